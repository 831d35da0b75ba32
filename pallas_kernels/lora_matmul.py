"""The 16-bit LoRA linear with the LoRA term fused into the base GEMM, forward and backward:

    y[M, N] = x[M, K] @ W[N, K]^T + s * (x @ A^T)[M, r] @ B[N, r]^T        (PEFT: A [r, K], B [N, r])

The kernels are nf4_matmul's, with W read as 16-bit tiles instead of dequantized NF4 ones: the forward reads each x
tile once for both x @ W^T and u = x @ A^T and adds s u @ B^T in its epilogue; the dx kernel accumulates dy @ W and
v = dy @ B from the same dy tile and adds (s v) @ A. dA and dB are r-wide XLA matmuls. W is frozen: it gets a zero
cotangent. Against XLA's three separate GEMMs, what fusing saves is the extra reads of x (forward) and dy
(backward) by the r-wide products and the [M, N] add of the LoRA output.

Measured on the H200 (BENCHMARKS.md, 2026-11-29): correct, but 1.1-1.6x slower than XLA's three GEMMs on the 8B
projections (its Triton GEMM reaches 360-380 TFLOP/s where cuBLAS reaches 600-710), so no profile chooses it (the
dispatch point's "lora_matmul" defaults to the reference); its temporaries are 128 KiB against XLA's 32-112 MiB.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels._common import resolve_interpret
from pallas_kernels.nf4_matmul import (
    KERNEL_BLOCKSIZE,
    KernelStatic,
    NF4MatmulBlock,
    backward_dx,
    forward,
    lora_delta,
    lora_grads,
    pad_rank,
)


def lora_matmul_reference(
    x: jax.Array,
    w: jax.Array,
    lora_a: jax.Array,
    lora_b: jax.Array,
    lora_scale: float = 1.0,
    *,
    lora_x: jax.Array | None = None,
) -> jax.Array:
    """x [..., K] @ w[N, K]^T + lora_scale * (lora_x @ A^T) @ B^T in x.dtype, the way PEFT's Linear computes it:
    the base output rounded to x.dtype, then the LoRA output added. lora_x: the LoRA branch's input when it
    differs from x (dropout), else x."""
    y = jnp.einsum("...i,oi->...o", x, w.astype(x.dtype))
    return y + lora_delta(x if lora_x is None else lora_x, lora_a, lora_b, lora_scale).astype(y.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lora_matmul_2d(st: KernelStatic, x, w, a, b):
    return forward(x, [w], a, b, st)[0]


def _lora_matmul_2d_fwd(st, x, w, a, b):
    y, uc = forward(x, [w], a, b, st)
    return y, (x, w, a, b, uc)


def _lora_matmul_2d_bwd(st, res, dy):
    x, w, a, b, uc = res
    dx, sv = backward_dx(dy.astype(x.dtype), [w], a, b, x.shape[1], st)
    return (dx, None, *lora_grads(st, x, dy, sv, uc, a, b))  # None: W is frozen (a zero cotangent)


_lora_matmul_2d.defvjp(_lora_matmul_2d_fwd, _lora_matmul_2d_bwd)


def lora_matmul(
    x: jax.Array,
    w: jax.Array,
    lora_a: jax.Array,
    lora_b: jax.Array,
    lora_scale: float = 1.0,
    *,
    lora_x: jax.Array | None = None,
    interpret: bool | None = None,
    block: NF4MatmulBlock | None = None,
) -> jax.Array:
    """``lora_matmul_reference`` through the fused Pallas kernels (f32 accumulation, one rounding of the sum).

    x: [..., K]; w: [N, K] (cast to x.dtype); lora_a: [r, K]; lora_b: [N, r]; lora_scale: a Python float.
    Gradients flow to x, lora_a and lora_b; w (frozen) gets zeros. Falls back to the reference when K is not a
    multiple of 64 (the kernels step K in 64-wide chunks) or when the LoRA branch has its own input (dropout).
    """
    n, k = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"x.shape={x.shape} does not end in the weight's in-features {k} (w.shape={w.shape})")
    r = lora_a.shape[0]
    if lora_a.shape != (r, k) or lora_b.shape != (n, r):
        raise ValueError(
            f"LoRA shapes must be lora_a [r, {k}] and lora_b [{n}, r], got {lora_a.shape} and {lora_b.shape}"
        )
    if k % KERNEL_BLOCKSIZE or lora_x is not None:
        return lora_matmul_reference(x, w, lora_a, lora_b, lora_scale, lora_x=lora_x)
    st = KernelStatic(
        shape=(n, k),
        double_quant=False,
        scale=float(lora_scale),
        interpret=resolve_interpret(interpret),
        block=block or NF4MatmulBlock(),
        dense=True,
    )
    a, b = pad_rank(lora_a, lora_b, x.dtype)
    y = _lora_matmul_2d(st, x.reshape(-1, k), w.astype(x.dtype), a, b)
    return y.reshape(*x.shape[:-1], n)
