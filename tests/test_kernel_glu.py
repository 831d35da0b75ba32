"""swiglu/geglu Pallas kernels: forward and gradients (gate, up) against jax.vjp of the references."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest

from jaxsloth.bench import kernel_glu
from pallas_kernels.glu import GluBlock, geglu, geglu_reference, swiglu, swiglu_reference
from tests.tolerances import assert_close, dtype_kind

_OPS = {"swiglu": (swiglu, swiglu_reference), "geglu": (geglu, geglu_reference)}
# Several programs along both axes with masked edges: 21 rows and 300 features in 4 x 128 / 8 x 64 tiles.
_SMALL = GluBlock(block_rows=4, block_cols=128, num_warps=4, bwd_block_rows=8, bwd_block_cols=64, bwd_num_warps=4)


def _check(op, shape, dtype, seed, interpret, block=None):
    kernel, reference = _OPS[op]
    keys = jax.random.split(jax.random.key(seed), 3)
    # Gate spread over [-12, 12]-ish so both saturated tails of the activation are exercised.
    gate = (4.0 * jax.random.normal(keys[0], shape, jnp.float32)).astype(dtype)
    up = jax.random.normal(keys[1], shape, jnp.float32).astype(dtype)
    ct = jax.random.normal(keys[2], shape, jnp.float32).astype(dtype)
    out, vjp = jax.vjp(lambda g, u: kernel(g, u, interpret=interpret, block=block), gate, up)
    ref, ref_vjp = jax.vjp(reference, gate, up)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert_close(out, ref, dtype_kind(dtype))
    for a, r, name in zip(vjp(ct), ref_vjp(ct), ("dgate", "dup")):
        assert a.dtype == r.dtype and a.shape == r.shape, name
        assert_close(a, r, dtype_kind(dtype, grad=True), err_msg=name)


@pytest.mark.parametrize("op", ["swiglu", "geglu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_matches_reference(op, dtype):
    block = _SMALL if dtype == jnp.float32 else None
    _check(op, (3, 7, 300), dtype, seed=len(op) + jnp.dtype(dtype).itemsize, interpret=True, block=block)


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        swiglu(jnp.ones((2, 300)), jnp.ones((2, 301)))
    with pytest.raises(ValueError, match="power of two"):
        GluBlock(block_cols=1000)


@pytest.mark.parametrize("op", ["swiglu", "geglu"])
def test_lowers_to_triton_on_cpu(triton_calls, op):
    """Forward and backward lower to Triton IR for an H100 without a GPU."""
    x = jnp.ones((3, 14336), jnp.bfloat16)

    def fwd_bwd(gate, up, ct):
        out, vjp = jax.vjp(lambda g, u: _OPS[op][0](g, u, interpret=False), gate, up)
        return out, vjp(ct)  # the output too: an unused forward would be dropped before lowering

    assert triton_calls(fwd_bwd, x, x, x) == 2


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["swiglu", "geglu"])
def test_gpu_8b_shape(op):
    _check(op, (4096, 14336), jnp.bfloat16, seed=1, interpret=False)


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["swiglu", "geglu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
def test_gpu_dtypes(op, dtype):
    _check(op, (2, 333, 14336), dtype, seed=2, interpret=False)


def test_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.jsonl"
    kernel_glu.main(["--smoke", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(row["max_err"] < 1e-4 and row["fwd_ms"] > 0 for row in rows)
