#!/usr/bin/env bash
# Fifth session, call D: the 8B QLoRA step under the final h200 profile (layer_loop "auto": unrolled for attn_dots
# and dots, the scan for full and offload) beside Unsloth 2026.10.9 (carried wheels) in the same call.
# Returns $OUT/s5d.tgz.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 PYTHONPATH=$PWD HF_HUB_OFFLINE=1
L=$OUT/logs; mkdir -p $L; R=$L/step.jsonl
t0=$(date +%s); el(){ echo "$1 $(( $(date +%s) - t0 ))s" >> $L/times.txt; }
left(){ echo $(( 560 - ($(date +%s) - t0) )); }
(python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl > $L/pip.log 2>&1; echo done >> $L/pip.log) &
S="python3 -m jaxsloth.bench.step --arch llama3.1-8b --quant nf4 --batch 2 --seq 2048 --profile h200 --steps 5 --warmup 1 --out $R"
timeout 80 $S >> $L/run.log 2>&1; el 8b_default
timeout 80 $S --remat dots >> $L/run.log 2>&1; el 8b_dots
timeout 60 $S --remat full >> $L/run.log 2>&1; el 8b_full
timeout 60 $S --remat offload >> $L/run.log 2>&1; el 8b_offload
l=$(left); [ $l -gt 60 ] && PYTHONPATH=/tmp/site:$PWD timeout $l python3 -m jaxsloth.bench.unsloth_baseline --arch llama3.1-8b --quant nf4 --steps 5 --warmup 1 --out $R >> $L/unsloth.log 2>&1; el unsloth
tar czf $OUT/s5d.tgz -C $OUT logs && rm -rf $OUT/logs
