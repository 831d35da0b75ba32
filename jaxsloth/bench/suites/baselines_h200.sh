#!/usr/bin/env bash
# jaxsloth against the PyTorch baselines in one bench run on one H200 (`jaxsloth bench`: each system in its own
# subprocess; HF + PEFT + bitsandbytes with and without prepare_model_for_kbit_training, Unsloth after
# FastLanguageModel.for_training). Unsloth and bitsandbytes come from wheels carried in .whl/
# (fetch_baseline_wheels.sh, run where there is network), installed into $SITE. One workload per call:
#   bash jaxsloth/bench/suites/baselines_h200.sh [--tree DIR] [--out DIR] [llama|mistral|gemma|lean|lean_mistral]
# lean: the 8B QLoRA step with jaxsloth's leanest settings (layer inputs offloaded to the host, 8-bit AdamW moments,
# the input embedding table on the host) against Unsloth; lean_mistral: the same for Mistral-7B. Default: llama.
# Words after lean or lean_mistral are more jaxsloth step flags, e.g. `lean --layer-loop unrolled`.
# Records: OUT/baselines_<workload>/results.jsonl, with report.md and plots beside them.
source "$(dirname "$0")/common.sh" "$@"
[ -d "$TREE/.whl" ] && "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
  "$TREE"/.whl/*.whl > "$OUTDIR/logs/pip.log" 2>&1
LEAN="--remat offload --optimizer-state 8bit --embedding host ${ARGS[*]:1}"  # words after the workload: more flags
B=("$PY" -m jaxsloth.bench.cli --batch 2 --seq 2048 --steps 5 --timeout 240)
case "${ARGS[0]:-llama}" in
  llama) timed baselines_llama 590 "${B[@]}" --arch llama3.1-8b --quant nf4 --systems jaxsloth,hf-peft-bnb,unsloth \
    --out-dir "$OUTDIR/baselines_llama" ;;
  mistral) timed baselines_mistral 590 "${B[@]}" --arch mistral-7b --quant nf4 --systems jaxsloth,unsloth \
    --out-dir "$OUTDIR/baselines_mistral" ;;
  gemma) timed baselines_gemma 590 "${B[@]}" --arch gemma2-9b --quant bf16 --systems jaxsloth,hf-peft \
    --hf-peft-args "--attn eager" --out-dir "$OUTDIR/baselines_gemma" ;;
  lean) timed baselines_lean 590 "${B[@]}" --arch llama3.1-8b --quant nf4 --systems jaxsloth,unsloth \
    --jaxsloth-args "$LEAN" --out-dir "$OUTDIR/baselines_lean" ;;
  lean_mistral) timed baselines_lean_mistral 590 "${B[@]}" --arch mistral-7b --quant nf4 --systems jaxsloth,unsloth \
    --jaxsloth-args "$LEAN" --out-dir "$OUTDIR/baselines_lean_mistral" ;;
  *) echo "unknown workload ${ARGS[0]}: choose llama, mistral, gemma, lean or lean_mistral" >&2; exit 2 ;;
esac
