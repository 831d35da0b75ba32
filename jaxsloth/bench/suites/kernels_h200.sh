#!/usr/bin/env bash
# The other kernels on one H200, each against its XLA reference at the 8B step's sizes (about six minutes):
# RMSNorm, SwiGLU, RoPE, the LM-head loss and the NF4 projections. Records: OUT/kernels.jsonl.
#   bash jaxsloth/bench/suites/kernels_h200.sh [--tree DIR] [--out DIR]
# The NF4 Mosaic GPU kernel has its own suite (nf4_mosaic_h200.sh: this one already takes about six minutes).
source "$(dirname "$0")/common.sh" "$@"
K="$OUTDIR/kernels.jsonl"
timed rms_norm 50 "$PY" -m jaxsloth.bench.kernel_rms_norm --rows 16384 --out "$OUTDIR/rms_norm.jsonl"
timed glu 50 "$PY" -m jaxsloth.bench.kernel_glu --rows 16384 --out "$OUTDIR/glu.jsonl"
timed rope 45 "$PY" -m jaxsloth.bench.kernel_rope --batch 2 8 --out "$OUTDIR/rope.jsonl"
timed cross_entropy 150 "$PY" -m jaxsloth.bench.kernel_cross_entropy --tokens 4096 --out "$OUTDIR/cross_entropy.jsonl"
timed nf4_matmul 120 "$PY" -m jaxsloth.bench.kernel_nf4_matmul --impls xla16 bf16_lora_xla --tokens 4096 16384 \
  --out "$OUTDIR/nf4_matmul.jsonl"
cat "$OUTDIR"/{rms_norm,glu,rope,cross_entropy,nf4_matmul}.jsonl > "$K" 2>/dev/null
