#!/usr/bin/env bash
# Full fine-tuning on one H200: the Llama 3.1 8B architecture (random bf16 weights), every weight trained, batch
# 2 x 2048 under the h200 profile, AdamW moments in 8 bits and then in f32. Each record holds peak_gib and
# tokens_per_s. Records: OUT/step.jsonl.
#   bash jaxsloth/bench/suites/full_ft_h200.sh [--tree DIR] [--out DIR] [extra jaxsloth.bench.step flags]
source "$(dirname "$0")/common.sh" "$@"
# With f32 moments the fixed state alone is 16 GB of weights, 16 of gradients and 64 of moments: above JAX's
# default cap of 75% of the 141 GB.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
S=("$PY" -m jaxsloth.bench.step --arch llama3.1-8b --quant bf16 --full-finetuning --batch 2 --seq 2048
  --profile h200 --steps 5 --warmup 1 --out "$OUTDIR/step.jsonl")
timed 8b_full_8bit 290 "${S[@]}" --optimizer-state 8bit "${ARGS[@]}"
timed 8b_full_f32 290 "${S[@]}" --optimizer-state float32 "${ARGS[@]}"
