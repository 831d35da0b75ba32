"""The grouped matmul of mixture-of-experts layers: rows sorted by expert, each group times its expert's weight.

    y[M, N] = x[M, K] @ w[g, N, K]^T   for the rows m of group g (groups are consecutive runs of group_sizes rows)

The reference is ``jax.lax.ragged_dot_general``. XLA lowers a ragged dot (and its transposes) by expanding the
rows to a dense [groups, rows, ...] operand, every row against every group's weight: 16 GiB and 128x the FLOPs per
projection of Qwen3-30B-A3B at 2 x 2048 tokens. ``grouped_matmul_tiled`` is what the training step runs instead:
tiles of the sorted rows, each against the weight of each group it holds, in a loop (megablox's schedule in XLA),
so no temporary is larger than the rows themselves. The weights keep the HF orientation [out, in]
of every other projection, so the contraction is over the weight's last axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_DIMS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((1,), (2,)), ((), ())),
    lhs_ragged_dimensions=(0,),
    rhs_group_dimensions=(0,),
)


def grouped_matmul_reference(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """x: [M, K] rows sorted by group; w: [G, N, K]; group_sizes: [G] int32 summing to M -> [M, N] in x.dtype."""
    return jax.lax.ragged_dot_general(x, w.astype(x.dtype), group_sizes.astype(jnp.int32), _DIMS)


TILE_ROWS = 128


def _schedule(group_sizes, rows: int, tile: int):
    """The (tile, group) work items: tile t of ``tile`` sorted rows meets the groups from the one holding its first
    row to the one holding its last. At most tiles + groups - 1 items; the rest are marked invalid."""
    groups = group_sizes.shape[0]
    tiles = -(-rows // tile)
    ends = jnp.cumsum(group_sizes)
    first = jnp.minimum(jnp.searchsorted(ends, jnp.arange(tiles) * tile, side="right"), groups - 1)
    last_row = jnp.minimum((jnp.arange(tiles) + 1) * tile, rows) - 1
    last = jnp.minimum(jnp.searchsorted(ends, last_row, side="right"), groups - 1)
    per_tile = last - first + 1
    item_end = jnp.cumsum(per_tile)
    items = tiles + groups - 1
    i = jnp.arange(items)
    item_tile = jnp.minimum(jnp.searchsorted(item_end, i, side="right"), tiles - 1)
    item_group = first[item_tile] + i - (item_end - per_tile)[item_tile]
    valid = i < item_end[-1]
    return item_tile.astype(jnp.int32), jnp.minimum(item_group, groups - 1).astype(jnp.int32), valid, ends


def _zeros_after(shape, dtype, ready: jax.Array) -> jax.Array:
    """Zeros of ``shape`` that exist only once ``ready`` does (a loop's accumulator, created beside its input).

    XLA merges every loop's constant zero accumulator into one broadcast and gives each loop a copy of it, which its
    scheduler places at the start of the program: every layer's accumulators (its forward, recomputed and backward
    loops, [rows, width] each: [32768, 2048] in bf16 for Qwen3-30B-A3B at 2 x 2048 tokens) then live from the first
    instruction to their loop. A zero passed through a barrier with the loop's input cannot be hoisted."""
    zero, _ = jax.lax.optimization_barrier((jnp.zeros((), dtype), ready))
    return jnp.broadcast_to(zero, shape)


def _tiled(x, w, group_sizes, spec: str):
    """rows of x [M, *] sorted by group, each times its group's w[g] by einsum ``spec`` ("mk,nk->mn" or
    "mn,nk->mk") -> [M, out] in x.dtype. Each row meets exactly one group, so the sums add exact zeros."""
    rows = x.shape[0]
    tile = min(TILE_ROWS, rows)
    item_tile, item_group, valid, ends = _schedule(group_sizes, rows, tile)
    starts = ends - group_sizes
    padded = -(-rows // tile) * tile
    xp = jnp.pad(x, ((0, padded - rows), (0, 0)))
    out_width = w.shape[1] if spec == "mk,nk->mn" else w.shape[2]

    def item(out, it):
        t, g, ok = it
        r0 = t * tile
        xs = jax.lax.dynamic_slice_in_dim(xp, r0, tile)
        ys = jnp.einsum(spec, xs, w[g].astype(x.dtype))
        row = r0 + jnp.arange(tile)
        mine = ok & (row >= starts[g]) & (row < ends[g])
        acc = jax.lax.dynamic_slice_in_dim(out, r0, tile) + jnp.where(mine[:, None], ys, jnp.zeros((), ys.dtype))
        return jax.lax.dynamic_update_slice_in_dim(out, acc, r0, 0), None

    out, _ = jax.lax.scan(item, _zeros_after((padded, out_width), x.dtype, xp), (item_tile, item_group, valid))
    return out[:rows]


def _weight_grad(x, dy, group_sizes, groups: int):
    """dw[g] = dy[rows of g]^T @ x[rows of g] -> [G, N, K] f32, by the same (tile, group) items."""
    rows = x.shape[0]
    tile = min(TILE_ROWS, rows)
    item_tile, item_group, valid, ends = _schedule(group_sizes, rows, tile)
    starts = ends - group_sizes
    padded = -(-rows // tile) * tile
    xp = jnp.pad(x, ((0, padded - rows), (0, 0)))
    dyp = jnp.pad(dy, ((0, padded - rows), (0, 0)))

    def item(dw, it):
        t, g, ok = it
        r0 = t * tile
        row = r0 + jnp.arange(tile)
        mine = ok & (row >= starts[g]) & (row < ends[g])
        xs = jnp.where(mine[:, None], jax.lax.dynamic_slice_in_dim(xp, r0, tile), jnp.zeros((), x.dtype))
        part = jnp.einsum("mn,mk->nk", jax.lax.dynamic_slice_in_dim(dyp, r0, tile), xs,
                          preferred_element_type=jnp.float32)  # fmt: skip
        return dw.at[g].add(part), None

    dw0 = _zeros_after((groups, dy.shape[1], x.shape[1]), jnp.float32, dyp)
    dw, _ = jax.lax.scan(item, dw0, (item_tile, item_group, valid))
    return dw


@jax.custom_vjp
def grouped_matmul_tiled(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """x: [M, K] rows sorted by group; w: [G, N, K]; group_sizes: [G] int32 summing to M -> [M, N] in x.dtype.

    The backward computes dx by the same loop against w[g] (no residual but the inputs) and dw in a loop of its own,
    which XLA drops when w is frozen."""
    return _tiled(x, w, group_sizes.astype(jnp.int32), "mk,nk->mn")


def _fwd(x, w, group_sizes):
    return grouped_matmul_tiled(x, w, group_sizes), (x, w, group_sizes)


def _bwd(res, dy):
    x, w, group_sizes = res
    gs = group_sizes.astype(jnp.int32)
    dx = _tiled(dy.astype(x.dtype), w, gs, "mn,nk->mk")
    dw = _weight_grad(x, dy.astype(x.dtype), gs, w.shape[0]).astype(w.dtype)
    zeros = np.zeros(group_sizes.shape, jax.dtypes.float0)
    return dx, dw, zeros


grouped_matmul_tiled.defvjp(_fwd, _bwd)


def grouped_lora_reference(x: jax.Array, a: jax.Array, b: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Per-expert LoRA of rows sorted by group, (x @ A[g]^T) @ B[g]^T for the rows of group g, as two dense matmuls
    over every expert's adapter at once. x: [M, in]; a: [G, r, in]; b: [G, out, r]; group_sizes: [G] -> [M, out].

    Not ragged dots: the transpose of a ragged dot (the adapters' gradients contract over the ragged rows) is
    expanded to dense [G, M, in] / [G, M, out] operands, gigabytes per layer at 128 experts. Here the widest
    temporary is u [M, G * r], every row against every expert's A (as wide as the hidden size at r=16, G=128), with
    the other experts' columns zeroed, so B's sum over them adds exact zeros and both gradients are plain matmuls."""
    g, r, k = a.shape
    row_group = jnp.repeat(jnp.arange(g, dtype=jnp.int32), group_sizes, total_repeat_length=x.shape[0])
    u = jnp.einsum("mk,ck->mc", x, a.reshape(g * r, k).astype(x.dtype))
    own = row_group[:, None] == jnp.arange(g * r, dtype=jnp.int32)[None, :] // r
    u = jnp.where(own, u, jnp.zeros((), u.dtype))
    return jnp.einsum("mc,oc->mo", u, jnp.swapaxes(b, 0, 1).reshape(b.shape[1], g * r).astype(x.dtype))
