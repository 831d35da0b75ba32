#!/usr/bin/env bash
# Fifth session, call A: the layer loop unrolled over per-layer weight arrays (--unroll-layers) against the scan.
# The fourth session's traces of the scan put 27.5 ms of the Gemma-2-9B dots step (1,016 memcpy128 kernels, ~24 per
# layer), 4.5 ms of the 1B's and 5.3 ms of the 8B QLoRA's in copies whose volume matches each layer's weights copied
# out of the stacked [L, ...] arrays twice per step (forward and backward scans); XLA's dynamic-slice fusion flag
# changed nothing (same call). Returns $OUT/s5a.tgz.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L; R=$L/step.jsonl
t0=$(date +%s); el(){ echo "$1 $(( $(date +%s) - t0 ))s" >> $L/times.txt; }
S="python3 -m jaxsloth.bench.step --batch 2 --seq 2048 --profile h200 --steps 5 --warmup 1 --out $R"
timeout 60 $S --arch llama3.2-1b --quant bf16 --remat dots >> $L/run.log 2>&1; el 1b_scan
timeout 100 $S --arch llama3.2-1b --quant bf16 --remat dots --unroll-layers --trace /tmp/t1b >> $L/run.log 2>&1; el 1b_unrolled
cp /tmp/t1b/summary.json $L/trace_1b_unrolled.json
timeout 200 $S --arch gemma2-9b --quant bf16 --remat dots --unroll-layers >> $L/run.log 2>&1; el gemma_unrolled
timeout 80 $S --arch gemma2-9b --quant bf16 --remat dots >> $L/run.log 2>&1; el gemma_scan
timeout 150 $S --arch llama3.1-8b --quant nf4 --unroll-layers >> $L/run.log 2>&1; el 8b_unrolled
tar czf $OUT/s5a.tgz -C $OUT logs && rm -rf $OUT/logs
