"""Fused LM-head cross-entropy (Pallas) against the plain-jnp reference: loss, count, dhidden, dhead."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.cross_entropy import (
    CrossEntropyBlocks,
    cross_entropy,
    cross_entropy_chunked,
    cross_entropy_reference,
)
from tests.tolerances import assert_close, dtype_kind, tolerance

IGNORE = -100
# Small tiles so the odd test shapes span several token, vocab, D and backward-chunk tiles; V = 1003 leaves
# a partial last vocab tile and a backward tail chunk (1003 = 512 + 491).
SMALL = CrossEntropyBlocks(block_n=16, block_v=256, block_d=64, chunk_v=512)


def _inputs(n, d, v, dtype, seed=0, ignored=()):
    kh, kw, kt = jax.random.split(jax.random.key(seed), 3)
    hidden = jax.random.normal(kh, (n, d), jnp.float32).astype(dtype)
    # Scaled so the logits spread over a few units: softmax is neither one-hot nor uniform.
    head = (jax.random.normal(kw, (v, d), jnp.float32) * (2.0 / np.sqrt(d))).astype(dtype)
    targets = jax.random.randint(kt, (n,), 0, v, jnp.int32)
    targets = targets.at[np.asarray(ignored, dtype=np.int32)].set(IGNORE)
    return hidden, head, targets


def _check(hidden, head, targets, *, softcap=None, block=None, interpret=None, g=0.75, chunk=None):
    """Compares forward outputs and the vjp with a non-unit loss cotangent against the reference; ``chunk``
    checks the token-chunked path (cross_entropy_chunked) instead of the kernel."""
    kind, grad_kind = dtype_kind(hidden.dtype), dtype_kind(hidden.dtype, grad=True)

    def kernel(h, w):
        if chunk is not None:
            return cross_entropy_chunked(h, w, targets, softcap=softcap, chunk=chunk)
        return cross_entropy(h, w, targets, softcap=softcap, block=block, interpret=interpret)

    def reference(h, w):
        return cross_entropy_reference(h, w, targets, softcap=softcap)

    @jax.jit
    def run(h, w):
        out, vjp = jax.vjp(kernel, h, w)
        out_ref, vjp_ref = jax.vjp(reference, h, w)
        cot = (jnp.float32(g), np.zeros((), jax.dtypes.float0))
        return out, vjp(cot), out_ref, vjp_ref(cot)

    (loss, count), (dh, dw), (loss_ref, count_ref), (dh_ref, dw_ref) = run(hidden, head)
    assert int(count) == int(count_ref)
    assert count.dtype == jnp.int32 and loss.dtype == jnp.float32
    assert dh.dtype == hidden.dtype and dw.dtype == head.dtype
    # The loss sums N per-token terms; compare the mean so one tolerance fits every N.
    n = max(int(count_ref), 1)
    assert_close(loss / n, loss_ref / n, kind, "loss")
    assert_close(dh, dh_ref, grad_kind, "dhidden")
    assert_close(dw, dw_ref, grad_kind, "dhead")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("softcap", [None, 30.0], ids=["nocap", "cap30"])
def test_matches_reference(dtype, softcap):
    # Tokens 16..31 are one whole token tile of ignored targets; 3 and 36 are stray ones.
    hidden, head, targets = _inputs(37, 72, 1003, dtype, ignored=[3, 36, *range(16, 32)])
    _check(hidden, head, targets, softcap=softcap, block=SMALL)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("softcap", [None, 30.0], ids=["nocap", "cap30"])
@pytest.mark.parametrize("chunk", [16, 37, 4096])
def test_chunked_matches_reference(dtype, softcap, chunk):
    # 37 tokens in chunks of 16: two whole chunks and a padded one; 37: exactly one; 4096: clipped to one.
    hidden, head, targets = _inputs(37, 72, 1003, dtype, seed=5, ignored=[3, 36, *range(16, 32)])
    _check(hidden, head, targets, softcap=softcap, chunk=chunk)


def test_chunked_frozen_head_and_evaluation():
    hidden, head, targets = _inputs(37, 72, 1003, jnp.bfloat16, seed=6, ignored=[7])

    def loss(h, w, head_grad):
        return cross_entropy_chunked(h, w, targets, softcap=30.0, chunk=16, head_grad=head_grad)[0]

    dh, dw = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(hidden, head, False)
    dh_ref = jax.grad(lambda h: cross_entropy_reference(h, head, targets, softcap=30.0)[0])(hidden)
    assert_close(dh, dh_ref, "bf16_grad", "dhidden")
    assert not np.any(np.asarray(dw, np.float32))

    def dots(fn, *args):
        return str(jax.make_jaxpr(fn, static_argnums=2)(hidden, head, *args)).count("dot_general")

    # Frozen head: two GEMMs per chunk (logits, dhidden), the head's third only when it is trained; without
    # gradients, the logits GEMM alone.
    assert dots(jax.grad(loss, argnums=(0, 1)), False) == 2
    assert dots(jax.grad(loss, argnums=(0, 1)), True) == 3
    assert dots(loss, True) == 1
    assert_close(loss(hidden, head, True), cross_entropy_reference(hidden, head, targets, softcap=30.0)[0], "bf16")


def test_many_tiles_chunks_and_groups():
    # 3 token tiles in L2 groups of 2 (a partial last group), 8 vocab tiles, 3 D steps with a masked last
    # one, 3 full backward chunks plus a tail: every index path of the tiling.
    block = CrossEntropyBlocks(block_n=16, block_v=128, block_d=32, chunk_v=256, group_n=2)
    hidden, head, targets = _inputs(37, 72, 1003, jnp.float32, seed=1, ignored=[0, 20])
    _check(hidden, head, targets, softcap=30.0, block=block)


def test_default_blocks_small_problem():
    # Blocks shrink to the problem: one tile, one chunk, V and D far below the defaults.
    hidden, head, targets = _inputs(21, 40, 300, jnp.float32, seed=2, ignored=[5])
    _check(hidden, head, targets)


def test_all_tokens_ignored():
    hidden, head, targets = _inputs(37, 72, 1003, jnp.float32, seed=3, ignored=range(37))
    (loss, count), vjp = jax.vjp(lambda h, w: cross_entropy(h, w, targets, block=SMALL), hidden, head)
    dh, dw = vjp((jnp.float32(1.0), np.zeros((), jax.dtypes.float0)))
    assert int(count) == 0 and float(loss) == 0.0
    assert not np.any(np.asarray(dh)) and not np.any(np.asarray(dw))


def test_frozen_head_skips_dhead():
    hidden, head, targets = _inputs(37, 72, 1003, jnp.bfloat16, seed=4, ignored=[7])

    def loss(h, w, head_grad):
        return cross_entropy(h, w, targets, softcap=30.0, block=SMALL, head_grad=head_grad)[0]

    dh, dw = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(hidden, head, False)
    dh_ref = jax.grad(lambda h: cross_entropy_reference(h, head, targets, softcap=30.0)[0])(hidden)
    assert_close(dh, dh_ref, "bf16_grad", "dhidden")
    assert dw.shape == head.shape and not np.any(np.asarray(dw, np.float32))

    # One GEMM fewer per backward chunk: the dhead product is never built.
    def dots(head_grad):
        jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(hidden, head, head_grad)
        return str(jaxpr).count("dot_general")

    assert dots(False) < dots(True)


@pytest.mark.parametrize("fn", [cross_entropy, cross_entropy_chunked])
def test_rejects_bad_arguments(fn):
    hidden, head, targets = _inputs(8, 16, 32, jnp.float32)
    with pytest.raises(ValueError, match="head.shape"):
        fn(hidden, head[:, :8], targets)
    with pytest.raises(ValueError, match="targets"):
        fn(hidden, head, targets[:4])
    with pytest.raises(TypeError, match="targets"):
        fn(hidden, head, targets.astype(jnp.float32))
    with pytest.raises(TypeError, match="dtype"):
        fn(hidden, head.astype(jnp.bfloat16), targets)
    with pytest.raises(ValueError, match="softcap"):
        fn(hidden, head, targets, softcap=0.0)
    with pytest.raises(ValueError, match="chunk=0"):
        cross_entropy_chunked(hidden, head, targets, chunk=0)
    with pytest.raises(ValueError, match="block_v"):
        CrossEntropyBlocks(block_v=96)
    with pytest.raises(ValueError, match="chunk_v"):
        CrossEntropyBlocks(block_v=256, chunk_v=384)


def test_bench_smoke(tmp_path):
    from jaxsloth.bench import kernel_cross_entropy

    out = tmp_path / "ce.jsonl"
    kernel_cross_entropy.main(["--smoke", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["impl"] for r in rows} == {"pallas", "chunked", "xla_reference"}
    for r in rows:
        assert r["op"] == "cross_entropy" and r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0
        # Max abs gradient error of bf16 values near 1: a bf16 step or two.
        assert r["max_err"] <= tolerance("bf16_grad")["atol"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("softcap", [None, 30.0], ids=["nocap", "cap30"])
@pytest.mark.parametrize("chunk", [None, 384], ids=["kernel", "chunked"])
def test_gpu_matches_reference(dtype, softcap, chunk):
    hidden, head, targets = _inputs(1000, 520, 32003, dtype, seed=5, ignored=[0, *range(128, 256)])
    # Both paths multiply f32 in IEEE f32; keep XLA's reference off TF32 so they can agree to 1e-5.
    with jax.default_matmul_precision("highest"):
        _check(hidden, head, targets, softcap=softcap, interpret=False, chunk=chunk)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [4096, 2053])
@pytest.mark.parametrize("chunk", [None, 1024], ids=["kernel", "chunked"])
def test_gpu_llama_vocab(n, chunk):
    # Llama-3 vocabulary (128256 = 15 chunks of 8192 + a 5376 tail) at the default H200 blocks.
    hidden, head, targets = _inputs(n, 1024, 128256, jnp.bfloat16, seed=6, ignored=range(0, n, 7))
    _check(hidden, head, targets, interpret=False, chunk=chunk)


@pytest.mark.gpu
def test_gpu_frozen_head():
    hidden, head, targets = _inputs(777, 512, 50257, jnp.bfloat16, seed=7, ignored=[1, 2])
    dh = jax.grad(lambda h: cross_entropy(h, head, targets, interpret=False, head_grad=False)[0])(hidden)
    dh_ref = jax.grad(lambda h: cross_entropy_reference(h, head, targets)[0])(hidden)
    assert_close(dh, dh_ref, "bf16_grad", "dhidden")


def test_dispatch_sends_a_trained_head_to_the_kernel(monkeypatch):
    # The profile's "chunked" loss for a frozen head; a trained head goes to the Pallas kernel (no f32 [V, D]
    # accumulator). Both must equal the reference through the dispatch point.
    import pallas_kernels.cross_entropy as ce
    from jaxsloth.ops import KernelChoice, Ops

    called = []
    for name in ("cross_entropy", "cross_entropy_chunked"):
        fn = getattr(ce, name)
        monkeypatch.setattr(ce, name, lambda *a, _fn=fn, _n=name, **k: called.append(_n) or _fn(*a, **k))
    ops = Ops(KernelChoice(cross_entropy="chunked", interpret=True))
    hidden, head, targets = _inputs(37, 72, 1003, jnp.float32, seed=8, ignored=[2])
    want = cross_entropy_reference(hidden, head, targets)[0]
    for head_grad, impl in ((False, "cross_entropy_chunked"), (True, "cross_entropy")):
        called.clear()
        assert_close(ops.cross_entropy(hidden, head, targets, head_grad=head_grad)[0], want, "f32")
        assert called == [impl]
