#!/usr/bin/env bash
# Context parallelism (ring attention over the mesh's "context" axis) and the longest single-GPU step, 8B QLoRA at
# batch 1 with the long-context settings (offloaded checkpoints, MLP and loss tiles). Records:
# OUT/long_context_cp.jsonl (one jaxsloth.bench.step record per run; "mesh" names the axes).
#   bash jaxsloth/bench/suites/long_context_cp_h200.sh [--tree DIR] [--out DIR] [WORKLOAD] [--seq T] [step flags]
# WORKLOAD (default ring1):
#   ring1     one H200, 1 x 65,536: the plain step (no mesh), the one-device mesh (its scanned layer loop), and the
#             ring attention path on a context axis of size 1 (--context-axis): that the ring costs nothing is
#             ring1 against mesh1. About six minutes.
#   longest   one H200, the single-GPU longest step, T default 450,000 (the fit of the measured steps says a step
#             takes about ten minutes there); the step alone after an ahead-of-time compile is the measurement.
#   context2  two H200s: context=2, T default 600,000.
#   context8  eight H200s: context=8, T default 1,048,576.
# --seq T replaces the workload's length; other flags go to every jaxsloth.bench.step run (e.g. --compile-only for
# XLA's memory plan alone, --remat-group 2).
source "$(dirname "$0")/common.sh" "$@"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95  # above JAX's default cap of 75%: the longest sequences need the card
# The offloaded layer inputs are 32 x T x 4096 x 2 bytes of pinned host memory (96 GiB at 393,216 tokens), above
# the host allocator's default 64 GB; the 128 GiB machine leaves the process room beside 112.
export XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB=${XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB:-112}
WORKLOAD=ring1
if [ ${#ARGS[@]} -gt 0 ] && [ "${ARGS[0]#--}" = "${ARGS[0]}" ]; then
  WORKLOAD=${ARGS[0]}
  ARGS=("${ARGS[@]:1}")
fi
S=("$PY" -m jaxsloth.bench.step --arch llama3.1-8b --quant nf4 --batch 1 --profile h200 --long-context
  --out "$OUTDIR/long_context_cp.jsonl")
case "$WORKLOAD" in
  ring1)
    R=("${S[@]}" --seq 65536 --steps 2 --warmup 1)
    timed plain_65536 140 "${R[@]}" "${ARGS[@]}"
    timed mesh1_65536 140 "${R[@]}" --mesh data=1 "${ARGS[@]}"
    timed ring1_65536 140 "${R[@]}" --mesh context=1 --context-axis "${ARGS[@]}"
    ;;
  longest)
    timed longest 595 "${S[@]}" --seq 450000 --steps 0 --warmup 0 "${ARGS[@]}"
    ;;
  context2)
    timed context2 595 "${S[@]}" --seq 600000 --steps 0 --warmup 0 --mesh context=2 "${ARGS[@]}"
    ;;
  context8)
    timed context8 595 "${S[@]}" --seq 1048576 --steps 0 --warmup 0 --mesh context=8 "${ARGS[@]}"
    ;;
  *)
    echo "unknown workload $WORKLOAD: ring1, longest, context2 or context8" >&2
    exit 2
    ;;
esac
