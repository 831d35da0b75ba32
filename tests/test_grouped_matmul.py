"""The tiled grouped matmul and the factored per-expert LoRA against their ragged-dot references, values and
gradients, with empty groups, groups spanning tiles and a last partial tile."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.grouped_matmul import grouped_lora_reference, grouped_matmul_reference, grouped_matmul_tiled
from tests.tolerances import assert_close

GROUPS = [[0, 100, 7, 0, 193], [300, 0, 0, 0, 0], [0, 0, 0, 0, 300], [1, 2, 3, 4, 290]]


@pytest.mark.parametrize("sizes", GROUPS)
def test_tiled_grouped_matmul_matches_ragged_dot(sizes):
    k = jax.random.split(jax.random.key(0), 3)
    gs = jnp.array(sizes, jnp.int32)
    x = jax.random.normal(k[0], (int(gs.sum()), 16))
    w = jax.random.normal(k[1], (len(sizes), 24, 16))
    dy = jax.random.normal(k[2], (x.shape[0], 24))
    assert_close(grouped_matmul_tiled(x, w, gs), grouped_matmul_reference(x, w, gs), "f32")
    grads = jax.grad(lambda x, w: jnp.sum(grouped_matmul_tiled(x, w, gs) * dy), (0, 1))(x, w)
    expected = jax.grad(lambda x, w: jnp.sum(grouped_matmul_reference(x, w, gs) * dy), (0, 1))(x, w)
    for got, want in zip(grads, expected):
        assert_close(got, want, "f32_grad")


def test_grouped_lora_matches_two_ragged_dots():
    k = jax.random.split(jax.random.key(1), 4)
    gs = jnp.array(GROUPS[0], jnp.int32)
    x = jax.random.normal(k[0], (int(gs.sum()), 16))
    a, b = jax.random.normal(k[1], (5, 4, 16)), jax.random.normal(k[2], (5, 24, 4))
    dy = jax.random.normal(k[3], (x.shape[0], 24))

    def ragged(x, a, b):
        return grouped_matmul_reference(grouped_matmul_reference(x, a, gs), b, gs)

    assert_close(grouped_lora_reference(x, a, b, gs), ragged(x, a, b), "f32")
    grads = jax.grad(lambda *p: jnp.sum(grouped_lora_reference(*p, gs) * dy), (0, 1, 2))(x, a, b)
    expected = jax.grad(lambda *p: jnp.sum(ragged(*p) * dy), (0, 1, 2))(x, a, b)
    for got, want in zip(grads, expected):
        assert_close(got, want, "f32_grad")
