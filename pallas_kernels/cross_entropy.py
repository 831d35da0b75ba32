"""Cross-entropy fused with the LM head: never the [tokens, vocab] logits in HBM (kernel), f32 LSE."""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100


def cross_entropy_reference(
    hidden: jax.Array,
    head: jax.Array,
    targets: jax.Array,
    *,
    softcap: float | None = None,
    ignore_index: int = IGNORE_INDEX,
):
    """hidden: [N, D], head: [V, D] (lm_head.weight, or the tied embedding), targets: [N] int.

    logits = hidden @ head.T accumulated in f32, softcapped (softcap * tanh(logits / softcap)) when set.
    Returns (loss_sum: f32 scalar over tokens whose target != ignore_index, count: int32 scalar).
    Differentiable in hidden and head.
    """
    logits = jnp.einsum("nd,vd->nv", hidden, head, preferred_element_type=jnp.float32)
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    valid = targets != ignore_index
    safe = jnp.where(valid, targets, 0)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, safe[:, None], axis=-1)[:, 0]
    loss = jnp.where(valid, lse - picked, 0.0)
    return jnp.sum(loss), jnp.sum(valid).astype(jnp.int32)
