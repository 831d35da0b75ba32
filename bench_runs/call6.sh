#!/usr/bin/env bash
# GPU call 6 (2026-11-29): attention tiles at the training shape of the Gemma-2 step (B2 x T2048), and that step
# with those tiles against the default tiles (both in this call).
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L; R=$L/step.jsonl
t0=$(date +%s); el(){ echo "$1 $(( $(date +%s) - t0 ))s" >> $L/times.txt; }
timeout 100 python3 -m jaxsloth.bench.kernel_attention --tune --iters 10 --only "gemma2_9b:B=2,T=2048" --out $L/tune.jsonl > $L/tune.log 2>&1; el tune
S="--arch gemma2-9b --quant bf16 --remat dots --batch 2 --seq 2048 --profile h200 --steps 2 --warmup 1 --out $R"
timeout 50 python3 bench_runs/tiles_step.py $L/tune.jsonl "gemma2_9b:B=2,T=2048" 256 -- $S >> $L/run.log 2>&1; el tuned_step
timeout 45 python3 -m jaxsloth.bench.step $S >> $L/run.log 2>&1; el default_step
tar czf $OUT/call6.tgz -C $OUT logs
