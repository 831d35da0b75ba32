"""Attention: causal, grouped-query, sliding window, logit softcap, packed segments.

Flash attention (FlashAttention-2, Dao 2023) in Pallas: ``attention`` pads the inputs, runs the forward kernel and,
through a hand-written ``jax.custom_vjp``, the dK/dV and dQ kernels; ``attention_reference`` in plain jnp defines
the semantics. Each of the three kernels runs on the backend its ``AttentionBlocks`` names: the Triton kernels
(``triton``; any GPU since Ampere) or the Mosaic GPU ones (``mosaic``; Hopper: wgmma, TMA, warp specialisation),
both built from ``common``'s score transform, masks, block ranges and softmax steps. This package never asks which
GPU it runs on: the caller (jaxsloth's per-GPU profiles) chooses the backends and tiles.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels._common import cdiv, dot_precision, lowered_once, next_power_of_2, resolve_interpret
from pallas_kernels.attention import triton
from pallas_kernels.attention.common import MASK_VALUE, AttentionBlocks, Static

__all__ = ["MASK_VALUE", "AttentionBlocks", "attention", "attention_mask", "attention_reference"]


def _mosaic():
    """The Mosaic GPU kernels, imported on first use (loading the Mosaic GPU compiler takes about a second)."""
    from pallas_kernels.attention import mosaic

    return mosaic


@lowered_once("st")
def _forward(q, k, v, segs, st: Static):
    """Padded q [B, Tp, Hq, D], k, v [B, Sp, Hk, D] -> (out [B, Tp, Hq, D], lse [B, Hq, Tp] f32, log2 units)."""
    if st.blocks.fwd_backend == "mosaic":
        return _mosaic().forward(q, k, v, st)
    return triton.forward(q, k, v, segs, st)


@lowered_once("st")
def _backward_dkv(q, k, v, do, lse, delta, segs, st: Static):
    """dK, dV [B, Sp, Hk, D] for padded inputs, lse and delta [B, Hq, Tp] f32."""
    if st.blocks.dkv_backend == "mosaic":
        return _mosaic().dkv(q, k, v, do, lse, delta, st)
    return triton.dkv(q, k, v, do, lse, delta, segs, st)


@lowered_once("st")
def _backward_dq(q, k, v, do, lse, delta, segs, st: Static):
    """dQ [B, Tp, Hq, D] for padded inputs."""
    if st.blocks.dq_backend == "mosaic":
        return _mosaic().dq(q, k, v, do, lse, delta, st)
    return triton.dq(q, k, v, do, lse, delta, segs, st)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, segs, st: Static):
    return _forward(q, k, v, segs, st)[0]


def _flash_fwd(q, k, v, segs, st: Static):
    out, lse = _forward(q, k, v, segs, st)
    return out, (q, k, v, segs, out, lse)


def _flash_bwd(st: Static, res, do):
    q, k, v, segs, out, lse = res
    # delta_i = rowsum(dO_i * O_i) = sum_j P_ij dP_ij (FlashAttention-2, eq. in section 3.2), computed once
    # per row here rather than in each kv block; XLA fuses it into one pass over O and dO. Same precision as
    # the kernels: XLA:GPU would otherwise round f32 O and dO to TF32 here.
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32), precision=st.precision)
    dk, dv = _backward_dkv(q, k, v, do, lse, delta, segs, st)
    dq = _backward_dq(q, k, v, do, lse, delta, segs, st)
    return dq, dk, dv, jax.tree.map(lambda _: None, segs)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _fit_blocks(blocks: AttentionBlocks, q_len: int, kv_len: int) -> AttentionBlocks:
    """Shrinks blocks longer than the sequence (rounded up to a power of two, at least 16); the Mosaic dK/dV
    kernel's tiles are fixed (64 keys, query rows in 64s: short sequences are padded to them)."""
    q_cap, k_cap = max(16, next_power_of_2(q_len)), max(16, next_power_of_2(kv_len))
    fixed = {"block_k_dkv", "block_q_dkv"} if blocks.dkv_backend == "mosaic" else set()
    fixed |= {"block_q", "block_k"} if blocks.fwd_backend == "mosaic" else set()
    fixed |= {"block_q_dq", "block_k_dq"} if blocks.dq_backend == "mosaic" else set()
    return dataclasses.replace(
        blocks,
        **{
            f.name: min(getattr(blocks, f.name), q_cap if f.name.startswith("block_q") else k_cap)
            for f in dataclasses.fields(blocks)
            if f.name.startswith("block_") and f.name not in fixed
        },
    )


def _resolve_backends(blocks: AttentionBlocks, dtype, width: int, has_segments: bool) -> AttentionBlocks:
    """Each kernel asked for on Mosaic runs there where the Mosaic kernel can express the case (``mosaic.supports``;
    dQ head dims up to 128), else on Triton with this head dim's default tiles."""
    if "mosaic" not in (blocks.fwd_backend, blocks.dkv_backend, blocks.dq_backend):
        return blocks
    supported = _mosaic().supports(dtype, width, has_segments)
    triton_tiles = AttentionBlocks.for_head_dim(width, dtype)
    names = []
    if blocks.dkv_backend == "mosaic" and not supported:
        names += ["block_q_dkv", "block_k_dkv", "num_warps_dkv", "num_stages_dkv", "dkv_backend"]
    if blocks.fwd_backend == "mosaic" and not supported:
        names += ["block_q", "block_k", "num_warps", "num_stages", "fwd_backend"]
    if blocks.dq_backend == "mosaic" and not (supported and width <= 128):
        names += ["block_q_dq", "block_k_dq", "num_warps_dq", "num_stages_dq", "dq_backend"]
    return dataclasses.replace(blocks, **{name: getattr(triton_tiles, name) for name in names})


def _pad_to(x: jax.Array, length: int, width: int | None = None) -> jax.Array:
    """Zero-pads axis 1 to ``length`` and (for 4-d x) the last axis to ``width``."""
    pads = [(0, 0)] * x.ndim
    pads[1] = (0, length - x.shape[1])
    if width is not None:
        pads[-1] = (0, width - x.shape[-1])
    return x if all(p == (0, 0) for p in pads) else jnp.pad(x, pads)


def _validate(q, k, v, segment_ids, sliding_window, softcap) -> None:
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"expected q [B, T, Hq, hd], k and v [B, S, Hk, hd]: {q.shape=} {k.shape=} {v.shape=}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"batch and head dim of q and k differ: {q.shape=} {k.shape=}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape=} {k.shape=}: query heads must be a multiple of key/value heads")
    if q.shape[1] > k.shape[1]:
        raise ValueError(f"{q.shape=} {k.shape=}: more queries than keys is not supported")
    if not 16 <= q.shape[3] <= 256:
        raise ValueError(f"head dim {q.shape[3]} must be in [16, 256]")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise TypeError(f"q, k, v must share one of f32/bf16/f16: {q.dtype=} {k.dtype=} {v.dtype=}")
    if segment_ids is not None and segment_ids.shape != (k.shape[0], k.shape[1]):
        raise ValueError(f"{segment_ids.shape=} must be [B, S] = {(k.shape[0], k.shape[1])}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"{sliding_window=} must be >= 1")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"{softcap=} must be > 0")


def prepare(q, k, v, *, segment_ids, causal, sliding_window, softcap, scale, interpret, block):
    """Padded (q, k, v, segs) and the kernels' static settings for ``attention``'s arguments; the benchmark's
    per-kernel tuner (``jaxsloth.bench.kernel_attention --tune``) launches the three kernels from these."""
    b, t, hq, d = q.shape
    s, hk = k.shape[1], k.shape[2]
    # Zero head-dim padding changes no score and no output column; zero query/key padding is masked (keys)
    # or gets a zero cotangent (queries, through the final slice).
    width = max(16, next_power_of_2(d))
    interpret = resolve_interpret(interpret)
    blocks = block or AttentionBlocks.for_head_dim(d, q.dtype)
    blocks = _resolve_backends(blocks, q.dtype, width, segment_ids is not None)
    blocks = _fit_blocks(blocks, t, s)
    q_multiple = max(blocks.block_q, blocks.block_q_dkv, blocks.block_q_dq)
    k_multiple = max(blocks.block_k, blocks.block_k_dkv, blocks.block_k_dq)
    tp, sp = cdiv(t, q_multiple) * q_multiple, cdiv(s, k_multiple) * k_multiple
    st = Static(
        causal=causal,
        window=sliding_window,
        softcap=None if softcap is None else float(softcap),
        scale=float(d**-0.5 if scale is None else scale),
        q_len=t,
        kv_len=s,
        groups=hq // hk,
        has_segments=segment_ids is not None,
        fast_tanh=q.dtype != jnp.float32,
        precision=dot_precision(q.dtype),
        blocks=blocks,
        interpret=interpret,
    )
    segs = ()
    if segment_ids is not None:
        segment_ids = segment_ids.astype(jnp.int32)
        segs = (_pad_to(segment_ids[:, s - t :], tp), _pad_to(segment_ids, sp))
    return (_pad_to(q, tp, width), _pad_to(k, sp, width), _pad_to(v, sp, width), segs), st


def kernel_calls(st: Static):
    """The three Pallas launches for padded inputs: (forward(q, k, v, segs) -> (out, lse),
    dkv(q, k, v, do, lse, delta, segs) -> (dk, dv), dq(same) -> dq); for per-kernel timing."""
    return (
        functools.partial(_forward, st=st),
        functools.partial(_backward_dkv, st=st),
        functools.partial(_backward_dq, st=st),
    )


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    interpret: bool | None = None,
    block: AttentionBlocks | None = None,
) -> jax.Array:
    """Flash attention with the semantics of ``attention_reference``.

    q: [B, T, Hq, hd], k and v: [B, S, Hk, hd] (Hq % Hk == 0, T <= S; K/V are shared by groups of Hq // Hk
    query heads without being repeated), segment_ids: [B, S] int or None. Returns [B, T, Hq, hd] in q.dtype.
    Differentiable in q, k, v (Pallas backward). ``block``: tiles and backends, by default
    ``AttentionBlocks.for_head_dim(hd, q.dtype)`` (the Triton kernels, which run on any GPU since Ampere).
    """
    _validate(q, k, v, segment_ids, sliding_window, softcap)
    t, d = q.shape[1], q.shape[3]
    padded, st = prepare(
        q,
        k,
        v,
        segment_ids=segment_ids,
        causal=causal,
        sliding_window=sliding_window,
        softcap=softcap,
        scale=scale,
        interpret=interpret,
        block=block,
    )
    out = _flash(*padded, st)
    return out[:, :t, :, :d]


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
