#!/usr/bin/env bash
# Prepared for the next session's device time (not run yet): the same-call baselines issue 7 still lacks.
# First, here: bash bench_runs/fetch_wheels.sh; then run(carry=[".whl"], command="bash bench_runs/next_baselines.sh").
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=/tmp/site:$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
L=$OUT/logs; mkdir -p $L; R=$L/step.jsonl
t0=$(date +%s); el(){ echo "$1 $(( $(date +%s) - t0 ))s" >> $L/times.txt; }
S="python3 -m jaxsloth.bench.step --batch 2 --seq 2048 --profile h200 --steps 3 --warmup 1 --out $R"
timeout 90 $S --arch llama3.1-8b --quant nf4 >> $L/run.log 2>&1; el jaxsloth_8b
timeout 120 python3 -m jaxsloth.bench.torch_baseline --arch llama3.1-8b --system hf-peft-bnb --out $R >> $L/run.log 2>&1; el hf_bnb_8b
timeout 150 python3 -m jaxsloth.bench.unsloth_baseline --arch llama3.1-8b --quant nf4 --out $R >> $L/run.log 2>&1; el unsloth_8b
timeout 90 $S --arch mistral-7b --quant nf4 >> $L/run.log 2>&1; el jaxsloth_mistral
timeout 120 python3 -m jaxsloth.bench.torch_baseline --arch mistral-7b --system hf-peft --out $R >> $L/run.log 2>&1; el hf_mistral
tar czf $OUT/next_baselines.tgz -C $OUT logs
