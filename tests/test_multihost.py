"""Two processes (multi-host) train exactly like one process on the same number of devices.

Two Python processes with 2 fake CPU devices each join through ``jaxsloth.sharding.initialize_distributed`` (the
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables; cross-process CPU collectives are JAX's
default gloo) and run ``jaxsloth.train`` on a data=2,fsdp=2 mesh spanning all 4 devices, with one shared output
directory (sharded orbax checkpoints), then ``save_adapter`` / ``save_merged`` (which gather the sharded arrays
from both hosts). A third process runs the same script alone on 4 fake devices: the reference.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.tolerances import assert_close

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
TIMEOUT_S = 240

# argv: output_dir (shared by the processes of one run), result_dir (per-process files), steps. Per-process adapter and
# merged paths let the parent see which process wrote them.
SCRIPT = r"""
import json, sys
from pathlib import Path

from jaxsloth.sharding import initialize_distributed

multi = initialize_distributed()  # before any other JAX call

import jax
import jaxsloth
from jaxsloth.demo import ASSETS

out, results = Path(sys.argv[1]), Path(sys.argv[2])
pid = jax.process_index()
assert jax.device_count() == 4 and jax.local_device_count() == (2 if multi else 4), jax.devices()
model, tokenizer = jaxsloth.load(ASSETS / "model", max_seq_length=32, profile="cpu", dtype="float32")
model = jaxsloth.add_lora(model, r=4, lora_alpha=8.0, seed=3)
records = [json.loads(line) for line in (ASSETS / "train.jsonl").read_text().splitlines()[:64]]
# micro-batch 1 row per device x 4 devices, grad_accum 2: 8 packed rows per step, 2 per device.
result = jaxsloth.train(
    model, tokenizer, records, batch_size=1, grad_accum=2, max_steps=int(sys.argv[3]), learning_rate=5e-3,
    warmup_steps=1, schedule="cosine", output_dir=out, save_every=2, progress=False, mesh="data=2,fsdp=2", seed=1,
)
jaxsloth.save_adapter(model, results / f"adapter-p{pid}")
jaxsloth.save_merged(model, results / f"merged-p{pid}", dtype="float32")
losses = [r["loss"] for r in result.history]
(results / f"losses-p{pid}.json").write_text(json.dumps({"losses": losses, "processes": jax.process_count()}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROCESS"))}
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        PYTHONPATH=str(ROOT),
        **extra,
    )
    return env


def _run_all(jobs: dict[str, tuple[list[str], dict[str, str]]]) -> dict[str, str]:
    """Starts every job at once, waits up to TIMEOUT_S for all; on a failure or timeout kills the rest and
    fails with every job's output tail."""
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", SCRIPT, *args, str(STEPS)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, (args, env) in jobs.items()
    }
    logs: dict[str, str] = {}
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for name, p in procs.items():
            try:
                logs[name], _ = p.communicate(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                p.kill()
                logs[name] = p.communicate()[0] + f"\n[killed after {TIMEOUT_S} s]"
            if p.returncode != 0:
                break
    finally:
        for name, p in procs.items():
            if p.poll() is None:
                p.kill()
                logs.setdefault(name, p.communicate()[0] + "\n[killed: another process failed]")
    failed = [n for n, p in procs.items() if p.returncode != 0]
    assert not failed, "\n\n".join(f"=== {n} (rc {procs[n].returncode}) ===\n{logs.get(n, '')[-4000:]}" for n in procs)
    return logs


def _safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Runs the two-process job and the one-process reference (concurrently) once for this module's tests."""
    tmp = tmp_path_factory.mktemp("multihost")
    dirs = {k: tmp / k for k in ("multi", "multi_results", "single", "single_results")}
    dirs["multi_results"].mkdir()
    dirs["single_results"].mkdir()
    multi = [str(dirs["multi"]), str(dirs["multi_results"])]
    dist = dict(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES="2")
    _run_all(
        {
            "process0": (multi, _env(2, **dist, JAX_PROCESS_ID="0")),
            "process1": (multi, _env(2, **dist, JAX_PROCESS_ID="1")),
            "single": ([str(dirs["single"]), str(dirs["single_results"])], _env(4)),
        }
    )
    return dirs


def _assert_same_tensors(got: dict[str, np.ndarray], ref: dict[str, np.ndarray], name: str) -> None:
    assert sorted(got) == sorted(ref) and ref
    for k in ref:
        assert got[k].shape == ref[k].shape, f"{name} {k}: {got[k].shape} vs {ref[k].shape}"
        # Weights after several Adam steps: per-device partial sums, then all-reduces, round differently.
        assert_close(got[k], ref[k], "f32_grad", err_msg=f"{name} {k}")


def test_two_processes_train_like_one(runs):
    multi_out, multi_res, single_res = runs["multi"], runs["multi_results"], runs["single_results"]
    p0, p1, single = (
        json.loads((d / f"losses-p{i}.json").read_text()) for d, i in ((multi_res, 0), (multi_res, 1), (single_res, 0))
    )
    assert (p0["processes"], p1["processes"], single["processes"]) == (2, 2, 1)
    assert len(single["losses"]) == STEPS and np.all(np.isfinite(single["losses"]))
    assert len(set(single["losses"])) == STEPS, f"losses never changed: {single['losses']}"
    # Both processes read the same replicated loss: bit-identical.
    assert p0["losses"] == p1["losses"]
    assert_close(p0["losses"], single["losses"], "f32", err_msg="two-process vs one-process losses")

    # Only process 0 writes: one metrics line per step (the writer appends, so a second writer would double them)
    # and the adapter; process 1 returns without writing.
    metrics = [json.loads(line) for line in (multi_out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert_close([m["loss"] for m in metrics], p0["losses"], "f32")
    assert not (multi_res / "adapter-p1").exists() and not (multi_res / "merged-p1").exists()
    # Sharded checkpoints written by both processes, finalized once: step 2 and the end.
    steps = sorted(int(p.name) for p in (multi_out / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2, STEPS]

    # The adapter (LoRA gathered from both hosts) equals the one-process run's.
    name = "adapter-p0/adapter_model.safetensors"
    ref = _safetensors(single_res / name)
    lora_b = [v for k, v in ref.items() if "lora_B" in k]
    assert lora_b and all(np.abs(v).max() > 0 for v in lora_b), "LoRA B never moved: the comparison would be vacuous"
    _assert_same_tensors(_safetensors(multi_res / name), ref, name)


def test_two_processes_merged_export_like_one(runs):
    name = "merged-p0/model.safetensors"
    _assert_same_tensors(_safetensors(runs["multi_results"] / name), _safetensors(runs["single_results"] / name), name)
