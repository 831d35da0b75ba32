#!/usr/bin/env bash
# Prepared for the next session's device time (not run yet): the PEFT-order NF4 path (nf4_matmul="xla16", no f32
# [tokens, N] arrays) against the profile's f32 path, per projection and in the 8B QLoRA step, with traces.
# If xla16 is faster and the step's first loss agrees, make it the GPU profiles' nf4_matmul and record both here.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L; R=$L/step.jsonl
timeout 120 python3 -m jaxsloth.bench.kernel_nf4_matmul --impls xla xla16 bf16_lora_xla --tokens 4096 --out $L/nf4.jsonl > $L/nf4.log 2>&1
S="python3 -m jaxsloth.bench.step --arch llama3.1-8b --quant nf4 --batch 2 --seq 2048 --profile h200 --steps 3 --warmup 1 --out $R"
timeout 100 $S --trace /tmp/t_xla >> $L/run.log 2>&1
timeout 100 $S --op nf4_matmul=xla16 --trace /tmp/t_xla16 >> $L/run.log 2>&1
cp /tmp/t_xla/summary.json $L/trace_xla.json; cp /tmp/t_xla16/summary.json $L/trace_xla16.json
timeout 100 $S --op nf4_matmul=xla16 --remat dots >> $L/run.log 2>&1
# XLA's own Triton GEMM may take the dequantization into its operand load (the 8B trace shows XLA already emitting
# some GEMMs as "gemm_fusion_dot_general" kernels); this flag lets its autotuner consider that for every GEMM.
XLA_FLAGS=--xla_gpu_triton_gemm_any=true timeout 120 $S --trace /tmp/t_any >> $L/run.log 2>&1
XLA_FLAGS=--xla_gpu_triton_gemm_any=true timeout 120 $S --op nf4_matmul=xla16 >> $L/run.log 2>&1
cp /tmp/t_any/summary.json $L/trace_triton_gemm_any.json
tar czf $OUT/next.tgz -C $OUT logs
