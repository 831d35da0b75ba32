"""The H200 before/after of the NNX module step: its Python entry point (jaxsloth.bench.step --module, in the
unrolled layer layout the h200 profile runs) on CPU with a tiny model, and module_step_h200.sh's alternation and
table (a stand-in interpreter writes the records, so this runs without a GPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
SUITE = ROOT / "jaxsloth" / "bench" / "suites" / "module_step_h200.sh"

_FAKE_PYTHON = """#!{python}
import json, os, sys
if sys.argv[1] == "-":  # the suite's table: run the script it pipes in
    sys.argv = sys.argv[1:]
    exec(sys.stdin.read())
    sys.exit()
out = sys.argv[sys.argv.index("--out") + 1]
module = "--module" in sys.argv
assert module == (os.getcwd() != os.environ["FAKE_BASE"]), "--module goes to the head tree only"
rec = {{"tokens_per_s": 1010.0 if module else 1000.0, "peak_gib": 10.0, "compile_s": 30.0}}
with open(out, "a") as f:
    f.write(json.dumps(rec) + "\\n")
with open(os.path.join(os.path.dirname(out), "order.txt"), "a") as f:
    f.write(("head" if module else "base") + " " + sys.argv[sys.argv.index("--arch") + 1] + "\\n")
"""


def test_bench_step_runs_the_module_step_in_the_unrolled_layout(tmp_path):
    from jaxsloth.bench import step

    out = tmp_path / "step.jsonl"
    step.main(
        ["--model-path", str(ROOT / "jaxsloth" / "demo_assets" / "model"), "--quant", "nf4", "--batch", "1"]
        + ["--seq", "32", "--steps", "0", "--warmup", "0", "--layer-loop", "unrolled", "--module", "--out", str(out)]
    )
    rec = json.loads(out.read_text().splitlines()[0])
    assert rec["module_step"] and rec["layer_loop"] == "unrolled"
    assert rec["tokens_per_s"] > 0 and rec["compile_s"] > 0 and 0 < rec["first_loss"] < 20


def test_suite_alternates_base_and_module_step_and_tables_them(tmp_path):
    base, head, out = tmp_path / "base", tmp_path / "head", tmp_path / "out"
    base.mkdir()
    head.mkdir()
    fake = tmp_path / "python"
    fake.write_text(_FAKE_PYTHON.format(python=sys.executable))
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "FAKE_BASE": str(base)}
    env.pop("OUT", None)
    cmd = ["bash", str(SUITE), str(base), "--tree", str(head), "--out", str(out), "--rounds", "2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    order = (out / "module_step" / "order.txt").read_text().split("\n")[:-1]
    assert order == ["base llama3.1-8b", "base gemma2-9b", "head llama3.1-8b", "head gemma2-9b"] * 2
    table = done.stdout[done.stdout.index("| measurement") :]
    assert "| 8B QLoRA step, tokens/s | 1,000.000 (n=2) | 1,010.000 (n=2) | 1.010 |" in table
    assert "| Gemma-2-9B LoRA step, compile s | 30.000 (n=2) | 30.000 (n=2) | 1.000 |" in table
