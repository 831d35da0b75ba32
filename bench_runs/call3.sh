#!/usr/bin/env bash
# GPU call 3 (2026-11-29): LoRA-linear GPU tests, end-to-end steps with the tuned attention (Gemma-2) and the
# 1B shape, each beside its PyTorch baseline in the same call.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L; R=$L/step.jsonl
t0=$(date +%s); el(){ echo "$1 $(( $(date +%s) - t0 ))s" >> $L/times.txt; }
left(){ echo $(( 575 - ($(date +%s) - t0) )); }
S="python3 -m jaxsloth.bench.step --batch 2 --seq 2048 --profile h200 --steps 3 --warmup 1 --quant bf16 --out $R"
timeout 90 python3 -m pytest -q -m gpu tests/test_kernel_lora_matmul.py > $L/pytest_lora.log 2>&1; el pytest
timeout 120 $S --arch gemma2-9b >> $L/run.log 2>&1; el gemma_attn_dots
timeout 130 python3 -m jaxsloth.bench.torch_baseline --arch gemma2-9b --system hf-peft --attn eager --out $R >> $L/run.log 2>&1; el hf_gemma
timeout 60 $S --arch llama3.2-1b >> $L/run.log 2>&1; el 1b_attn_dots
timeout 60 $S --arch llama3.2-1b --remat none >> $L/run.log 2>&1; el 1b_none
timeout 60 $S --arch llama3.2-1b --remat dots >> $L/run.log 2>&1; el 1b_dots
timeout 60 python3 -m jaxsloth.bench.torch_baseline --arch llama3.2-1b --system hf-peft --out $R >> $L/run.log 2>&1; el hf_1b
l=$(left); [ $l -gt 30 ] && timeout $l $S --arch gemma2-9b --remat dots >> $L/run.log 2>&1; el gemma_dots
tar czf $OUT/call3.tgz -C $OUT logs
