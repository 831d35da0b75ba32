"""Attention: causal, grouped-query, sliding window, logit softcap, packed segments."""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(
    q_len: int,
    kv_len: int,
    *,
    segment_ids: jax.Array | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
) -> jax.Array:
    """Boolean [B or 1, T, S] mask, True where query i may see key j (queries are the last T keys).

    Sliding window as in transformers: j is visible from i iff i - j < sliding_window.
    """
    i = jnp.arange(q_len)[:, None] + (kv_len - q_len)
    j = jnp.arange(kv_len)[None, :]
    mask = jnp.ones((q_len, kv_len), bool)
    if causal:
        mask &= j <= i
    if sliding_window is not None:
        mask &= (i - j) < sliding_window
    mask = mask[None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, -q_len:, None] == segment_ids[:, None, :])
    return mask


def attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
) -> jax.Array:
    """q: [B, T, Hq, hd], k and v: [B, S, Hk, hd] with Hq % Hk == 0, segment_ids: [B, S] int or None.

    scores = (q . k) * scale (default hd**-0.5); softcap * tanh(scores / softcap) when softcap is set;
    masked per ``attention_mask``; softmax in f32. Returns [B, T, Hq, hd] in q.dtype. K/V are never
    repeated: query heads are grouped as [Hk, Hq // Hk].
    """
    b, t, hq, d = q.shape
    s, hk = k.shape[1], k.shape[2]
    if hq % hk:
        raise ValueError(f"{q.shape=} {k.shape=}: query heads must be a multiple of key/value heads")
    scale = d**-0.5 if scale is None else scale
    qg = q.reshape(b, t, hk, hq // hk, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    mask = attention_mask(t, s, segment_ids=segment_ids, causal=causal, sliding_window=sliding_window)
    scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, hq, d).astype(q.dtype)
