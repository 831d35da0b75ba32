"""attention Pallas kernel: output and dq/dk/dv against jax.vjp of attention_reference.

CPU cases run in interpret mode with 16-wide blocks, so T in {17, 40} spans several blocks: the online
softmax across blocks, the skipped (fully masked) blocks, the unmasked interior loops and the padded tail
are all exercised. The reference runs in f32 on the (rounded) inputs, so low-precision cases measure the
kernel's own rounding.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.attention import AttentionBlocks, attention, attention_reference
from tests.tolerances import assert_close, dtype_kind

SMALL = AttentionBlocks(
    block_q=16,
    block_k=16,
    num_warps=4,
    num_stages=1,
    block_q_dkv=16,
    block_k_dkv=32,
    block_q_dq=32,
    block_k_dq=16,
)


def _segments(key, b: int, t: int) -> jax.Array:
    """Random packing: sorted ids, a boundary every ~6 tokens, at least two segments per row."""
    starts = jax.random.bernoulli(key, 0.15, (b, t)).at[:, t // 2].set(True)
    return jnp.cumsum(starts, axis=1).astype(jnp.int32)


def _inputs(b, t, hq, hk, d, dtype, seed, segments):
    keys = jax.random.split(jax.random.key(seed), 5)
    q, k, v, do = (
        jax.random.normal(key, (b, t, h, d), jnp.float32).astype(dtype) for key, h in zip(keys[:4], (hq, hk, hk, hq))
    )
    return q, k, v, do, (_segments(keys[4], b, t) if segments else None)


def _check(
    *,
    b=1,
    t=40,
    hq=2,
    hk=2,
    d=64,
    dtype=jnp.float32,
    segments=False,
    seed=0,
    interpret=True,
    block=SMALL,
    **kw,
):
    q, k, v, do, segment_ids = _inputs(b, t, hq, hk, d, dtype, seed, segments)
    kw["segment_ids"] = segment_ids

    @jax.jit
    def kernel(q, k, v, do):
        out, vjp = jax.vjp(lambda *a: attention(*a, interpret=interpret, block=block, **kw), q, k, v)
        return out, vjp(do)

    @jax.jit
    def reference(q, k, v, do):
        out, vjp = jax.vjp(lambda *a: attention_reference(*a, **kw), q, k, v)
        return out, vjp(do)

    out, grads = kernel(q, k, v, do)
    with jax.default_matmul_precision("highest"):  # XLA:GPU would otherwise use TF32 for f32 dots
        ref_out, ref_grads = reference(*(x.astype(jnp.float32) for x in (q, k, v, do)))
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, ref_out, dtype_kind(dtype), err_msg="out")
    for got, want, x, name in zip(grads, ref_grads, (q, k, v), ("dq", "dk", "dv")):
        assert got.dtype == x.dtype and got.shape == x.shape, name
        assert_close(got, want, dtype_kind(dtype, grad=True), err_msg=name)


CASES = {
    "causal_gqa": dict(t=40, hq=4, hk=2),
    "causal_mqa_bf16": dict(t=40, hq=4, hk=1, dtype=jnp.bfloat16),
    "causal_f16": dict(t=17, d=80, dtype=jnp.float16),
    "window": dict(sliding_window=7),
    "window_not_causal": dict(sliding_window=9, causal=False),
    "softcap": dict(softcap=2.0, d=80),
    "segments": dict(segments=True, b=2),
    "not_causal_scaled": dict(causal=False, t=17, d=80, scale=0.3),
    "all": dict(t=40, d=80, hq=4, hk=2, sliding_window=11, softcap=3.0, segments=True),
    "all_bf16": dict(t=17, hq=4, hk=2, sliding_window=5, softcap=3.0, segments=True, dtype=jnp.bfloat16),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name):
    _check(seed=len(name), **CASES[name])


# The Mosaic GPU dK/dV kernel (16-bit, head dim a multiple of 64, no segments), run by the GPU interpreter on
# CPU: 64 keys per CTA, 64 query rows per step (the least it takes) and a two-deep ring, so T = 90-150 spans
# several key and query blocks, a padded key block, ring wraps and (with GQA) several query heads' steps.
MOSAIC = dataclasses.replace(SMALL, block_q_dkv=64, block_k_dkv=64, num_stages_dkv=2, dkv_backend="mosaic")
MOSAIC_CASES = {
    "causal_gqa_bf16": dict(t=100, hq=4, hk=2, dtype=jnp.bfloat16),
    "window_softcap_mqa_bf16": dict(t=150, hq=2, hk=1, sliding_window=40, softcap=20.0, dtype=jnp.bfloat16),
    "window_not_causal_f16": dict(t=90, sliding_window=30, causal=False, dtype=jnp.float16),
    "d128_scaled_bf16": dict(t=70, d=128, hq=2, hk=1, scale=0.2, softcap=5.0, dtype=jnp.bfloat16),
}


@pytest.mark.parametrize("name", list(MOSAIC_CASES))
def test_mosaic_dkv_matches_reference(name):
    _check(seed=len(name), block=MOSAIC, **MOSAIC_CASES[name])


# 128 keys per CTA, each compute warpgroup dK and dV of its own 64 (head dims up to 128): T = 150 and 200 leave
# a CTA whose second half is partly or wholly padding, and windows that end inside one half.
MOSAIC_128 = dataclasses.replace(MOSAIC, block_k_dkv=128)


@pytest.mark.parametrize("name", ["causal_gqa_bf16", "window_softcap_mqa_bf16", "window_not_causal_f16"])
def test_mosaic_dkv_128_keys_matches_reference(name):
    _check(seed=len(name) + 1, block=MOSAIC_128, **MOSAIC_CASES[name])


# The Mosaic forward: 128 query rows per CTA (two warpgroups of 64), 64 keys per step, a two-deep ring; T = 90-200
# spans CTAs whose second warpgroup holds only padding rows, and key blocks masked for one warpgroup only.
MOSAIC_FWD = dataclasses.replace(MOSAIC_128, block_q=128, block_k=64, num_stages=2, fwd_backend="mosaic")


@pytest.mark.parametrize("name", list(MOSAIC_CASES))
def test_mosaic_forward_matches_reference(name):
    _check(seed=len(name) + 2, block=MOSAIC_FWD, **MOSAIC_CASES[name])


# The Mosaic dQ kernel (an opt-in no profile selects: untimed on the GPU): the forward's layout, 64 or 128 keys per
# step.
MOSAIC_DQ = dataclasses.replace(MOSAIC_FWD, block_q_dq=128, block_k_dq=64, num_stages_dq=2, dq_backend="mosaic")


@pytest.mark.parametrize("name", list(MOSAIC_CASES))
def test_mosaic_dq_matches_reference(name):
    _check(seed=len(name) + 4, block=MOSAIC_DQ, **MOSAIC_CASES[name])


def test_mosaic_dq_128_keys_and_its_d256_fallback():
    _check(seed=7, block=dataclasses.replace(MOSAIC_DQ, block_k_dq=128), **MOSAIC_CASES["causal_gqa_bf16"])
    # Head dim 256: Q, dO and two K + V stages exceed shared memory, so dQ takes the Triton kernel.
    from pallas_kernels import attention as attention_module

    q = jnp.zeros((1, 40, 2, 256), jnp.bfloat16)
    _, st = attention_module.prepare(
        q,
        q,
        q,
        segment_ids=None,
        causal=True,
        sliding_window=None,
        softcap=None,
        scale=None,
        interpret=True,
        block=MOSAIC_DQ,
    )
    assert (st.blocks.dq_backend, st.blocks.fwd_backend, st.blocks.dkv_backend) == ("triton", "mosaic", "mosaic")


@pytest.mark.parametrize("name", ["causal_gqa_bf16", "d128_scaled_bf16"])
def test_mosaic_forward_128_keys_matches_reference(name):
    # The d128 default's 128 keys per step: T = 70 and 100 pad the keys inside the only block.
    _check(seed=len(name) + 3, block=dataclasses.replace(MOSAIC_FWD, block_k=128), **MOSAIC_CASES[name])


def test_mosaic_kernels_run_where_they_apply_and_fall_back_elsewhere(monkeypatch):
    from pallas_kernels.attention import mosaic as attention_mgpu

    calls = []
    for name in ("dkv", "forward", "dq"):
        real = getattr(attention_mgpu, name)
        monkeypatch.setattr(
            attention_mgpu, name, functools.partial(lambda real, name, *a: calls.append(name) or real(*a), real, name)
        )
    _check(seed=3, block=MOSAIC_DQ, t=20, hq=2, hk=1, dtype=jnp.bfloat16)  # one padded key block
    assert sorted(calls) == ["dkv", "dq", "forward"]
    # Segment ids, f32 and head dims below 64 take the Triton kernels with the head dim's default tiles.
    _check(seed=4, block=MOSAIC_DQ, t=40, segments=True, b=2, dtype=jnp.bfloat16)
    _check(seed=5, block=MOSAIC_DQ, t=40)
    _check(seed=6, block=MOSAIC_DQ, t=40, d=32, dtype=jnp.bfloat16)
    assert len(calls) == 3
    with pytest.raises(ValueError, match="block_k_dkv=64 or 128"):
        dataclasses.replace(MOSAIC, block_k_dkv=32)
    with pytest.raises(ValueError, match="multiple of 64"):
        dataclasses.replace(MOSAIC, block_q_dkv=32)
    with pytest.raises(ValueError, match="dkv_backend"):
        dataclasses.replace(SMALL, dkv_backend="cuda")
    with pytest.raises(ValueError, match="block_q=128"):
        dataclasses.replace(MOSAIC_FWD, block_q=64)


def test_default_blocks():
    # The kernel's default tiles shrink to the sequence: one block per program, no inner-loop steps skipped.
    _check(t=17, hq=4, hk=2, d=64, block=None, sliding_window=6)


def _profile_blocks(name: str, d: int, dtype) -> AttentionBlocks | None:
    from jaxsloth.profiles import profile_for_device

    return profile_for_device(name=name).kernels.block_for("attention", jnp.zeros((1, 1, 1, d), dtype))


def test_hopper_profiles_choose_the_mosaic_forward_and_dkv():
    # The profile, not the kernel package, picks the backend: on Hopper the 16-bit head dims 65-256 run the forward
    # and dK/dV on Mosaic (dQ on Triton); f32 and small head dims, and every other GPU, the kernel's Triton default.
    for name in ("h200", "h100"):
        for d in (80, 128, 256):
            for dtype in (jnp.bfloat16, jnp.float16):
                blocks = _profile_blocks(name, d, dtype)
                assert (blocks.fwd_backend, blocks.dkv_backend, blocks.dq_backend) == ("mosaic", "mosaic", "triton")
                assert blocks.block_k_dkv == (128 if d <= 128 else 64)
        assert _profile_blocks(name, 128, jnp.float32) is None and _profile_blocks(name, 64, jnp.bfloat16) is None
    for name in ("a100", "ada", "ampere", "t4", "cpu"):
        assert _profile_blocks(name, 128, jnp.bfloat16) is None
    assert AttentionBlocks.for_head_dim(128) == AttentionBlocks.for_head_dim(80)  # the default: Triton throughout
    assert {AttentionBlocks.for_head_dim(d).fwd_backend for d in (64, 128, 256)} == {"triton"}


def test_dispatch_hands_the_profiles_tiles_to_the_kernel(monkeypatch):
    # The h200 profile's cuDNN attention cannot softcap: the dispatch point sends the call to the Pallas kernel with
    # the profile's Mosaic tiles for this head dim (run by the interpreter here).
    from jaxsloth.profiles import profile_for_device
    from pallas_kernels.attention import mosaic as attention_mgpu

    calls = []
    for name in ("dkv", "forward", "dq"):
        real = getattr(attention_mgpu, name)
        monkeypatch.setattr(
            attention_mgpu, name, functools.partial(lambda real, name, *a: calls.append(name) or real(*a), real, name)
        )
    ops = profile_for_device(name="h200", interpret=True).ops
    q, k, v, do, _ = _inputs(1, 20, 2, 1, 128, jnp.bfloat16, 8, False)
    kw = dict(softcap=5.0, sliding_window=9)
    out, vjp = jax.vjp(lambda *a: ops.attention(*a, **kw), q, k, v)
    grads = vjp(do)
    assert sorted(calls) == ["dkv", "forward"]
    f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
    ref_out, ref_vjp = jax.vjp(lambda *a: attention_reference(*a, **kw), *f32[:3])
    assert_close(out, ref_out, "bf16", err_msg="out")
    for got, want, name in zip(grads, ref_vjp(f32[3]), ("dq", "dk", "dv")):
        assert_close(got, want, "bf16_grad", err_msg=name)


def test_under_jit_and_grad_with_fewer_queries_than_keys():
    # Queries are the last T of S keys: the causal diagonal and the window are offset by S - T, and the
    # query segment ids are the last T of the [B, S] ids.
    keys = jax.random.split(jax.random.key(5), 4)
    q = jax.random.normal(keys[0], (1, 9, 2, 64))
    k, v = (jax.random.normal(key, (1, 40, 1, 64)) for key in keys[1:3])
    kw = dict(segment_ids=_segments(keys[3], 1, 40), sliding_window=13, softcap=4.0)

    def loss(fn, q, k, v):
        return jnp.sum(jnp.sin(fn(q, k, v, **kw)))

    got = jax.jit(jax.grad(lambda *a: loss(functools.partial(attention, block=SMALL), *a), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(lambda *a: loss(attention_reference, *a), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(got, want):
        assert_close(a, b, "f32_grad")


def test_rejects_bad_inputs():
    q, k = jnp.ones((1, 8, 3, 64)), jnp.ones((1, 8, 2, 64))
    with pytest.raises(ValueError, match="multiple"):
        attention(q, k, k)
    q = jnp.ones((1, 8, 4, 64))
    with pytest.raises(ValueError, match="segment_ids"):
        attention(q, k, k, segment_ids=jnp.zeros((1, 7), jnp.int32))
    with pytest.raises(ValueError, match="sliding_window"):
        attention(q, k, k, sliding_window=0)
    with pytest.raises(TypeError, match="dtype"):
        attention(q.astype(jnp.bfloat16), k, k)
    with pytest.raises(ValueError, match="block_k"):
        AttentionBlocks(block_k=48)


def test_benchmark_smoke(tmp_path):
    import json

    from jaxsloth.bench.kernel_attention import main

    out = tmp_path / "attn.jsonl"
    main(["--smoke", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all("error" not in r for r in rows), rows
    assert {r["impl"] for r in rows} >= {"pallas", "xla_reference"}
    assert all(r["max_err"] < 0.1 for r in rows if r["impl"] == "pallas")
    assert all(r["temp_bytes_fwd_bwd"] >= 0 for r in rows)  # the compiled plan's temporaries, per row


def test_tuner_times_each_kernel_and_combines_the_best(tmp_path):
    import json

    from jaxsloth.bench.kernel_attention import main

    out = tmp_path / "tune.jsonl"
    main(["--smoke", "--tune", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    *rows, whole = rows
    timed = [r for r in rows if r["kernel"] != "best"]
    assert {r["kernel"] for r in timed} == {"fwd", "fwd_mosaic", "dkv", "dkv_mosaic", "dq", "dq_mosaic"}
    assert all("error" not in r and r["max_err"] < 0.05 and r["ms"] > 0 for r in timed), timed
    (best,) = [r for r in rows if r["kernel"] == "best"]
    assert set(best["ms"]) == {"fwd", "fwd_mosaic", "dkv", "dkv_mosaic", "dq", "dq_mosaic"}
    # The combined settings are a valid AttentionBlocks holding each kernel's fastest tile, and the fastest of
    # the Triton and the Mosaic dK/dV.
    blocks = AttentionBlocks(**best["settings"])
    fastest = {k: min((r for r in timed if r["kernel"] == k), key=lambda r: r["ms"]) for k in best["ms"]}
    dq = min(("dq", "dq_mosaic"), key=lambda k: fastest[k]["ms"])
    assert blocks.dq_backend == ("mosaic" if dq == "dq_mosaic" else "triton")
    fwd = min(("fwd", "fwd_mosaic"), key=lambda k: fastest[k]["ms"])
    assert blocks.block_q == fastest[fwd]["settings"]["block_q"]
    assert blocks.fwd_backend == ("mosaic" if fwd == "fwd_mosaic" else "triton")
    dkv = min(("dkv", "dkv_mosaic"), key=lambda k: fastest[k]["ms"])
    assert blocks.dkv_backend == ("mosaic" if dkv == "dkv_mosaic" else "triton")
    assert blocks.block_k_dkv == fastest[dkv]["settings"]["block_k_dkv"]
    # Last, the public op timed forward+backward with the combined settings, checked against the reference.
    assert whole["impl"] == "pallas" and whole["blocks"] == best["settings"], whole
    assert whole["max_err"] < 0.1 and whole["fwd_bwd_ms"] > 0


def test_tuner_tunes_only_the_kernels_asked_for(tmp_path):
    import json

    from jaxsloth.bench.kernel_attention import main

    out = tmp_path / "tune.jsonl"
    main(["--smoke", "--tune", "--kernels", "dkv_mosaic", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["kernel"] for r in rows[:-2]} == {"dkv_mosaic"}
    best = AttentionBlocks(**rows[-2]["settings"])
    default = AttentionBlocks.for_head_dim(64)
    assert best.dkv_backend == "mosaic" and (best.block_q, best.block_q_dq) == (default.block_q, default.block_q_dq)


@pytest.mark.parametrize(
    "d, dtype, kw",
    [
        (128, jnp.bfloat16, dict()),
        (256, jnp.bfloat16, dict(softcap=50.0, sliding_window=1024)),
        (80, jnp.float32, dict(segments=True, causal=False, sliding_window=300, softcap=30.0)),
    ],
)
def test_lowers_to_triton_on_cpu(monkeypatch, d, dtype, kw):
    """Lowers the three kernels (forward, dK/dV, dQ) to Triton IR for an H200 without a GPU, so an op or
    an indexing form the Triton lowering lacks fails in CI rather than on the GPU machine."""
    gpu_info = pytest.importorskip("jax._src.pallas.triton.gpu_info")
    monkeypatch.setattr(gpu_info, "get_gpu_info", lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H200))
    kw = dict(kw)
    b, t, hq, hk = 2, 1000, 8, 2
    segment_ids = jax.ShapeDtypeStruct((b, t), jnp.int32) if kw.pop("segments", False) else None
    q = jax.ShapeDtypeStruct((b, t, hq, d), dtype)
    k = jax.ShapeDtypeStruct((b, t, hk, d), dtype)

    def f(q, k, v, do, segment_ids):
        def g(q, k, v):
            return attention(q, k, v, segment_ids=segment_ids, interpret=False, **kw)

        return jax.vjp(g, q, k, v)[1](do)

    lowered = jax.jit(f).trace(q, k, k, q, segment_ids).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("xla.gpu.triton") == 3
    dots = _triton_dots(lowered.compiler_ir("stablehlo"))
    assert len(dots) == 3 and all(dots), dots
    # f32 dots must be IEEE (Triton elides that default attribute); the Triton default, TF32, fails f32
    # tolerances on the GPU. bf16 dots keep the default (tensor cores; the attribute is ignored for bf16).
    want_tf32 = dtype != jnp.float32
    for kernel_dots in dots:
        assert all(("inputPrecision = tf32" in line) == want_tf32 for line in kernel_dots), kernel_dots


@pytest.mark.parametrize(
    "d, keys, fwd, kw", [(256, 64, True, dict(softcap=50.0, sliding_window=300)), (128, 128, False, dict())]
)
def test_mosaic_kernels_lower_for_hopper_on_cpu(monkeypatch, d, keys, fwd, kw):
    # The Mosaic dK/dV kernel lowered for an H200 without one: its wgmma shapes, layouts and shared-memory
    # plan are checked at lowering, so a tile the hardware cannot take fails in CI.
    gpu_info = pytest.importorskip("jax._src.pallas.triton.gpu_info")
    monkeypatch.setattr(gpu_info, "get_gpu_info", lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H200))
    block = dataclasses.replace(
        AttentionBlocks.for_head_dim(d, jnp.bfloat16),
        block_q_dkv=64,
        block_k_dkv=keys,
        dkv_backend="mosaic",
    )
    if fwd:
        block = dataclasses.replace(block, block_q=128, block_k=64, num_stages=2, fwd_backend="mosaic")
    else:  # d128: the Mosaic dQ instead
        block = dataclasses.replace(block, block_q_dq=128, block_k_dq=64, num_stages_dq=2, dq_backend="mosaic")
    q = jax.ShapeDtypeStruct((1, 1000, 4, d), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 1000, 2, d), jnp.bfloat16)

    def f(q, k, v, do):
        g = lambda q, k, v: attention(q, k, v, interpret=False, block=block, **kw)  # noqa: E731
        return jax.vjp(g, q, k, v)[1](do)

    text = jax.jit(f).trace(q, k, k, q).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 1  # the Triton forward or dQ
    assert text.count("custom_call @mosaic_gpu") == 2


def _triton_dots(module) -> list[list[str]]:
    """The ``tt.dot`` lines of each Triton kernel embedded (as MLIR bytecode) in a lowered StableHLO module."""
    from jax._src.lib.mlir import ir
    from jaxlib.triton import dialect as triton_dialect

    blobs = []

    def walk(op):
        for region in op.regions:
            for block in region:
                for child in block:
                    if child.operation.name == "stablehlo.custom_call" and "mhlo.backend_config" in child.attributes:
                        config = ir.DictAttr(child.attributes["mhlo.backend_config"])
                        blobs.append(ir.StringAttr(config["ir"]).value_bytes)
                    walk(child.operation)

    walk(module.operation)
    with ir.Context() as ctx:
        triton_dialect.register_dialect(ctx)
        ctx.allow_unregistered_dialects = True
        texts = [str(ir.Module.parse(blob)) for blob in blobs]
    return [[line for line in text.splitlines() if "tt.dot " in line] for text in texts]


def _hopper_blocks(d: int) -> AttentionBlocks:
    """The Hopper profiles' bf16 tiles for head dim d (the kernel's default where they have none)."""
    return _profile_blocks("h200", d, jnp.bfloat16) or AttentionBlocks.for_head_dim(d, jnp.bfloat16)


GPU_CASES = {
    # Llama-3.1-8B attention: 32 q / 8 kv heads, d128, causal.
    "llama8b_d128": dict(b=1, t=2048, hq=32, hk=8, d=128),
    # Gemma-2-9B: 16 q / 8 kv heads, d256, softcap 50, window (smaller than T here).
    "gemma2_d256": dict(b=1, t=2048, hq=16, hk=8, d=256, softcap=50.0, sliding_window=1024),
    "packed_d128": dict(b=2, t=2048, hq=8, hk=2, d=128, segments=True),
    "ragged_d80": dict(b=1, t=1000, hq=4, hk=4, d=80, sliding_window=300),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_CASES))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("tiles", ["profile", "default"])
def test_gpu_matches_reference(name, dtype, tiles):
    # "profile": this GPU's profile's tiles and backends (on Hopper the Mosaic forward and dK/dV where they apply);
    # "default": the kernel's own Triton tiles.
    from jaxsloth.profiles import profile_for_device

    d = GPU_CASES[name]["d"]
    block = (
        profile_for_device().kernels.block_for("attention", jnp.zeros((1, 1, 1, d), dtype))
        if tiles == "profile"
        else None
    )
    _check(dtype=dtype, interpret=False, block=block, seed=1, **GPU_CASES[name])


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["gemma2_d256", "llama8b_d128", "ragged_d80", "packed_d128"])
@pytest.mark.parametrize("tiles", [(64, 64, 2), (64, 128, 2), (128, 64, 3)], ids=["k64q64s2", "k64q128s2", "k128q64s3"])
def test_gpu_mosaic_dkv_matches_reference(name, tiles):
    # ragged_d80: a padded head dim and a padded key block; packed_d128: segments fall back to Triton.
    d = GPU_CASES[name]["d"]
    if d > 128 and max(tiles[:2]) > 64:
        pytest.skip("d256: 128 query rows exceed shared memory, 128 keys the registers")
    block = dataclasses.replace(
        _hopper_blocks(d),
        block_k_dkv=tiles[0],
        block_q_dkv=tiles[1],
        num_stages_dkv=tiles[2],
        dkv_backend="mosaic",
    )
    _check(dtype=jnp.bfloat16, interpret=False, block=block, seed=3, **GPU_CASES[name])


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["gemma2_d256", "llama8b_d128", "ragged_d80"])
@pytest.mark.parametrize("keys", [64, 128])
def test_gpu_mosaic_forward_matches_reference(name, keys):
    d = GPU_CASES[name]["d"]
    if d > 128 and keys > 64:
        pytest.skip("d256: two 128-key K + V stages exceed shared memory")
    block = dataclasses.replace(_hopper_blocks(d), block_q=128, block_k=keys, num_stages=2, fwd_backend="mosaic")
    _check(dtype=jnp.bfloat16, interpret=False, block=block, seed=4, **GPU_CASES[name])


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["llama8b_d128", "ragged_d80"])
@pytest.mark.parametrize("keys", [64, 128])
def test_gpu_mosaic_dq_matches_reference(name, keys):
    block = dataclasses.replace(
        _hopper_blocks(GPU_CASES[name]["d"]),
        block_q_dq=128,
        block_k_dq=keys,
        num_stages_dq=2,
        dq_backend="mosaic",
    )
    _check(dtype=jnp.bfloat16, interpret=False, block=block, seed=5, **GPU_CASES[name])
