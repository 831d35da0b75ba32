#!/usr/bin/env bash
# Fifth session, call B: the h200 profile with its new default, the unrolled layer loop (call A: 1B dots 68,458 ->
# 78,037 tok/s, Gemma-2-9B dots 10,420 -> 11,366). Gemma-2 against HF in the same call (the 3x target), the 8B QLoRA
# default with a trace (issue 7's breakdown under the current profile), the 8B remat choices for the lean target,
# the 1B again. Returns $OUT/s5b.tgz.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L; R=$L/step.jsonl
t0=$(date +%s); el(){ echo "$1 $(( $(date +%s) - t0 ))s" >> $L/times.txt; }
left(){ echo $(( 560 - ($(date +%s) - t0) )); }
S="python3 -m jaxsloth.bench.step --batch 2 --seq 2048 --profile h200 --steps 5 --warmup 1 --out $R"
timeout 90 $S --arch gemma2-9b --quant bf16 --remat dots >> $L/run.log 2>&1; el gemma_dots
timeout 120 python3 -m jaxsloth.bench.torch_baseline --arch gemma2-9b --system hf-peft --attn eager --steps 3 --warmup 1 --out $R >> $L/run.log 2>&1; el hf_gemma
timeout 90 $S --arch llama3.1-8b --quant nf4 --trace /tmp/t8b >> $L/run.log 2>&1; el 8b_default_trace
cp /tmp/t8b/summary.json $L/trace_8b_unrolled.json
timeout 40 $S --arch llama3.2-1b --quant bf16 --remat dots >> $L/run.log 2>&1; el 1b_dots
for r in offload full dots; do
  l=$(left); [ $l -gt 50 ] && timeout 70 $S --arch llama3.1-8b --quant nf4 --remat $r >> $L/run.log 2>&1; el 8b_$r
done
tar czf $OUT/s5b.tgz -C $OUT logs && rm -rf $OUT/logs
