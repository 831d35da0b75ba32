#!/usr/bin/env bash
# The attention kernels on one H200: forward and forward+backward of Pallas, cuDNN, XLA (and tokamax when its
# wheels were carried, see fetch_baseline_wheels.sh) at the Llama-3.1-8B and Gemma-2-9B shapes, T = 2048 / 8192 /
# 32768. Records: OUT/attention.jsonl, or with --tune (each Pallas kernel's tiles alone) OUT/attention_tune.jsonl.
#   bash jaxsloth/bench/suites/attention_h200.sh [--tree DIR] [--out DIR] [kernel_attention flags]
# e.g. `... --only gemma2_9b:B=1,T=8192`, `... --tune --only llama3_8b:B=1,T=8192 --kernels dq dq_mosaic`.
source "$(dirname "$0")/common.sh" "$@"
[ -d "$TREE/.whl/tokamax" ] && bash "$(dirname "$0")/install_tokamax_wheels.sh" "$SITE" > "$OUTDIR/logs/tokamax.log" 2>&1
name=attention; [[ " ${ARGS[*]} " == *" --tune "* ]] && name=attention_tune
timed "$name" 540 "$PY" -m jaxsloth.bench.kernel_attention --out "$OUTDIR/$name.jsonl" "${ARGS[@]}"
