"""Context parallelism: a sequence split over the mesh's "context" axis (ring attention, zigzag order) gives the
loss and LoRA gradients of the single-device step.

The multi-device cases run in ONE subprocess with 8 fake CPU devices (XLA_FLAGS must be set before JAX starts):
``python -m tests.test_context_parallel WORKDIR`` writes results.npz with every case's loss and gradients, from
the single-device loss function (the reference: the full-sequence attention of ``attention_reference``) and from
the step's loss over the mesh (``make_mesh_loss_fn``). Lengths are multiples of neither the attention blocks nor
the device counts (padded inside and masked).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.tolerances import assert_close

ROOT = Path(__file__).resolve().parents[1]

# name -> (tiny model family, mesh, length, packed rows, kernels, profile overrides)
CASES = {
    # Causal, with the long-context options inside the shard_map: full remat per 2-layer group, MLP and loss tiles.
    "causal_tiles_remat_context4": (
        "llama",
        "context=4",
        37,
        False,
        "reference",
        {"remat": "full", "remat_group": 2, "mlp_chunk": 8, "loss_chunk": 16},
    ),
    "window_context2_fsdp2_data2": ("mistral", "context=2,fsdp=2,data=2", 45, False, "reference", {}),
    "gemma2_softcap_window_packed_context4_data2": ("gemma2", "context=4,data=2", 53, True, "reference", {}),
    # A context axis of size 1 kept (the GPU suite's ring1): the context path (shard_map, zigzag) with local attention.
    "ring_of_one_data2": ("llama", "context=1,data=2", 27, True, "reference", {}),
    # The Pallas flash kernels (interpret mode) for every block pair, packed and windowed (Gemma 2).
    "pallas_gemma2_packed_context2_data2": ("gemma2", "context=2,data=2", 29, True, "pallas", {}),
}


def _batch(vocab: int, rows: int, length: int, packed: bool, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, (rows, length)).astype(np.int32)
    targets = np.where(rng.random((rows, length)) < 0.2, -100, rng.integers(3, vocab, (rows, length))).astype(np.int32)
    batch = {"tokens": tokens, "targets": targets}
    if packed:  # three examples per row, positions restarting at each
        cuts = sorted(rng.choice(np.arange(4, length - 4), 2, replace=False))
        seg = np.zeros((rows, length), np.int32)
        seg[:, cuts[0] :] = 1
        seg[:, cuts[1] :] = 2
        starts = np.array([0, *cuts])
        pos = np.arange(length) - starts[seg[0]]
        batch["segment_ids"] = seg
        batch["positions"] = np.broadcast_to(pos, (rows, length)).astype(np.int32)
    return batch


def _worker(workdir: Path, only: list[str]) -> None:
    import jax
    import jax.numpy as jnp

    from converters.hf import load_hf_model
    from jaxsloth.lora import LoraConfig, init_lora
    from jaxsloth.ops import KernelChoice
    from jaxsloth.profiles import profile_for_device
    from jaxsloth.sharding import batch_devices, make_mesh, put, replicated
    from jaxsloth.train.step import make_mesh_loss_fn
    from tests.tiny_models import saved_model

    assert jax.device_count() == 8, jax.devices()
    lora = LoraConfig(r=4, lora_alpha=8.0)
    base = profile_for_device(name="cpu")
    out: dict[str, np.ndarray] = {}
    models = {}
    for i, (name, (family, spec, length, packed, kernels, overrides)) in enumerate(CASES.items()):
        if only and name not in only:
            continue
        start = time.perf_counter()
        if family not in models:
            models[family] = load_hf_model(saved_model(family), dtype=jnp.float32)
        config, params = models[family]
        profile = base.replace(kernels=KernelChoice.all(kernels, interpret=True), **overrides)
        trainable = init_lora(config, lora, jax.random.key(0))
        # Nonzero B, so every LoRA A gets a gradient too.
        trainable = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(7), x.shape), trainable)
        size = int(np.prod([int(v) for v in (p.split("=")[1] for p in spec.split(","))]))
        mesh = make_mesh(spec, devices=jax.devices()[:size], context_axis="context" in spec)
        assert ("context" in mesh.axis_names) == ("context" in spec)
        batch = _batch(config.vocab_size, 2 * batch_devices(mesh), length, packed, seed=i)
        for which, m in (("single", None), ("mesh", mesh)):
            loss_fn = make_mesh_loss_fn(config, lora, profile, m)

            def mean_loss(t, p, b, loss_fn=loss_fn):
                s, c = loss_fn(t, p, b, jax.random.key(1))
                return s / c

            args = (trainable, params, {k: jnp.asarray(v) for k, v in batch.items()})
            if m is not None:
                args = (put(args[0], replicated(m)), put(args[1], replicated(m)), put(args[2], replicated(m)))
            value, grads = jax.jit(jax.value_and_grad(mean_loss))(*args)
            out[f"{name}/{which}/loss"] = np.asarray(value)
            for path, leaf in jax.tree_util.tree_flatten_with_path(grads)[0]:
                out[f"{name}/{which}/grad{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
        print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)  # in the test's failure output
    if not only or "bench" in only:
        start = time.perf_counter()
        out["bench"] = np.array(_bench_entry_points(workdir))
        print(f"bench: {time.perf_counter() - start:.1f} s", flush=True)
    np.savez(workdir / "results.npz", **out)


def _bench_entry_points(workdir: Path) -> str:
    """The GPU suite's command (jaxsloth/bench/suites/long_context_cp_h200.sh) at tiny shapes: the long-context
    step over a context axis (of 2 beside data=4 here; the suite's ring1 flag --context-axis too, with data=8)."""
    from jaxsloth.bench import step

    demo = ROOT / "jaxsloth" / "demo_assets" / "model"
    common = ["--model-path", str(demo), "--quant", "nf4", "--seq", "50", "--steps", "1", "--warmup", "0"]
    common += ["--out", str(workdir / "bench.jsonl")]
    step.main([*common, "--batch", "4", "--long-context", "--mesh", "context=2,data=4", "--context-axis"])
    return (workdir / "bench.jsonl").read_text()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, np.ndarray]:
    workdir = tmp_path_factory.mktemp("context_parallel")
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(ROOT),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "tests.test_context_parallel", str(workdir)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return dict(np.load(workdir / "results.npz"))


@pytest.mark.parametrize("case", list(CASES))
def test_context_parallel_matches_one_device(results, case):
    single = {k.split("/", 2)[2]: v for k, v in results.items() if k.startswith(f"{case}/single/")}
    mesh = {k.split("/", 2)[2]: v for k, v in results.items() if k.startswith(f"{case}/mesh/")}
    assert single.keys() == mesh.keys() and len(single) > 1
    assert_close(mesh.pop("loss"), single.pop("loss"), "f32", err_msg=case)
    for key, g in single.items():
        assert np.abs(g).max() > 0, key  # every LoRA weight takes part
        assert_close(mesh[key], g, "f32_grad", err_msg=f"{case} {key}")


def test_a_context_axis_of_one_attends_locally(monkeypatch):
    """With one device on the axis the sequence is whole there: the profile's attention runs, not the ring."""
    import jax
    import jax.numpy as jnp

    import jaxsloth.context_parallel as cp
    from converters.hf import load_hf_model
    from jaxsloth.lora import LoraConfig, init_lora
    from jaxsloth.profiles import profile_for_device
    from jaxsloth.sharding import make_mesh
    from jaxsloth.train.step import make_mesh_loss_fn
    from tests.tiny_models import saved_model

    def no_ring(*args, **kwargs):
        raise AssertionError("ring attention ran on a context axis of size 1")

    monkeypatch.setattr(cp, "ring_attention", no_ring)
    config, params = load_hf_model(saved_model("llama"), dtype=jnp.float32)
    lora = LoraConfig(r=4, lora_alpha=8.0)
    trainable = init_lora(config, lora, jax.random.key(0))
    batch = {k: jnp.asarray(v) for k, v in _batch(config.vocab_size, 2, 21, False, seed=3).items()}
    profile = profile_for_device(name="cpu")
    losses = []
    for mesh in (None, make_mesh("context=1", devices=jax.devices()[:1], context_axis=True)):
        total, count = jax.jit(make_mesh_loss_fn(config, lora, profile, mesh))(
            trainable, params, batch, jax.random.key(1)
        )
        losses.append(total / count)
    assert_close(losses[1], losses[0], "f32")


def test_bench_suite_entry_points(results):
    import json

    records = [json.loads(line) for line in str(results["bench"]).splitlines()]
    assert [r["mesh"] for r in records] == [{"data": 4, "fsdp": 1, "context": 2}]
    assert all(r["tokens_per_s"] > 0 for r in records)


def test_memory_model_splits_activations_over_the_context_axis():
    from jaxsloth.models.presets import preset
    from jaxsloth.profiles import long_context, profile_for_device
    from jaxsloth.train.memory import estimate_step_memory, longest_sequence

    config = preset("llama3.1-8b")
    profile = long_context(profile_for_device(name="h200"))
    kw = dict(batch=1, seq_len=600_000, quantized=True)
    one, two = estimate_step_memory(config, profile, **kw), estimate_step_memory(config, profile, **kw, context=2)
    assert two.fixed_gib == one.fixed_gib  # weights are replicated over the axis
    activations = one.device_gib - one.fixed_gib
    # Half the tokens per device, plus ring attention's K/V blocks and accumulators of the layer in flight.
    assert 0.5 * activations < two.device_gib - two.fixed_gib < 0.75 * activations
    assert two.host_gib == pytest.approx(one.host_gib / 2)
    # Device-limited (ample host memory): eight devices take more than five times one device's length.
    mem = dict(batch=1, quantized=True, device_gib=139, host_gib=1000)
    single, eight = longest_sequence(config, profile, **mem), longest_sequence(config, profile, **mem, context=8)
    assert single.limited_by == eight.limited_by == "device"
    assert 5 * single.tokens < eight.tokens < 8 * single.tokens


def test_attention_block_kernel_matches_its_reference():
    # One block pair of a longer sequence: queries at key positions 24..39, keys 0..23 (a windowed pair one chunk
    # apart), segments crossing it, softcap; the Pallas kernels (interpret mode) against the jnp reference, whose
    # own semantics are attention_reference's (checked on the whole sequence first).
    import jax
    import jax.numpy as jnp

    from pallas_kernels.attention import attention_reference
    from pallas_kernels.attention.blockwise import (
        attention_block,
        attention_block_grad,
        attention_block_grad_reference,
        attention_block_reference,
    )

    keys = jax.random.split(jax.random.key(0), 5)
    q = jax.random.normal(keys[0], (2, 16, 4, 16))
    k, v = (jax.random.normal(key, (2, 24, 2, 16)) for key in keys[1:3])
    seg = jnp.asarray(np.repeat([[0] * 20 + [1] * 20], 2, axis=0), jnp.int32)
    whole = dict(segment_ids=seg[:, :24], sliding_window=13, softcap=4.0)
    out_whole, _ = attention_block_reference(q, k, v, q_segment_ids=seg[:, 8:24], kv_segment_ids=seg[:, :24],
                                             causal=True, sliding_window=13, softcap=4.0)  # fmt: skip
    assert_close(out_whole, attention_reference(q, k, v, causal=True, **whole), "f32")

    kw = dict(q_offset=24, causal=False, sliding_window=13, softcap=4.0)
    segs = dict(q_segment_ids=seg[:, 24:], kv_segment_ids=seg[:, :24])
    out_r, lse_r = attention_block_reference(q, k, v, **segs, **kw)
    out_p, lse_p = attention_block(q, k, v, **segs, **kw, interpret=True)
    seen = jnp.isfinite(lse_r)
    assert bool(seen.any()) and not bool(seen.all())  # some rows see keys of this block, some none
    assert bool((jnp.isfinite(lse_p) == seen).all())
    assert_close(jnp.where(seen, lse_p, 0.0), jnp.where(seen, lse_r, 0.0), "f32")
    rows = seen.transpose(0, 2, 1)[..., None]  # [B, T, Hq, 1]: a row that sees nothing has no defined output
    assert_close(jnp.where(rows, out_p, 0.0), jnp.where(rows, out_r, 0.0), "f32")
    do = jax.random.normal(keys[3], q.shape)
    lse = jnp.where(seen, lse_r, 0.0) + 0.5  # a whole row's lse is at least this block's
    delta = jax.random.normal(keys[4], lse.shape)
    grads_r = attention_block_grad_reference(q, k, v, do, lse, delta, **segs, **kw)
    grads_p = attention_block_grad(q, k, v, do, lse, delta, **segs, **kw, interpret=True)
    for name, a, b in zip(("dq", "dk", "dv"), grads_p, grads_r, strict=True):
        assert np.abs(np.asarray(b)).max() > 0, name
        assert_close(a, b, "f32_grad", err_msg=name)


def test_zigzag_order_balances_the_causal_work():
    from jaxsloth.models.ring_attention import zigzag_order

    order = zigzag_order(16, 4).reshape(4, 4)  # 4 devices, chunks of 2 tokens
    assert order.tolist() == [[0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9]]
    # Causal (query, key) pairs per device: equal on every device.
    work = [sum(int(q) + 1 for q in row) for row in order]
    assert len(set(work)) == 1, work


def test_mesh_spec_with_context_axis():
    from jaxsloth.sharding import parse_mesh_spec

    assert parse_mesh_spec("context=2,fsdp=2,data=2") == {"data": 2, "fsdp": 2, "context": 2}
    assert parse_mesh_spec("context=1,fsdp=2") == {"data": 1, "fsdp": 2}  # size 1: no axis, today's path
    with pytest.raises(ValueError, match="axis 'ctx'"):
        parse_mesh_spec("ctx=2")


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2:])  # optional case names: run only those
