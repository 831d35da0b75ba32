#!/usr/bin/env bash
# GPU call 5 (2026-11-29): where the step time goes (profiler traces summarized by kind of kernel), and kernel
# choices for the 1B shape.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L; R=$L/step.jsonl; T=/tmp/traces
t0=$(date +%s); el(){ echo "$1 $(( $(date +%s) - t0 ))s" >> $L/times.txt; }
left(){ echo $(( 320 - ($(date +%s) - t0) )); }
S="python3 -m jaxsloth.bench.step --batch 2 --seq 2048 --profile h200 --steps 2 --warmup 1 --out $R"
timeout 110 $S --arch llama3.1-8b --quant nf4 --trace $T/8b_qlora >> $L/run.log 2>&1; el 8b_qlora
timeout 50 $S --arch llama3.2-1b --quant bf16 --remat dots --trace $T/1b_dots >> $L/run.log 2>&1; el 1b_dots
timeout 40 $S --arch llama3.2-1b --quant bf16 --remat dots --op cross_entropy=reference >> $L/run.log 2>&1; el 1b_ce_ref
timeout 40 $S --arch llama3.2-1b --quant bf16 --remat dots --op rms_norm=reference --op rope=reference >> $L/run.log 2>&1; el 1b_norm_ref
l=$(left); [ $l -gt 40 ] && timeout $l $S --arch gemma2-9b --quant bf16 --remat dots --trace $T/gemma_dots >> $L/run.log 2>&1; el gemma
for d in $T/*/; do n=$(basename $d); cp $d/summary.json $L/trace_$n.json 2>/dev/null; done
tar czf $OUT/call5.tgz -C $OUT logs
