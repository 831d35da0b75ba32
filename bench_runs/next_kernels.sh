#!/usr/bin/env bash
# Prepared for the next session's device time (not run yet): issue 9's remaining measurements with the pipelined
# timing (timing.kernel_ms): the fused loss at 4096 and 16384 tokens against the full-logits path (time and peak
# temporaries), its launch sweep, and RoPE at batch 2 and 8.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L
timeout 240 python3 -m jaxsloth.bench.kernel_cross_entropy --tokens 4096 16384 --out $L/ce.jsonl > $L/ce.log 2>&1
timeout 150 python3 -m jaxsloth.bench.kernel_cross_entropy --sweep --out $L/ce_sweep.jsonl > $L/ce_sweep.log 2>&1
timeout 60 python3 -m jaxsloth.bench.kernel_rope --batch 2 8 --out $L/rope.jsonl > $L/rope.log 2>&1
tar czf $OUT/next_kernels.tgz -C $OUT logs
