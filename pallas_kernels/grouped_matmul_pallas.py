"""The grouped matmul of mixture-of-experts layers as Pallas Triton kernels: every work item of the sorted rows
in one launch, instead of ``grouped_matmul_tiled``'s sequential loop of small GEMMs.

    y[M, N] = x[M, K] @ w[g, N, K]^T   for the rows m of group g (groups are consecutive runs of group_sizes rows)

Weights in HF orientation [out, in], as ``pallas_kernels.grouped_matmul`` documents; its
``grouped_matmul_reference`` (``jax.lax.ragged_dot_general``) is the reference.

Work items (megablox's schedule, computed in XLA and passed in as int32 arrays): tile t of ``block_m`` sorted rows
meets every group from the one holding its first row to the one holding its last, at most tiles + groups - 1
(tile, group) pairs. Kernels:
- forward, grid (work items, N blocks): one [block_m, block_n] tile of x @ w[g]^T with a K loop. Rows outside the
  item's group load as zero and are not stored, so the items sharing a tile write disjoint rows (no atomics).
  Rows past the groups' total (ragged_dot leaves them zero) are stored as zeros by the tile's last-group item.
- dx = dy @ w[g]: the same kernel with w[g] read as [N, K] (contraction over its first axis).
- dw[g] = dy_g^T @ x_g, grid (groups, N blocks, K blocks): a loop over the group's rows in ``dw_block_m`` steps
  starting at the group's first row; an empty group runs no step and stores zeros. XLA drops it when w is frozen
  (QLoRA), as it drops any unused output.
Blocks need not divide M, N or K (masked loads and stores); inputs bf16, f16 or f32, f32 accumulation, output in
x.dtype; w is cast to x.dtype as it is loaded.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import (
    cdiv,
    dot_precision,
    lowered_once,
    next_power_of_2,
    resolve_interpret,
    triton_compiler_params,
)


@dataclasses.dataclass(frozen=True)
class GroupedMatmulBlock:
    """Launch configuration (powers of two >= 16).

    block_m: sorted rows per work item (the schedule's tile); block_n: output columns per program; block_k: the
        contraction step. The dx kernel runs the same tiles (its output columns are K, its contraction N).
    n_fastest: launch the N blocks of one work item next to each other (its rows are read from HBM once, the
        expert's weight once per item) instead of one N block across all items (each expert's weight block is
        read once while its items run together, the rows once per N block).
    dw_block_m: rows per step of the weight gradient's loop over a group; dw_block_n / dw_block_k: its dw tile.
    """

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3
    n_fastest: bool = True  # faster on both Qwen3-30B-A3B projections on the H200 (BENCHMARKS.md)
    dw_block_m: int = 64
    dw_block_n: int = 128
    dw_block_k: int = 128
    dw_num_warps: int = 4
    dw_num_stages: int = 3

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k", "dw_block_m", "dw_block_n", "dw_block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"GroupedMatmulBlock.{name} must be a power of two >= 16, got {v}")


def _fit(block: int, size: int) -> int:
    """The block, shrunk (in powers of two, not below 16) for a small dimension."""
    return min(block, max(16, next_power_of_2(size)))


def work_items(group_sizes: jax.Array, rows: int, block_m: int) -> tuple[jax.Array, ...]:
    """The (tile, group) work items of ``rows`` sorted rows in tiles of ``block_m``, each [tiles + groups - 1] int32:
    tile, group, and the item's rows [lo, hi) (empty for the unused items at the end) and [lo, store_hi) it stores
    (hi, or the tile's end for the item of a tile's last group: rows past the groups' total are written as zeros).
    The searches compare every pair at once: a few hundred tiles and items, one fused op each, where jnp's default
    search is a loop of tiny kernels, run for every projection of every layer."""
    groups = group_sizes.shape[0]
    tiles = cdiv(rows, block_m)
    totals = jnp.cumsum(group_sizes)
    ends, starts = jnp.minimum(totals, rows), jnp.minimum(totals - group_sizes, rows)
    tile_start = jnp.arange(tiles, dtype=jnp.int32) * block_m
    tile_end = jnp.minimum(tile_start + block_m, rows)
    first = jnp.minimum(jnp.searchsorted(ends, tile_start, side="right", method="compare_all"), groups - 1)
    last = jnp.minimum(jnp.searchsorted(ends, tile_end - 1, side="right", method="compare_all"), groups - 1)
    per_tile = last - first + 1
    item_end = jnp.cumsum(per_tile)
    i = jnp.arange(tiles + groups - 1)
    tile = jnp.minimum(jnp.searchsorted(item_end, i, side="right", method="compare_all"), tiles - 1)
    group = jnp.minimum(first[tile] + i - (item_end - per_tile)[tile], groups - 1)
    valid = i < item_end[-1]
    lo = jnp.maximum(starts[group], tile_start[tile])
    hi = jnp.where(valid, jnp.maximum(jnp.minimum(ends[group], tile_end[tile]), lo), lo)
    store_hi = jnp.where(valid & (group == last[tile]) & (last[tile] == groups - 1), tile_end[tile], hi)
    return tuple(a.astype(jnp.int32) for a in (tile, group, lo, hi, store_hi))


def _dot(a, b, contract_a: int, contract_b: int):
    dims = (((contract_a,), (contract_b,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=dot_precision(a.dtype), preferred_element_type=jnp.float32)


def _mask(shape, rows=None, cols=None):
    """The [r, c] mask of optional row and column masks (None: every element); None when neither is given."""
    mask = None if rows is None else jnp.broadcast_to(rows[:, None], shape)
    if cols is not None:
        mask = jnp.broadcast_to(cols[None, :], shape) if mask is None else mask & cols[None, :]
    return mask


def _load(ref, mask):
    return plgpu.load(ref, mask=mask, other=None if mask is None else 0)


def _tail(start, block: int, size: int):
    """Which of ``block`` indices from ``start`` are below ``size``; None when blocks divide ``size`` (no tail)."""
    return None if size % block == 0 else start + jnp.arange(block) < size


def _rows_kernel(
    tile_ref, group_ref, lo_ref, hi_ref, store_hi_ref, a_ref, w_ref, o_ref, *, q, p, bm, bp, bq, w_t, n_fastest
):
    """o[rows of the item, p block] = a[rows, :] @ w[g] over the contraction width q. a: [M, q]; w: [G * p, q]
    (w_t False: w[g] is [p, q]) or [G * q, p] (w_t True: w[g] is [q, p]); o: [M, p]."""
    item, j = pl.program_id(1), pl.program_id(0)
    if not n_fastest:
        item, j = j, item
    g, lo, hi, store_hi = group_ref[item], lo_ref[item], hi_ref[item], store_hi_ref[item]

    @pl.when(store_hi > lo)
    def _():
        m0 = tile_ref[item] * bm
        row = m0 + jnp.arange(bm)
        p0 = j * bp
        p_mask = _tail(p0, bp, p)
        a_rows = (row >= lo) & (row < hi)

        def body(s, acc):
            q0 = s * bq
            q_mask = _tail(q0, bq, q)
            a = _load(a_ref.at[pl.ds(m0, bm), pl.ds(q0, bq)], _mask((bm, bq), a_rows, q_mask))
            if w_t:
                w = _load(w_ref.at[pl.ds(g * q + q0, bq), pl.ds(p0, bp)], _mask((bq, bp), q_mask, p_mask))
                return acc + _dot(a, w.astype(a.dtype), 1, 0)
            w = _load(w_ref.at[pl.ds(g * p + p0, bp), pl.ds(q0, bq)], _mask((bp, bq), p_mask, q_mask))
            return acc + _dot(a, w.astype(a.dtype), 1, 1)

        acc = lax.fori_loop(0, cdiv(q, bq), body, jnp.zeros((bm, bp), jnp.float32))
        out_rows = (row >= lo) & (row < store_hi)
        plgpu.store(
            o_ref.at[pl.ds(m0, bm), pl.ds(p0, bp)], acc.astype(o_ref.dtype), mask=_mask((bm, bp), out_rows, p_mask)
        )


@lowered_once("block", "interpret", "transpose_w")
def _grouped_rows(a, w, group_sizes, block: GroupedMatmulBlock, interpret: bool, transpose_w: bool):
    """a [M, Q] rows sorted by group times w[g]^T (w [G, P, Q]) or w[g] (transpose_w: w [G, Q, P]) -> [M, P]."""
    m, q = a.shape
    groups = w.shape[0]
    p = w.shape[2] if transpose_w else w.shape[1]
    if m == 0:
        return jnp.zeros((0, p), a.dtype)
    bm, bp, bq = _fit(block.block_m, m), _fit(block.block_n, p), _fit(block.block_k, q)
    items = work_items(group_sizes, m, bm)
    kernel = functools.partial(_rows_kernel, q=q, p=p, bm=bm, bp=bp, bq=bq, w_t=transpose_w, n_fastest=block.n_fastest)
    grid = (items[0].shape[0], cdiv(p, bp))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, p), a.dtype),
        grid=grid[::-1] if block.n_fastest else grid,
        compiler_params=triton_compiler_params(block.num_warps, block.num_stages),
        interpret=interpret,
        name="grouped_matmul_dx" if transpose_w else "grouped_matmul_fwd",
    )(*items, a, w.reshape(groups * w.shape[1], w.shape[2]))


def _dw_kernel(starts_ref, ends_ref, x_ref, dy_ref, dw_ref, *, n, k, bm, bn, bk):
    """dw[g * n + n block, k block] = dy[rows of g, n block]^T @ x[rows of g, k block]."""
    g, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, end = starts_ref[g], ends_ref[g]
    n0, k0 = i * bn, j * bk
    n_mask, k_mask = _tail(n0, bn, n), _tail(k0, bk, k)

    def body(s, acc):
        r0 = start + s * bm
        rows = r0 + jnp.arange(bm) < end
        dy = _load(dy_ref.at[pl.ds(r0, bm), pl.ds(n0, bn)], _mask((bm, bn), rows, n_mask))
        x = _load(x_ref.at[pl.ds(r0, bm), pl.ds(k0, bk)], _mask((bm, bk), rows, k_mask))
        return acc + _dot(dy, x, 0, 0)

    steps = (end - start + bm - 1) // bm
    acc = lax.fori_loop(0, steps, body, jnp.zeros((bn, bk), jnp.float32))
    mask = _mask((bn, bk), n_mask, k_mask)
    plgpu.store(dw_ref.at[pl.ds(g * n + n0, bn), pl.ds(k0, bk)], acc.astype(dw_ref.dtype), mask=mask)


@lowered_once("w_shape", "w_dtype", "block", "interpret")
def _weight_grad(x, dy, group_sizes, w_shape, w_dtype, block: GroupedMatmulBlock, interpret: bool):
    """dw[g] = dy[rows of g]^T @ x[rows of g] -> [G, N, K] in w_dtype (zeros for an empty group)."""
    groups, n, k = w_shape
    m = x.shape[0]
    if m == 0:
        return jnp.zeros(w_shape, w_dtype)
    bm, bn, bk = _fit(block.dw_block_m, m), _fit(block.dw_block_n, n), _fit(block.dw_block_k, k)
    totals = jnp.cumsum(group_sizes)
    ends, starts = jnp.minimum(totals, m), jnp.minimum(totals - group_sizes, m)
    kernel = functools.partial(_dw_kernel, n=n, k=k, bm=bm, bn=bn, bk=bk)
    dw = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((groups * n, k), w_dtype),
        grid=(groups, cdiv(n, bn), cdiv(k, bk)),
        compiler_params=triton_compiler_params(block.dw_num_warps, block.dw_num_stages),
        interpret=interpret,
        name="grouped_matmul_dw",
    )(starts, ends, x, dy)
    return dw.reshape(groups, n, k)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _grouped_matmul(x, w, group_sizes, block, interpret):
    return _grouped_rows(x, w, group_sizes, block, interpret, transpose_w=False)


def _fwd(x, w, group_sizes, block, interpret):
    return _grouped_matmul(x, w, group_sizes, block, interpret), (x, w, group_sizes)


def _bwd(block, interpret, res, dy):
    x, w, group_sizes = res
    dy = dy.astype(x.dtype)
    dx = _grouped_rows(dy, w, group_sizes, block, interpret, transpose_w=True)
    dw = _weight_grad(x, dy, group_sizes, w.shape, w.dtype, block, interpret)
    return dx, dw, np.zeros(group_sizes.shape, jax.dtypes.float0)


_grouped_matmul.defvjp(_fwd, _bwd)


def grouped_matmul(
    x: jax.Array,
    w: jax.Array,
    group_sizes: jax.Array,
    *,
    block: GroupedMatmulBlock | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """x: [M, K] rows sorted by group; w: [G, N, K]; group_sizes: [G] integers summing to at most M -> [M, N] in
    x.dtype (rows past the total are zero, as ragged_dot leaves them). Differentiable in x and w."""
    if x.ndim != 2 or w.ndim != 3 or x.shape[1] != w.shape[2] or group_sizes.shape != (w.shape[0],):
        raise ValueError(
            f"grouped_matmul: expected x [M, K], w [G, N, K], group_sizes [G]; got x {x.shape}, w {w.shape}, "
            f"group_sizes {group_sizes.shape}"
        )
    largest = max(x.size, w.size, x.shape[0] * w.shape[1])
    if largest >= 2**31:  # Triton addresses the operands with int32 offsets: larger ones would wrap around silently
        raise ValueError(
            f"grouped_matmul: x {x.shape} and w {w.shape} make an operand of {largest:,} elements, beyond the "
            "kernel's int32 offsets (2**31); use the tiled loop (grouped_matmul='tiled')"
        )
    return _grouped_matmul(
        x, w, group_sizes.astype(jnp.int32), block or GroupedMatmulBlock(), resolve_interpret(interpret)
    )
