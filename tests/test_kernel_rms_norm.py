"""rms_norm Pallas kernel: forward and every gradient against jax.vjp of rms_norm_reference."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest

from jaxsloth.bench import kernel_rms_norm
from pallas_kernels.rms_norm import RmsNormBlock, rms_norm, rms_norm_reference
from tests.tolerances import assert_close, dtype_kind


def _inputs(shape, dtype, seed, residual):
    keys = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(keys[0], shape, jnp.float32).astype(dtype)
    weight = (1.0 + 0.3 * jax.random.normal(keys[1], shape[-1:], jnp.float32)).astype(dtype)
    res = jax.random.normal(keys[2], shape, jnp.float32).astype(dtype) if residual else None
    cts = tuple(jax.random.normal(k, shape, jnp.float32).astype(dtype) for k in keys[3:])
    return x, weight, res, cts


def _check(shape, dtype, weight_offset, residual, seed, interpret, block=None):
    x, weight, res, cts = _inputs(shape, dtype, seed, residual)
    kw = {"eps": 1e-6, "weight_offset": weight_offset}

    def kernel(*args):
        return rms_norm(*args, **kw, interpret=interpret, block=block)

    def reference(*args):
        return rms_norm_reference(*args, **kw)

    args = (x, weight) if res is None else (x, weight, res)
    out, vjp = jax.vjp(kernel, *args)
    ref_out, ref_vjp = jax.vjp(reference, *args)
    ct = cts[0] if res is None else cts
    for a, b, name in zip(jax.tree.leaves(out), jax.tree.leaves(ref_out), ("y", "sum")):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert_close(a, b, dtype_kind(dtype), err_msg=name)
    for a, b, name in zip(vjp(ct), ref_vjp(ct), ("dx", "dweight", "dresidual")):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert_close(a, b, dtype_kind(dtype, grad=True), err_msg=name)


@pytest.mark.parametrize(
    "shape, dtype, weight_offset, residual",
    [
        ((37, 200), jnp.float32, 0.0, False),
        ((2, 19, 200), jnp.float32, 1.0, True),
        ((37, 200), jnp.bfloat16, 0.0, True),
        ((37, 200), jnp.bfloat16, 1.0, False),
    ],
)
def test_matches_reference(shape, dtype, weight_offset, residual):
    _check(shape, dtype, weight_offset, residual, seed=len(shape) * 7 + int(residual), interpret=True)


def test_multi_step_backward_and_small_blocks():
    # Three row blocks per backward program, the last program running past the rows: exercises the
    # dweight partial sums and the row masks of the backward loop.
    block = RmsNormBlock(block_rows=4, num_warps=4, bwd_block_rows=2, bwd_num_warps=4, bwd_programs=7)
    _check((37, 200), jnp.float32, 1.0, True, seed=3, interpret=True, block=block)


def test_under_jit_and_grad():
    x, weight, _, _ = _inputs((5, 24), jnp.float32, seed=11, residual=False)

    def loss(fn, x, w):
        return jnp.sum(jnp.sin(fn(x, w)))

    got = jax.jit(jax.grad(lambda x, w: loss(rms_norm, x, w), argnums=(0, 1)))(x, weight)
    want = jax.grad(lambda x, w: loss(rms_norm_reference, x, w), argnums=(0, 1))(x, weight)
    for a, b in zip(got, want):
        assert_close(a, b, "f32_grad")


def test_rejects_bad_inputs():
    x = jnp.ones((3, 8))
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, jnp.ones((7,)))
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, jnp.ones((8,)), jnp.ones((3, 8), jnp.bfloat16))
    with pytest.raises(ValueError, match="8192"):
        rms_norm(jnp.ones((2, 8200)), jnp.ones((8200,)))
    with pytest.raises(ValueError, match="power of two"):
        RmsNormBlock(block_rows=3)


@pytest.mark.parametrize("d, residual", [(4096, False), (4096, True), (3584, True)])
def test_lowers_to_triton_on_cpu(triton_calls, d, residual):
    """Forward and backward lower to Triton IR for an H100 without a GPU (the default launch configuration of
    each width)."""
    x, weight, res, cts = _inputs((8, d), jnp.bfloat16, 0, residual)
    args = (x, weight) if res is None else (x, weight, res)
    ct = cts[0] if res is None else cts

    def fwd_bwd(args, ct):
        return jax.vjp(lambda *a: rms_norm(*a, weight_offset=1.0, interpret=False), *args)[1](ct)

    assert triton_calls(fwd_bwd, args, ct) == 2


@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape, weight_offset, residual",
    [((4096, 4096), 0.0, False), ((2, 2048, 4096), 1.0, True), ((1000, 3584), 1.0, True)],
)
def test_gpu_8b_shapes(shape, weight_offset, residual):
    _check(shape, jnp.bfloat16, weight_offset, residual, seed=5, interpret=False)


@pytest.mark.gpu
def test_gpu_f32():
    _check((333, 4096), jnp.float32, 0.0, True, seed=6, interpret=False)


def test_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.jsonl"
    kernel_rms_norm.main(["--smoke", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(row["max_err"] < 1e-4 and row["fwd_ms"] > 0 for row in rows)
