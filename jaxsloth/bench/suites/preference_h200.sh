#!/usr/bin/env bash
# The 8B QLoRA DPO step on one H200: jaxsloth against TRL's DPOTrainer (PEFT + bitsandbytes NF4) and Unsloth's DPO
# (PatchDPOTrainer + TRL's DPOTrainer), each in its own process under its own time limit, on random-weight Llama 3.1
# 8B-shaped models: 2 pairs per step, each prompt + answer 1024 tokens, reference = the adapter off, 2 warmup + 5
# timed steps (jaxsloth/bench/preference_baseline.py). TRL, Unsloth and bitsandbytes come from the wheels carried in
# .whl/ (fetch_baseline_wheels.sh), installed into $SITE.
#   bash jaxsloth/bench/suites/preference_h200.sh [--tree DIR] [--out DIR]
# Records: OUT/dpo.jsonl (one line per system); the table: OUT/dpo_table.md (also printed).
source "$(dirname "$0")/common.sh" "$@"
[ -d "$TREE/.whl" ] && "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
  "$TREE"/.whl/*.whl > "$OUTDIR/logs/pip.log" 2>&1
D=("$PY" -m jaxsloth.bench.preference_baseline --arch llama3.1-8b --pairs 2 --seq 1024 --steps 5 --warmup 2
  --work-dir /tmp --out "$OUTDIR/dpo.jsonl")
timed dpo_jaxsloth 150 "${D[@]}" --system jaxsloth --profile h200
timed dpo_trl_peft_bnb 140 "${D[@]}" --system trl-peft-bnb
timed dpo_unsloth 190 "${D[@]}" --system unsloth
[ -f "$OUTDIR/dpo.jsonl" ] && "$PY" -m jaxsloth.bench.preference_baseline --table "$OUTDIR/dpo.jsonl" \
  | tee "$OUTDIR/dpo_table.md"
