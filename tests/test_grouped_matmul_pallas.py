"""The Pallas grouped matmul (interpret mode) against ragged_dot_general: output, dx and dw through jax.vjp, on
ragged shapes (M, N and K not multiples of the blocks, empty groups, one-row groups, groups spanning tiles, rows past
the groups' total), and its work items cover every row exactly once."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.grouped_matmul import grouped_matmul_reference
from pallas_kernels.grouped_matmul_pallas import GroupedMatmulBlock, grouped_matmul, work_items
from tests.tolerances import assert_vjp_close

# The smallest Triton tiles, so tiny shapes still span several tiles, N blocks and K steps.
SMALL = GroupedMatmulBlock(block_m=16, block_n=16, block_k=16, dw_block_m=16, dw_block_n=16, dw_block_k=16)

CASES = [
    # (group sizes, rows M, N, K, dtype)
    ([0, 17, 1, 0, 27], 45, 24, 40, "float32"),  # empty first and middle groups, a 1-row group, a partial last tile
    ([1, 2, 3, 30, 0], 36, 40, 24, "bfloat16"),  # small groups inside one tile, an empty last group
    ([5, 0, 20, 0], 33, 20, 18, "float16"),  # 8 rows past the total: zero outputs, no gradient
]


@pytest.mark.parametrize("sizes, m, n, k, dtype", CASES)
def test_grouped_matmul_vjp_matches_ragged_dot(sizes, m, n, k, dtype):
    keys = jax.random.split(jax.random.key(len(sizes) + m), 3)
    gs = jnp.array(sizes, jnp.int32)
    x = jax.random.normal(keys[0], (m, k), jnp.float32).astype(dtype)
    w = jax.random.normal(keys[1], (len(sizes), n, k), jnp.float32).astype(dtype)
    dy = jax.random.normal(keys[2], (m, n), jnp.float32).astype(dtype)

    def kernel(x, w):
        return grouped_matmul(x, w, gs, block=SMALL, interpret=True)

    assert_vjp_close(
        kernel, lambda x, w: grouped_matmul_reference(x, w, gs), (x, w), dy, jnp.dtype(dtype), ("dx", "dw")
    )
    if sum(sizes) < m:
        assert not np.any(np.asarray(kernel(x, w), np.float32)[sum(sizes) :])


@pytest.mark.parametrize("sizes, rows", [([0, 17, 1, 0, 27], 45), ([5, 0, 20, 0], 33), ([64, 0], 64), ([0, 0], 5)])
def test_work_items_store_every_row_once(sizes, rows):
    """Each row is stored by exactly one item, and loaded only by the item of its own group."""
    tile, group, lo, hi, store_hi = (np.asarray(a) for a in work_items(jnp.array(sizes, jnp.int32), rows, 16))
    assert len(tile) == -(-rows // 16) + len(sizes) - 1
    ends = np.cumsum(sizes)
    stored = np.zeros(rows, int)
    for t, g, a, b, c in zip(tile, group, lo, hi, store_hi):
        assert 16 * t <= a and c <= min(16 * t + 16, rows) and a <= b <= c
        assert (b == a) or (ends[g] - sizes[g] <= a and b <= ends[g])
        stored[a:c] += 1
    np.testing.assert_array_equal(stored, np.ones(rows, int))
