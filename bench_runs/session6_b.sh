#!/usr/bin/env bash
# Sixth session, call B: the Mosaic dK/dV kernel as the d256 16-bit default. GPU attention tests (every case,
# the default path now Mosaic for Gemma-2's d256 bf16), the Gemma-2 shapes through `attention` with XLA beside
# them (T = 2048 / 8192 / 32768, memory), the 8B shape's dK/dV (Triton against Mosaic), and the Gemma-2-9B LoRA
# step (`dots`, the profile's unrolled loop) to see the kernel end to end (fifth session: 11,360 tok/s).
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L
t0=$(date +%s); el(){ echo "$1 $(( $(date +%s) - t0 ))s" >> $L/times.txt; }
timeout 210 python3 -m pytest -q -m gpu tests/test_kernel_attention.py > $L/pytest.txt 2>&1; el pytest
tail -5 $L/pytest.txt
timeout 150 python3 -m jaxsloth.bench.kernel_attention --only gemma2_9b --out $L/attn.jsonl > $L/attn.log 2>&1; el attn
cut -c1-330 $L/attn.log
timeout 130 python3 -m jaxsloth.bench.step --arch gemma2-9b --quant bf16 --remat dots --batch 2 --seq 2048 --profile h200 --steps 5 --warmup 1 --out $L/step.jsonl > $L/step.log 2>&1; el step
tail -2 $L/step.log | cut -c1-600
timeout 80 python3 -m jaxsloth.bench.kernel_attention --tune --only "llama3_8b:B=1,T=8192" --kernels dkv dkv_mosaic --out $L/tune_8b.jsonl > $L/tune_8b.log 2>&1; el tune_8b
grep -h '"kernel": "dkv_mosaic"\|"best"' $L/tune_8b.jsonl | cut -c1-300
cat $L/times.txt
tar czf $OUT/s6b.tgz -C $OUT logs && rm -rf $OUT/logs
