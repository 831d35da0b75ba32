"""Evaluation during a GRPO run, as TRL's GRPOTrainer evaluates: every eval prompt once, in batches of
per_device_eval_batch_size completions per device (num_generations_eval per prompt, default num_generations; the
last batch may hold fewer prompts), each batch sampled with the current adapter, scored by the reward functions, and
its GRPO loss computed on its own samples (ratio 1, no accumulation). Recorded with TRL's names and ``eval_``
prefix: eval_loss (mean over completions, as transformers' evaluation loop weighs batches), and the mean over
batches (NaNs left out, TRL's ``log``) of eval_reward, eval_reward_std, eval_rewards/<name>/mean and /std,
eval_frac_reward_zero_std, eval_completions/*, eval_entropy, eval_clip_ratio/* and (beta > 0) eval_kl; besides
jaxsloth's eval_runtime_s.

Every evaluation samples batch b from the same seeds (``EVAL_SEED + b x devices``), so two evaluations differ by
the adapter, not by sampling noise; the training generations' seeds stay far below.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from jaxsloth.methods.grpo import completion_metrics, group_advantages

log = logging.getLogger("jaxsloth")

EVAL_SEED = 10**9


def hold_out(rows: list[dict], size: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(training prompts, eval prompts) of ``rows``: ``size`` rows (a fraction below 1, rounded up as datasets'
    train_test_split, or a count) drawn by ``seed`` (val_set_size); both parts keep the data's order."""
    n = len(rows)
    k = math.ceil(size * n) if size < 1 else int(size)
    if not 1 <= k < n:
        raise ValueError(f"val_set_size={size} holds out {k} of the {n} prompts; leave at least one of each")
    order = np.random.default_rng(seed).permutation(n)
    held = set(order[:k].tolist())
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def _mean(values: list[float]) -> float | None:
    """TRL's ``log``: the mean of the values that are not NaN; None when none is."""
    valid = [v for v in values if not math.isnan(v)]
    return sum(valid) / len(valid) if valid else None


class GRPOEvaluator:
    """Evaluates the adapter on ``rows`` every ``every`` steps (None: only at the end).

    rollouts(trainable, rows, seed, step) -> (Rollout, rewards [N, F]): samples ``num_generations`` completions of
    each row's prompt (seeds from ``seed`` on) and scores them; batch(rollout) -> the loss's arrays
    (``rollout.completion_batch``); loss(trainable, arrays) -> (loss, metrics) of the GRPO loss on them."""

    def __init__(
        self,
        rows: Sequence[dict],
        *,
        prompts_per_batch: int,
        num_generations: int,
        devices: int,
        rollouts: Callable,
        batch: Callable,
        loss: Callable,
        reward_weights: np.ndarray,
        reward_names: Sequence[str],
        scale_rewards: str,
        every: int | None = None,
    ):
        if not rows:
            raise ValueError("the GRPO eval data has no prompts")
        if any("prompt" not in r for r in rows):
            raise ValueError("method='grpo': every row of the eval data needs a 'prompt' (text or a conversation)")
        self.rows, self.per_batch, self.g, self.devices = list(rows), prompts_per_batch, num_generations, devices
        self.rollouts, self.batch, self.loss = rollouts, batch, loss
        self.weights, self.names, self.scale_rewards = reward_weights, list(reward_names), scale_rewards
        self.every = every
        self.last_step: int | None = None

    def due(self, step: int) -> bool:
        return self.every is not None and step % self.every == 0

    def metrics(self, trainable, step: int) -> dict[str, float | None]:
        """{"loss", TRL's metric names}: eval_loss's completion-weighted mean and the other metrics' batch means."""
        per_metric: dict[str, list[float]] = {}
        losses, counts = [], []
        for b, start in enumerate(range(0, len(self.rows), self.per_batch)):
            rows = self.rows[start : start + self.per_batch]
            rollout, rewards = self.rollouts(trainable, rows, EVAL_SEED + b * self.devices, step)
            advantages, values = group_advantages(rewards, self.weights, self.g, self.scale_rewards, self.names)
            values |= completion_metrics(rollout.lengths, rollout.truncated)
            arrays = self.batch(rollout)
            arrays["advantages"] = advantages
            loss, loss_metrics = jax.device_get(self.loss(trainable, arrays))
            values |= {k: float(v) for k, v in loss_metrics.items()}
            losses.append(float(loss))
            counts.append(len(rollout.completion_ids))
            for k, v in values.items():
                per_metric.setdefault(k, []).append(v)
        out = {"loss": sum(l * c for l, c in zip(losses, counts, strict=True)) / sum(counts)}
        return out | {k: _mean(v) for k, v in per_metric.items()}

    def evaluate(self, step: int, trainable, callbacks: Sequence = ()) -> dict:
        """Evaluates and hands the record ({"step", "eval_loss", "eval_reward", ...}) to every callback."""
        t0 = time.perf_counter()
        metrics = self.metrics(trainable, step)
        record = {"step": step, **{f"eval_{k}": v for k, v in metrics.items()}}
        record["eval_runtime_s"] = time.perf_counter() - t0
        self.last_step = step
        log.info("step %d: eval_reward %s, eval_loss %.4f", step, metrics.get("reward"), metrics["loss"])
        for cb in callbacks:
            cb(record)
        return record
