#!/usr/bin/env bash
# The mixture-of-experts grouped matmul on one H200 (about eight minutes at most): Qwen3-30B-A3B's expert projections
# (2 x 2048 tokens top-8 of 128 experts: 32768 sorted rows, router-skewed groups; gate_up 2048 -> 1536, down
# 768 -> 2048) forward, forward + dx and forward + dx + dw on the tiled XLA loop and on the Pallas kernel at its
# default and SWEEP tiles; then the Qwen3-30B-A3B QLoRA step (2 x 2048) with each grouped matmul.
# Records: OUT/grouped_matmul.jsonl (one line per projection and implementation), OUT/moe_step.jsonl (one per step).
#   bash jaxsloth/bench/suites/moe_kernels_h200.sh [--tree DIR] [--out DIR] [extra jaxsloth.bench.step flags]
# e.g. `... --grouped-matmul-blocks '{"block_m": 64}'` runs the Pallas step on the tiles the sweep found best.
source "$(dirname "$0")/common.sh" "$@"
timed grouped_matmul 180 "$PY" -m jaxsloth.bench.kernel_grouped_matmul --sweep --out "$OUTDIR/grouped_matmul.jsonl"
S=("$PY" -m jaxsloth.bench.step --arch qwen3-30b-a3b --quant nf4 --batch 2 --seq 2048 --steps 3 --warmup 1
   --out "$OUTDIR/moe_step.jsonl")
timed moe_step_pallas 150 "${S[@]}" --grouped-matmul pallas "${ARGS[@]}"
timed moe_step_tiled 150 "${S[@]}" --grouped-matmul tiled
# One line per record on stdout: ms per projection and implementation, tokens/s per step.
"$PY" - "$OUTDIR" <<'PYEOF'
import json, pathlib, sys

out = pathlib.Path(sys.argv[1])
for name in ("grouped_matmul.jsonl", "moe_step.jsonl"):
    path = out / name
    for r in (json.loads(line) for line in (path.read_text().splitlines() if path.exists() else []) if line.strip()):
        if "op" in r:
            keys = ("impl", "shape", "fwd_ms", "fwd_bwd_ms", "fwd_dx_dw_ms", "max_err", "error")
            print({k: r[k] for k in keys if r.get(k) is not None}, {k: v for k, v in (r["block"] or {}).items()})
        else:
            keys = ("tokens_per_s", "step_ms", "peak_gib", "compile_s", "first_loss")
            print(r["kernels"]["grouped_matmul"], {k: r.get(k) for k in keys})
PYEOF
