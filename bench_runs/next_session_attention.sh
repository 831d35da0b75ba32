#!/usr/bin/env bash
# Prepared for the next session's first device call (not run yet), under 10 minutes:
#   bash bench_runs/next_session_attention.sh     # returns $OUT/next_attn.tgz
# What the sixth session left unverified (BENCHMARKS.md, sixth session):
# - the GPU attention tests whole: the 128-key Mosaic forward (the d128 default) and the ragged d80 forward case were
#   cut by call E's time limit;
# - the Gemma-2-9B `dots` step with the Mosaic forward (call B's 11,760 tok/s had the Triton forward);
# - the 8B and Gemma-2 attention table at T = 2048 / 8192 / 32768 with the final kernels (call C predates the Mosaic
#   forward and the 128-key dK/dV), cuDNN beside it;
# - the Mosaic dQ kernel (written after the last device call: interpreter- and lowering-tested only): its GPU tests
#   run with the file's, then its tiles against the Triton dQ at the 8B shape, the tune's last row being forward+
#   backward on the best of each kernel (8B: 4.51 ms against cuDNN's 4.00 with the Triton dQ; 0.9x needs <= 4.44).
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L
t0=$(date +%s); el(){ echo "$1 $(( $(date +%s) - t0 ))s" >> $L/times.txt; }
timeout 280 python3 -m pytest -q -m gpu tests/test_kernel_attention.py > $L/pytest.txt 2>&1; el pytest
tail -3 $L/pytest.txt
timeout 120 python3 -m jaxsloth.bench.step --arch gemma2-9b --quant bf16 --remat dots --batch 2 --seq 2048 \
  --profile h200 --steps 5 --warmup 1 --out $L/step.jsonl > $L/step.log 2>&1; el gemma_step
tail -1 $L/step.log | cut -c1-300
timeout 60 python3 -m jaxsloth.bench.kernel_attention --tune --only "llama3_8b:B=1,T=8192" --kernels dq dq_mosaic \
  --out $L/tune_dq.jsonl > $L/tune_dq.log 2>&1; el tune_dq
timeout 150 python3 -m jaxsloth.bench.kernel_attention --out $L/attn.jsonl > $L/attn.log 2>&1; el attn
cat $L/times.txt
tar czf $OUT/next_attn.tgz -C $OUT logs && rm -rf $OUT/logs
