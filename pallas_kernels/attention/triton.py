"""Flash attention's three kernels in Pallas with the Triton lowering (any NVIDIA GPU since Ampere, and the
interpreter on CPU).

FlashAttention-2 (Dao 2023): the forward keeps a running max and sum per query row (online softmax, section 3.1)
in f32 and saves the output and the log-sum-exp. The backward is the paper's split (section 3.2 / algorithm 2):
one kernel per kv block that loops over the query blocks (dK, dV), one per query block that loops over the kv
blocks (dQ), with delta = rowsum(dO * O) computed first by the caller.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import triton_compiler_params
from pallas_kernels.attention.common import (
    MASK_VALUE,
    Static,
    kv_block_range,
    masked_loops,
    online_softmax,
    q_block_range,
    scale_scores,
    softmax_result,
    visible,
)


def _dot(a, b, st: Static, *, trans_a: bool = False, trans_b: bool = False):
    """[m, k] @ [k, n] with f32 accumulation at ``st.precision``; transposes are folded into the dot."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=st.precision, preferred_element_type=jnp.float32)


def _scores(q, k, st: Static):
    """q [m, d], k [n, d] -> (scores in log2 units [m, n], tanh of the softcap or None)."""
    return scale_scores(_dot(q, k, st, trans_b=True), st)


def _split_refs(refs, n_in: int, has_segments: bool):
    """(inputs, (qseg_ref, kseg_ref) or (None, None), outputs) from a kernel's flat ref list."""
    ins, rest = refs[:n_in], refs[n_in:]
    if has_segments:
        return ins, rest[:2], rest[2:]
    return ins, (None, None), rest


def _fwd_kernel(*refs, st: Static, bq: int, bk: int, num_q: int):
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


def _probs_and_dscores(q, k, v, do, lse, delta, mask, st: Static, kv_major: bool = False):
    """Recomputes P [bq, bk] and returns (P, dS) with dS the gradient w.r.t. the unscaled, uncapped scores
    divided by ``scale`` (the caller multiplies the final dQ, dK by it once). With ``kv_major`` both are
    computed transposed, [bk, bq], straight from K Q^T, so the dK/dV dots need no register transposes."""
    if kv_major:
        s, t = _scores(k, q, st)
        lse, delta = lse[None, :], delta[None, :]
    else:
        s, t = _scores(q, k, st)
        lse, delta = lse[:, None], delta[:, None]
    if mask is not None:
        s = jnp.where(mask, s, MASK_VALUE)
    p = jnp.exp2(s - lse)
    dp = _dot(v, do, st, trans_b=True) if kv_major else _dot(do, v, st, trans_b=True)
    ds = p * (dp - delta)
    if t is not None:
        ds = ds * (1.0 - t * t)  # d(cap * tanh(x / cap)) / dx
    return p, ds


def _dkv_kernel(*refs, st: Static, bq: int, bk: int):
    """dK and dV of one key block, summed over its query heads."""
    ins, (qseg_ref, kseg_ref), (dk_ref, dv_ref) = _split_refs(refs, 6, st.has_segments)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
    k_start = pl.program_id(0) * bk
    k = k_ref[...]
    v = v_ref[...]
    kseg = None if kseg_ref is None else kseg_ref[...]
    bounds = q_block_range(k_start, bq, bk, st)

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
            p_t, ds_t = _probs_and_dscores(q, k, v, do, lse, delta, mask, st, kv_major=True)
            return dk + _dot(ds_t.astype(q.dtype), q, st), dv + _dot(p_t.astype(do.dtype), do, st)

        return masked_loops(bounds, body, carry)

    zeros = jnp.zeros((bk, k.shape[1]), jnp.float32)
    dk, dv = lax.fori_loop(0, st.groups, group_body, (zeros, zeros))
    dk_ref[...] = (dk * st.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(*refs, st: Static, bq: int, bk: int, num_q: int):
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


def forward(q, k, v, segs, st: Static):
    """Padded q [B, Tp, Hq, D], k, v [B, Sp, Hk, D] -> (out [B, Tp, Hq, D], lse [B, Hq, Tp] f32, log2)."""
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


def dkv(q, k, v, do, lse, delta, segs, st: Static):
    """dK, dV [B, Sp, Hk, D]: one program per (kv block, batch, kv head), summing over its query heads."""
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
    dk_dv = pl.pallas_call(
        functools.partial(_dkv_kernel, st=st, bq=bq, bk=bk),
        grid=(sp // bk, b, hk),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, bk, None, d), kv_map)] * 2,
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
        compiler_params=triton_compiler_params(st.blocks.num_warps_dkv, st.blocks.num_stages_dkv),
        interpret=st.interpret,
        name="flash_attention_bwd_dkv",
    )(q, k, v, do, lse, delta, *segs)
    return tuple(dk_dv)


def dq(q, k, v, do, lse, delta, segs, st: Static):
    """dQ [B, Tp, Hq, D]: one program per (query block, batch, query head)."""
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
