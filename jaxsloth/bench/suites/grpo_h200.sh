#!/usr/bin/env bash
# GRPO on one H200 against TRL's GRPOTrainer and transformers' generate (jaxsloth.bench.grpo_bench and
# grpo_baseline: each system in its own subprocess under its own time limit). Workload: 8 prompts x G = 8, prompt
# 256 tokens, every completion 768 tokens, random weights, LoRA r=16. One workload per call (each about 8 minutes):
#   bash jaxsloth/bench/suites/grpo_h200.sh [--tree DIR] [--out DIR] sampling|sampling8b|1b|8b
# sampling: Llama-3.2-1B bf16, jaxsloth's batched sampling (LoRA unmerged) vs transformers' generate (PEFT, KV cache).
# sampling8b: jaxsloth's sampling alone at the 8B GRPO workload's shape (NF4), one more run profiled: device time per
#   decode step by kind of kernel, and the trace's span per step (OUT/traces/grpo_sampling_8b/summary.json).
# 1b / 8b: Llama-3.2-1B / Llama-3.1-8B QLoRA GRPO steps (sampling and training time, peak memory) vs TRL 1.x with
# PEFT + bitsandbytes, transformers' generation, gradient checkpointing, bf16, no vLLM.
# Records: OUT/grpo.jsonl (appended); table: OUT/grpo_table.md. Carried wheels (.whl/: trl, bitsandbytes) go to $SITE.
source "$(dirname "$0")/common.sh" "$@"
[ -d "$TREE/.whl" ] && "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
  "$TREE"/.whl/*.whl > "$OUTDIR/logs/pip.log" 2>&1
J=("$PY" -m jaxsloth.bench.grpo_bench --out "$OUTDIR/grpo.jsonl")
T=("$PY" -m jaxsloth.bench.grpo_baseline --out "$OUTDIR/grpo.jsonl")
case "${ARGS[0]:-}" in
  sampling)
    timed grpo_sampling_jaxsloth 180 "${J[@]}" --mode sampling --arch llama3.2-1b --quant bf16 --steps 3
    timed grpo_sampling_hf 270 "${T[@]}" --system hf-generate --mode sampling --arch llama3.2-1b --quant bf16 --steps 2 ;;
  sampling8b)
    timed grpo_sampling_8b_jaxsloth 300 "${J[@]}" --mode sampling --arch llama3.1-8b --quant nf4 --steps 1 \
      --trace "$OUTDIR/traces/grpo_sampling_8b" ;;
  1b)
    timed grpo_1b_jaxsloth 200 "${J[@]}" --arch llama3.2-1b --quant nf4 --steps 2
    timed grpo_1b_trl 260 "${T[@]}" --system trl --arch llama3.2-1b --quant nf4 --steps 1 ;;
  8b)
    timed grpo_8b_jaxsloth 230 "${J[@]}" --arch llama3.1-8b --quant nf4 --steps 1
    timed grpo_8b_trl 300 "${T[@]}" --system trl --arch llama3.1-8b --quant nf4 --steps 1 ;;
  *) echo "choose a workload: sampling, sampling8b, 1b or 8b" >&2; exit 2 ;;
esac
[ -f "$OUTDIR/grpo.jsonl" ] && "${J[@]:0:3}" --table "$OUTDIR/grpo.jsonl" > "$OUTDIR/grpo_table.md"
cat "$OUTDIR/grpo_table.md" 2>/dev/null
