"""Per-sequence summed log-probabilities of packed rows, without materialising the [tokens, vocab] logits.

The fused cross-entropy ops (``ops.cross_entropy``, pallas_kernels/cross_entropy.py) return one scalar sum per
call, while preference losses need one sum per sequence; so the tokens are walked here in chunks of
``chunk`` rows, each chunk's f32 logits built by ``logits_from_hidden`` (the decoder's LM head with its softcap)
and reduced to the target's log-prob at once. Each chunk is rematerialised (``jax.checkpoint``) so neither pass
holds more than one [chunk, vocab] block; a segment sum then gives one value per sequence.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsloth.models.config import ModelConfig
from jaxsloth.models.decoder import forward_hidden, logits_from_hidden
from jaxsloth.ops import Ops

IGNORE_INDEX = -100
LOGPROB_CHUNK = 1024


def token_logps(params, hidden, targets, *, config: ModelConfig, chunk: int = LOGPROB_CHUNK) -> jax.Array:
    """hidden: [N, D], targets: [N] (-100 = not counted) -> [N] f32 log p(target), 0 where not counted."""
    n = hidden.shape[0]
    m = -(-n // chunk)
    hp = jnp.pad(hidden, ((0, m * chunk - n), (0, 0))).reshape(m, chunk, -1)
    tp = jnp.pad(targets, (0, m * chunk - n), constant_values=IGNORE_INDEX).reshape(m, chunk)

    @jax.checkpoint
    def one(xs):
        h, t = xs
        z = logits_from_hidden(params, h, config)
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
