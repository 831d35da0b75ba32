#!/usr/bin/env bash
# GPU call 4 (2026-11-29): NF4/LoRA kernel GPU tests with IEEE f32 references; the attention table at every length.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L
t0=$(date +%s); el(){ echo "$1 $(( $(date +%s) - t0 ))s" >> $L/times.txt; }
timeout 150 python3 -m pytest -q -m gpu tests/test_kernel_lora_matmul.py tests/test_kernel_nf4_matmul.py > $L/pytest.log 2>&1; el pytest
timeout 200 python3 -m jaxsloth.bench.kernel_attention --out $L/attn.jsonl > $L/attn.log 2>&1; el attn
tar czf $OUT/call4.tgz -C $OUT logs
