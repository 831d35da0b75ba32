"""Evaluation during training: the loss over held-out data, greedy answers to fixed prompts, early stopping and the
best step (transformers' Trainer and EarlyStoppingCallback semantics).

The eval loss is the token-weighted mean cross-entropy over the whole eval set: its examples are packed (or not)
into rows exactly as training packs its data, with the same label masks, and the rows grouped into batches of one
fixed shape (the last one filled with padding rows), so the loss compiles once and every evaluation reuses it.

Callbacks (``jaxsloth.train(callbacks=...)``, ``fit``) are called with every record: each training step's and
each evaluation's ``{"step", "eval_loss", "eval_tokens", "eval_runtime_s", "eval_samples"?}`` (eval_samples: one
``{"prompt", "completion"}`` per eval prompt). A callback with an ``on_evaluate(record, model)`` method is then
also given the model as of that step (a ``jaxsloth.api.Model`` holding the step's adapter; its arrays are reused
by the next step, so copy what you keep, e.g. ``jax.device_get(model.trainable)``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsloth.config import TrainConfig
from jaxsloth.data import BatchLoader, TokenizedDataset
from jaxsloth.models.decoder import layers_unstacked, stack_layers, unstack_layers
from jaxsloth.sharding import ShardedOps, batch_devices, shard_batch
from jaxsloth.train.host_embedding import step_params, with_embedded
from jaxsloth.train.step import make_loss_fn

log = logging.getLogger("jaxsloth")


def split_off(dataset: TokenizedDataset, size: float, seed: int) -> tuple[TokenizedDataset, TokenizedDataset]:
    """(training part, held-out part) of ``dataset``: ``size`` examples (a fraction below 1, rounded up as
    datasets' train_test_split does, or a count) drawn by ``seed``; the two are disjoint and keep dataset order."""
    n = len(dataset)
    k = math.ceil(size * n) if size < 1 else int(size)
    if not 1 <= k < n:
        raise ValueError(f"val_set_size={size} holds out {k} of the {n} training examples; leave at least one of each")
    order = np.random.default_rng(seed).permutation(n)
    held, kept = np.sort(order[:k]), np.sort(order[k:])

    def subset(idx: np.ndarray) -> TokenizedDataset:
        examples = [dataset.examples[i] for i in idx]
        return dataclasses.replace(dataset, examples=examples, row_index=dataset.row_index[idx])

    return subset(kept), subset(held)


def eval_batches(dataset: TokenizedDataset, rows: int, seq_len: int, pack: bool) -> list[dict[str, np.ndarray]]:
    """Every example of ``dataset`` once, in order, as batches of [rows, seq_len] int32 arrays (see jaxsloth.data)."""
    return list(BatchLoader(dataset, rows, seq_len, pack=pack, shuffle=False, num_epochs=1))


@dataclasses.dataclass
class BestTracker:
    """The lowest eval_loss so far and its step; ``bad_evals`` counts evaluations in a row that did not improve
    on the best by more than ``threshold`` (transformers' EarlyStoppingCallback), ``should_stop`` once it reaches
    ``patience``."""

    patience: int | None = None
    threshold: float = 0.0
    best_loss: float | None = None
    best_step: int | None = None
    bad_evals: int = 0

    def update(self, step: int, loss: float) -> bool:
        """Counts one evaluation; returns whether it is the new best."""
        best = self.best_loss
        self.bad_evals = 0 if best is None or (loss < best and best - loss > self.threshold) else self.bad_evals + 1
        if best is None or loss < best:
            self.best_loss, self.best_step = loss, step
            return True
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_evals >= self.patience

    def state_dict(self) -> dict:
        return {"best_loss": self.best_loss, "best_step": self.best_step, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict) -> None:
        self.best_loss, self.best_step, self.bad_evals = state["best_loss"], state["best_step"], state["bad_evals"]


@contextlib.contextmanager
def stacked_layers(params: dict):
    """``params`` with stacked layers for the duration (generation scans the stacked layout). Params split per
    layer for the unrolled training loop are stacked in place and split back after, one projection at a time, so
    the device never holds both layouts."""
    if not layers_unstacked(params):
        yield params
        return
    stacked = stack_layers(params, consume=True)
    try:
        yield stacked
    finally:
        params.update(unstack_layers(stacked, consume=True))


class Evaluator:
    """What ``fit`` evaluates and when: the eval loss over ``batches``, sample answers, the best step.

    batches: [rows, seq] int32 dicts of one shape (``eval_batches``); every: evaluate every this many steps (None:
    only at the end); answer: (trainable, params) -> one completion per prompt in ``prompts``; as_model: (trainable,
    params) -> the model handed to callbacks' ``on_evaluate``; load_best: fit returns the best step's adapter."""

    def __init__(
        self,
        batches: Sequence[dict[str, np.ndarray]],
        *,
        config,
        lora,
        profile,
        mesh=None,
        every: int | None = None,
        tracker: BestTracker | None = None,
        load_best: bool = False,
        prompts: Sequence[str] = (),
        answer: Callable | None = None,
        as_model: Callable | None = None,
    ):
        if not batches:
            raise ValueError("the eval data has no examples")
        self.batches, self.mesh, self.every = list(batches), mesh, every
        self.tracker = tracker or BestTracker()
        self.load_best, self.prompts, self.answer, self.as_model = load_best, tuple(prompts), answer, as_model
        ops = None if mesh is None else ShardedOps(profile.kernels, mesh=mesh)
        loss_fn = make_loss_fn(config, dataclasses.replace(lora, lora_dropout=0.0), profile, ops)  # no dropout
        self.loss_sum_and_count = jax.jit(lambda trainable, params, batch: loss_fn(trainable, params, batch, None))
        self.last_step: int | None = None

    def loss(self, trainable, params) -> tuple[float, int]:
        """(token-weighted mean loss over every batch, counted tokens)."""
        sums = []
        device_params = step_params(params)  # a host embedding table: its rows travel with each batch
        for batch in self.batches:
            batch = with_embedded(batch, params)
            device_batch = jax.tree.map(jnp.asarray, batch) if self.mesh is None else shard_batch(batch, self.mesh)
            sums.append(self.loss_sum_and_count(trainable, device_params, device_batch))
        sums = jax.device_get(sums)
        total, count = sum(float(s) for s, _ in sums), sum(int(c) for _, c in sums)
        return total / max(count, 1), count

    def due(self, step: int) -> bool:
        return self.every is not None and step % self.every == 0

    def evaluate(self, step: int, trainable, params, callbacks: Sequence = ()) -> dict:
        """Evaluates, counts the result toward the best step and early stopping, and hands the record to every
        callback (and the model to their ``on_evaluate``)."""
        t0 = time.perf_counter()
        loss, count = self.loss(trainable, params)
        record = {"step": step, "eval_loss": loss, "eval_tokens": count}
        if self.prompts and self.answer is not None:
            completions = self.answer(trainable, params)
            record["eval_samples"] = [{"prompt": p, "completion": c} for p, c in zip(self.prompts, completions)]
        record["eval_runtime_s"] = time.perf_counter() - t0
        self.tracker.update(step, loss)
        self.last_step = step
        log.info("step %d: eval_loss %.4f over %d tokens", step, loss, count)
        for cb in callbacks:
            cb(record)
        hooks = [cb.on_evaluate for cb in callbacks if hasattr(cb, "on_evaluate")]
        if hooks and self.as_model is not None:
            model = self.as_model(trainable, params)
            for hook in hooks:
                hook(record, model)
        return record


def _eval_rows(model, tc: TrainConfig, mesh) -> int:
    per_device = tc.per_device_eval_batch_size or tc.per_device_train_batch_size or model.profile.micro_batch
    return per_device * batch_devices(mesh)


def tokenize_eval(model, tokenizer, data, tc: TrainConfig, split: str | None = None) -> TokenizedDataset:
    """``data`` (any source ``jaxsloth.train`` reads) tokenized as the training data is."""
    from jaxsloth.data import tokenize_dataset

    return tokenize_dataset(
        data,
        tokenizer,
        format=tc.format,
        max_seq_length=model.max_seq_length,
        train_on_inputs=tc.train_on_inputs,
        vocab_size=model.config.vocab_size,
        text_field=tc.dataset_text_field,
        num_proc=tc.dataset_num_proc,
        split=split or tc.eval_split or tc.split,
        name=tc.dataset_config,
    )


def make_evaluator(model, tokenizer, tc: TrainConfig, held_out: TokenizedDataset | None, mesh=None) -> Evaluator | None:
    """The Evaluator of a ``jaxsloth.train`` run: over ``held_out`` (val_set_size) or tc.eval_dataset; None when
    the run does not evaluate."""
    if not tc.evaluates:
        return None
    dataset = held_out if held_out is not None else tokenize_eval(model, tokenizer, tc.eval_dataset, tc)
    batches = eval_batches(dataset, _eval_rows(model, tc, mesh), model.max_seq_length, tc.packing)

    def as_model(trainable, params):
        return dataclasses.replace(model, params=params, trainable=trainable)

    # A model trained on conversations is asked as it was trained: each prompt a user turn of the chat template.
    prompts = list(tc.eval_prompts)
    if dataset.format == "messages":
        prompts = [[{"role": "user", "content": p}] for p in prompts]

    def answer(trainable, params) -> list[str]:
        from jaxsloth.generate import generate_text

        with stacked_layers(params) as stacked:
            return generate_text(
                as_model(trainable, stacked), tokenizer, prompts, max_new_tokens=tc.eval_max_new_tokens
            )

    return Evaluator(
        batches,
        config=model.config,
        lora=model.lora,
        profile=model.profile,
        mesh=mesh,
        every=tc.eval_steps,
        tracker=BestTracker(tc.early_stopping_patience, tc.early_stopping_threshold),
        load_best=tc.load_best_model_at_end,
        prompts=tc.eval_prompts,
        answer=answer,
        as_model=as_model,
    )


# Settings of evaluation during a training run, which a one-off evaluation has no use for.
_DURING_TRAINING = ("eval_dataset", "val_set_size", "eval_steps", "early_stopping_patience", "load_best_model_at_end")


def evaluate_model(model, tokenizer, data, **settings) -> dict[str, float]:
    """{"eval_loss", "eval_tokens"} of ``model`` (its adapter) over ``data``, read, tokenized and packed as
    ``jaxsloth.train`` would with these settings (TrainConfig fields: packing, format, per_device_eval_batch_size,
    ...; those of evaluation during training are not used)."""
    if model.trainable is None:
        raise ValueError("the model has no adapter to evaluate: call jaxsloth.add_lora(model, ...) first")
    tc = TrainConfig(**{k: v for k, v in settings.items() if k not in _DURING_TRAINING})
    dataset = tokenize_eval(model, tokenizer, data, tc)
    batches = eval_batches(dataset, _eval_rows(model, tc, None), model.max_seq_length, tc.packing)
    evaluator = Evaluator(batches, config=model.config, lora=model.lora, profile=model.profile)
    loss, count = evaluator.loss(model.trainable, model.params)
    return {"eval_loss": loss, "eval_tokens": count}
