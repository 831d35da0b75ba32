#!/usr/bin/env bash
# Prepared for the next session's device time (not run yet), one call of under 10 minutes:
#   bash bench_runs/next_session.sh     # returns $OUT/next.tgz
# What the fifth session left untried (see BENCHMARKS.md, fifth session):
# - XLA's Triton GEMM for every GEMM: whether it takes the NF4 decode into its operand load (the 8B step's NF4
#   dequantization costs ~19 ms against bf16 GEMMs; look for gemm_fusion kernels in the trace's kernel names);
# - dots_layers = 17 (k = 16 ran 12,682 tok/s at 15.38 GiB, k = 18 13,044 at 15.88; bitsandbytes' peak is 15.7);
# - the Gemma-2 `dots` step's breakdown under the unrolled loop (its last trace is of the scan);
# - the unrolled `full` step with the latency-hiding scheduler off (does the unrolled program's extra 0.7 GiB come
#   from the scheduler overlapping layers?).
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L; R=$L/step.jsonl
t0=$(date +%s); el(){ echo "$1 $(( $(date +%s) - t0 ))s" >> $L/times.txt; }
S="python3 -m jaxsloth.bench.step --batch 2 --seq 2048 --profile h200 --steps 5 --warmup 1 --out $R"
XLA_FLAGS=--xla_gpu_triton_gemm_any=true timeout 110 $S --arch llama3.1-8b --quant nf4 --trace /tmp/tany \
  >> $L/run.log 2>&1; el 8b_triton_gemm_any
cp /tmp/tany/summary.json $L/trace_8b_triton_gemm_any.json
timeout 90 $S --arch llama3.1-8b --quant nf4 --dots-layers 17 >> $L/run.log 2>&1; el 8b_k17
timeout 110 $S --arch gemma2-9b --quant bf16 --remat dots --trace /tmp/tgemma >> $L/run.log 2>&1; el gemma_trace
cp /tmp/tgemma/summary.json $L/trace_gemma_dots_unrolled.json
XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=false timeout 90 $S --arch llama3.1-8b --quant nf4 --remat full \
  --layer-loop unrolled >> $L/run.log 2>&1; el 8b_full_unrolled_no_lhs
tar czf $OUT/next.tgz -C $OUT logs && rm -rf $OUT/logs
