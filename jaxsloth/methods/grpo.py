"""GRPO as TRL's GRPOTrainer defines it: group-normalised advantages from weighted rewards (host side, numpy) and
the per-token clipped surrogate with an optional KL to the reference (device side, JAX).

Advantages (TRL's ``sum_then_normalize``): each completion's reward is the weighted sum of its reward functions'
values (a function's None counts 0; a completion every function left unscored gets advantage 0 and is left out of
the baselines), minus its group's mean, divided by the group's (``scale_rewards="group"``) or the whole batch's
("batch") sample std + 1e-4, or not divided ("none").

Loss: ratio r = exp(logp - old_logp) per completion token; per-token loss -min(r A, clip(r, 1 - epsilon,
1 + epsilon_high) A) + beta * KL, KL = exp(ref - logp) - (ref - logp) - 1 (times r with use_bias_correction_kl,
TRL's default); reduced by ``loss_type``:
grpo: mean over sequences of each sequence's token mean; bnpo: token mean of the micro-batch; dr_grpo: token sum /
(micro-batch sequences x max_completion_length); dapo: token sum / completion tokens of the whole generation
batch. grpo, bnpo and dr_grpo divide by the gradient-accumulation steps too, so the micro-batch losses add up.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxsloth.config import GRPO_LOSS_TYPES as LOSS_TYPES
from jaxsloth.config import GRPO_SCALE_REWARDS as SCALE_REWARDS

STD_EPS = 1e-4  # TRL's: keeps a group of equal rewards at advantage 0 rather than 0/0


@dataclasses.dataclass(frozen=True)
class GRPOLossConfig:
    """TRL's GRPOConfig names and defaults for the loss. epsilon_high None = epsilon (symmetric clipping);
    use_bias_correction_kl: the KL term is weighted by the importance ratio (off-policy samples)."""

    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    loss_type: str = "dapo"
    max_completion_length: int = 512
    use_bias_correction_kl: bool = True

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r}: expected one of {LOSS_TYPES}")
        if self.beta < 0:
            raise ValueError(f"beta={self.beta} must be >= 0")
        if self.epsilon < 0 or (self.epsilon_high is not None and self.epsilon_high < 0):
            raise ValueError(f"epsilon={self.epsilon}, epsilon_high={self.epsilon_high} must be >= 0")

    @property
    def high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


def _nanmean(x: np.ndarray, axis=None, keepdims: bool = False) -> np.ndarray:
    """Mean ignoring NaNs; NaN where there is no value."""
    count = np.sum(~np.isnan(x), axis=axis, keepdims=keepdims)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, np.nansum(x, axis=axis, keepdims=keepdims) / count, np.nan)


def _nanstd(x: np.ndarray, axis=None) -> np.ndarray:
    """Sample std (Bessel) ignoring NaNs; NaN where fewer than two values (TRL's ``nanstd``)."""
    count = np.sum(~np.isnan(x), axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        var = np.nansum((x - _nanmean(x, axis, keepdims=True)) ** 2, axis=axis) / (count - 1)
    return np.where(count > 1, np.sqrt(var), np.nan)


def group_advantages(
    rewards_per_func: np.ndarray,
    reward_weights,
    num_generations: int,
    scale_rewards: str = "group",
    reward_names=None,
) -> tuple[np.ndarray, dict]:
    """rewards_per_func: [N, F] (NaN = that function gave None), rows grouped by prompt (G = num_generations
    consecutive rows each); reward_weights: [F] -> (advantages [N] f32, TRL's reward metrics)."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r}: expected one of {SCALE_REWARDS}")
    r = np.asarray(rewards_per_func, dtype=np.float64)
    n, f = r.shape
    w = np.asarray(reward_weights, dtype=np.float64).reshape(f)
    if n % num_generations:
        raise ValueError(f"{n} completions are not whole groups of num_generations={num_generations}")
    unscorable = np.isnan(r).all(axis=1)
    rewards = np.nansum(r * w[None], axis=1)
    rewards[unscorable] = np.nan
    grouped = rewards.reshape(-1, num_generations)
    mean = np.repeat(_nanmean(grouped, axis=1), num_generations)
    if scale_rewards == "batch":
        std = np.full(n, _nanstd(rewards) if n > 1 else 0.0)
    else:
        std = np.repeat(_nanstd(grouped, axis=1), num_generations) if num_generations > 1 else np.zeros(n)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + STD_EPS)
    advantages = np.nan_to_num(advantages, nan=0.0)
    names = reward_names if reward_names is not None else [f"reward_{i}" for i in range(f)]
    metrics = {}
    for i, name in enumerate(names):
        metrics[f"rewards/{name}/mean"] = float(_nanmean(r[:, i]))
        metrics[f"rewards/{name}/std"] = float(_nanstd(r[:, i]))
    metrics["reward"] = float(_nanmean(rewards))
    metrics["reward_std"] = float(_nanstd(rewards))
    metrics["frac_reward_zero_std"] = float(np.mean(np.isclose(std, 0.0)))
    return advantages.astype(np.float32), metrics


def completion_metrics(lengths, truncated) -> dict:
    """lengths: [N] completion lengths (the stop token counted), truncated: [N] bool (ran out of tokens) -> TRL's
    completions/* metrics; the terminated lengths are 0 when no completion terminated, as TRL logs them."""
    lengths = np.asarray(lengths, dtype=np.float64)
    truncated = np.asarray(truncated, dtype=bool)
    term = lengths[~truncated] if (~truncated).any() else np.zeros(1)
    return {
        "completions/mean_length": float(lengths.mean()),
        "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()),
        "completions/clipped_ratio": float(truncated.mean()),
        "completions/mean_terminated_length": float(term.mean()),
        "completions/min_terminated_length": float(term.min()),
        "completions/max_terminated_length": float(term.max()),
    }


def grpo_loss(
    logps,
    mask,
    advantages,
    lc: GRPOLossConfig,
    *,
    old_logps=None,
    ref_logps=None,
    entropies=None,
    num_items_in_batch=None,
    accumulation_steps: int = 1,
) -> tuple[jax.Array, dict]:
    """logps, old_logps, ref_logps, entropies, mask: [B, C] (the completion tokens of one micro-batch);
    advantages: [B]; num_items_in_batch: completion tokens of the whole generation batch (dapo) -> (loss, metrics).

    old_logps None: the samples come from the current weights, ratio 1 with its gradient (TRL's detach).
    ref_logps is needed when beta > 0."""
    mask = mask.astype(jnp.float32)
    adv = advantages[:, None]
    old = jax.lax.stop_gradient(logps) if old_logps is None else old_logps
    ratio = jnp.exp(logps - old)
    clipped = jnp.clip(ratio, 1 - lc.epsilon, 1 + lc.high)
    per_token = -jnp.minimum(ratio * adv, clipped * adv)
    metrics = {}
    masked_mean = lambda x: jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)  # noqa: E731
    if lc.beta != 0.0:
        if ref_logps is None:
            raise ValueError(f"beta={lc.beta} needs the reference log-probs")
        d = ref_logps - logps
        kl = jnp.exp(d) - d - 1
        if lc.use_bias_correction_kl:
            kl = kl * ratio
        per_token = per_token + lc.beta * kl
        metrics["kl"] = masked_mean(jax.lax.stop_gradient(kl))
    summed = jnp.sum(per_token * mask)
    b = logps.shape[0]
    if lc.loss_type == "grpo":
        loss = jnp.mean(jnp.sum(per_token * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0))
    elif lc.loss_type == "bnpo":
        loss = summed / jnp.maximum(jnp.sum(mask), 1.0)
    elif lc.loss_type == "dr_grpo":
        loss = summed / (b * lc.max_completion_length)
    else:
        n = jnp.sum(mask) if num_items_in_batch is None else num_items_in_batch
        loss = summed / jnp.maximum(n, 1.0)
    if lc.loss_type != "dapo":
        loss = loss / accumulation_steps
    if entropies is not None:
        metrics["entropy"] = masked_mean(entropies)
    ratio = jax.lax.stop_gradient(ratio)
    low = ((ratio < 1 - lc.epsilon) & (adv < 0)).astype(jnp.float32)
    high = ((ratio > 1 + lc.high) & (adv > 0)).astype(jnp.float32)
    region = jnp.maximum(low, high)
    # Per-sequence means as TRL takes them: a fully masked sequence is NaN and left out of the min / max.
    seq_mean = lambda x: jnp.sum(x * mask, axis=1) / jnp.sum(mask, axis=1)  # noqa: E731
    metrics["clip_ratio/low_mean"] = masked_mean(low)
    metrics["clip_ratio/high_mean"] = masked_mean(high)
    metrics["clip_ratio/region_mean"] = masked_mean(region)
    metrics["clip_ratio/low_min"] = jnp.nanmin(seq_mean(low))
    metrics["clip_ratio/high_max"] = jnp.nanmax(seq_mean(high))
    return loss, metrics
