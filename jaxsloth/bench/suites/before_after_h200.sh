#!/usr/bin/env bash
# The same measurements on a base checkout and on this one, alternating base / head so both share the machine's
# noise: the 8B QLoRA default step (batch 2 x 2048) and the Gemma-2 attention forward+backward at T = 8192, each
# ROUNDS times (default 2; about eight minutes). Prints a comparison table; records in OUT/before_after/.
#   bash jaxsloth/bench/suites/before_after_h200.sh BASE_DIR [--tree DIR] [--out DIR] [--rounds N]
# BASE_DIR: a copy of the base commit, e.g. made beside this checkout with
#   mkdir -p .base && git archive BASE_COMMIT | tar -x -C .base
# (.base/ is git-ignored: send it along to the GPU machine with the working tree).
BASE=$(cd "${1:?usage: before_after_h200.sh BASE_DIR [--tree DIR] [--out DIR] [--rounds N]}" && pwd)
shift
SUITES=$(cd "$(dirname "$0")" && pwd)
source "$SUITES/common.sh" "$@"
ROUNDS=2
[ "${ARGS[0]}" = --rounds ] && ROUNDS=${ARGS[1]}
R="$OUTDIR/before_after"
mkdir -p "$R"
for round in $(seq "$ROUNDS"); do
  for side in base head; do
    dir=$TREE; [ $side = base ] && dir=$BASE
    export PYTHONPATH="$dir"
    (cd "$dir" && timed "step_${side}_$round" 120 "$PY" -m jaxsloth.bench.step --arch llama3.1-8b --quant nf4 \
      --batch 2 --seq 2048 --steps 5 --warmup 1 --out "$R/step_$side.jsonl")
    (cd "$dir" && timed "attention_${side}_$round" 90 "$PY" -m jaxsloth.bench.kernel_attention \
      --only gemma2_9b:B=1,T=8192 --out "$R/attention_${side}_$round.jsonl")
  done
done
export PYTHONPATH="$TREE"
"$PY" - "$R" <<'PY'
import glob, json, statistics, sys

def rows(pattern, keep):
    return [r for f in sorted(glob.glob(pattern)) for line in open(f) if line.strip() for r in [json.loads(line)] if keep(r)]

out = sys.argv[1]
print("| measurement | base | head | head / base |\n|---|---|---|---|")
for label, pattern, keep, field in (
    ("8B QLoRA step, tokens/s", "step_{}.jsonl", lambda r: r.get("tokens_per_s"), "tokens_per_s"),
    ("8B QLoRA step, peak GiB", "step_{}.jsonl", lambda r: r.get("peak_gib"), "peak_gib"),
    ("Gemma-2 attention T=8192, fwd+bwd ms", "attention_{}_*.jsonl", lambda r: r.get("impl") == "pallas", "fwd_bwd_ms"),
    ("Gemma-2 attention T=8192, fwd ms", "attention_{}_*.jsonl", lambda r: r.get("impl") == "pallas", "fwd_ms"),
):
    values = {s: [r[field] for r in rows(f"{out}/" + pattern.format(s), keep) if r.get(field)] for s in ("base", "head")}
    med = {s: statistics.median(v) if v else None for s, v in values.items()}
    ratio = f"{med['head'] / med['base']:.3f}" if med["base"] and med["head"] else "-"
    cells = [f"{med[s]:,.3f} (n={len(values[s])})" if med[s] else "failed" for s in ("base", "head")]
    print(f"| {label} | {cells[0]} | {cells[1]} | {ratio} |")
PY
