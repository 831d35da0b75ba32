#!/usr/bin/env bash
# One long sequence through the 8B QLoRA step at batch 1 (offloaded checkpoints, MLP and loss in tiles): the first
# step after an ahead-of-time compile is the measurement. Records: OUT/long_context.jsonl.
#   bash jaxsloth/bench/suites/long_context.sh [--tree DIR] [--out DIR] [--seq T] [--remat-group 2] [--compile-only]
# Default T = 131072 (about two minutes). Steps grow quadratically with T: 327680 takes about five minutes,
# 600000 would take longer than a device command may run, so ask it with --compile-only (XLA's memory plan).
source "$(dirname "$0")/common.sh" "$@"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95  # above JAX's default cap of 75%: the longest sequences need the card
timed long_context 590 "$PY" -m jaxsloth.bench.step --arch llama3.1-8b --quant nf4 --batch 1 --seq 131072 \
  --profile h200 --steps 0 --warmup 0 --long-context --out "$OUTDIR/long_context.jsonl" "${ARGS[@]}"
