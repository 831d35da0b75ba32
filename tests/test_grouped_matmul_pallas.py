"""The Pallas grouped matmul (interpret mode) against ragged_dot_general: output, dx and dw through jax.vjp, on
ragged shapes (M, N and K not multiples of the blocks, empty groups, one-row groups, groups spanning tiles, rows past
the groups' total), and its work items cover every row exactly once."""

from __future__ import annotations

import dataclasses
import functools

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
    # (group sizes, rows M, N, K, dtype, N blocks of an item launched together)
    ([0, 17, 1, 0, 27], 45, 24, 40, "float32", False),  # empty first and middle groups, a 1-row group, a last tile
    ([1, 2, 3, 30, 0], 36, 40, 24, "bfloat16", True),  # small groups inside one tile, an empty last group
    ([5, 0, 20, 0], 33, 20, 18, "float16", False),  # 8 rows past the total: zero outputs, no gradient
]


@pytest.mark.parametrize("sizes, m, n, k, dtype, n_fastest", CASES)
def test_grouped_matmul_vjp_matches_ragged_dot(sizes, m, n, k, dtype, n_fastest):
    keys = jax.random.split(jax.random.key(len(sizes) + m), 3)
    gs = jnp.array(sizes, jnp.int32)
    x = jax.random.normal(keys[0], (m, k), jnp.float32).astype(dtype)
    w = jax.random.normal(keys[1], (len(sizes), n, k), jnp.float32).astype(dtype)
    dy = jax.random.normal(keys[2], (m, n), jnp.float32).astype(dtype)

    @jax.jit
    def kernel(x, w):
        return grouped_matmul(x, w, gs, block=dataclasses.replace(SMALL, n_fastest=n_fastest), interpret=True)

    assert_vjp_close(
        kernel, lambda x, w: grouped_matmul_reference(x, w, gs), (x, w), dy, jnp.dtype(dtype), ("dx", "dw")
    )
    if sum(sizes) < m:
        assert not np.any(np.asarray(kernel(x, w), np.float32)[sum(sizes) :])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("n_fastest", [False, True])
def test_gpu_matches_ragged_dot(dtype, n_fastest):
    """The compiled kernels at their default tiles on ragged groups, K and N not multiples of the tiles, 20 rows past
    the groups' total."""
    sizes = [0, 300, 1, 0, 77, 129, 0, 400]
    m, n, k = sum(sizes) + 20, 200, 328
    keys = jax.random.split(jax.random.key(7), 3)
    gs = jnp.array(sizes, jnp.int32)
    x = jax.random.normal(keys[0], (m, k), jnp.float32).astype(dtype)
    w = (jax.random.normal(keys[1], (len(sizes), n, k), jnp.float32) / np.sqrt(k)).astype(dtype)
    dy = jax.random.normal(keys[2], (m, n), jnp.float32).astype(dtype)
    block = GroupedMatmulBlock(n_fastest=n_fastest)

    def kernel(x, w):
        return grouped_matmul(x, w, gs, block=block, interpret=False)

    assert_vjp_close(
        kernel, lambda x, w: grouped_matmul_reference(x, w, gs), (x, w), dy, jnp.dtype(dtype), ("dx", "dw")
    )


@pytest.mark.parametrize("m, k, n, dtype", [(1000, 200, 192, jnp.float32), (1024, 256, 512, jnp.bfloat16)])
def test_lowers_to_three_triton_kernels(triton_calls, m, k, n, dtype):
    """Forward, dx and dw each lower to one Triton kernel (default blocks; masked tails, or none where the blocks
    divide K and N), without a GPU."""
    g = 8
    x, dy = jax.ShapeDtypeStruct((m, k), dtype), jax.ShapeDtypeStruct((m, n), dtype)
    w, gs = jax.ShapeDtypeStruct((g, n, k), dtype), jax.ShapeDtypeStruct((g,), jnp.int32)

    def f(x, w, gs, dy):
        y, vjp = jax.vjp(lambda x, w: grouped_matmul(x, w, gs, interpret=False), x, w)
        return y, vjp(dy)

    assert triton_calls(f, x, w, gs, dy) == 3


@pytest.mark.parametrize("sizes, rows", [([0, 17, 1, 0, 27], 45), ([5, 0, 20, 0], 33), ([64, 0], 64), ([0, 0], 5)])
def test_work_items_store_every_row_once(sizes, rows):
    """Each row is stored by exactly one item, and loaded only by the item of its own group."""
    items = jax.jit(work_items, static_argnums=(1, 2))(jnp.array(sizes, jnp.int32), rows, 16)
    tile, group, lo, hi, store_hi = (np.asarray(a) for a in items)
    assert len(tile) == -(-rows // 16) + len(sizes) - 1
    ends = np.cumsum(sizes)
    stored = np.zeros(rows, int)
    for t, g, a, b, c in zip(tile, group, lo, hi, store_hi):
        assert 16 * t <= a and c <= min(16 * t + 16, rows) and a <= b <= c
        assert (b == a) or (ends[g] - sizes[g] <= a and b <= ends[g])
        stored[a:c] += 1
    np.testing.assert_array_equal(stored, np.ones(rows, int))


def test_moe_layer_on_pallas_kernel_equals_tiled():
    """The profile's grouped_matmul choice reaches the expert projections (NF4 experts, as QLoRA holds them, with
    per-expert LoRA): the MoE layer's output and its gradients in x and the adapters agree between "tiled" and
    "pallas"."""
    from jaxsloth.models.moe import moe_mlp
    from jaxsloth.models.presets import preset
    from jaxsloth.ops import KernelChoice, Ops
    from jaxsloth.quant import quantize_nf4
    from tests.tolerances import assert_close

    config = dataclasses.replace(
        preset("qwen3-30b-a3b"), hidden_size=64, moe_intermediate_size=32, num_experts=6, num_experts_per_tok=2
    )
    e, d, i, r = 6, 64, 32, 4
    keys = iter(jax.random.split(jax.random.key(3), 9))
    normal = lambda *shape: 0.2 * jax.random.normal(next(keys), shape, jnp.float32)  # noqa: E731
    lp = {
        "router": {"weight": normal(e, d)},
        "experts_gate_up": {"weight": normal(e, 2 * i, d)},
        "experts_down": {"weight": normal(e, d, i)},
    }
    for name in ("experts_gate_up", "experts_down"):
        lp[name]["weight"] = quantize_nf4(lp[name]["weight"])
    ll = {
        "experts_gate_up": {"a": normal(e, r, d), "b": normal(e, 2 * i, r)},
        "experts_down": {"a": normal(e, r, i), "b": normal(e, d, r)},
    }
    x, dy = normal(2, 7, d), normal(2, 7, d)

    @functools.partial(jax.jit, static_argnums=0)
    def run(impl, lp, ll, x, dy):
        ops = Ops(KernelChoice(grouped_matmul=impl, interpret=True, blocks=(("grouped_matmul", SMALL),)))
        y, vjp = jax.vjp(lambda x, ll: moe_mlp(x, lp, ll, config=config, ops=ops, lora_scale=2.0)[0], x, ll)
        return y, vjp(dy)

    (y, grads), (y_ref, grads_ref) = run("pallas", lp, ll, x, dy), run("tiled", lp, ll, x, dy)
    assert_close(y, y_ref, "f32")
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True):
        assert_close(got, want, "f32_grad")


def test_operands_beyond_int32_offsets_are_refused():
    x = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((256, 2048, 4096), jnp.bfloat16)  # 2**31 elements
    gs = jax.ShapeDtypeStruct((256,), jnp.int32)
    with pytest.raises(ValueError, match="int32 offsets"):
        jax.eval_shape(grouped_matmul, x, w, gs)


def test_dispatch_takes_the_tiled_loop_beyond_int32_offsets(monkeypatch):
    """A profile that picks the kernel still runs a model whose experts exceed its offsets: on the tiled loop."""
    from jaxsloth.ops import KernelChoice, Ops

    called = []
    monkeypatch.setattr(Ops, "_call", lambda self, op, impl, *a, **kw: called.append(impl) or a[0][:, :1])
    ops = Ops(KernelChoice(grouped_matmul="pallas"))
    x = jnp.zeros((4, 4096), jnp.bfloat16)
    ops.grouped_matmul(x, jnp.zeros((2, 8, 4096), jnp.bfloat16), jnp.array([2, 2]))
    ops.grouped_matmul(x, jax.ShapeDtypeStruct((256, 2048, 4096), jnp.bfloat16), jnp.zeros(256, jnp.int32))
    assert called == ["pallas", "tiled"]
