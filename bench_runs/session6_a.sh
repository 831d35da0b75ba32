#!/usr/bin/env bash
# Sixth session, call A: the Mosaic GPU dK/dV kernel (pallas_kernels/attention_mgpu.py) on the H200. Correctness
# first (its GPU tests against the reference), then each tile alone at the Gemma-2 and 8B shapes, T = 8192, with
# forward+backward through `attention` on the best tiles (the tuner's last row), then the Triton dK/dV
# defaults re-timed in the same call for the side-by-side.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L
t0=$(date +%s); el(){ echo "$1 $(( $(date +%s) - t0 ))s" >> $L/times.txt; }
timeout 200 python3 -m pytest -q -m gpu -x tests/test_kernel_attention.py -k "mosaic and gemma2" > $L/pytest.txt 2>&1; el pytest
tail -40 $L/pytest.txt
timeout 200 python3 -m jaxsloth.bench.kernel_attention --tune --only "gemma2_9b:B=1,T=8192" --kernels dkv dkv_mosaic --out $L/tune_gemma.jsonl > $L/tune_gemma.log 2>&1; el tune_gemma
tail -5 $L/tune_gemma.log | cut -c1-600
timeout 120 python3 -m jaxsloth.bench.kernel_attention --tune --only "llama8b:B=1,T=8192" --kernels dkv dkv_mosaic --out $L/tune_8b.jsonl > $L/tune_8b.log 2>&1; el tune_8b
tail -3 $L/tune_8b.log | cut -c1-400
cat $L/times.txt
tar czf $OUT/s6a.tgz -C $OUT logs && rm -rf $OUT/logs
