#!/usr/bin/env bash
# The newer families on one H200 at 2 x 2048, one workload per call (each about eight minutes):
#   qwen3  Qwen3-8B QLoRA: jaxsloth, transformers + PEFT + bitsandbytes (both preparations) and Unsloth (`jaxsloth
#          bench`, as baselines_h200.sh runs them).
#   gemma3 Gemma-3-12B QLoRA: the same three systems.
#   moe    Qwen3-30B-A3B QLoRA (LoRA on attention and every expert; jaxsloth holds attention and experts in NF4 as its
#          load_in_4bit loads them, bitsandbytes quantizes the attention only and keeps the fused experts in bf16):
#          jaxsloth with the profile's grouped matmul (the Pallas kernel on Hopper) and transformers + PEFT
#          (target_parameters on the fused experts) + bitsandbytes without prepare_model_for_kbit_training (which
#          would upcast the 61 GB of bf16 experts to f32). Unsloth is not run: it loads only from a checkpoint on
#          disk, and the model's bf16 checkpoint (61 GB) does not fit beside the rest on the GPU machine's 64 GiB disk.
#   bash jaxsloth/bench/suites/families_h200.sh [--tree DIR] [--out DIR] [qwen3|gemma3|moe]   (default qwen3)
# Records: OUT/families_<workload>/results.jsonl (report.md and plots beside them for qwen3 and gemma3). Unsloth and bitsandbytes come from the wheels carried in .whl/.
source "$(dirname "$0")/common.sh" "$@"
[ -d "$TREE/.whl" ] && "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
  "$TREE"/.whl/*.whl > "$OUTDIR/logs/pip.log" 2>&1
B=("$PY" -m jaxsloth.bench.cli --batch 2 --seq 2048 --steps 5 --timeout 240)
MOE="$OUTDIR/families_moe"
case "${ARGS[0]:-qwen3}" in
  qwen3) timed families_qwen3 590 "${B[@]}" --arch qwen3-8b --quant nf4 --systems jaxsloth,hf-peft-bnb,unsloth \
    --out-dir "$OUTDIR/families_qwen3" ;;
  gemma3) timed families_gemma3 590 "${B[@]}" --arch gemma3-12b --quant nf4 --systems jaxsloth,hf-peft-bnb,unsloth \
    --out-dir "$OUTDIR/families_gemma3" ;;
  moe)
    mkdir -p "$MOE"
    S=("$PY" -m jaxsloth.bench.step --arch qwen3-30b-a3b --quant nf4 --batch 2 --seq 2048 --steps 3 --warmup 1)
    timed moe_jaxsloth 360 "${S[@]}" --out "$MOE/results.jsonl"
    timed moe_hf_peft_bnb 200 "$PY" -m jaxsloth.bench.torch_baseline --arch qwen3-30b-a3b --system hf-peft-bnb \
      --variant plain --batch 2 --seq 2048 --steps 3 --warmup 1 --out "$MOE/results.jsonl" ;;
  *) echo "unknown workload ${ARGS[0]}: choose qwen3, gemma3 or moe" >&2; exit 2 ;;
esac
