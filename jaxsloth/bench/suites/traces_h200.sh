#!/usr/bin/env bash
# Where each training-step target stands: one traced step per workload on one H200 (h200 profile, batch 2 x 2048),
# device time per step by kernel kind against the step's span (jaxsloth.bench.trace_summary). About eight minutes.
#   bash jaxsloth/bench/suites/traces_h200.sh [--tree DIR] [--out DIR] [workload ...] [-- step flags for each]
# (default: every workload), e.g. `... lean8b -- --layer-loop unrolled`.
# Workloads: lean8b (8B QLoRA, offloaded layer inputs, 8-bit moments, the embedding table on the host), host8b (8B
# QLoRA, the default profile with the table on the host), dots8b (8B QLoRA, remat dots), lean_mistral (Mistral-7B
# QLoRA, as lean8b), dots1b (Llama-3.2-1B LoRA, remat dots), gemma2 (Gemma-2-9B LoRA, default).
# Records: OUT/step.jsonl (each with trace_by_category_ms); OUT/traces/NAME/summary.json (top kernels). The raw
# profiler files are deleted once summarized: they are hundreds of MB.
source "$(dirname "$0")/common.sh" "$@"
S=("$PY" -m jaxsloth.bench.step --batch 2 --seq 2048 --profile h200 --steps 3 --warmup 1 --out "$OUTDIR/step.jsonl")
lean=(--remat offload --optimizer-state 8bit --embedding host)
NAMES=() EXTRA=()
for i in "${!ARGS[@]}"; do
  if [ "${ARGS[$i]}" = "--" ]; then EXTRA=("${ARGS[@]:$((i + 1))}"); break; fi
  NAMES+=("${ARGS[$i]}")
done
traced() {
  local name=$1 limit=$2
  shift 2
  timed "$name" "$limit" "${S[@]}" --trace "$OUTDIR/traces/$name" "$@" "${EXTRA[@]}"
  find "$OUTDIR/traces/$name" -type f ! -name summary.json -delete 2>/dev/null
  find "$OUTDIR/traces/$name" -mindepth 1 -type d -empty -delete 2>/dev/null
}
for w in "${NAMES[@]:-lean8b host8b dots8b lean_mistral dots1b gemma2}"; do
  for name in $w; do
    case "$name" in
      lean8b) traced lean8b 110 --arch llama3.1-8b --quant nf4 "${lean[@]}" ;;
      host8b) traced host8b 110 --arch llama3.1-8b --quant nf4 --embedding host ;;
      dots8b) traced dots8b 110 --arch llama3.1-8b --quant nf4 --remat dots ;;
      lean_mistral) traced lean_mistral 110 --arch mistral-7b --quant nf4 "${lean[@]}" ;;
      dots1b) traced dots1b 70 --arch llama3.2-1b --quant bf16 --remat dots ;;
      gemma2) traced gemma2 150 --arch gemma2-9b --quant bf16 ;;
      *) echo "unknown workload $name: choose lean8b, host8b, dots8b, lean_mistral, dots1b or gemma2" >&2; exit 2 ;;
    esac
  done
done
