#!/usr/bin/env bash
# Prepared for the next session's device time (not run yet): the split dK/dV kernels (AttentionBlocks.split_dkv)
# on the GPU, correctness first, then tuned against the fused dK/dV at the Gemma-2 shapes. If the split pair wins,
# make it for_head_dim's d256 default and re-time `python -m jaxsloth.bench.kernel_attention --only T=8192`.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L
timeout 150 python3 -m pytest -q -m gpu tests/test_kernel_attention.py -k split > $L/pytest_split.log 2>&1
timeout 150 python3 -m jaxsloth.bench.kernel_attention --tune --iters 10 --only "gemma2_9b:B=1,T=8192" --out $L/tune.jsonl > $L/tune.log 2>&1
timeout 120 python3 -m jaxsloth.bench.kernel_attention --tune --iters 10 --only "gemma2_9b:B=2,T=2048" --out $L/tune.jsonl >> $L/tune.log 2>&1
timeout 120 python3 -m jaxsloth.bench.kernel_attention --tune --iters 10 --only "llama3_8b:B=1,T=8192" --out $L/tune.jsonl >> $L/tune.log 2>&1
tar czf $OUT/next_attention.tgz -C $OUT logs
