"""Several devices: data-parallel, FSDP and mixed meshes train exactly like one device; checkpoints move between
device counts; Pallas kernels run per device under ShardedOps.

The multi-device checks run in ONE subprocess with 8 fake CPU devices (XLA_FLAGS must be set before JAX starts,
and the rest of the suite shares this process): ``python -m tests.test_sharding WORKDIR`` writes results.npz, which
the tests below compare. The single-device reference is the same ``fit`` without a mesh, on one device.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.tolerances import assert_close

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
MESHES = {"dp8": "data=8", "fsdp8": "fsdp=8", "mixed": "data=2,fsdp=4"}


def _dataset(vocab, n=48, seed=0):
    """Copy-task examples (second half repeats the first) of varied lengths, packed by the loader."""
    from jaxsloth.data import Example, TokenizedDataset

    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(n):
        k = int(rng.integers(3, 7))
        half = rng.integers(3, vocab, k)
        ids = np.concatenate([half, half]).astype(np.int32)
        trained = np.zeros(len(ids), bool)
        trained[k:] = True
        examples.append(Example(ids, trained))
    return TokenizedDataset(examples, "text", 32, 0, 0, 0, np.arange(n))


def _worker(scenario: str, workdir: Path) -> None:
    """Runs one multi-device scenario; saves its losses and final LoRA weights (or gradients) to results.npz."""
    import shutil

    import jax
    import jax.numpy as jnp

    from converters.hf import load_hf_model
    from jaxsloth.data import BatchLoader
    from jaxsloth.lora import LoraConfig, init_lora
    from jaxsloth.profiles import profile_for_device
    from jaxsloth.sharding import make_mesh, param_shardings
    from jaxsloth.train.loop import fit
    from jaxsloth.train.step import TrainConfig
    from tests.tiny_models import saved_model

    assert jax.device_count() == 8, jax.devices()
    lora = LoraConfig(r=4, lora_alpha=8.0)
    profile = profile_for_device(name="cpu")
    out: dict[str, np.ndarray] = {}

    def run(params, config, mesh=None, **kw):
        trainable = init_lora(config, lora, jax.random.key(0))
        # global batch 16 = grad_accum 2 x micro-batch 8 (one row per device on the 8-device meshes)
        loader = BatchLoader(_dataset(config.vocab_size), batch_size=16, seq_len=16, seed=1)
        tc = TrainConfig(
            learning_rate=3e-3,
            max_steps=STEPS,
            gradient_accumulation_steps=2,
            lr_scheduler_type="cosine",
            warmup_steps=1,
        )
        res = fit(config, params, trainable, loader, lora=lora, train_config=tc, profile=profile, mesh=mesh, **kw)
        return np.array([r["loss"] for r in res.history]), res.trainable

    def record(name, losses, tree):
        out[f"{name}/loss"] = losses
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            out[f"{name}/lora{jax.tree_util.keystr(path)}"] = np.asarray(leaf)

    if scenario == "dense":
        # f32 frozen weights (the tolerance table's f32 kinds apply).
        config, params = load_hf_model(saved_model("llama"), dtype=jnp.float32)
        record("single", *run(params, config))
        ckpt = workdir / "ckpt"
        for name, spec in MESHES.items():
            # The mixed run also checkpoints every 2 steps (sharded over 8 devices) for the resume below.
            kw = {"checkpoint_dir": str(ckpt), "save_every": 2} if name == "mixed" else {}
            record(name, *run(params, config, make_mesh(spec), **kw))
        # Drop the step-4 checkpoint and resume on 4 devices from step 2.
        shutil.rmtree(ckpt / str(STEPS))
        losses, trainable = run(
            params, config, make_mesh("data=2,fsdp=2", devices=jax.devices()[:4]), checkpoint_dir=str(ckpt), resume=True
        )
        record("resumed4", losses, trainable)
        out["resumed4/devices"] = np.array(len(jax.tree.leaves(trainable)[0].sharding.device_set))
    elif scenario == "qlora":
        # NF4 frozen weights split over fsdp (whole blocks per shard); LoRA and Adam state sharded too.
        config, nf4 = load_hf_model(saved_model("llama"), dtype=jnp.float32, load_in_4bit=True)
        sh = param_shardings(nf4, make_mesh("data=2,fsdp=4"))
        out["q_packed_split"] = np.array(sh["layers"]["q_proj"]["weight"].packed.spec[-1] == "fsdp")
        record("single", *run(nf4, config))
        record("mixed_shard_lora", *run(nf4, config, make_mesh("data=2,fsdp=4"), shard_lora=True))
    else:
        # Pallas kernels (interpret mode) per device under ShardedOps: the loss and LoRA gradients of one
        # micro-batch equal the unsharded call's.
        from jaxsloth.ops import KernelChoice
        from jaxsloth.sharding import ShardedOps
        from jaxsloth.train.step import make_loss_fn

        assert scenario == "pallas", scenario
        config, params = load_hf_model(saved_model("llama"), dtype=jnp.float32)
        # The Pallas kernels the H200 profile runs (rms_norm, rope, the fused loss); interpret mode is slow on CPU.
        kernels = KernelChoice(rms_norm="pallas", rope="pallas", cross_entropy="pallas", interpret=True)
        pallas = profile.replace(kernels=kernels)
        trainable = init_lora(config, lora, jax.random.key(0))
        trainable = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(7), x.shape), trainable)
        batch = {k: jnp.asarray(v[:8]) for k, v in next(BatchLoader(_dataset(config.vocab_size), 16, 16)).items()}
        mesh = make_mesh("data=2,fsdp=4")
        for name, ops in (("single", None), ("sharded", ShardedOps(pallas.kernels, mesh=mesh))):
            loss_fn = make_loss_fn(config, lora, pallas, ops)

            def mean_loss(t, loss_fn=loss_fn):
                s, c = loss_fn(t, params, batch, None)
                return s / c

            value, g = jax.jit(jax.value_and_grad(mean_loss))(trainable)
            record(name, np.array([value]), g)
    np.savez(workdir / "results.npz", **out)


def _results(scenario: str, tmp_path: Path) -> dict[str, np.ndarray]:
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(ROOT),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "tests.test_sharding", scenario, str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    with np.load(tmp_path / "results.npz") as z:
        return dict(z)


def _lora(results, name):
    return {k.split("/", 1)[-1]: v for k, v in results.items() if k.startswith(f"{name}/lora")}


def _assert_same_run(results, name, reference="single"):
    assert_close(results[f"{name}/loss"], results[f"{reference}/loss"], "f32", err_msg=f"{name} losses")
    ref, got = _lora(results, reference), _lora(results, name)
    assert sorted(got) == sorted(ref) and ref
    for k in ref:
        assert np.abs(ref[k]).max() > 0, f"{reference} {k} never moved: the comparison would be vacuous"
        # LoRA weights after several optimizer steps (or gradients): per-device partial sums, then an all-reduce,
        # round differently from one device's sum, hence the gradient tolerance.
        assert_close(got[k], ref[k], "f32_grad", err_msg=f"{name} {k}")


def test_dense_meshes_match_one_device_and_resume_on_4(tmp_path):
    """Data-parallel (data=8), FSDP (fsdp=8) and mixed (data=2,fsdp=4) runs equal the single-device run; a
    checkpoint saved on 8 devices resumes on 4 and continues with the same losses."""
    r = _results("dense", tmp_path)
    losses = r["single/loss"]
    assert len(losses) == STEPS and np.all(np.isfinite(losses))
    for name in MESHES:
        _assert_same_run(r, name)
    assert int(r["resumed4/devices"]) == 4
    resumed = r["resumed4/loss"]
    assert len(resumed) == STEPS - 2  # steps 3 and 4 only: it continued from the step-2 checkpoint
    assert_close(resumed, losses[2:], "f32", err_msg="losses after resuming on 4 devices")
    for k, v in _lora(r, "single").items():
        assert_close(_lora(r, "resumed4")[k], v, "f32_grad", err_msg=f"resumed4 {k}")


def test_qlora_fsdp_with_sharded_lora_matches_one_device(tmp_path):
    r = _results("qlora", tmp_path)
    assert bool(r["q_packed_split"])
    _assert_same_run(r, "mixed_shard_lora")


def test_pallas_kernels_per_device_match_unsharded(tmp_path):
    _assert_same_run(_results("pallas", tmp_path), "sharded")


def test_mesh_spec_parsing():
    from jaxsloth.sharding import parse_mesh_spec

    assert parse_mesh_spec("data=2,fsdp=4") == {"data": 2, "fsdp": 4}
    assert parse_mesh_spec("fsdp=2") == {"data": 1, "fsdp": 2}
    assert parse_mesh_spec({"data": -1}) == {"data": -1, "fsdp": 1}
    for bad, msg in (
        ("data2", "axis=size"),
        ("model=2", "unknown axis 'model'"),
        ("data=x", "not an integer"),
        ("data=0", "size 0"),
        ("data=-1,fsdp=-1", "at most one"),
        ("data=2,data=2", "twice"),
    ):
        with pytest.raises(ValueError, match=msg):
            parse_mesh_spec(bad)


def test_make_mesh_checks_the_device_count():
    import jax

    from jaxsloth.sharding import make_mesh

    n = jax.device_count()
    assert dict(make_mesh(None).shape) == {"data": n, "fsdp": 1}
    assert dict(make_mesh("fsdp=-1").shape) == {"data": 1, "fsdp": n}
    with pytest.raises(ValueError, match=f"needs {2 * n} devices but there are {n}"):
        make_mesh(f"data=2,fsdp={n}")


def test_initialize_distributed_reads_the_environment(monkeypatch):
    from jaxsloth import sharding

    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert sharding.initialize_distributed() is False
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    with pytest.raises(ValueError, match=r"\['JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'\] are not"):
        sharding.initialize_distributed()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    with pytest.raises(ValueError, match="outside"):
        sharding.initialize_distributed()
    calls = []
    monkeypatch.setattr(sharding.jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    sharding.initialize_distributed()
    assert calls == [(("10.0.0.1:1234",), {"num_processes": 2, "process_id": 1})]


if __name__ == "__main__":
    _worker(sys.argv[1], Path(sys.argv[2]))
