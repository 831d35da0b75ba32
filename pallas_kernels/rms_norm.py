"""RMSNorm, optionally fused with the residual add.

y = (x * rsqrt(mean(x^2) + eps)) * (weight + weight_offset), computed in f32 and cast to x.dtype.
Gemma stores the weight minus one, hence ``weight_offset=1.0`` there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm_reference(
    x: jax.Array,
    weight: jax.Array,
    residual: jax.Array | None = None,
    *,
    eps: float = 1e-6,
    weight_offset: float = 0.0,
):
    """x: [..., D], weight: [D], residual: like x or None.

    Returns y (x.dtype) when ``residual`` is None, else ``(y, s)`` with s = x + residual (x.dtype) and
    y = norm(s): the sum is what the next residual branch adds to.
    """
    if residual is not None:
        x = x + residual
    x32 = x.astype(jnp.float32)
    var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(var + eps) * (weight.astype(jnp.float32) + weight_offset)
    y = y.astype(x.dtype)
    return y if residual is None else (y, x)
