"""Preference tuning inside ``jaxsloth.train`` / ``jaxsloth.train.loop.fit``: the data (``preference_loader``), the
reference log-probs (in the step with the adapter off, or precomputed once over the dataset: TRL's
``precompute_ref_log_probs``), and a step with the SFT step's signature, so checkpoints, resume, metrics sinks and
interrupts are the SFT loop's own.

The step accumulates gradients over ``gradient_accumulation_steps`` micro-batches as transformers' Trainer does for
TRL: each micro-batch's loss is the method's mean over its pairs, and the step's loss and gradient are the mean over
micro-batches.
"""

from __future__ import annotations

import dataclasses
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
from jaxsloth.methods.preference_data import map_fields
from jaxsloth.methods.preference_eval import PreferenceEvaluator, eval_batches, split_examples
from jaxsloth.methods.preference_loader import (
    PreferenceExamples,
    PreferenceLoader,
    pack_examples,
    row_length,
    tokenize_preferences,
)
from jaxsloth.methods.preference_reference import Reference, resolve_reference
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


class BoundStep:
    """A jitted step with trailing arguments bound (the reference model's weights): called, lowered and compiled
    with the SFT step's arguments, as ``fit`` does, while the bound arrays stay arguments of the compiled program
    (not constants folded into it)."""

    def __init__(self, jitted: Callable, *bound):
        self.jitted, self.bound = jitted, bound

    def __call__(self, *args):
        return self.jitted(*args, *self.bound)

    def lower(self, *args) -> BoundStep:
        return BoundStep(self.jitted.lower(*args, *self.bound), *self.bound)

    def compile(self) -> BoundStep:
        return BoundStep(self.jitted.compile(), *self.bound)

    def memory_analysis(self):
        return self.jitted.memory_analysis()


def make_preference_train_step(
    config: ModelConfig,
    lora: LoraConfig | None,
    tc: TrainConfig,
    profile: Profile,
    optimizer: optax.GradientTransformation,
    *,
    pc: PreferenceConfig,
    sequences: int,
    reference: Reference | None = None,
    mesh=None,
    shardings=None,
) -> Callable:
    """``make_train_step``'s shape for ``fit``: ``step(trainable, opt_state, params, batch, key) -> (trainable,
    opt_state, metrics)``. batch: ``PreferenceLoader`` arrays, [accum * rows, seq] (rows of ``sequences`` sequences
    per micro-batch). lora None: full fine-tuning. reference: a separate frozen reference model (bound to the step
    as an argument); None: the adapter-off weights, or the batch's precomputed "ref_logps". metrics: loss, tokens
    (completion tokens), grad_norm, finite and the method's TRL metrics (mean over micro-batches)."""
    if mesh is not None:
        raise NotImplementedError("preference tuning runs on one device (or one data-parallel rank): give mesh=None")
    ref_config = None if reference is None else reference.config
    loss_fn = make_preference_loss_fn(config, lora, pc, profile.ops, ref_config=ref_config, **profile.forward_settings)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    n = tc.gradient_accumulation_steps
    dropout = lora is not None and lora.lora_dropout > 0

    def step(trainable, opt_state, params, batch, key, ref_params):
        micro = {k: v.reshape(n, v.shape[0] // n, *v.shape[1:]) for k, v in batch.items()}
        keys = jax.random.split(key, n)

        def grads_of(b, k):
            return grad_fn(trainable, params, b, sequences, k if dropout else None, ref_params)

        if n == 1:  # no f32 accumulator (in full fine-tuning, twice the 16-bit weights' size)
            (loss, metrics), grads = grads_of(jax.tree.map(lambda x: x[0], micro), keys[0])
            metrics = {**metrics, "loss": loss}
        else:

            def accumulate(g_sum, xs):
                (loss, metrics), g = grads_of(*xs)
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

    return BoundStep(jax.jit(step, donate_argnums=(0, 1)), None if reference is None else reference.params)


def precompute_reference(
    config: ModelConfig, params: dict, profile: Profile, examples: PreferenceExamples, rows: int, seq_len: int
) -> np.ndarray:
    """The reference model's (base weights, no adapter) summed completion log-probs of every example, computed once
    in dataset order, ``rows`` examples per forward -> [n, 2] f32 (chosen, rejected; or completion, KL)."""
    kwargs = profile.forward_settings

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


def _examples(model: Any, tokenizer: Any, data: Any, tc: TrainConfig, rows: int, split: str):
    """``data`` read, its columns mapped to TRL's names (prompt_field, ...) and tokenized -> (PreferenceExamples,
    whether its prompts are conversations)."""
    from jaxsloth.data import load_records

    records = load_records(data, split=split, name=tc.dataset_config)
    fields = dict(prompt_field=tc.prompt_field, chosen_field=tc.chosen_field, rejected_field=tc.rejected_field,
                  system_field=tc.system_field, chat_answers=tc.chat_answers)  # fmt: skip
    if fields != dict(prompt_field="prompt", chosen_field="chosen", rejected_field="rejected", system_field=None,
                      chat_answers=False):  # fmt: skip
        try:
            records = [map_fields(r, **fields) for r in records]
        except ValueError as e:
            raise ValueError(f"preference data: {e}") from None
    first = records[0] if records else {}
    conversational = isinstance(first.get("prompt", first.get("chosen")), list)
    examples = tokenize_preferences(
        records, tokenizer, method=tc.method, max_length=model.max_seq_length, pairs_per_micro=rows
    )
    return examples, conversational


def _evaluator(model, tokenizer, tc, pc, examples, chat, reference, ref_in_step, rows) -> PreferenceEvaluator:
    """The run's PreferenceEvaluator over ``examples`` (eval_dataset or the val_set_size held out)."""
    from jaxsloth.train.evaluate import BestTracker, stacked_layers

    ref_logps = None
    if tc.precompute_ref_log_probs and pc.needs_reference:
        ref = reference or Reference(model.config, model.params)
        ref_logps = precompute_reference(ref.config, ref.params, model.profile, examples, rows, row_length(examples))
    lora = None if model.full_finetuning else dataclasses.replace(model.lora, lora_dropout=0.0)
    ref_config = None if reference is None else reference.config
    loss_fn = make_preference_loss_fn(
        model.config, lora, pc, model.profile.ops, ref_config=ref_config, **model.profile.forward_settings
    )

    def as_model(trainable, params):
        if model.full_finetuning:
            return dataclasses.replace(model, params=trainable)
        return dataclasses.replace(model, params=params, trainable=trainable)

    # Asked as the model was trained: a user turn of the chat template when the prompts were conversations.
    prompts = [[{"role": "user", "content": p}] for p in tc.eval_prompts] if chat else list(tc.eval_prompts)

    def answer(trainable, params) -> list[str]:
        from jaxsloth.generate import generate_text

        with stacked_layers(trainable if model.full_finetuning else params) as stacked:
            m = as_model(stacked, None) if model.full_finetuning else as_model(trainable, stacked)
            return generate_text(m, tokenizer, prompts, max_new_tokens=tc.eval_max_new_tokens)

    return PreferenceEvaluator(
        eval_batches(examples, rows, ref_logps),
        loss_fn=loss_fn,
        ref_params=reference.params if ref_in_step else None,
        every=tc.eval_steps,
        tracker=BestTracker(tc.early_stopping_patience, tc.early_stopping_threshold),
        load_best=tc.load_best_model_at_end,
        prompts=tc.eval_prompts,
        answer=answer,
        as_model=as_model,
    )


def preference_run(model: Any, tokenizer: Any, data: Any, tc: TrainConfig, pairs_per_micro: int):
    """What ``jaxsloth.train`` needs for a preference method: (loader, make_step for ``fit``, the evaluator or None).
    data: anything ``jaxsloth.data.load_records`` reads; each prompt + completion is cut to
    ``model.max_seq_length`` tokens."""
    if tc.streaming or type(data).__name__ == "IterableDataset":
        raise ValueError(f"method={tc.method!r}: preference data is read whole; streaming is for SFT")
    pc = preference_config(tc)
    examples, chat = _examples(model, tokenizer, data, tc, pairs_per_micro, tc.split)
    held_out = None
    if tc.val_set_size:
        examples, held_out = split_examples(examples, tc.val_set_size, tc.seed)
    reference = resolve_reference(model, tokenizer, tc, pc.needs_reference)
    precompute = tc.precompute_ref_log_probs and pc.needs_reference
    loader = PreferenceLoader(
        examples, pairs_per_micro=pairs_per_micro, gradient_accumulation_steps=tc.gradient_accumulation_steps,
        seed=tc.seed, method=tc.method,
    )  # fmt: skip
    evaluator = None
    if tc.evaluates:
        rows = tc.per_device_eval_batch_size or pairs_per_micro
        if held_out is None:
            held_out, chat = _examples(model, tokenizer, tc.eval_dataset, tc, rows, tc.eval_split or tc.split)
        evaluator = _evaluator(model, tokenizer, tc, pc, held_out, chat, reference, not precompute, rows)
    if precompute:
        log.info("precomputing the reference log-probs of %d examples", len(examples))
        ref = reference or Reference(model.config, model.params)
        loader.ref_logps = precompute_reference(
            ref.config, ref.params, model.profile, examples, pairs_per_micro, loader.seq_len
        )
        reference = None  # the step reads the batch's log-probs; no reference weights are held
    make_step = functools.partial(
        make_preference_train_step, pc=pc, sequences=loader.sequences_per_micro, reference=reference
    )
    return loader, make_step, evaluator


def evaluate_preferences(model: Any, tokenizer: Any, data: Any, **settings) -> dict[str, float]:
    """{"eval_loss", "eval_rewards/chosen", ..., "eval_tokens"} of ``model`` as it is now over ``data``, read and
    scored as a preference run with these settings (TrainConfig fields: method, beta, ref_model, ...) would."""
    from jaxsloth.train.evaluate import _DURING_TRAINING

    tc = TrainConfig(**{k: v for k, v in settings.items() if k not in _DURING_TRAINING})
    if tc.method == "sft":
        raise ValueError("evaluate_preferences needs a preference method (method='dpo', 'orpo', 'simpo' or 'kto')")
    pc = preference_config(tc)
    if model.full_finetuning and pc.needs_reference and tc.ref_model is None:
        raise ValueError(
            f"evaluating {tc.method} on a fully fine-tuned model needs ref_model: its initial weights, the "
            "reference of the run, are gone"
        )
    rows = tc.per_device_eval_batch_size or tc.per_device_train_batch_size or model.profile.micro_batch
    examples, chat = _examples(model, tokenizer, data, tc, rows, tc.eval_split or tc.split)
    reference = resolve_reference(model, tokenizer, tc, pc.needs_reference)
    precompute = tc.precompute_ref_log_probs and pc.needs_reference
    evaluator = _evaluator(model, tokenizer, tc, pc, examples, chat, reference, not precompute, rows)
    trainable, params = (model.params, {}) if model.full_finetuning else (model.trainable, model.params)
    return {f"eval_{k}": v for k, v in evaluator.metrics(trainable, params).items()}
