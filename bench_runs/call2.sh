#!/usr/bin/env bash
# GPU call 2 (2026-11-29): GPU kernel tests with the tuned attention tiles, tuning round 2, kernel tables.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L
t0=$(date +%s); el(){ echo "$1 $(( $(date +%s) - t0 ))s" >> $L/times.txt; }
timeout 200 python3 -m pytest -q -m gpu tests/test_kernel_attention.py > $L/pytest_attn.log 2>&1; el pytest_attn
timeout 100 python3 -m jaxsloth.bench.kernel_attention --tune --iters 10 --only "gemma2_9b:B=1,T=8192" --out $L/attn_tune2.jsonl > $L/tune2.log 2>&1; el tune_gemma
timeout 80 python3 -m jaxsloth.bench.kernel_attention --tune --iters 10 --only "llama3_8b:B=1,T=8192" --out $L/attn_tune2.jsonl >> $L/tune2.log 2>&1; el tune_llama
timeout 60 python3 -m jaxsloth.bench.kernel_attention --only "T=8192" --out $L/attn.jsonl > $L/attn.log 2>&1; el attn_table
timeout 30 python3 -m jaxsloth.bench.kernel_glu --rows 16384 --out $L/norm_glu.jsonl > $L/glu.log 2>&1
timeout 30 python3 -m jaxsloth.bench.kernel_rms_norm --rows 16384 --out $L/norm_glu2.jsonl > $L/rms.log 2>&1; el glu_rms
left=$(( 570 - ($(date +%s) - t0) ))
[ $left -gt 20 ] && timeout $left python3 -m pytest -q -m gpu tests/test_kernel_lora_matmul.py tests/test_kernel_glu.py tests/test_kernel_rms_norm.py > $L/pytest_other.log 2>&1; el pytest_other
cat $L/norm_glu2.jsonl >> $L/norm_glu.jsonl; rm $L/norm_glu2.jsonl
tar czf $OUT/call2.tgz -C $OUT logs
