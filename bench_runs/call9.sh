#!/usr/bin/env bash
# Session 4, call 3: the new h200 profile (nf4_matmul=xla16, cross_entropy=chunked) end to end: 8B QLoRA beside
# the Pallas loss in the same call and at full / dots remat, Gemma-2-9B and 1B LoRA, the Mistral-7B showcase beside
# HF + PEFT, and Unsloth's 8B QLoRA (carried wheels) when time is left.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 PYTHONPATH=$PWD HF_HUB_OFFLINE=1
L=$OUT/logs; mkdir -p $L; R=$L/step.jsonl
t0=$(date +%s); el(){ echo "$1 $(( $(date +%s) - t0 ))s" >> $L/times.txt; }
left(){ echo $(( 575 - ($(date +%s) - t0) )); }
(python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl > $L/pip.log 2>&1; echo done >> $L/pip.log) &
S="python3 -m jaxsloth.bench.step --batch 2 --seq 2048 --profile h200 --steps 3 --warmup 1 --out $R"
timeout 60 $S --arch llama3.1-8b --quant nf4 >> $L/run.log 2>&1; el 8b
timeout 60 $S --arch llama3.1-8b --quant nf4 --op cross_entropy=pallas >> $L/run.log 2>&1; el 8b_pallas_loss
timeout 60 $S --arch llama3.1-8b --quant nf4 --remat full >> $L/run.log 2>&1; el 8b_full
timeout 60 $S --arch llama3.1-8b --quant nf4 --remat dots >> $L/run.log 2>&1; el 8b_dots
timeout 90 $S --arch gemma2-9b --quant bf16 --remat dots >> $L/run.log 2>&1; el gemma_dots
timeout 90 $S --arch gemma2-9b --quant bf16 >> $L/run.log 2>&1; el gemma_attn_dots
timeout 45 $S --arch llama3.2-1b --quant bf16 --remat dots >> $L/run.log 2>&1; el 1b_dots
timeout 60 $S --arch mistral-7b --quant bf16 >> $L/run.log 2>&1; el mistral
timeout 100 python3 -m jaxsloth.bench.torch_baseline --arch mistral-7b --system hf-peft --steps 3 --warmup 1 --out $R >> $L/run.log 2>&1; el hf_mistral
l=$(left); [ $l -gt 60 ] && PYTHONPATH=/tmp/site:$PWD timeout $l python3 -m jaxsloth.bench.unsloth_baseline --arch llama3.1-8b --quant nf4 --steps 3 --warmup 1 --out $R >> $L/unsloth.log 2>&1; el unsloth
