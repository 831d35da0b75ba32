"""Attention: causal, grouped-query, sliding window, logit softcap, packed segments.

Flash attention (FlashAttention-2, Dao 2023) in Pallas with the Triton lowering. The forward keeps a running
max and sum per query row (online softmax, section 3.1) in f32 and saves the output and the log-sum-exp.
The backward is the paper's split (section 3.2 / algorithm 2): one kernel per kv block that loops over the
query blocks (dK, dV), one per query block that loops over the kv blocks (dQ), with
delta = rowsum(dO * O) computed first. Scores are kept in log2 units so the kernels use exp2. On Hopper, each of
the three can run as a Mosaic GPU kernel instead for 16-bit inputs (``attention_mgpu``; ``AttentionBlocks``'s
``fwd_backend``, ``dkv_backend``, ``dq_backend``: the forward and dK/dV are the d128 and d256 defaults), built from
this module's score transform, softmax steps, masks and block ranges.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import cdiv, dot_precision, next_power_of_2, resolve_interpret, triton_compiler_params

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
LOG2E = math.log2(math.e)


BACKENDS = ("triton", "mosaic")


@dataclasses.dataclass(frozen=True)
class AttentionBlocks:
    """Tile sizes and Triton launch settings (powers of two, at least 16 for the dots).

    Forward: a program owns ``block_q`` query rows and walks ``block_k`` keys at a time. The dK/dV kernel
    owns ``block_k_dkv`` keys and walks ``block_q_dkv`` queries; the dQ kernel owns ``block_q_dq`` queries
    and walks ``block_k_dq`` keys. Blocks larger than the (power-of-two rounded) sequence are shrunk to fit.
    """

    block_q: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3
    block_q_dkv: int = 64
    block_k_dkv: int = 128
    block_q_dq: int = 128
    block_k_dq: int = 64
    num_warps_dkv: int = 8
    num_warps_dq: int = 8
    num_stages_dkv: int = 2
    num_stages_dq: int = 2
    # dK and dV from two kernels of one f32 accumulator each (same tiles), instead of one kernel holding both:
    # 25% more score recomputation, but at d256 the fused kernel's two [block_k, 256] accumulators force small
    # tiles. The dK kernel mirrors the dQ kernel. H200 (BENCHMARKS.md, fourth session): 3.17 against 3.27 ms at
    # Gemma-2 T=8192, but 0.83 against 0.68 at the Gemma-2 step's B2 x T2048 and 3.32 against 2.23 at the 8B
    # shape, so no default uses it.
    split_dkv: bool = False
    # "mosaic": dK and dV from the Mosaic GPU kernel (``attention_mgpu``: wgmma, TMA, warp-specialised; 64 or 128
    # keys per CTA, ``block_q_dkv`` queries per step, ``num_stages_dkv`` steps in flight) where it applies (16-bit
    # inputs, head dim a multiple of 64, no segment ids); elsewhere the Triton kernel with this head dim's
    # default tiles.
    dkv_backend: str = "triton"
    # "mosaic": the forward from the Mosaic GPU kernel (``attention_mgpu.forward``: 128 query rows per CTA, two
    # warpgroups of 64; ``block_k`` keys per step, ``num_stages`` steps in flight), where it applies (as above).
    fwd_backend: str = "triton"
    # "mosaic": dQ from the Mosaic GPU kernel (``attention_mgpu.dq``: the forward's layout, ``block_k_dq`` keys per
    # step, ``num_stages_dq`` stages; head dims up to 128). Not timed on the GPU yet, so no default takes it.
    dq_backend: str = "triton"

    def __post_init__(self):
        for name in ("dkv_backend", "fwd_backend", "dq_backend"):
            if getattr(self, name) not in BACKENDS:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {BACKENDS}")
        for kernel, bq, bk in (("forward", "block_q", "block_k"), ("dQ", "block_q_dq", "block_k_dq")):
            backend = self.fwd_backend if kernel == "forward" else self.dq_backend
            if backend == "mosaic" and (getattr(self, bq) != 128 or getattr(self, bk) % 64):
                raise ValueError(
                    f"the Mosaic {kernel} takes {bq}=128 and {bk} a multiple of 64, not "
                    f"{getattr(self, bq)}, {getattr(self, bk)}"
                )
        if self.dkv_backend == "mosaic" and (self.block_k_dkv not in (64, 128) or self.block_q_dkv % 64):
            # Keys: one or two wgmma M tiles of 64 (see attention_mgpu); query rows in 64s: the contraction of
            # dV += P^T dO and dK += dS^T Q runs over them, in whole 128-byte swizzle groups.
            raise ValueError(
                "the Mosaic dK/dV kernel takes block_k_dkv=64 or 128 and block_q_dkv a multiple of 64, not "
                f"{self.block_k_dkv} and {self.block_q_dkv}"
            )
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int):
                continue
            if f.name.startswith("block_") and (value < 16 or value & (value - 1)):
                raise ValueError(f"{f.name}={value} must be a power of two >= 16")
            if f.name.startswith("num_") and value < 1:
                raise ValueError(f"{f.name}={value} must be >= 1")

    @classmethod
    def for_head_dim(cls, head_dim: int, dtype=jnp.bfloat16, mosaic: bool = True) -> AttentionBlocks:
        """H200 defaults by bytes per tile row (padded head dim x itemsize), each kernel's tile the fastest
        of ``jaxsloth.bench.kernel_attention --tune`` (BENCHMARKS.md, 2026-11-29: bf16, T=8192; 256-byte
        rows on the Llama-3.1-8B shape, 512-byte rows on the Gemma-2-9B shape). The dK/dV kernel holds two
        f32 [block_k_dkv, d] accumulators in registers, hence its short key tiles at 512-byte rows. 1 KiB
        rows (f32 d256) were not tuned: they take half the 512-byte tiles to stay in registers and under
        227 KiB of shared memory. 16-bit d128 and d256 take the Mosaic GPU forward and dK/dV kernels (sixth
        session, T=8192: Gemma-2 shape forward+backward 4.35 against 5.94 ms, 8B shape 4.51 against 5.18)
        unless ``mosaic`` is False (the Triton tiles, for the cases those kernels do not cover)."""
        row_bytes = next_power_of_2(head_dim) * jnp.dtype(dtype).itemsize
        if row_bytes > 512:
            return cls(
                block_q=32,
                block_k=32,
                num_warps=4,
                num_stages=2,
                block_q_dkv=16,
                block_k_dkv=32,
                block_q_dq=32,
                block_k_dq=16,
                num_warps_dkv=4,
                num_warps_dq=4,
            )
        if row_bytes > 256:
            if mosaic and row_bytes == 512 and jnp.dtype(dtype).itemsize == 2:
                # dK/dV: K, V and two 64-row Q + dO stages, 192 KiB of shared memory, the most that fits at d256.
                # Forward: two 64-key K + V stages beside the 128 query rows (sixth session: 0.84 against the
                # Triton forward's 1.20 ms at Gemma-2 T=8192).
                mosaic_tiles = dict(block_q_dkv=64, block_k_dkv=64, num_stages_dkv=2, dkv_backend="mosaic")
                mosaic_tiles.update(block_q=128, block_k=64, num_stages=2, fwd_backend="mosaic")
                return dataclasses.replace(cls.for_head_dim(head_dim, dtype, mosaic=False), **mosaic_tiles)
            return cls(
                block_q=128,
                block_k=64,
                num_warps=8,
                num_stages=2,
                block_q_dkv=64,
                block_k_dkv=32,
                block_q_dq=128,
                block_k_dq=32,
                num_warps_dkv=4,
                num_warps_dq=8,
                # A third dQ stage: 9% faster at T=8192 and 14% at B2 x T=2048 (d256 bf16); f32 d128 shares
                # these tiles but keeps two, its K/V stages being twice the bytes.
                num_stages_dq=3 if jnp.dtype(dtype).itemsize == 2 else 2,
            )
        if mosaic and row_bytes == 256 and jnp.dtype(dtype).itemsize == 2:
            # dK/dV: 128 keys per CTA, each compute warpgroup dK and dV of its own 64 (sixth session, 8B shape
            # T=8192: 1.80 against the Triton kernel's 2.26 ms). Forward: 128 keys per step, two stages (1.01
            # against 1.30 ms; three stages exceed shared memory by 88 bytes).
            mosaic_tiles = dict(block_q_dkv=64, block_k_dkv=128, num_stages_dkv=2, dkv_backend="mosaic")
            mosaic_tiles.update(block_q=128, block_k=128, num_stages=2, fwd_backend="mosaic")
            return dataclasses.replace(cls.for_head_dim(head_dim, dtype, mosaic=False), **mosaic_tiles)
        return cls(
            block_q=256,
            block_k=64,
            num_warps=8,
            num_stages=3,
            block_q_dkv=64,
            block_k_dkv=128,
            block_q_dq=128,
            block_k_dq=64,
            num_warps_dkv=8,
            num_warps_dq=8,
            num_stages_dkv=3,
            num_stages_dq=3,
        )


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the kernels need that is known at trace time."""

    causal: bool
    window: int | None
    softcap: float | None
    scale: float
    q_len: int  # real (unpadded) lengths
    kv_len: int
    groups: int  # query heads per kv head
    has_segments: bool
    fast_tanh: bool  # softcap tanh through exp2 (inputs below f32 precision)
    precision: lax.Precision | None  # of every dot: HIGHEST (IEEE) for f32 inputs, else the fast default
    blocks: AttentionBlocks
    interpret: bool

    @property
    def offset(self) -> int:
        """Queries are the last q_len keys: query i sits at key position i + offset."""
        return self.kv_len - self.q_len


def _dot(a, b, st: _Static, *, trans_a: bool = False, trans_b: bool = False):
    """[m, k] @ [k, n] with f32 accumulation at ``st.precision``; transposes are folded into the dot."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=st.precision, preferred_element_type=jnp.float32)


def _scores(q, k, st: _Static):
    """q [m, d], k [n, d] -> (scores in log2 units [m, n], tanh of the softcap or None)."""
    return scale_scores(_dot(q, k, st, trans_b=True), st)


def scale_scores(raw, st: _Static):
    """Raw dot products -> (scores in log2 units, tanh of the softcap or None); shared with the Mosaic GPU
    kernel, whose dots are wgmma instructions rather than ``lax.dot_general``."""
    if st.softcap is None:
        return raw * (st.scale * LOG2E), None
    if st.fast_tanh:
        # tanh(x) = 1 - 2 / (exp(2x) + 1): one exp2 and a division instead of libdevice's longer tanhf;
        # saturates correctly at both ends. Near 0 it loses ~1e-7 absolute to cancellation: far below
        # bf16/f16 rounding, but visible at f32 tolerances, so f32 inputs keep the exact tanh.
        t = 1.0 - 2.0 / (jnp.exp2(raw * (2.0 * LOG2E * st.scale / st.softcap)) + 1.0)
    else:
        t = jnp.tanh(raw * (st.scale / st.softcap))
    return t * (st.softcap * LOG2E), t


def visible(q_start, k_start, bq: int, bk: int, qseg, kseg, st: _Static, kv_major=False, iota=lax.broadcasted_iota):
    """Boolean [bq, bk] visibility of keys k_start.. from queries q_start.. (None if all visible);
    [bk, bq] when ``kv_major``. ``iota``: the Mosaic GPU kernel passes one that places it in wgmma layout."""
    shape, q_axis = ((bk, bq), 1) if kv_major else ((bq, bk), 0)
    rows = q_start + st.offset + iota(jnp.int32, shape, q_axis)
    cols = k_start + iota(jnp.int32, shape, 1 - q_axis)
    conds = []
    if st.causal:
        conds.append(cols <= rows)
    if st.window is not None:
        conds.append(rows - cols < st.window)
    if st.kv_len % bk:
        conds.append(cols < st.kv_len)  # padded keys
    if qseg is not None:
        conds.append(kseg[:, None] == qseg[None, :] if kv_major else qseg[:, None] == kseg[None, :])
    if not conds:
        return None
    return functools.reduce(jnp.logical_and, conds)


def _clamp(x, lo, hi):
    return jnp.minimum(jnp.maximum(x, lo), hi)


def kv_block_range(q_start, bq: int, bk: int, st: _Static):
    """Blocks of keys seen by queries q_start..q_start+bq-1, from the block index (fully masked blocks are
    never visited): (lo, m1, m2, hi) with [m1, m2) the blocks that need no mask (none with segments)."""
    first = q_start + st.offset
    num_k = cdiv(st.kv_len, bk)
    lo, hi = 0, num_k
    full_lo, full_hi = 0, st.kv_len // bk  # the last block is partly padding unless kv_len % bk == 0
    if st.window is not None:
        lo = lax.div(jnp.maximum(first - st.window + 1, 0), bk)
        # i - j < window for every pair iff kb * bk >= last row - window + 1
        full_lo = lax.div(jnp.maximum(first + bq - st.window, 0) + bk - 1, bk)
    if st.causal:
        hi = jnp.minimum(num_k, lax.div(first + bq - 1, bk) + 1)
        full_hi = jnp.minimum(full_hi, lax.div(first + 1, bk))  # whole block at or before the first row
    return _split(lo, hi, full_lo, full_hi, st)


def q_block_range(k_start, bq: int, bk: int, st: _Static):
    """Blocks of queries that see keys k_start..k_start+bk-1: (lo, m1, m2, hi) as in ``kv_block_range``."""
    num_q = cdiv(st.q_len, bq)
    lo, hi = 0, num_q
    full_lo, full_hi = 0, num_q
    if st.causal:
        lo = lax.div(jnp.maximum(k_start - st.offset, 0), bq)
        # every row of the block at or after the last key
        full_lo = lax.div(jnp.maximum(k_start + bk - 1 - st.offset, 0) + bq - 1, bq)
    if st.window is not None:
        last = k_start + bk - 1 + st.window - 1 - st.offset  # last query row that sees the block
        hi = jnp.minimum(num_q, lax.div(jnp.maximum(last + 1, 0) + bq - 1, bq))
        full_hi = lax.div(jnp.maximum(k_start + st.window - st.offset, 0), bq)
    if st.kv_len % bk:
        # The block holding padded keys (index kv_len // bk) is masked throughout. Integer arithmetic: a
        # jnp.where on these scalars fails in the Triton lowering (i1/i32 operand mismatch).
        full_hi = full_hi * _clamp(st.kv_len // bk - lax.div(k_start, bk), 0, 1)
    return _split(lo, hi, full_lo, full_hi, st)


def _split(lo, hi, full_lo, full_hi, st: _Static):
    if st.has_segments:
        return lo, hi, hi, hi
    m1 = _clamp(full_lo, lo, hi)
    return lo, m1, _clamp(full_hi, m1, hi), hi


def masked_loops(bounds, body, carry):
    """Runs ``body(i, carry, masked)`` over [lo, m1) and [m2, hi) with masking and over [m1, m2) without."""
    lo, m1, m2, hi = bounds
    carry = lax.fori_loop(lo, m1, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(m1, m2, functools.partial(body, masked=False), carry)
    return lax.fori_loop(m2, hi, functools.partial(body, masked=True), carry)


def _split_refs(refs, n_in: int, has_segments: bool):
    """(inputs, (qseg_ref, kseg_ref) or (None, None), outputs) from a kernel's flat ref list."""
    ins, rest = refs[:n_in], refs[n_in:]
    if has_segments:
        return ins, rest[:2], rest[2:]
    return ins, (None, None), rest


def online_softmax(s, m, l):
    """One key block of the online softmax (FlashAttention-2, section 3.1; scores in log2 units): (p, alpha,
    m_new, l_new), alpha rescaling what was accumulated before. Shared with the Mosaic GPU forward, hence
    ``broadcast_in_dim`` (which both lowerings take) for the per-row broadcasts."""
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
    return p, alpha, m_new, l * alpha + p.sum(axis=1)


def softmax_result(acc, m, l):
    """(acc / l in f32, lse in log2 units) at the end of the online softmax. Every real row sees its own key, so
    l > 0 there; l == 0 only on padding rows whose blocks were all skipped. Their lse is made huge so the
    backward's exp2(s - lse) is 0 instead of NaN. ln(l) * log2(e): Mosaic GPU has no log2."""
    empty = l == 0.0
    l = jnp.where(empty, 1.0, l)
    return acc / lax.broadcast_in_dim(l, acc.shape, [0]), jnp.where(empty, -MASK_VALUE, m + jnp.log(l) * LOG2E)


def _fwd_kernel(*refs, st: _Static, bq: int, bk: int, num_q: int):
    (q_ref, k_ref, v_ref), (qseg_ref, kseg_ref), (o_ref, lse_ref) = _split_refs(refs, 3, st.has_segments)
    q_start = (num_q - 1 - pl.program_id(0)) * bq  # longest rows first (see the index maps)
    q = q_ref[...]
    qseg = None if qseg_ref is None else qseg_ref[...]

    def body(kb, carry, masked):
        acc, m, l = carry
        k_start = kb * bk
        k = k_ref[pl.ds(k_start, bk), :]
        v = v_ref[pl.ds(k_start, bk), :]
        s, _ = _scores(q, k, st)
        kseg = None if kseg_ref is None else kseg_ref[pl.ds(k_start, bk)]
        mask = visible(q_start, k_start, bq, bk, qseg, kseg, st) if masked else None
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        p, alpha, m, l = online_softmax(s, m, l)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, st)
        return acc, m, l

    init = (
        jnp.zeros((bq, q.shape[1]), jnp.float32),
        jnp.full((bq,), -jnp.inf, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    out, lse_ref[...] = softmax_result(*masked_loops(kv_block_range(q_start, bq, bk, st), body, init))
    o_ref[...] = out.astype(o_ref.dtype)


def _probs_and_dscores(q, k, v, do, lse, delta, mask, st: _Static, kv_major: bool = False, probs_only=False):
    """Recomputes P [bq, bk] and returns (P, dS) with dS the gradient w.r.t. the unscaled, uncapped scores
    divided by ``scale`` (the caller multiplies the final dQ, dK by it once). With ``kv_major`` both are
    computed transposed, [bk, bq], straight from K Q^T, so the dK/dV dots need no register transposes.
    ``probs_only``: (P, None), without the dP product (the dV kernel's need)."""
    if kv_major:
        s, t = _scores(k, q, st)
        lse, delta = lse[None, :], delta[None, :]
    else:
        s, t = _scores(q, k, st)
        lse, delta = lse[:, None], delta[:, None]
    if mask is not None:
        s = jnp.where(mask, s, MASK_VALUE)
    p = jnp.exp2(s - lse)
    if probs_only:
        return p, None
    dp = _dot(v, do, st, trans_b=True) if kv_major else _dot(do, v, st, trans_b=True)
    ds = p * (dp - delta)
    if t is not None:
        ds = ds * (1.0 - t * t)  # d(cap * tanh(x / cap)) / dx
    return p, ds


def _dkv_kernel(*refs, st: _Static, bq: int, bk: int, outputs: str):
    """dK and/or dV (``outputs``: "dkv", "dk" or "dv") of one key block, summed over its query heads."""
    ins, (qseg_ref, kseg_ref), out_refs = _split_refs(refs, 6, st.has_segments)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
    k_start = pl.program_id(0) * bk
    k = k_ref[...]
    v = v_ref[...] if outputs != "dv" else None  # dV needs P only, not dP = V dO^T
    kseg = None if kseg_ref is None else kseg_ref[...]
    bounds = q_block_range(k_start, bq, bk, st)
    want_dk, want_dv = outputs in ("dkv", "dk"), outputs in ("dkv", "dv")

    def group_body(g, carry):
        # The query heads of one group share these keys: their dK, dV are summed here, in registers.
        def body(qb, carry, masked):
            dk, dv = carry
            q_start = qb * bq
            rows = pl.ds(q_start, bq)
            q = q_ref[rows, g, :]
            do = do_ref[rows, g, :]
            qseg = None if qseg_ref is None else qseg_ref[rows]
            mask = visible(q_start, k_start, bq, bk, qseg, kseg, st, kv_major=True) if masked else None
            lse, delta = lse_ref[g, rows], delta_ref[g, rows]
            p_t, ds_t = _probs_and_dscores(q, k, v, do, lse, delta, mask, st, kv_major=True, probs_only=not want_dk)
            if want_dv:
                dv = dv + _dot(p_t.astype(do.dtype), do, st)
            if want_dk:
                dk = dk + _dot(ds_t.astype(q.dtype), q, st)
            return dk, dv

        return masked_loops(bounds, body, carry)

    zeros = jnp.zeros((bk, k.shape[1]), jnp.float32)
    dk, dv = lax.fori_loop(0, st.groups, group_body, (zeros if want_dk else None, zeros if want_dv else None))
    results = ([(dk * st.scale)] if want_dk else []) + ([dv] if want_dv else [])
    for ref, value in zip(out_refs, results, strict=True):
        ref[...] = value.astype(ref.dtype)


def _dq_kernel(*refs, st: _Static, bq: int, bk: int, num_q: int):
    ins, (qseg_ref, kseg_ref), (dq_ref,) = _split_refs(refs, 6, st.has_segments)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
    q_start = (num_q - 1 - pl.program_id(0)) * bq
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    qseg = None if qseg_ref is None else qseg_ref[...]

    def body(kb, dq, masked):
        k_start = kb * bk
        cols = pl.ds(k_start, bk)
        k = k_ref[cols, :]
        kseg = None if kseg_ref is None else kseg_ref[cols]
        mask = visible(q_start, k_start, bq, bk, qseg, kseg, st) if masked else None
        _, ds = _probs_and_dscores(q, k, v_ref[cols, :], do, lse, delta, mask, st)
        return dq + _dot(ds.astype(k.dtype), k, st)

    dq = masked_loops(kv_block_range(q_start, bq, bk, st), body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * st.scale).astype(dq_ref.dtype)


def _forward(q, k, v, segs, st: _Static):
    """Padded q [B, Tp, Hq, D], k, v [B, Sp, Hk, D] -> (out [B, Tp, Hq, D], lse [B, Hq, Tp] f32, log2)."""
    if st.blocks.fwd_backend == "mosaic":
        from pallas_kernels import attention_mgpu  # imports this module

        return attention_mgpu.forward(q, k, v, st)
    b, tp, hq, d = q.shape
    sp = k.shape[1]
    bq, bk, g = st.blocks.block_q, st.blocks.block_k, st.groups
    nq = tp // bq
    q_map = lambda i, bi, h: (bi, nq - 1 - i, h, 0)  # noqa: E731
    kv_map = lambda i, bi, h: (bi, 0, lax.div(h, g), 0)  # noqa: E731
    in_specs = [
        pl.BlockSpec((None, bq, None, d), q_map),
        pl.BlockSpec((None, sp, None, d), kv_map),
        pl.BlockSpec((None, sp, None, d), kv_map),
    ]
    if st.has_segments:
        in_specs += [
            pl.BlockSpec((None, bq), lambda i, bi, h: (bi, nq - 1 - i)),
            pl.BlockSpec((None, sp), lambda i, bi, h: (bi, 0)),
        ]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, st=st, bq=bq, bk=bk, num_q=nq),
        grid=(nq, b, hq),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, bq, None, d), q_map),
            pl.BlockSpec((None, None, bq), lambda i, bi, h: (bi, h, nq - 1 - i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, hq, tp), jnp.float32),
        ],
        compiler_params=triton_compiler_params(st.blocks.num_warps, st.blocks.num_stages),
        interpret=st.interpret,
        name="flash_attention_fwd",
    )(q, k, v, *segs)


def _backward_dkv(q, k, v, do, lse, delta, segs, st: _Static):
    """dK, dV [B, Sp, Hk, D]: one program per (kv block, batch, kv head), summing over its query heads; with
    ``split_dkv`` one such launch for dK and one for dV."""
    if st.blocks.dkv_backend == "mosaic":
        from pallas_kernels import attention_mgpu  # imports this module

        return attention_mgpu.dkv(q, k, v, do, lse, delta, st)
    if st.blocks.split_dkv:
        (dk,) = _dkv_call(q, k, v, do, lse, delta, segs, st, "dk")
        (dv,) = _dkv_call(q, k, v, do, lse, delta, segs, st, "dv")
        return dk, dv
    return tuple(_dkv_call(q, k, v, do, lse, delta, segs, st, "dkv"))


def _dkv_call(q, k, v, do, lse, delta, segs, st: _Static, outputs: str):
    b, tp, _, d = q.shape
    sp, hk = k.shape[1], k.shape[2]
    bq, bk, g = st.blocks.block_q_dkv, st.blocks.block_k_dkv, st.groups
    group_map = lambda j, bi, h: (bi, 0, h, 0)  # noqa: E731  (a block of g heads: heads h*g .. h*g+g-1)
    kv_map = lambda j, bi, h: (bi, j, h, 0)  # noqa: E731
    row_map = lambda j, bi, h: (bi, h, 0)  # noqa: E731
    in_specs = [
        pl.BlockSpec((None, tp, g, d), group_map),
        pl.BlockSpec((None, bk, None, d), kv_map),
        pl.BlockSpec((None, bk, None, d), kv_map),
        pl.BlockSpec((None, tp, g, d), group_map),
        pl.BlockSpec((None, g, tp), row_map),
        pl.BlockSpec((None, g, tp), row_map),
    ]
    if st.has_segments:
        in_specs += [
            pl.BlockSpec((None, tp), lambda j, bi, h: (bi, 0)),
            pl.BlockSpec((None, bk), lambda j, bi, h: (bi, j)),
        ]
    return pl.pallas_call(
        functools.partial(_dkv_kernel, st=st, bq=bq, bk=bk, outputs=outputs),
        grid=(sp // bk, b, hk),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, bk, None, d), kv_map)] * (2 if outputs == "dkv" else 1),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * (2 if outputs == "dkv" else 1),
        compiler_params=triton_compiler_params(st.blocks.num_warps_dkv, st.blocks.num_stages_dkv),
        interpret=st.interpret,
        name=f"flash_attention_bwd_{outputs}",
    )(q, k, v, do, lse, delta, *segs)


def _backward_dq(q, k, v, do, lse, delta, segs, st: _Static):
    """dQ [B, Tp, Hq, D]: one program per (query block, batch, query head)."""
    if st.blocks.dq_backend == "mosaic":
        from pallas_kernels import attention_mgpu  # imports this module

        return attention_mgpu.dq(q, k, v, do, lse, delta, st)
    b, tp, hq, d = q.shape
    sp = k.shape[1]
    bq, bk, g = st.blocks.block_q_dq, st.blocks.block_k_dq, st.groups
    nq = tp // bq
    q_map = lambda i, bi, h: (bi, nq - 1 - i, h, 0)  # noqa: E731
    kv_map = lambda i, bi, h: (bi, 0, lax.div(h, g), 0)  # noqa: E731
    row_map = lambda i, bi, h: (bi, h, nq - 1 - i)  # noqa: E731
    in_specs = [
        pl.BlockSpec((None, bq, None, d), q_map),
        pl.BlockSpec((None, sp, None, d), kv_map),
        pl.BlockSpec((None, sp, None, d), kv_map),
        pl.BlockSpec((None, bq, None, d), q_map),
        pl.BlockSpec((None, None, bq), row_map),
        pl.BlockSpec((None, None, bq), row_map),
    ]
    if st.has_segments:
        in_specs += [
            pl.BlockSpec((None, bq), lambda i, bi, h: (bi, nq - 1 - i)),
            pl.BlockSpec((None, sp), lambda i, bi, h: (bi, 0)),
        ]
    return pl.pallas_call(
        functools.partial(_dq_kernel, st=st, bq=bq, bk=bk, num_q=nq),
        grid=(nq, b, hq),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, bq, None, d), q_map),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=triton_compiler_params(st.blocks.num_warps_dq, st.blocks.num_stages_dq),
        interpret=st.interpret,
        name="flash_attention_bwd_dq",
    )(q, k, v, do, lse, delta, *segs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, segs, st: _Static):
    return _forward(q, k, v, segs, st)[0]


def _flash_fwd(q, k, v, segs, st: _Static):
    out, lse = _forward(q, k, v, segs, st)
    return out, (q, k, v, segs, out, lse)


def _flash_bwd(st: _Static, res, do):
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


def _resolve_backends(blocks: AttentionBlocks, dtype, width: int, has_segments: bool, interpret: bool):
    """The Mosaic kernels where they apply, else the Triton kernels with this head dim's default tiles."""
    from pallas_kernels import attention_mgpu  # imports this module

    supported = attention_mgpu.supports(dtype, width, has_segments, interpret)
    triton = AttentionBlocks.for_head_dim(width, dtype, mosaic=False)
    names = []
    if blocks.dkv_backend == "mosaic" and not supported:
        names += ["block_q_dkv", "block_k_dkv", "num_warps_dkv", "num_stages_dkv", "split_dkv", "dkv_backend"]
    if blocks.fwd_backend == "mosaic" and not supported:
        names += ["block_q", "block_k", "num_warps", "num_stages", "fwd_backend"]
    if blocks.dq_backend == "mosaic" and not (supported and width <= 128):
        names += ["block_q_dq", "block_k_dq", "num_warps_dq", "num_stages_dq", "dq_backend"]
    return dataclasses.replace(blocks, **{name: getattr(triton, name) for name in names})


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
    # The default takes the Mosaic dK/dV kernel on the GPU only: interpreted, it needs at least three XLA CPU
    # threads (see ``attention_mgpu.dkv``), so CPU runs keep the Triton kernel unless asked through ``block``.
    blocks = block or AttentionBlocks.for_head_dim(d, q.dtype, mosaic=not interpret)
    blocks = _resolve_backends(blocks, q.dtype, width, segment_ids is not None, interpret)
    blocks = _fit_blocks(blocks, t, s)
    q_multiple = max(blocks.block_q, blocks.block_q_dkv, blocks.block_q_dq)
    k_multiple = max(blocks.block_k, blocks.block_k_dkv, blocks.block_k_dq)
    tp, sp = cdiv(t, q_multiple) * q_multiple, cdiv(s, k_multiple) * k_multiple
    st = _Static(
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


def kernel_calls(st: _Static):
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
    Differentiable in q, k, v (Pallas backward). ``block`` defaults to
    ``AttentionBlocks.for_head_dim(hd, q.dtype)``.
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
