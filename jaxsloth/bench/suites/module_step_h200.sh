#!/usr/bin/env bash
# The training step over the Flax NNX module's split state (this checkout, jaxsloth.bench.step --module) against
# the functional step of a base checkout, alternating base / head so both share the machine's noise: the 8B QLoRA
# default step and the Gemma-2-9B LoRA default step (h200 profile, batch 2 x 2048), ROUNDS times (default 1; about
# six minutes). Prints tokens/s, peak GiB and compile seconds side by side; records in OUT/module_step/.
#   bash jaxsloth/bench/suites/module_step_h200.sh BASE_DIR [--tree DIR] [--out DIR] [--rounds N]
# BASE_DIR: a copy of the base commit, e.g. made beside this checkout with
#   mkdir -p .base && git archive BASE_COMMIT | tar -x -C .base
# (.base/ is git-ignored: send it along to the GPU machine with the working tree).
BASE=$(cd "${1:?usage: module_step_h200.sh BASE_DIR [--tree DIR] [--out DIR] [--rounds N]}" && pwd)
shift
SUITES=$(cd "$(dirname "$0")" && pwd)
source "$SUITES/common.sh" "$@"
ROUNDS=1
[ "${ARGS[0]}" = --rounds ] && ROUNDS=${ARGS[1]}
R="$OUTDIR/module_step"
mkdir -p "$R"
for round in $(seq "$ROUNDS"); do
  for side in base head; do
    dir=$TREE; flag=(--module)
    [ $side = base ] && { dir=$BASE; flag=(); }
    export PYTHONPATH="$SITE:$dir"
    S=("$PY" -m jaxsloth.bench.step --batch 2 --seq 2048 --profile h200 --steps 5 --warmup 1 "${flag[@]}")
    (cd "$dir" && timed "8b_qlora_${side}_$round" 110 "${S[@]}" --arch llama3.1-8b --quant nf4 \
      --out "$R/8b_qlora_$side.jsonl")
    (cd "$dir" && timed "gemma2_lora_${side}_$round" 120 "${S[@]}" --arch gemma2-9b --quant bf16 \
      --out "$R/gemma2_lora_$side.jsonl")
  done
done
export PYTHONPATH="$SITE:$TREE"
"$PY" - "$R" <<'PY'
import json, os, statistics, sys

out = sys.argv[1]
print("| measurement | base | head (module step) | head / base |\n|---|---|---|---|")
for workload, label in (("8b_qlora", "8B QLoRA step"), ("gemma2_lora", "Gemma-2-9B LoRA step")):
    for field, unit in (("tokens_per_s", "tokens/s"), ("peak_gib", "peak GiB"), ("compile_s", "compile s")):
        med = {}
        for side in ("base", "head"):
            path = f"{out}/{workload}_{side}.jsonl"
            values = [json.loads(x).get(field) for x in open(path) if x.strip()] if os.path.exists(path) else []
            values = [v for v in values if v]
            med[side] = (statistics.median(values), len(values)) if values else None
        cells = [f"{m[0]:,.3f} (n={m[1]})" if m else "failed" for m in (med["base"], med["head"])]
        ratio = f"{med['head'][0] / med['base'][0]:.3f}" if med["base"] and med["head"] else "-"
        print(f"| {label}, {unit} | {cells[0]} | {cells[1]} | {ratio} |")
PY
