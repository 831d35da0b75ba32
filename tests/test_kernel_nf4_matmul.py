"""The fused NF4 dequant-matmul + LoRA kernel against its jnp reference: forward and the gradients of x,
lora_a and lora_b, in interpret mode on CPU and compiled on a GPU (marked)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsloth.quant import quantize_nf4
from pallas_kernels.lora_matmul import lora_matmul_reference
from pallas_kernels.nf4_matmul import (
    NF4MatmulBlock,
    nf4_dequantize_reference,
    nf4_dequantize_xla,
    nf4_matmul,
    nf4_matmul_reference,
    nf4_matmul_xla16,
)
from tests.tolerances import assert_close, assert_vjp_close

# Small tiles so the odd shapes below span several tiles with ragged M and N edges.
SMALL = NF4MatmulBlock(block_m=16, block_n=64, block_k=128, bwd_block_m=16, bwd_block_n=64, bwd_block_k=128)
SMALL_GATHER_UNFUSED = NF4MatmulBlock(
    block_m=32,
    block_n=32,
    block_k=64,
    bwd_block_m=32,
    bwd_block_n=32,
    bwd_block_k=64,
    lookup="gather",
    fuse_lora_a=False,
)


def _case(m, k, n, r, dtype, double_quant, seed):
    rng = np.random.default_rng(seed)
    q = quantize_nf4(rng.standard_normal((n, k)).astype(np.float32) * 0.05, double_quant=double_quant)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    lora = None
    if r:
        lora = (
            jnp.asarray(rng.standard_normal((r, k)) * 0.1, dtype),
            jnp.asarray(rng.standard_normal((n, r)) * 0.1, dtype),
        )
    dy = jnp.asarray(rng.standard_normal((m, n)), dtype)
    return q, x, lora, dy


def _check(m, k, n, r, dtype, double_quant, block, interpret, seed=0):
    q, x, lora, dy = _case(m, k, n, r, dtype, double_quant, seed)

    def kernel(x, a=None, b=None):
        return nf4_matmul(x, q, a, b, 0.75, interpret=interpret, block=block)

    def reference(x, a=None, b=None):
        return nf4_matmul_reference(x, q, a, b, 0.75)

    primals = (x, *(lora or ()))
    assert reference(*primals).dtype == x.dtype
    assert_vjp_close(kernel, reference, primals, dy, dtype, ("dx", "dlora_a", "dlora_b")[: len(primals)])


@pytest.mark.parametrize(
    "m,k,n,r,dtype,double_quant,block",
    [
        (37, 192, 200, 8, jnp.float32, True, SMALL),
        (37, 320, 200, 16, jnp.bfloat16, True, SMALL_GATHER_UNFUSED),
        (37, 192, 200, 8, jnp.bfloat16, False, SMALL),
        (20, 128, 72, 0, jnp.float32, False, SMALL_GATHER_UNFUSED),
    ],
)
def test_matches_reference_interpret(m, k, n, r, dtype, double_quant, block):
    _check(m, k, n, r, dtype, double_quant, block, interpret=True)


def test_leading_axes_and_fallback():
    rng = np.random.default_rng(1)
    # K = 96 is not a multiple of 64: quant blocks straddle rows, so the public function uses the reference.
    for k in (128, 96):
        q = quantize_nf4(rng.standard_normal((24, k)).astype(np.float32), double_quant=True)
        x = jnp.asarray(rng.standard_normal((2, 3, k)), jnp.float32)
        y = nf4_matmul(x, q, interpret=True, block=SMALL)
        assert y.shape == (2, 3, 24)
        assert_close(y, nf4_matmul_reference(x, q), "f32")


def test_bad_operands_raise():
    q = quantize_nf4(np.ones((8, 64), np.float32), double_quant=False)
    x = jnp.ones((4, 64), jnp.float32)
    with pytest.raises(ValueError, match="in-features"):
        nf4_matmul(x[:, :32], q)
    with pytest.raises(ValueError, match="absmax"):
        nf4_matmul(x, dataclasses.replace(q, double_quant=True))
    with pytest.raises(ValueError, match="LoRA shapes"):
        a, b = jnp.ones((4, 64)), jnp.ones((4, 8))
        nf4_matmul(x, q, a, b)
    with pytest.raises(TypeError, match="NF4Weight"):
        nf4_matmul(x, q.packed)
    with pytest.raises(ValueError, match="block_k"):
        NF4MatmulBlock(block_k=32)


def test_lowers_to_triton_on_cpu(triton_calls):
    """Both kernels lower to Triton IR for an H100 without a GPU."""
    for double_quant, block in ((True, NF4MatmulBlock()), (False, SMALL_GATHER_UNFUSED)):
        q, x, (a, b), dy = _case(64, 256, 128, 16, jnp.bfloat16, double_quant, seed=2)

        def f(x, a, b, dy, q=q, block=block):
            def g(x, a, b):
                return nf4_matmul(x, q, a, b, 2.0, interpret=False, block=block)

            return jax.vjp(g, x, a, b)[1](dy)

        assert triton_calls(f, x, a, b, dy) == 2


@pytest.mark.gpu
@pytest.mark.parametrize(
    "m,k,n,r,dtype,double_quant,block",
    [
        (37, 192, 200, 8, jnp.float32, True, SMALL),
        (37, 320, 200, 16, jnp.bfloat16, True, SMALL_GATHER_UNFUSED),
        (300, 1024, 520, 16, jnp.bfloat16, True, NF4MatmulBlock()),
        (300, 1024, 520, 16, jnp.bfloat16, False, NF4MatmulBlock(lookup="gather")),
        (129, 4096, 1024, 0, jnp.bfloat16, True, NF4MatmulBlock()),
    ],
)
def test_matches_reference_gpu(m, k, n, r, dtype, double_quant, block):
    # XLA:GPU runs f32 matmuls as TF32 by default; the reference must use IEEE f32 as the kernel does.
    with jax.default_matmul_precision("highest"):
        _check(m, k, n, r, dtype, double_quant, block, interpret=False)


def _xla_case(seed, lead, k, n, r, dtype, double_quant):
    """An NF4 weight [n, k], x, r-rank f32 LoRA factors (none when r == 0) and a cotangent, drawn in that order
    from one generator."""
    rng = np.random.default_rng(seed)
    q = quantize_nf4(rng.standard_normal((n, k)).astype(np.float32) * 0.05, double_quant=double_quant)
    x = jnp.asarray(rng.standard_normal((*lead, k)), dtype)
    lora = (
        ()
        if not r
        else (jnp.asarray(rng.standard_normal((r, k)) * 0.1), jnp.asarray(rng.standard_normal((n, r)) * 0.1))
    )
    dy = jnp.asarray(rng.standard_normal((*lead, n)), dtype)
    return q, x, lora, dy


@pytest.mark.parametrize(
    "lead,k,n,r,dtype,double_quant",
    [
        ((2, 19), 192, 200, 8, jnp.float32, True),
        ((37,), 320, 72, 16, jnp.bfloat16, True),
        ((5,), 128, 96, 0, jnp.bfloat16, False),
        ((3, 4), 50, 37, 4, jnp.float32, True),  # 37 x 50 is no multiple of 64: the reference's layout path
    ],
)
def test_xla_dequantize_matches_reference(lead, k, n, r, dtype, double_quant):
    q, *_ = _xla_case(3, lead, k, n, r, dtype, double_quant)
    # The dequantized weight is bit-identical, in any dtype.
    for dt in (jnp.float32, dtype):
        np.testing.assert_array_equal(
            np.asarray(nf4_dequantize_xla(q, dt), np.float32), np.asarray(nf4_dequantize_reference(q, dt), np.float32)
        )


def test_xla16_path_keeps_no_16bit_weight_for_the_backward():
    # One reason the XLA path has a custom VJP: autodiff of the reference keeps dequant(W) (N x K in 16 bits)
    # alive from forward to backward, which across 32 layers without remat is a second, 16-bit model.
    from jax._src.ad_checkpoint import saved_residuals

    rng = np.random.default_rng(4)
    q = quantize_nf4(rng.standard_normal((256, 128)).astype(np.float32), double_quant=True)
    x = jnp.asarray(rng.standard_normal((8, 128)), jnp.bfloat16)
    a, b = jnp.zeros((4, 128)), jnp.zeros((256, 4))

    def shapes(impl):
        return [r.shape for r, _ in saved_residuals(lambda x, a, b: impl(x, q, a, b, 1.0), x, a, b)]

    assert (256, 128) in shapes(nf4_matmul_reference)
    assert (256, 128) not in shapes(nf4_matmul_xla16)


@pytest.mark.parametrize(
    "lead,k,n,r,dtype,double_quant",
    [
        ((37,), 320, 72, 16, jnp.bfloat16, True),
        ((2, 19), 192, 200, 8, jnp.float32, True),
        ((5,), 128, 96, 0, jnp.bfloat16, False),
        ((3, 4), 50, 37, 4, jnp.bfloat16, True),  # not a multiple of 64: the reference's dequantization
    ],
)
def test_xla16_path_is_peft_order(lead, k, n, r, dtype, double_quant):
    # PEFT + bitsandbytes: base output rounded to x.dtype, LoRA output in x.dtype, added in x.dtype, which is
    # the 16-bit LoRA linear's reference applied to the dequantized weight.
    q, x, lora, dy = _xla_case(5, lead, k, n, r, dtype, double_quant)
    w = nf4_dequantize_reference(q, dtype)

    def xla16(x, *ab):
        return nf4_matmul_xla16(x, q, *(ab or (None, None)), 0.75)

    def peft_order(x, *ab):
        if not ab:
            return jnp.einsum("...i,oi->...o", x, w)
        return lora_matmul_reference(x, w, *ab, 0.75)

    assert xla16(x, *lora).dtype == x.dtype and xla16(x, *lora).shape == (*lead, n)
    assert_vjp_close(xla16, peft_order, (x, *lora), dy, dtype, ("dx", "dlora_a", "dlora_b")[: 1 + len(lora)])


def test_xla16_path_has_no_f32_token_by_n_array():
    # What the PEFT order is for: f32 products (the reference's) materialize f32 [tokens, N] arrays; xla16 none.
    rng = np.random.default_rng(6)
    m, k, n, r = 24, 128, 200, 8
    q = quantize_nf4(rng.standard_normal((n, k)).astype(np.float32) * 0.05, double_quant=True)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    a, b = jnp.zeros((r, k)), jnp.zeros((n, r))
    dy = jnp.ones((m, n), jnp.bfloat16)

    def hlo(impl):
        def f(x, a, b, dy):
            fn = lambda x, a, b: impl(x, q, a, b, 0.5)  # noqa: E731
            y, vjp = jax.vjp(fn, x, a, b)
            return y, vjp(dy)

        return jax.jit(f).lower(x, a, b, dy).as_text()

    assert f"tensor<{m}x{n}xf32>" in hlo(nf4_matmul_reference)
    assert f"tensor<{m}x{n}xf32>" not in hlo(nf4_matmul_xla16)


def test_benchmark_smoke(tmp_path):
    from jaxsloth.bench.kernel_nf4_matmul import main

    out = tmp_path / "nf4.jsonl"
    main(["--smoke", "--out", str(out)])
    lines = out.read_text().splitlines()
    assert lines and all('"op": "nf4_matmul"' in line for line in lines)
