"""Rotary position embedding applied to q and k (Hugging Face's rotate-half layout)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    rot = 2 * cos.shape[-1]
    xr, xp = x[..., :rot].astype(jnp.float32), x[..., rot:]
    half = rot // 2
    x1, x2 = xr[..., :half], xr[..., half:]
    c = jnp.concatenate([cos, cos], axis=-1)[:, :, None, :]
    s = jnp.concatenate([sin, sin], axis=-1)[:, :, None, :]
    rotated = xr * c + jnp.concatenate([-x2, x1], axis=-1) * s
    out = rotated.astype(x.dtype)
    return out if xp.shape[-1] == 0 else jnp.concatenate([out, xp], axis=-1)


def rope_reference(
    q: jax.Array,
    k: jax.Array,
    positions: jax.Array,
    inv_freq: jax.Array,
    *,
    attention_scaling: float = 1.0,
):
    """q: [B, T, Hq, hd], k: [B, T, Hk, hd], positions: [B, T] int, inv_freq: [rot/2] f32.

    Rotates the first ``rot = 2 * len(inv_freq)`` features of each head (partial rotary keeps the rest);
    angles = positions * inv_freq in f32; cos and sin are multiplied by ``attention_scaling`` (longrope,
    yarn). Packed sequences pass per-segment positions. Returns (q', k') in their input dtypes.
    """
    angles = positions.astype(jnp.float32)[..., None] * inv_freq.astype(jnp.float32)
    cos = jnp.cos(angles) * attention_scaling
    sin = jnp.sin(angles) * attention_scaling
    return _rotate(q, cos, sin), _rotate(k, cos, sin)
