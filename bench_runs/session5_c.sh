#!/usr/bin/env bash
# Fifth session, call C: kernels. Issue 5: per 8B projection at 4096 tokens, the fused NF4 kernel, the same Triton
# kernel on a bf16 weight (no decoding: what the kernel's GEMM alone costs), the XLA paths and the bf16 matmul, all
# in one call (then 16384 tokens for the profile's path and bf16). Issue 10: the Gemma-2 attention rows with their
# compiled temporaries at T = 2048, 8192, 32768 (memory as the sequence grows). Returns $OUT/s5c.tgz.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L
t0=$(date +%s); el(){ echo "$1 $(( $(date +%s) - t0 ))s" >> $L/times.txt; }
timeout 200 python3 -m jaxsloth.bench.kernel_nf4_matmul --tokens 4096 \
  --impls pallas bf16_lora_pallas xla xla16 bf16_lora_xla --out $L/nf4.jsonl > $L/nf4.log 2>&1; el nf4_4096
timeout 90 python3 -m jaxsloth.bench.kernel_nf4_matmul --tokens 16384 --impls xla16 bf16_lora_xla \
  --out $L/nf4.jsonl >> $L/nf4.log 2>&1; el nf4_16384
timeout 200 python3 -m jaxsloth.bench.kernel_attention --only gemma2_9b --out $L/attn.jsonl > $L/attn.log 2>&1; el attn
tar czf $OUT/s5c.tgz -C $OUT logs && rm -rf $OUT/logs
