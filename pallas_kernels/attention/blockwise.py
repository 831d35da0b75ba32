"""Attention of one block pair of a longer sequence, returning the log-sum-exp, with the backward taking the whole
row's log-sum-exp: the pieces ring attention (``jaxsloth.models.ring_attention``) merges across devices.

The queries and keys are two contiguous chunks of one sequence: query i sits at key position ``q_offset + i``
(default: the queries are the last keys, as in ``attention``), so causal and sliding-window masks follow the true
distance; queries and keys carry segment ids of their own. ``attention_block`` runs the flash forward kernel and
returns (out, lse); ``attention_block_grad`` runs the dK/dV and dQ kernels against a log-sum-exp and
delta = rowsum(dO * O) of the merged output (FlashAttention-2's backward for one block of keys): summing its dQ
over every key block and its dK, dV over every query block gives the gradient of the whole attention.
``*_reference`` are the plain-jnp definitions.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.attention import _backward_dkv, _backward_dq, _forward, _pad_to, _validate, prepare
from pallas_kernels.attention.common import LOG2E, MASK_VALUE, AttentionBlocks

# A row that sees no key of the block ends with lse = -MASK_VALUE when the kernel skipped every key block of its
# rows (so its own backward's exp2 is 0), or near MASK_VALUE when the blocks it visited were masked throughout;
# merging needs either as -inf.
_EMPTY = -0.5 * MASK_VALUE


def _prepared(
    q, k, v, q_segment_ids, kv_segment_ids, q_offset, causal, sliding_window, softcap, scale, interpret, block
):
    _validate(q, k, v, kv_segment_ids, sliding_window, softcap)
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("q_segment_ids and kv_segment_ids are given together or not at all")
    (qp, kp, vp, segs), st = prepare(
        q,
        k,
        v,
        segment_ids=kv_segment_ids,
        causal=causal,
        sliding_window=sliding_window,
        softcap=softcap,
        scale=scale,
        interpret=interpret,
        block=block,
    )
    if segs:
        segs = (_pad_to(q_segment_ids.astype(jnp.int32), qp.shape[1]), segs[1])
    return (qp, kp, vp, segs), dataclasses.replace(st, q_offset=q_offset)


def attention_block(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    q_offset: int | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    interpret: bool | None = None,
    block: AttentionBlocks | None = None,
) -> tuple[jax.Array, jax.Array]:
    """q: [B, T, Hq, hd], k, v: [B, S, Hk, hd], segment ids [B, T] and [B, S] -> (out [B, T, Hq, hd] in q.dtype,
    lse [B, Hq, T] f32, natural log; -inf where a row sees no key, whose out is then meaningless and weighs 0).
    Not differentiable: ring attention's custom_vjp calls ``attention_block_grad``."""
    t, d = q.shape[1], q.shape[3]
    padded, st = _prepared(
        q, k, v, q_segment_ids, kv_segment_ids, q_offset, causal, sliding_window, softcap, scale, interpret, block
    )
    out, lse = _forward(*padded, st)
    lse = lse[:, :, :t]
    return out[:, :t, :, :d], jnp.where(jnp.abs(lse) > _EMPTY, -jnp.inf, lse / LOG2E)


def attention_block_grad(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    do: jax.Array,
    lse: jax.Array,
    delta: jax.Array,
    *,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    q_offset: int | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    interpret: bool | None = None,
    block: AttentionBlocks | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """This key block's share of the gradient. do: [B, T, Hq, hd]; lse, delta: [B, Hq, T] f32 of the whole row
    (natural log; finite: every real row sees its own key somewhere). Returns (dq, dk, dv) shaped like q, k, v."""
    t, s, d = q.shape[1], k.shape[1], q.shape[3]
    (qp, kp, vp, segs), st = _prepared(
        q, k, v, q_segment_ids, kv_segment_ids, q_offset, causal, sliding_window, softcap, scale, interpret, block
    )
    tp = qp.shape[1]
    dop = _pad_to(do.astype(q.dtype), tp, qp.shape[3])
    # Padded query rows: lse huge so their probabilities are 0 (their dO is 0 too).
    lse2 = jnp.pad(lse.astype(jnp.float32) * LOG2E, ((0, 0), (0, 0), (0, tp - t)), constant_values=-MASK_VALUE)
    delta = jnp.pad(delta.astype(jnp.float32), ((0, 0), (0, 0), (0, tp - t)))
    dk, dv = _backward_dkv(qp, kp, vp, dop, lse2, delta, segs, st)
    dq = _backward_dq(qp, kp, vp, dop, lse2, delta, segs, st)
    return dq[:, :t, :, :d].astype(q.dtype), dk[:, :s, :, :d].astype(k.dtype), dv[:, :s, :, :d].astype(v.dtype)


def _scores_and_mask(q, k, q_segment_ids, kv_segment_ids, q_offset, causal, sliding_window, softcap, scale):
    """Grouped scores [B, Hk, G, T, S] f32 (softcapped) and the visibility mask [B or 1, 1, 1, T, S]."""
    b, t, hq, d = q.shape
    s, hk = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else scale
    qg = q.reshape(b, t, hk, hq // hk, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    rows = (s - t if q_offset is None else q_offset) + jnp.arange(t)[:, None]  # key position of each query
    cols = jnp.arange(s)[None, :]
    mask = jnp.ones((1, t, s), bool)
    if causal:
        mask &= cols <= rows
    if sliding_window is not None:
        mask &= rows - cols < sliding_window
    if q_segment_ids is not None:
        mask = mask & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
    return scores, mask[:, None, None]


def attention_block_reference(
    q,
    k,
    v,
    *,
    q_segment_ids=None,
    kv_segment_ids=None,
    q_offset: int | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
):
    """The semantics of ``attention_block`` in plain jnp: (out [B, T, Hq, hd], lse [B, Hq, T])."""
    b, t, hq, d = q.shape
    scores, mask = _scores_and_mask(
        q, k, q_segment_ids, kv_segment_ids, q_offset, causal, sliding_window, softcap, scale
    )
    scores = jnp.where(mask, scores, -jnp.inf)
    lse = jax.nn.logsumexp(scores, axis=-1)  # [B, Hk, G, T]
    probs = jnp.where(mask, jnp.exp(scores - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]), 0.0)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, hq, d).astype(q.dtype), lse.reshape(b, hq, t)


def attention_block_grad_reference(
    q,
    k,
    v,
    do,
    lse,
    delta,
    *,
    q_segment_ids=None,
    kv_segment_ids=None,
    q_offset: int | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
):
    """The semantics of ``attention_block_grad`` in plain jnp: P = exp(S - lse), dV = P^T dO,
    dS = P (dO V^T - delta), then dQ, dK through the score transform (scale, softcap) by ``jax.vjp``."""
    b, t, hq, d = q.shape
    hk = k.shape[2]

    def scores_of(q, k):
        return _scores_and_mask(q, k, q_segment_ids, kv_segment_ids, q_offset, causal, sliding_window, softcap, scale)[
            0
        ]

    scores, vjp = jax.vjp(scores_of, q, k)
    mask = _scores_and_mask(q, k, q_segment_ids, kv_segment_ids, q_offset, causal, sliding_window, softcap, scale)[1]
    lse_g = lse.reshape(b, hk, hq // hk, t)[..., None]
    probs = jnp.where(mask, jnp.exp(scores - lse_g), 0.0)
    dog = do.reshape(b, t, hk, hq // hk, d).astype(jnp.float32)
    dv = jnp.einsum("bkgts,btkgd->bskd", probs, dog)
    dp = jnp.einsum("btkgd,bskd->bkgts", dog, v.astype(jnp.float32))
    ds = probs * (dp - delta.reshape(b, hk, hq // hk, t)[..., None])
    dq, dk = vjp(ds)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)
