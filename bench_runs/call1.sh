#!/usr/bin/env bash
# GPU call 1 (2026-11-29): per-kernel attention tuning, norm/GLU sweeps, LoRA linear kernels.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $L/gpu.txt 2>&1
python3 -c "import jax,flax,optax,torch,transformers;print(jax.__version__,flax.__version__,optax.__version__,torch.__version__,transformers.__version__)" >> $L/gpu.txt 2>&1
t0=$(date +%s); el(){ echo "$1 $(( $(date +%s) - t0 ))s" >> $L/times.txt; }
timeout 200 python3 -m jaxsloth.bench.kernel_attention --tune --iters 10 --only "gemma2_9b:B=1,T=8192" --out $L/attn_tune.jsonl > $L/attn_tune_gemma.log 2>&1; el attn_gemma
timeout 50 python3 -m jaxsloth.bench.kernel_rms_norm --rows 16384 --out $L/rms.jsonl > $L/rms.log 2>&1
timeout 60 python3 -m jaxsloth.bench.kernel_rms_norm --sweep --rows 16384 --out $L/rms_sweep.jsonl > $L/rms_sweep.log 2>&1; el rms
timeout 50 python3 -m jaxsloth.bench.kernel_glu --rows 16384 --out $L/glu.jsonl > $L/glu.log 2>&1
timeout 60 python3 -m jaxsloth.bench.kernel_glu --sweep --rows 16384 --out $L/glu_sweep.jsonl > $L/glu_sweep.log 2>&1; el glu
timeout 120 python3 -m jaxsloth.bench.kernel_attention --tune --iters 10 --only "llama3_8b:B=1,T=8192" --out $L/attn_tune.jsonl > $L/attn_tune_llama.log 2>&1; el attn_llama
left=$(( 575 - ($(date +%s) - t0) ))
[ $left -gt 20 ] && timeout $left python3 -m jaxsloth.bench.kernel_nf4_matmul --impls xla bf16_lora_xla bf16_lora_pallas --tokens 4096 --out $L/lora.jsonl > $L/lora.log 2>&1; el lora
tar czf $OUT/call1.tgz -C $OUT logs
