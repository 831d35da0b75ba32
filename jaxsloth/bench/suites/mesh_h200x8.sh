#!/usr/bin/env bash
# The training step over several GPUs of one host (nvidia-h200-x8; the 1-, 2- and 4-GPU points run on the first
# GPUs of the same host, so every point of a curve shares the machine). Records: OUT/mesh.jsonl ("mesh" names the
# axes; tokens/s counts every GPU's tokens).
#   bash jaxsloth/bench/suites/mesh_h200x8.sh [--tree DIR] [--out DIR] WORKLOAD... [-- step flags for each run]
# WORKLOAD (one call of at most ten minutes each):
#   data    8B QLoRA, 2 x 2048 tokens per GPU, data parallel over 1, 2, 4 and 8 GPUs (90% efficiency: >= 7.2x at 8)
#   fsdp    the same with the frozen weights sharded (FSDP) over 1, 2, 4 and 8 GPUs
#   mixed   the same on a data=2, fsdp=4 mesh of 8 GPUs
#   70b1    Llama-3.1-70B-shape QLoRA, full remat, one GPU, 1 x 2048
#   70b8    the same, FSDP over 8 GPUs, 8 x 2048
# Context parallelism at 8 GPUs is long_context_cp_h200.sh context8.
source "$(dirname "$0")/common.sh" "$@"
NAMES=() EXTRA=()
for i in "${!ARGS[@]}"; do
  if [ "${ARGS[$i]}" = "--" ]; then EXTRA=("${ARGS[@]:$((i + 1))}"); break; fi
  NAMES+=("${ARGS[$i]}")
done
S=("$PY" -m jaxsloth.bench.step --seq 2048 --profile h200 --quant nf4 --steps 4 --warmup 1 --out "$OUTDIR/mesh.jsonl")
# on N NAME LIMIT FLAGS...: one step run on the first N GPUs.
on() {
  local n=$1 name=$2 limit=$3
  shift 3
  timed "$name" "$limit" env CUDA_VISIBLE_DEVICES="$(seq -s, 0 $((n - 1)))" "${S[@]}" "$@" "${EXTRA[@]}"
}
[ ${#NAMES[@]} -gt 0 ] || { echo "name a workload: data, fsdp, mixed, 70b1 or 70b8" >&2; exit 2; }
for w in "${NAMES[@]}"; do
  case "$w" in
    data | fsdp)
      for n in 1 2 4 8; do on "$n" "8b_${w}$n" 140 --arch llama3.1-8b --batch $((2 * n)) --mesh "$w=$n"; done ;;
    mixed) on 8 8b_data2_fsdp4 140 --arch llama3.1-8b --batch 16 --mesh data=2,fsdp=4 ;;
    70b1) on 1 70b_1gpu 590 --arch llama3.1-70b --remat full --batch 1 ;;
    70b8) on 8 70b_fsdp8 590 --arch llama3.1-70b --remat full --batch 8 --mesh fsdp=8 ;;
    *) echo "unknown workload $w: choose data, fsdp, mixed, 70b1 or 70b8" >&2; exit 2 ;;
  esac
done
