"""Per-sequence summed log-probabilities of packed rows, without materialising the [tokens, vocab] logits.

The fused cross-entropy ops (``ops.cross_entropy``, pallas_kernels/cross_entropy.py) return one scalar sum per
call, while preference losses need one sum per sequence; so the tokens are walked here in chunks of
``chunk`` rows, each chunk's f32 logits built by ``head_logits`` (the decoder's LM head with its softcap)
and reduced to the target's log-prob at once. Each chunk is rematerialised (``jax.checkpoint``) so neither pass
holds more than one [chunk, vocab] block; a segment sum then gives one value per sequence.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsloth.models.config import ModelConfig
from jaxsloth.models.decoder import forward_hidden, lm_head
from jaxsloth.ops import Ops

IGNORE_INDEX = -100
LOGPROB_CHUNK = 1024


@jax.custom_vjp
def _head_product(hidden, head):
    """hidden: [N, D], head: [V, D] in the compute dtype -> hidden @ head.T [N, V] f32 (f32 accumulation)."""
    return jnp.einsum("nd,vd->nv", hidden, head, preferred_element_type=jnp.float32)


def _head_product_fwd(hidden, head):
    return _head_product(hidden, head), (hidden, head)


def _head_product_bwd(res, dz):
    # The f32 logits' gradient goes into both products in the compute dtype (f32 accumulation), as a 16-bit autocast
    # backward does: autodiff's product of an f32 gradient with a 16-bit head makes XLA widen the whole [V, D] head to
    # f32 (a second copy of the head, 1 GiB at a 128K vocabulary), held through the chunk loop.
    hidden, head = res
    dz = dz.astype(hidden.dtype)
    dh = jnp.einsum("nv,vd->nd", dz, head, preferred_element_type=jnp.float32).astype(hidden.dtype)
    dw = jnp.einsum("nv,nd->vd", dz, hidden, preferred_element_type=jnp.float32).astype(head.dtype)
    return dh, dw


_head_product.defvjp(_head_product_fwd, _head_product_bwd)


def head_logits(params, hidden, config: ModelConfig) -> jax.Array:
    """hidden: [N, D] -> logits [N, V] f32 (final softcap applied): ``decoder.logits_from_hidden``'s values, with a
    backward that keeps the head in the compute dtype (``_head_product``)."""
    logits = _head_product(hidden, lm_head(params, config).astype(hidden.dtype))
    if config.final_logit_softcap is not None:
        c = config.final_logit_softcap
        logits = c * jnp.tanh(logits / c)
    return logits


def token_logps(params, hidden, targets, *, config: ModelConfig, chunk: int = LOGPROB_CHUNK) -> jax.Array:
    """hidden: [N, D], targets: [N] (-100 = not counted) -> [N] f32 log p(target), 0 where not counted."""
    n = hidden.shape[0]
    m = -(-n // chunk)
    hp = jnp.pad(hidden, ((0, m * chunk - n), (0, 0))).reshape(m, chunk, -1)
    tp = jnp.pad(targets, (0, m * chunk - n), constant_values=IGNORE_INDEX).reshape(m, chunk)

    @jax.checkpoint
    def one(xs):
        h, t = xs
        z = head_logits(params, h, config)
        picked = jnp.take_along_axis(z, jnp.maximum(t, 0)[:, None], axis=1)[:, 0]
        return jnp.where(t != IGNORE_INDEX, picked - jax.nn.logsumexp(z, axis=1), 0.0)

    return jax.lax.map(one, (hp, tp)).reshape(-1)[:n]


def sequence_logps(
    params,
    batch: dict,
    num_sequences: int,
    *,
    config: ModelConfig,
    ops: Ops = Ops(),
    lora=None,
    chunk: int = LOGPROB_CHUNK,
    **kwargs,
) -> tuple[jax.Array, jax.Array]:
    """batch: tokens, targets, positions, segment_ids, sequence_index, all [B, T] (``preference_data.pack``);
    sequence_index numbers the sequences 0..num_sequences-1 across the batch (-1 = padding).

    Returns (summed log-probs of the counted targets, number of counted targets), each [num_sequences] f32.
    lora=None gives the reference model (adapter off) from the same weights. kwargs go to ``forward_hidden``.
    """
    hidden = forward_hidden(
        params,
        batch["tokens"],
        config=config,
        ops=ops,
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
        lora=lora,
        **kwargs,
    )
    targets = batch["targets"].reshape(-1)
    per_token = token_logps(params, hidden.reshape(-1, hidden.shape[-1]), targets, config=config, chunk=chunk)
    index = batch["sequence_index"].reshape(-1)
    # Padding (index -1) goes to an extra bucket that is dropped.
    index = jnp.where(index < 0, num_sequences, index)
    sums = jax.ops.segment_sum(per_token, index, num_segments=num_sequences + 1)[:num_sequences]
    counted = (targets != IGNORE_INDEX).astype(jnp.float32)
    counts = jax.ops.segment_sum(counted, index, num_segments=num_sequences + 1)[:num_sequences]
    return sums, counts
