"""Preference tuning inside ``jaxsloth.train`` / ``jaxsloth.train.loop.fit``: the data (``preference_loader``), the
reference log-probs (in the step with the adapter off, or precomputed once over the dataset: TRL's
``precompute_ref_log_probs``), and a step with the SFT step's signature, so checkpoints, resume, metrics sinks and
interrupts are the SFT loop's own.

The step accumulates gradients over ``gradient_accumulation_steps`` micro-batches as transformers' Trainer does for
TRL: each micro-batch's loss is the method's mean over its pairs, and the step's loss and gradient are the mean over
micro-batches.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsloth.config import LoraConfig, TrainConfig
from jaxsloth.methods.logprobs import sequence_logps
from jaxsloth.methods.preference_loader import (
    PreferenceExamples,
    PreferenceLoader,
    pack_examples,
    tokenize_preferences,
)
from jaxsloth.methods.preference_step import PreferenceConfig, make_preference_loss_fn
from jaxsloth.models.config import ModelConfig
from jaxsloth.profiles import Profile

log = logging.getLogger("jaxsloth")


def preference_config(tc: TrainConfig) -> PreferenceConfig:
    """The method and its settings from a TrainConfig (method must not be "sft")."""
    return PreferenceConfig(
        method=tc.method,
        beta=tc.beta,
        loss_type=tc.loss_type,
        label_smoothing=tc.label_smoothing,
        simpo_gamma=tc.simpo_gamma,
        cpo_alpha=tc.cpo_alpha,
        desirable_weight=tc.desirable_weight,
        undesirable_weight=tc.undesirable_weight,
    )


def _forward_kwargs(profile: Profile) -> dict:
    return dict(
        remat=profile.remat,
        compute_dtype=profile.dtype,
        mlp_chunk=profile.mlp_chunk,
        remat_group=profile.remat_group,
        dots_layers=profile.dots_layers,
    )


def make_preference_train_step(
    config: ModelConfig,
    lora: LoraConfig,
    tc: TrainConfig,
    profile: Profile,
    optimizer: optax.GradientTransformation,
    *,
    pc: PreferenceConfig,
    sequences: int,
    mesh=None,
    shardings=None,
) -> Callable:
    """``make_train_step``'s shape for ``fit``: jitted ``step(trainable, opt_state, params, batch, key) ->
    (trainable, opt_state, metrics)``. batch: ``PreferenceLoader`` arrays, [accum * rows, seq] (rows of
    ``sequences`` sequences per micro-batch). metrics: loss, tokens (completion tokens), grad_norm, finite and the
    method's TRL metrics (mean over micro-batches)."""
    if mesh is not None:
        raise NotImplementedError("preference tuning runs on one device (or one data-parallel rank): give mesh=None")
    loss_fn = make_preference_loss_fn(config, lora, pc, profile.ops, **_forward_kwargs(profile))
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    n = tc.gradient_accumulation_steps

    def step(trainable, opt_state, params, batch, key):
        micro = {k: v.reshape(n, v.shape[0] // n, *v.shape[1:]) for k, v in batch.items()}
        keys = jax.random.split(key, n)

        def accumulate(g_sum, xs):
            b, k = xs
            (loss, metrics), g = grad_fn(trainable, params, b, sequences, k if lora.lora_dropout > 0 else None)
            g_sum = jax.tree.map(lambda a, x: a + x.astype(jnp.float32), g_sum, g)
            return g_sum, {**metrics, "loss": loss}

        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable)
        g_sum, per_micro = jax.lax.scan(accumulate, zeros, (micro, keys))
        grads = jax.tree.map(lambda g, p: (g / n).astype(p.dtype), g_sum, trainable)
        metrics = jax.tree.map(lambda x: jnp.mean(x, axis=0), per_micro)
        updates, new_opt = optimizer.update(grads, opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        tokens = jnp.sum(batch["targets"] != -100)
        metrics = {**metrics, "tokens": tokens, "grad_norm": grad_norm, "finite": finite}
        return keep(new_trainable, trainable), keep(new_opt, opt_state), metrics

    return jax.jit(step, donate_argnums=(0, 1))


def precompute_reference(
    config: ModelConfig, params: dict, profile: Profile, examples: PreferenceExamples, rows: int, seq_len: int
) -> np.ndarray:
    """The reference model's (base weights, no adapter) summed completion log-probs of every example, computed once
    in dataset order, ``rows`` examples per forward -> [n, 2] f32 (chosen, rejected; or completion, KL)."""
    kwargs = _forward_kwargs(profile)

    @jax.jit
    def logps(batch):
        sums, _ = sequence_logps(params, batch, 2 * rows, config=config, ops=profile.ops, lora=None, **kwargs)
        return sums

    n = len(examples)
    out = np.zeros((n, 2), np.float32)
    for start in range(0, n, rows):
        ids = np.arange(start, min(start + rows, n))
        # The last block is padded with the first examples so every forward has one shape (one compile).
        padded = np.concatenate([ids, np.arange(rows - len(ids)) % n])
        batch = pack_examples(examples, padded, seq_len)
        batch.pop("desirable", None)
        sums = np.asarray(logps({k: jnp.asarray(v) for k, v in batch.items()}))
        if examples.unpaired:
            per_example = np.stack([sums[:rows], sums[rows:]], axis=1)
        else:
            per_example = sums.reshape(rows, 2)
        out[ids] = per_example[: len(ids)]
    return out


def preference_run(model: Any, tokenizer: Any, data: Any, tc: TrainConfig, pairs_per_micro: int):
    """What ``jaxsloth.train`` needs for a preference method: (loader, make_step for ``fit``). data: anything
    ``jaxsloth.data.load_records`` reads; each prompt + completion is cut to ``model.max_seq_length`` tokens."""
    from jaxsloth.data import load_records

    if tc.streaming or type(data).__name__ == "IterableDataset":
        raise ValueError(f"method={tc.method!r}: preference data is read whole; streaming is for SFT")
    pc = preference_config(tc)
    records = load_records(data, split=tc.split, name=tc.dataset_config)
    examples = tokenize_preferences(
        records, tokenizer, method=tc.method, max_length=model.max_seq_length, pairs_per_micro=pairs_per_micro
    )
    loader = PreferenceLoader(
        examples, pairs_per_micro=pairs_per_micro, gradient_accumulation_steps=tc.gradient_accumulation_steps,
        seed=tc.seed, method=tc.method,
    )  # fmt: skip
    if tc.precompute_ref_log_probs and pc.needs_reference:
        log.info("precomputing the reference log-probs of %d examples", len(examples))
        loader.ref_logps = precompute_reference(
            model.config, model.params, model.profile, examples, pairs_per_micro, loader.seq_len
        )
    make_step = functools.partial(make_preference_train_step, pc=pc, sequences=loader.sequences_per_micro)
    return loader, make_step
