#!/usr/bin/env bash
# The end-to-end training step on one H200: every workload of BENCHMARKS.md's step tables under the h200 profile,
# batch 2 x 2048 (about eight minutes). Records: OUT/step.jsonl.
#   bash jaxsloth/bench/suites/step_h200.sh [--tree DIR] [--out DIR] [extra jaxsloth.bench.step flags]
# e.g. `... --attention-blocks tune.jsonl` or `... --op nf4_matmul=xla` applies to every workload.
source "$(dirname "$0")/common.sh" "$@"
S=("$PY" -m jaxsloth.bench.step --batch 2 --seq 2048 --profile h200 --steps 5 --warmup 1 --out "$OUTDIR/step.jsonl")
timed 8b_qlora 90 "${S[@]}" --arch llama3.1-8b --quant nf4 "${ARGS[@]}"
timed 8b_qlora_full 80 "${S[@]}" --arch llama3.1-8b --quant nf4 --remat full "${ARGS[@]}"
timed 8b_qlora_dots 80 "${S[@]}" --arch llama3.1-8b --quant nf4 --remat dots "${ARGS[@]}"
timed mistral_qlora 80 "${S[@]}" --arch mistral-7b --quant nf4 "${ARGS[@]}"
timed 1b_lora_dots 50 "${S[@]}" --arch llama3.2-1b --quant bf16 --remat dots "${ARGS[@]}"
timed gemma2_lora 100 "${S[@]}" --arch gemma2-9b --quant bf16 "${ARGS[@]}"
timed gemma2_qlora 100 "${S[@]}" --arch gemma2-9b --quant nf4 "${ARGS[@]}"
