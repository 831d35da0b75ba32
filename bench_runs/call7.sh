#!/usr/bin/env bash
# Session 4, call 1: the split dK/dV kernels on the GPU (correctness first), then tuned against the fused dK/dV
# at the Gemma-2 and Llama-3.1-8B shapes; each tune ends with `attention` fwd+bwd timed on the combined settings.
# Also the xla16 NF4 path's tests on the GPU.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L; t0=$(date +%s); el(){ echo "$1 $(( $(date +%s) - t0 ))s" >> $L/times.txt; }
nvidia-smi --query-gpu=name,driver_version --format=csv > $L/gpu.txt
timeout 150 python3 -m pytest -q -m gpu tests/test_kernel_attention.py -k split > $L/pytest.log 2>&1; el pytest_split
timeout 90 python3 -m pytest -q tests/test_kernel_nf4_matmul.py -k xla16 >> $L/pytest.log 2>&1; el pytest_xla16
T="python3 -m jaxsloth.bench.kernel_attention --tune --iters 10 --kernels dkv dkv_split --out $L/tune.jsonl"
timeout 130 $T --only "gemma2_9b:B=1,T=8192" > $L/tune.log 2>&1; el tune_gemma_8192
timeout 100 $T --only "gemma2_9b:B=2,T=2048" >> $L/tune.log 2>&1; el tune_gemma_b2
timeout 100 $T --only "llama3_8b:B=1,T=8192" >> $L/tune.log 2>&1; el tune_llama_8192
