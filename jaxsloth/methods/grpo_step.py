"""The GRPO training step: per-token log-probs of the completion tokens with the LoRA (the policy) and, when
beta > 0, with the adapter off (the reference, from the same weights), the GRPO loss (``grpo.grpo_loss``), gradients
accumulated over micro-batches in one jitted function, and the SFT step's AdamW (``make_optimizer``).

Rows are laid out as ``rollout.completion_batch`` makes them: [left-padded prompt (P) | completion padded on the
right (C)]. Only the C hidden states that predict completion tokens reach the LM head, in chunks of ``chunk`` rows,
so no [tokens, vocab] logits exist.

Memory: the rollout's KV cache sets GRPO's peak, so the step keeps below it: each layer's input is the only
activation a micro-batch keeps for the backward (``grpo_forward_settings``), the LM head runs on GRPO_LOGPROB_CHUNK
rows at a time (each f32 [chunk, vocab] block is held about three times over in the backward), and the log-probs of
a whole generation (``make_logps_fn``) run a micro-batch's worth of tokens at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from jaxsloth.config import LoraConfig
from jaxsloth.lora import with_trainable
from jaxsloth.methods.grpo import GRPOLossConfig, grpo_loss
from jaxsloth.methods.logprobs import head_logits
from jaxsloth.models.config import ModelConfig
from jaxsloth.models.decoder import forward_hidden
from jaxsloth.ops import Ops

# 256 rows x a 128K vocabulary: 125 MiB per f32 logits block; the [256, D] x [D, V] products stay large enough to run
# at the GEMM's full rate.
GRPO_LOGPROB_CHUNK = 256
# Tokens per pass of ``make_logps_fn``: one training micro-batch's worth at the default workload (8 x 1024).
LOGPS_TOKENS = 8192


def grpo_forward_settings(forward: dict) -> dict:
    """A profile's ``forward_settings`` for GRPO's steps: remat "full" (each layer's input kept, as TRL's gradient
    checkpointing) where the profile keeps more ("dots", "attn_dots"): at Llama-3.1-8B's shape attn_dots keeps
    6.5 GiB for 8 x 1024 tokens against full's 2 GiB, and training is a small part of a GRPO step beside sampling."""
    return {**forward, "remat": "full"} if forward.get("remat") in ("dots", "attn_dots") else dict(forward)


def token_logps_entropy(params, hidden, targets, *, config: ModelConfig, chunk: int = GRPO_LOGPROB_CHUNK):
    """hidden: [N, D], targets: [N] -> (log p(target) [N] f32, entropy of the next-token distribution [N] f32,
    no gradient), one [chunk, vocab] block of logits at a time."""
    n = hidden.shape[0]
    m = -(-n // chunk)
    hp = jnp.pad(hidden, ((0, m * chunk - n), (0, 0))).reshape(m, chunk, -1)
    tp = jnp.pad(targets, (0, m * chunk - n)).reshape(m, chunk)

    @jax.checkpoint
    def one(xs):
        h, t = xs
        z = head_logits(params, h, config)
        lse = jax.nn.logsumexp(z, axis=1)
        picked = jnp.take_along_axis(z, t[:, None], axis=1)[:, 0]
        zs = jax.lax.stop_gradient(z)
        entropy = jax.lax.stop_gradient(lse) - jnp.sum(jax.nn.softmax(zs, axis=1) * zs, axis=1)
        return picked - lse, entropy

    logps, entropy = jax.lax.map(one, (hp, tp))
    return logps.reshape(-1)[:n], entropy.reshape(-1)[:n]


def completion_logps(params, batch: dict, *, config: ModelConfig, chunk: int = GRPO_LOGPROB_CHUNK, **forward_kwargs):
    """batch: tokens, positions, segment_ids [B, P + C], completion_ids [B, C] -> (per-token log-probs [B, C],
    entropies [B, C]) of the completion tokens. forward_kwargs (lora=None: the reference) go to ``forward_hidden``."""
    b, c = batch["completion_ids"].shape
    p = batch["tokens"].shape[1] - c
    hidden = forward_hidden(
        params,
        batch["tokens"],
        config=config,
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
        **forward_kwargs,
    )
    # Position t predicts token t + 1: the completion's C tokens are predicted from positions P - 1 .. P + C - 2.
    hidden = hidden[:, p - 1 : p - 1 + c].reshape(b * c, -1)
    logps, entropy = token_logps_entropy(
        params, hidden, batch["completion_ids"].reshape(-1), config=config, chunk=chunk
    )
    return logps.reshape(b, c), entropy.reshape(b, c)


def make_grpo_loss_fn(
    config: ModelConfig,
    lora: LoraConfig,
    lc: GRPOLossConfig,
    ops: Ops = Ops(),
    chunk: int = GRPO_LOGPROB_CHUNK,
    **forward_kwargs,
) -> Callable:
    """-> loss_fn(trainable, params, batch, num_items_in_batch, accumulation_steps) -> (loss, metrics) of one
    micro-batch. batch: ``rollout.completion_batch``'s arrays, plus "old_logps" [B, C] when the samples came from
    earlier weights (num_iterations > 1) and "ref_logps" [B, C] when the reference's are computed beforehand. forward_kwargs go to ``forward_hidden`` (remat, compute_dtype, ...)."""
    kwargs = dict(config=config, ops=ops, chunk=chunk, **forward_kwargs)

    def loss_fn(trainable, params, batch, num_items_in_batch, accumulation_steps: int = 1):
        p, lora_tree = with_trainable(params, trainable)
        logps, entropies = completion_logps(p, batch, lora=lora_tree, lora_rt=lora.runtime, **kwargs)
        ref = batch.get("ref_logps")
        if lc.beta != 0.0 and ref is None:
            # The reference: the base weights (untrained embeddings too), adapter off.
            ref, _ = completion_logps(params, batch, lora=None, **kwargs)
            ref = jax.lax.stop_gradient(ref)
        return grpo_loss(
            logps,
            batch["completion_mask"],
            batch["advantages"],
            lc,
            old_logps=batch.get("old_logps"),
            ref_logps=ref,
            entropies=entropies,
            num_items_in_batch=num_items_in_batch,
            accumulation_steps=accumulation_steps,
        )

    return loss_fn


def make_logps_fn(
    config: ModelConfig, lora: LoraConfig, ops: Ops = Ops(), chunk: int = GRPO_LOGPROB_CHUNK, **forward_kwargs
):
    """Jitted ``logps(trainable, params, batch) -> [B, C]``: the policy's completion log-probs at sampling time,
    kept as the old log-probs when one batch of samples serves several steps (num_iterations > 1); trainable None:
    the reference's (adapter off). The B rows run in passes of at most LOGPS_TOKENS tokens (a divisor of B rows,
    at least one), so a whole generation's forward never holds more than a training micro-batch's activations."""

    def logps(trainable, params, batch):
        kw = dict(config=config, ops=ops, chunk=chunk, **forward_kwargs)
        rows, width = batch["tokens"].shape
        per_pass = max(d for d in range(1, rows + 1) if rows % d == 0 and (d == 1 or d * width <= LOGPS_TOKENS))
        keys = ("tokens", "positions", "segment_ids", "completion_ids")
        passes = {k: batch[k].reshape(rows // per_pass, per_pass, *batch[k].shape[1:]) for k in keys}
        if trainable is None:
            p, lora_kw = params, dict(lora=None)
        else:
            p, lora_tree = with_trainable(params, trainable)
            lora_kw = dict(lora=lora_tree, lora_rt=lora.runtime)
        out = jax.lax.map(lambda part: completion_logps(p, part, **lora_kw, **kw)[0], passes)
        return out.reshape(rows, -1)

    return jax.jit(logps)


def make_grpo_step(
    config: ModelConfig,
    lora: LoraConfig,
    lc: GRPOLossConfig,
    optimizer: optax.GradientTransformation,
    ops: Ops = Ops(),
    chunk: int = GRPO_LOGPROB_CHUNK,
    **forward_kwargs,
) -> Callable:
    """Jitted ``step(trainable, opt_state, params, batches) -> (trainable, opt_state, metrics)``; batches: the
    generation batch as micro-batches, every array with a leading [accumulation_steps] axis. Gradients of the
    micro-batch losses (each normalised as TRL's) add up; metrics are their mean, as TRL averages its logs. A
    non-finite loss or gradient keeps the old state (``finite=False``), as the SFT step."""
    grad_fn = jax.value_and_grad(make_grpo_loss_fn(config, lora, lc, ops, chunk, **forward_kwargs), has_aux=True)

    def step(trainable, opt_state, params, batches):
        steps = batches["completion_mask"].shape[0]
        num_items = jnp.sum(batches["completion_mask"].astype(jnp.float32))

        def micro(grads, batch):
            (loss, metrics), g = grad_fn(trainable, params, batch, num_items, steps)
            return jax.tree.map(jnp.add, grads, g), (loss, metrics)

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        grads, (losses, metrics) = jax.lax.scan(micro, zeros, batches)
        loss = jnp.sum(losses)
        updates, new_opt = optimizer.update(grads, opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        metrics = {k: jnp.nanmean(v) for k, v in metrics.items()}
        metrics = {**metrics, "loss": loss, "grad_norm": grad_norm, "finite": finite}
        return keep(new_trainable, trainable), keep(new_opt, opt_state), metrics

    return jax.jit(step, donate_argnums=(0, 1))
