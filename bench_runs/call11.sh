#!/usr/bin/env bash
# Session 4, call 5 (short: the last device minutes): the "dots" policy now keeps the attention forward's outputs
# (no second attention forward in the backward). cuDNN's case tested on the GPU, then the dots steps (compare with
# call 3's 10,124 / 13,071 / 67,472 tok/s under the old policy) and HF's Gemma-2 baseline in the same call.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L; R=$L/step.jsonl
t0=$(date +%s); el(){ echo "$1 $(( $(date +%s) - t0 ))s" >> $L/times.txt; }
left(){ echo $(( 240 - ($(date +%s) - t0) )); }
S="python3 -m jaxsloth.bench.step --batch 2 --seq 2048 --profile h200 --steps 3 --warmup 1 --remat dots --out $R"
timeout 40 $S --arch gemma2-9b --quant bf16 >> $L/run.log 2>&1; el gemma_dots
timeout 35 $S --arch llama3.1-8b --quant nf4 >> $L/run.log 2>&1; el 8b_dots
timeout 25 $S --arch llama3.2-1b --quant bf16 >> $L/run.log 2>&1; el 1b_dots
timeout 30 python3 -m pytest -q -m gpu tests/test_models_kernels.py -k cudnn > $L/pytest.log 2>&1; el pytest
l=$(left); [ $l -gt 60 ] && timeout $l python3 -m jaxsloth.bench.torch_baseline --arch gemma2-9b --system hf-peft --attn eager --steps 2 --warmup 1 --out $R >> $L/run.log 2>&1; el hf_gemma
