#!/usr/bin/env bash
# The NF4 projection's Mosaic GPU kernels on one H200 (at most about seven minutes): their output and gradients
# against the reference first (`check ... PASS/FAIL` lines in logs/nf4_mosaic_check.log, exit 1 on a failure), then
# forward and forward+backward at the 8B QLoRA shapes (4096 tokens; q, k_v, gate_up, down; LoRA r=16) against the XLA
# path (xla16) and the Triton kernel (pallas), the 8B QLoRA step with the kernels and with the XLA path, and last the
# kernels' other configurations (LoRA A fused into the forward; 128-row tiles).
# Records: OUT/nf4_mosaic.jsonl, OUT/nf4_mosaic_step.jsonl, OUT/nf4_mosaic_tiles.jsonl.
#   bash jaxsloth/bench/suites/nf4_mosaic_h200.sh [--tree DIR] [--out DIR] [step]   (step: the two steps alone)
source "$(dirname "$0")/common.sh" "$@"
N=("$PY" -m jaxsloth.bench.kernel_nf4_matmul --tokens 4096 --proj q k_v gate_up down)
S=("$PY" -m jaxsloth.bench.step --batch 2 --seq 2048 --profile h200 --steps 5 --warmup 1 --arch llama3.1-8b --quant nf4)
steps_only=${ARGS[0]:-}
if [ "$steps_only" != step ]; then
  timed nf4_mosaic_check 50 "${N[@]}" --check --impls mosaic
  timed nf4_mosaic 140 "${N[@]}" --impls mosaic xla16 pallas --out "$OUTDIR/nf4_mosaic.jsonl"
fi
timed 8b_qlora_mosaic 150 "${S[@]}" --op nf4_matmul=mosaic --out "$OUTDIR/nf4_mosaic_step.jsonl"
timed 8b_qlora_xla16 80 "${S[@]}" --out "$OUTDIR/nf4_mosaic_step.jsonl"
[ "$steps_only" = step ] || timed nf4_mosaic_tiles 45 "${N[@]}" --sweep --impls mosaic --out "$OUTDIR/nf4_mosaic_tiles.jsonl"
