"""The GRPO GPU suite's entry points run on CPU with the tiny demo architecture: grpo_h200.sh itself (its step
workload: jaxsloth's GRPO steps on random NF4 weights and a real TRL GRPOTrainer step with PEFT + bitsandbytes),
through a python that shrinks the workload, then the sampling runners (jaxsloth's unmerged-LoRA sampling and
transformers' generate) as the suite calls them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxsloth.bench import grpo_baseline, grpo_bench

pytest.importorskip("trl")
pytest.importorskip("bitsandbytes")

ROOT = Path(__file__).parents[1]
DEMO_MODEL = ROOT / "jaxsloth" / "demo_assets" / "model"
TINY = ["--prompts", "2", "--generations", "2", "--prompt-len", "4", "--completion-len", "4"]
# The suite's python: the same command line with the demo architecture for --arch and a tiny workload.
_SHRINKING_PYTHON = f"""#!{sys.executable}
import os, sys
args = sys.argv[1:]
if "--arch" in args:
    i = args.index("--arch")
    args[i : i + 2] = ["--model-path", {str(DEMO_MODEL)!r}]
    args += {TINY!r} + ["--steps", "0"] + (["--profile", "cpu"] if "jaxsloth.bench.grpo_bench" in args else [])
os.execv({sys.executable!r}, [{sys.executable!r}] + args)
"""


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_suite_step_workload_runs_jaxsloth_and_trl(tmp_path):
    python = tmp_path / "python"
    python.write_text(_SHRINKING_PYTHON)
    python.chmod(0o755)
    env = {**os.environ, "PYTHON": str(python), "JAX_PLATFORMS": "cpu", "SITE": str(tmp_path / "site")}
    suite = ROOT / "jaxsloth" / "bench" / "suites" / "grpo_h200.sh"
    done = subprocess.run(["bash", str(suite), "--out", str(tmp_path / "out"), "1b"], env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    logs = "".join(p.read_text() for p in (tmp_path / "out" / "logs").glob("*.log"))
    assert "grpo_1b_jaxsloth: exit 0" in done.stdout and "grpo_1b_trl: exit 0" in done.stdout, done.stdout + logs
    records = {r["system"]: r for r in _records(tmp_path / "out" / "grpo.jsonl")}
    assert set(records) == {"jaxsloth", "trl"}
    for r in records.values():
        assert r["workload"] == "model-qlora-p2xg2-4+4" and r["mode"] == "step"
        assert r["completion_tokens"] == 16 and r["sample_s"] > 0 and r["train_s"] > 0
        assert r["reward_std"] > 0  # the varied reward: a loss with a gradient
    assert records["trl"]["completion_length"] == 4  # min_new_tokens forced full-length completions
    table = (tmp_path / "out" / "grpo_table.md").read_text()
    assert "| model-qlora-p2xg2-4+4 | jaxsloth |" in table and "| trl |" in table


def test_sampling_runners(tmp_path):
    out = tmp_path / "grpo.jsonl"
    common = ["--model-path", str(DEMO_MODEL), "--quant", "bf16", "--mode", "sampling", *TINY, "--steps", "1"]
    trace = tmp_path / "trace"
    grpo_bench.main([*common, "--profile", "cpu", "--trace", str(trace), "--out", str(out)])
    grpo_baseline.main([*common, "--system", "hf-generate", "--out", str(out)])
    jax_rec, hf_rec = _records(out)
    assert (jax_rec["system"], hf_rec["system"]) == ("jaxsloth", "hf-generate")
    # --trace: one more sampling profiled; device time per decode step, whole and by kind of kernel
    per_step = jax_rec["trace_per_decode_step_ms"]
    assert per_step["kernels"] > 0 and per_step["span"] > 0 and len(per_step) > 2
    assert json.loads((trace / "summary.json").read_text())["steps"] == 4  # --completion-len decode steps
    with pytest.raises(SystemExit):
        grpo_bench.main([*common, "--mode", "step", "--trace", str(trace)])
    for r in (jax_rec, hf_rec):  # every completion runs to its full length: 2 prompts x 2 x 4 tokens
        assert r["completion_tokens"] == 16 and r["tokens_per_s"] > 0
    assert "| vs generate |" in grpo_bench.markdown_table([jax_rec, hf_rec])
    with pytest.raises(SystemExit, match="measures --mode step"):
        grpo_baseline.main(["--system", "trl", "--mode", "sampling"])
