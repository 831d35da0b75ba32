"""Evaluation during a preference run, as TRL's preference trainers evaluate: the method's loss and its metrics over
every example of the eval set, recorded as ``eval_loss``, ``eval_rewards/chosen``, ``eval_rewards/accuracies``, ...
(TRL's names), into the same records, trackers, early stopping and best step as SFT's evaluation
(``jaxsloth.train.evaluate``).

The eval set is read and tokenized as the training data (``preference_loader``), packed one example per row in
batches of ``per_device_eval_batch_size`` examples in dataset order (the last batch smaller: one more compile). Each
value is the mean over batches weighted by their examples (TRL's, whose batches are all of one size). No dropout;
the reference is the training step's (adapter off, the separate reference model, or log-probs precomputed for the
eval set too).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsloth.methods.preference_loader import PreferenceExamples, pack_examples, row_length, sequence_order
from jaxsloth.train.evaluate import BestTracker, Evaluator

log = logging.getLogger("jaxsloth")


def split_examples(examples: PreferenceExamples, size: float, seed: int) -> tuple[PreferenceExamples, ...]:
    """(training part, held-out part): ``size`` examples (a fraction below 1, rounded up, or a count) drawn by
    ``seed`` (val_set_size), each part in dataset order."""
    n = len(examples)
    k = math.ceil(size * n) if size < 1 else int(size)
    if not 1 <= k < n:
        raise ValueError(f"val_set_size={size} holds out {k} of the {n} preference examples; leave one of each")
    order = np.random.default_rng(seed).permutation(n)

    def subset(ids) -> PreferenceExamples:
        ids = np.sort(ids)
        labels = None if examples.labels is None else examples.labels[ids]
        return PreferenceExamples([examples.prompts[i] for i in ids], [examples.completions[i] for i in ids], labels)

    return subset(order[k:]), subset(order[:k])


def eval_batches(
    examples: PreferenceExamples, rows: int, ref_logps: np.ndarray | None = None
) -> list[dict[str, np.ndarray]]:
    """Every example once, in order, ``rows`` per batch (``pack_examples`` arrays, [rows, seq_len]; the last batch
    may have fewer rows), with the batch's slice of ``ref_logps`` ([n, 2], precomputed) as "ref_logps"."""
    seq_len = row_length(examples)
    out = []
    for start in range(0, len(examples), rows):
        ids = np.arange(start, min(start + rows, len(examples)))
        batch = pack_examples(examples, ids, seq_len)
        if ref_logps is not None:
            batch["ref_logps"] = sequence_order(examples, ref_logps[ids]).astype(np.float32)
        out.append(batch)
    return out


class PreferenceEvaluator(Evaluator):
    """``fit``'s evaluator for a preference run. loss_fn: ``make_preference_loss_fn``'s (no dropout); ref_params:
    the separate reference model's weights, or None."""

    def __init__(
        self,
        batches: Sequence[dict[str, np.ndarray]],
        *,
        loss_fn: Callable,
        ref_params=None,
        every: int | None = None,
        tracker: BestTracker | None = None,
        load_best: bool = False,
        prompts: Sequence = (),
        answer: Callable | None = None,
        as_model: Callable | None = None,
    ):
        if not batches:
            raise ValueError("the eval data has no examples")
        self.batches, self.mesh, self.every = list(batches), None, every
        self.tracker = tracker or BestTracker()
        self.load_best, self.prompts, self.answer, self.as_model = load_best, tuple(prompts), answer, as_model
        self.ref_params = ref_params
        self.loss_and_metrics = jax.jit(loss_fn, static_argnums=3)
        self.last_step: int | None = None

    def metrics(self, trainable, params) -> dict[str, float]:
        """{"loss", the method's TRL metrics, "tokens"}: means over the eval set (tokens: the completion tokens)."""
        results, weights, tokens = [], [], 0
        for batch in self.batches:
            n = batch["tokens"].shape[0]
            device_batch = {k: jnp.asarray(v) for k, v in batch.items()}
            results.append(self.loss_and_metrics(trainable, params, device_batch, 2 * n, None, self.ref_params))
            weights.append(n)
            tokens += int(np.sum(batch["targets"] != -100))
        results = jax.device_get(results)
        total = sum(weights)
        out = {"loss": sum(w * float(loss) for w, (loss, _) in zip(weights, results, strict=True)) / total}
        for key in results[0][1]:
            out[key] = sum(w * float(m[key]) for w, (_, m) in zip(weights, results, strict=True)) / total
        return {**out, "tokens": tokens}

    def evaluate(self, step: int, trainable, params, callbacks: Sequence = ()) -> dict:
        t0 = time.perf_counter()
        metrics = self.metrics(trainable, params)
        record = {"step": step, **{f"eval_{k}": v for k, v in metrics.items()}}
        if self.prompts and self.answer is not None:
            completions = self.answer(trainable, params)
            record["eval_samples"] = [{"prompt": p, "completion": c} for p, c in zip(self.prompts, completions)]
        record["eval_runtime_s"] = time.perf_counter() - t0
        self.tracker.update(step, metrics["loss"])
        self.last_step = step
        accuracy = metrics.get("rewards/accuracies", math.nan)
        log.info("step %d: eval_loss %.4f, eval_rewards/accuracies %.3f", step, metrics["loss"], accuracy)
        for cb in callbacks:
            cb(record)
        hooks = [cb.on_evaluate for cb in callbacks if hasattr(cb, "on_evaluate")]
        if hooks and self.as_model is not None:
            model = self.as_model(trainable, params)
            for hook in hooks:
                hook(record, model)
        return record
