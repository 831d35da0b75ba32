"""What the Triton and the Mosaic GPU attention kernels share: the tile settings, the trace-time constants, the
score transform (scale, softcap, log2 units), the visibility mask, the block ranges that skip fully masked blocks,
and the online-softmax steps. Both backends build on these, so they skip the same blocks, mask the same pairs and
save the same log-sum-exp (the backward kernels take either forward's)."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
from jax import lax

from pallas_kernels._common import cdiv, next_power_of_2

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
LOG2E = math.log2(math.e)  # scores are kept in log2 units so the kernels use exp2

BACKENDS = ("triton", "mosaic")


@dataclasses.dataclass(frozen=True)
class AttentionBlocks:
    """Tile sizes, launch settings and the backend of each of the three kernels (tiles: powers of two, at least
    16 for the dots).

    Forward: a program owns ``block_q`` query rows and walks ``block_k`` keys at a time. The dK/dV kernel
    owns ``block_k_dkv`` keys and walks ``block_q_dkv`` queries; the dQ kernel owns ``block_q_dq`` queries
    and walks ``block_k_dq`` keys. Blocks larger than the (power-of-two rounded) sequence are shrunk to fit.

    ``fwd_backend``, ``dkv_backend``, ``dq_backend``: "triton" (any GPU since Ampere) or "mosaic" (the Mosaic GPU
    kernels of ``pallas_kernels.attention.mosaic``: wgmma and TMA, so Hopper only; the caller, which knows the
    card, asks for them). Where a Mosaic kernel cannot express the case (f32 inputs, segment ids, a padded head
    dim below 64, dQ above 128) that kernel runs on Triton with ``for_head_dim``'s tiles instead. Mosaic tiles:
    forward 128 query rows per CTA (two warpgroups of 64), ``block_k`` keys per step, ``num_stages`` steps in
    flight; dK/dV 64 or 128 keys per CTA, ``block_q_dkv`` query rows (a multiple of 64) per step,
    ``num_stages_dkv`` in flight; dQ the forward's layout with ``block_k_dq`` keys and ``num_stages_dq`` (an
    opt-in that no profile selects: it has run only in the interpreter, never been timed on a GPU).
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
    fwd_backend: str = "triton"
    dkv_backend: str = "triton"
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
            # Keys: one or two wgmma M tiles of 64 (see the mosaic module); query rows in 64s: the contraction of
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
    def for_head_dim(cls, head_dim: int, dtype=jnp.bfloat16) -> AttentionBlocks:
        """The default: Triton tiles by bytes per tile row (padded head dim x itemsize), the fastest of
        ``jaxsloth.bench.kernel_attention --tune`` per row size (BENCHMARKS.md, attention tiles). The dK/dV
        kernel holds two f32 [block_k_dkv, d] accumulators in registers, hence its short key tiles at 512-byte
        rows; 1 KiB rows (f32 d256) take half the 512-byte tiles to stay in registers and shared memory. The
        Mosaic kernels are never a default here: they run on Hopper only, which the caller knows, not this
        package (jaxsloth's Hopper profiles carry their Mosaic tiles per head dim)."""
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
                # A third dQ stage was faster for d256 bf16 at every length tuned; f32 d128 shares these tiles
                # but keeps two, its K/V stages being twice the bytes.
                num_stages_dq=3 if jnp.dtype(dtype).itemsize == 2 else 2,
            )
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
class Static:
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
    # Key position of query 0 when the queries are not the last q_len keys: one block pair of a longer sequence
    # (ring attention's chunks). None: kv_len - q_len.
    q_offset: int | None = None

    @property
    def offset(self) -> int:
        """Query i sits at key position i + offset (by default the queries are the last q_len keys)."""
        return self.kv_len - self.q_len if self.q_offset is None else self.q_offset


def scale_scores(raw, st: Static):
    """Raw dot products -> (scores in log2 units, tanh of the softcap or None). Takes the products rather than
    q and k because the Mosaic kernels' dots are wgmma instructions, the Triton kernels' ``lax.dot_general``."""
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


def visible(q_start, k_start, bq: int, bk: int, qseg, kseg, st: Static, kv_major=False, iota=lax.broadcasted_iota):
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


def kv_block_range(q_start, bq: int, bk: int, st: Static):
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


def q_block_range(k_start, bq: int, bk: int, st: Static):
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


def _split(lo, hi, full_lo, full_hi, st: Static):
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


def online_softmax(s, m, l):
    """One key block of the online softmax (FlashAttention-2, section 3.1; scores in log2 units): (p, alpha,
    m_new, l_new), alpha rescaling what was accumulated before. ``broadcast_in_dim`` for the per-row broadcasts:
    both lowerings take it."""
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
