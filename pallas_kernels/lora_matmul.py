"""The 16-bit LoRA linear, as PEFT computes it:

    y[M, N] = x[M, K] @ W[N, K]^T + s * (x @ A^T)[M, r] @ B[N, r]^T        (PEFT: A [r, K], B [N, r])

Only the reference: XLA runs it as three GEMMs, which beat a fused Triton kernel (one pass over x for both
products, the LoRA term in the GEMM's epilogue) because cuBLAS's GEMM is faster than a Triton one at these
shapes (BENCHMARKS.md, LoRA linear). ``lora_delta`` is shared with the NF4 paths.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def lora_delta(x: jax.Array, lora_a: jax.Array, lora_b: jax.Array, lora_scale: float) -> jax.Array:
    """lora_scale * (x @ A^T) @ B^T with both products in x.dtype, as PEFT runs them (LoRA master weights may be
    f32 for the optimizer; the matmuls run in the activations' dtype). x: [..., K] -> [..., N]."""
    a, b = lora_a.astype(x.dtype), lora_b.astype(x.dtype)
    u = jnp.einsum("...i,ri->...r", x, a)
    return lora_scale * jnp.einsum("...r,or->...o", u, b)


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
