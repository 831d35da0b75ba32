"""The fused 16-bit LoRA linear (pallas_kernels/lora_matmul.py) against its reference: forward and dx, dA, dB in
interpret mode on odd shapes (CI), the Triton lowering, and the GPU (marked)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.lora_matmul import lora_matmul, lora_matmul_reference
from pallas_kernels.nf4_matmul import NF4MatmulBlock
from tests.tolerances import assert_close, assert_normwise_close, assert_vjp_close

# Small tiles so the odd shapes span several tiles with ragged M and N edges.
SMALL = NF4MatmulBlock(block_m=16, block_n=64, block_k=128, bwd_block_m=16, bwd_block_n=64, bwd_block_k=128)
SMALL_UNFUSED = NF4MatmulBlock(
    block_m=32, block_n=32, block_k=64, bwd_block_m=32, bwd_block_n=32, bwd_block_k=64, fuse_lora_a=False
)


def _case(lead, k, n, r, dtype, seed):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.standard_normal((n, k)) * 0.05, dtype)
    x = jnp.asarray(rng.standard_normal((*lead, k)), dtype)
    a = jnp.asarray(rng.standard_normal((r, k)) * 0.1, jnp.float32)  # f32 masters, as the optimizer keeps them
    b = jnp.asarray(rng.standard_normal((n, r)) * 0.1, jnp.float32)
    dy = jnp.asarray(rng.standard_normal((*lead, n)), dtype)
    return w, x, a, b, dy


def _check(lead, k, n, r, dtype, block, interpret, seed=0):
    w, x, a, b, dy = _case(lead, k, n, r, dtype, seed)
    assert lora_matmul_reference(x, w, a, b).dtype == x.dtype
    assert_vjp_close(
        lambda x, a, b: lora_matmul(x, w, a, b, 0.75, interpret=interpret, block=block),
        lambda x, a, b: lora_matmul_reference(x, w, a, b, 0.75),
        (x, a, b),
        dy,
        dtype,
        ("dx", "dlora_a", "dlora_b"),
    )


@pytest.mark.parametrize(
    "lead,k,n,r,dtype,block",
    [
        ((37,), 192, 200, 8, jnp.float32, SMALL),
        ((3, 13), 320, 72, 16, jnp.bfloat16, SMALL_UNFUSED),
        ((21,), 128, 136, 4, jnp.bfloat16, SMALL),
    ],
)
def test_matches_reference_interpret(lead, k, n, r, dtype, block):
    _check(lead, k, n, r, dtype, block, interpret=True)


def test_falls_back_where_the_kernel_does_not_apply():
    w, x, a, b, _ = _case((5,), 96, 24, 4, jnp.float32, seed=1)  # K = 96: not a multiple of 64
    assert_close(lora_matmul(x, w, a, b, 2.0, interpret=True), lora_matmul_reference(x, w, a, b, 2.0), "f32")
    w, x, a, b, _ = _case((5,), 128, 24, 4, jnp.float32, seed=1)
    dropped = x * 0.5  # the LoRA branch has its own input (dropout): the unfused reference
    got = lora_matmul(x, w, a, b, 2.0, lora_x=dropped, interpret=True)
    assert_close(got, lora_matmul_reference(x, w, a, b, 2.0, lora_x=dropped), "f32")
    with pytest.raises(ValueError, match="LoRA shapes"):
        lora_matmul(x, w, a[:, :64], b, interpret=True)
    with pytest.raises(ValueError, match="in-features"):
        lora_matmul(x[:, :64], w, a, b, interpret=True)


def test_lowers_to_triton_on_cpu(triton_calls):
    w, x, a, b, dy = _case((64,), 256, 128, 16, jnp.bfloat16, seed=2)

    def f(x, a, b, dy):
        g = lambda x, a, b: lora_matmul(x, w, a, b, 2.0, interpret=False)  # noqa: E731
        return jax.vjp(g, x, a, b)[1](dy)

    assert triton_calls(f, x, a, b, dy) == 2


@pytest.mark.gpu
@pytest.mark.parametrize(
    "lead,k,n,r,dtype,block",
    [
        ((37,), 192, 200, 8, jnp.float32, SMALL),
        ((300,), 1024, 520, 16, jnp.bfloat16, NF4MatmulBlock()),
        ((129,), 4096, 1024, 16, jnp.bfloat16, NF4MatmulBlock()),
    ],
)
def test_matches_reference_gpu(lead, k, n, r, dtype, block):
    if dtype == jnp.float32:
        # XLA:GPU runs f32 matmuls as TF32 by default (measured: the reference off by 9e-4 from the IEEE kernel).
        with jax.default_matmul_precision("highest"):
            _check(lead, k, n, r, dtype, block, interpret=False)
        return
    # bf16 on the GPU: the reference (PEFT's order) rounds the base output, the LoRA output and dA's bf16 GEMM
    # separately, the kernel once from f32, so the two differ by a few bf16 steps of each output's scale
    # wherever an element is near zero (several hundredths on the H200). Both are held to an
    # f32 truth from the same bf16 inputs, the kernel at least as close as the reference.
    w, x, a, b, dy = _case(lead, k, n, r, dtype, seed=0)
    f = lambda x, a, b: lora_matmul(x, w, a, b, 0.75, interpret=False, block=block)  # noqa: E731
    ref = lambda x, a, b: lora_matmul_reference(x, w, a, b, 0.75)  # noqa: E731
    f32 = lambda t: t.astype(jnp.float32)  # noqa: E731
    with jax.default_matmul_precision("highest"):
        truth_y, truth_vjp = jax.vjp(
            lambda x, a, b: lora_matmul_reference(x, f32(w), f32(a.astype(dtype)), f32(b.astype(dtype)), 0.75),
            f32(x),
            a,
            b,
        )
        truth = (truth_y, *truth_vjp(f32(dy)))
    names = ("y", "dx", "dlora_a", "dlora_b")
    errors = {}
    for label, fn in (("kernel", f), ("reference", ref)):
        y, vjp = jax.vjp(fn, x, a, b)
        errors[label] = [float(jnp.max(jnp.abs(f32(g) - t))) for g, t in zip((y, *vjp(dy)), truth, strict=True)]
        if label == "kernel":
            for name, g, t in zip(names, (y, *vjp(dy)), truth, strict=True):
                assert_normwise_close(g, t, "bf16_normwise", err_msg=f"{name} (lead={lead}, k={k}, n={n})")
    for name, kernel_err, reference_err in zip(names, errors["kernel"], errors["reference"], strict=True):
        assert kernel_err <= 1.5 * reference_err + 1e-6, (name, kernel_err, reference_err)
