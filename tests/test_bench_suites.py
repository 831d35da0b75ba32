"""The benchmark suites (jaxsloth/bench/suites/*.sh) parse, and before_after_h200.sh runs the same measurements on
the base tree and on --tree, alternating, then tables them (a stand-in interpreter writes the records, so this runs
without a GPU in seconds)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SUITES = Path(__file__).parents[1] / "jaxsloth" / "bench" / "suites"

_FAKE_PYTHON = """#!{python}
import json, os, sys
if sys.argv[1] == "-":  # the suite's table: run the script it pipes in
    sys.argv = sys.argv[1:]
    exec(sys.stdin.read())
    sys.exit()
out = sys.argv[sys.argv.index("--out") + 1]
tree = os.environ["PYTHONPATH"]
base = tree == os.environ["FAKE_BASE"]
if sys.argv[2] == "jaxsloth.bench.step":
    rec = {{"tokens_per_s": 1000.0 if base else 1100.0, "peak_gib": 10.0, "tree": tree}}
else:
    rec = {{"impl": "pallas", "fwd_ms": 1.0, "fwd_bwd_ms": 5.0 if base else 4.0, "tree": tree}}
with open(out, "a") as f:
    f.write(json.dumps(rec) + "\\n")
with open(os.path.join(os.path.dirname(out), "order.txt"), "a") as f:
    f.write(("base" if base else "head") + " " + sys.argv[2] + "\\n")
"""


@pytest.mark.parametrize("suite", sorted(p.name for p in SUITES.glob("*.sh")))
def test_suite_parses(suite):
    subprocess.run(["bash", "-n", str(SUITES / suite)], check=True)


def test_before_after_alternates_base_and_head_and_tables_them(tmp_path):
    base, head, out = tmp_path / "base", tmp_path / "head", tmp_path / "out"
    base.mkdir()
    head.mkdir()
    fake = tmp_path / "python"
    fake.write_text(_FAKE_PYTHON.format(python=sys.executable))
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "FAKE_BASE": str(base)}
    env.pop("OUT", None)
    cmd = ["bash", str(SUITES / "before_after_h200.sh"), str(base), "--tree", str(head), "--out", str(out)]
    done = subprocess.run(cmd + ["--rounds", "2"], env=env, capture_output=True, text=True, check=True)
    order = (out / "before_after" / "order.txt").read_text().split("\n")[:-1]
    assert [line.split()[0] for line in order] == ["base", "base", "head", "head"] * 2
    steps = [json.loads(x) for x in (out / "before_after" / "step_base.jsonl").read_text().splitlines()]
    assert len(steps) == 2 and all(r["tree"] == str(base) for r in steps)
    table = done.stdout[done.stdout.index("| measurement") :]
    assert "| 8B QLoRA step, tokens/s | 1,000.000 (n=2) | 1,100.000 (n=2) | 1.100 |" in table
    assert "| Gemma-2 attention T=8192, fwd+bwd ms | 5.000 (n=2) | 4.000 (n=2) | 0.800 |" in table


def test_mesh_suite_runs_each_point_on_the_first_gpus_with_the_batch_per_gpu(tmp_path):
    # mesh_h200x8.sh: every point of a scaling curve on the first N GPUs, 2 sequences per GPU, one mesh axis of N.
    log = tmp_path / "calls.jsonl"
    fake = tmp_path / "python"
    fake.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"open({str(log)!r}, 'a').write(json.dumps([os.environ.get('CUDA_VISIBLE_DEVICES'), sys.argv[1:]]) + '\\n')\n"
    )
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake))
    subprocess.run(
        ["bash", str(SUITES / "mesh_h200x8.sh"), "--out", str(tmp_path / "out"), "data", "70b8", "--", "--steps", "2"],
        check=True, env=env, capture_output=True,
    )  # fmt: skip
    calls = [json.loads(line) for line in log.read_text().splitlines()]

    def flag(argv, name):
        return argv[argv.index(name) + 1]

    assert [c[0] for c in calls] == ["0", "0,1", "0,1,2,3", "0,1,2,3,4,5,6,7", "0,1,2,3,4,5,6,7"]
    assert [flag(a, "--mesh") for _, a in calls] == ["data=1", "data=2", "data=4", "data=8", "fsdp=8"]
    assert [flag(a, "--batch") for _, a in calls] == ["2", "4", "8", "16", "8"]
    assert flag(calls[-1][1], "--arch") == "llama3.1-70b" and all(a[-2:] == ["--steps", "2"] for _, a in calls)
    bad = subprocess.run(["bash", str(SUITES / "mesh_h200x8.sh"), "--out", str(tmp_path), "nine"], env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "unknown workload nine" in bad.stderr
