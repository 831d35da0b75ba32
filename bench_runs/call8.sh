#!/usr/bin/env bash
# Session 4, call 2: the loss paths on the GPU (kernel and token-chunked, tests first), then issue 9's table at
# 16384 and 4096 tokens against the full-logits path; the 8B QLoRA step with the profile's NF4 path and with xla16
# (PEFT's 16-bit order) in the same call; RoPE at B2/B8 with the pipelined timing.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L; t0=$(date +%s); el(){ echo "$1 $(( $(date +%s) - t0 ))s" >> $L/times.txt; }
timeout 120 python3 -m pytest -q -m gpu tests/test_kernel_cross_entropy.py > $L/pytest.log 2>&1; el pytest_ce
timeout 330 python3 -m jaxsloth.bench.kernel_cross_entropy --tokens 16384 4096 --out $L/ce.jsonl > $L/ce.log 2>&1; el ce
S="python3 -m jaxsloth.bench.step --arch llama3.1-8b --quant nf4 --batch 2 --seq 2048 --profile h200 --steps 3 --warmup 1 --out $L/step.jsonl"
timeout 95 $S >> $L/run.log 2>&1; el step_xla
timeout 95 $S --op nf4_matmul=xla16 >> $L/run.log 2>&1; el step_xla16
timeout 45 python3 -m jaxsloth.bench.kernel_rope --batch 2 8 --out $L/rope.jsonl > $L/rope.log 2>&1; el rope
