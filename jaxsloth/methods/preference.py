"""Preference losses as TRL defines them, as pure jnp functions of per-sequence summed log-probabilities.

Every function takes [n] arrays (one value per pair, or per example for KTO) and returns (loss, metrics) with the
metric names TRL logs. ``*_tokens`` are completion-token counts, used where TRL length-normalises (IPO, ORPO, SimPO).
Reference log-probabilities enter as constants (TRL computes them under ``no_grad``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def _pair_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict:
    chosen_rewards, rejected_rewards = jax.lax.stop_gradient((chosen_rewards, rejected_rewards))
    return {
        "rewards/chosen": jnp.mean(chosen_rewards),
        "rewards/rejected": jnp.mean(rejected_rewards),
        "rewards/accuracies": jnp.mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
        "rewards/margins": jnp.mean(chosen_rewards - rejected_rewards),
        "logps/chosen": jnp.mean(jax.lax.stop_gradient(chosen_logps)),
        "logps/rejected": jnp.mean(jax.lax.stop_gradient(rejected_logps)),
    }


def _smoothed_sigmoid_loss(logits, label_smoothing: float):
    """Conservative sigmoid loss (label smoothing encodes the chance that a pair's labels are flipped)."""
    return -jax.nn.log_sigmoid(logits) * (1 - label_smoothing) - jax.nn.log_sigmoid(-logits) * label_smoothing


def dpo_loss(
    chosen_logps,
    rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens=None,
    rejected_tokens=None,
) -> tuple[jax.Array, dict]:
    """DPO (``DPOTrainer``, reverse-KL scores). All inputs [pairs]; ``*_tokens`` (completion lengths) needed for
    "ipo", which TRL normalises by the completion length. ``label_smoothing`` > 0 gives the conservative sigmoid
    loss (cDPO, as CPOTrainer applies it); at its default 0 "sigmoid" is DPOTrainer's. Returns (mean loss, metrics)."""
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: expected one of {DPO_LOSS_TYPES}")
    chosen_ratio = chosen_logps - jax.lax.stop_gradient(ref_chosen_logps)
    rejected_ratio = rejected_logps - jax.lax.stop_gradient(ref_rejected_logps)
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid_loss(beta * delta, label_smoothing)
    elif loss_type == "hinge":
        losses = jax.nn.relu(1 - beta * delta)
    else:
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError('loss_type="ipo" needs chosen_tokens and rejected_tokens (completion lengths)')
        ipo_delta = chosen_ratio / jnp.maximum(chosen_tokens, 1) - rejected_ratio / jnp.maximum(rejected_tokens, 1)
        losses = (ipo_delta - 1 / (2 * beta)) ** 2
    metrics = _pair_metrics(beta * chosen_ratio, beta * rejected_ratio, chosen_logps, rejected_logps)
    return jnp.mean(losses), metrics


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler's split at -log 2)."""
    return jnp.where(x > -jnp.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def orpo_loss(
    chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, *, beta: float = 0.1
) -> tuple[jax.Array, dict]:
    """ORPO (``ORPOTrainer``): NLL of the chosen completions (mean over their tokens) minus beta (the paper's
    lambda) times the mean log-sigmoid of the log odds ratio of the length-averaged log-probs. No reference model.
    Inputs: summed completion log-probs and completion lengths, [pairs]."""
    nll = -jnp.sum(chosen_logps) / jnp.sum(chosen_tokens)
    chosen_avg = chosen_logps / chosen_tokens
    rejected_avg = rejected_logps / rejected_tokens
    log_odds = (chosen_avg - rejected_avg) - (_log1mexp(chosen_avg) - _log1mexp(rejected_avg))
    ratio = jax.nn.log_sigmoid(log_odds)
    loss = nll - beta * jnp.mean(ratio)
    metrics = _pair_metrics(beta * chosen_avg, beta * rejected_avg, chosen_avg, rejected_avg)
    metrics["nll_loss"] = jax.lax.stop_gradient(nll)
    metrics["log_odds_ratio"] = jax.lax.stop_gradient(jnp.mean(ratio))
    metrics["log_odds_chosen"] = jax.lax.stop_gradient(jnp.mean(log_odds))
    return loss, metrics


def simpo_loss(
    chosen_logps,
    rejected_logps,
    chosen_tokens,
    rejected_tokens,
    *,
    beta: float = 0.1,
    simpo_gamma: float = 0.5,
    label_smoothing: float = 0.0,
    cpo_alpha: float = 0.0,
) -> tuple[jax.Array, dict]:
    """SimPO (``CPOTrainer`` with ``loss_type="simpo"``): sigmoid loss on the margin of length-averaged log-probs
    minus ``simpo_gamma / beta``; no reference. ``cpo_alpha`` > 0 adds that times the chosen NLL (CPO-SimPO;
    CPOConfig defaults it to 1.0, SimPO itself has none, hence 0 here). Inputs [pairs]."""
    chosen_avg = chosen_logps / chosen_tokens
    rejected_avg = rejected_logps / rejected_tokens
    logits = (chosen_avg - rejected_avg) - simpo_gamma / beta
    loss = jnp.mean(_smoothed_sigmoid_loss(beta * logits, label_smoothing))
    nll = -jnp.sum(chosen_logps) / jnp.sum(chosen_tokens)
    if cpo_alpha:
        loss = loss + cpo_alpha * nll
    metrics = _pair_metrics(beta * chosen_avg, beta * rejected_avg, chosen_avg, rejected_avg)
    metrics["nll_loss"] = jax.lax.stop_gradient(nll)
    return loss, metrics


def kto_loss(
    logps,
    ref_logps,
    kl_logps,
    ref_kl_logps,
    desirable,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[jax.Array, dict]:
    """KTO (``KTOTrainer``). logps, ref_logps: [n] summed completion log-probs of each example; kl_logps,
    ref_kl_logps: [n] of the mismatched (prompt i, completion i-1) sequences; desirable: [n] bool labels.

    The KL estimate is the batch mean of kl_logps - ref_kl_logps, clamped at 0 and not differentiated (TRL computes
    it under no_grad). Loss = mean over examples of weight * (1 - sigmoid(beta * (ratio - kl))) for desirable and
    weight * (1 - sigmoid(beta * (kl - ratio))) for undesirable ones."""
    desirable = jnp.asarray(desirable, bool)
    kl = jnp.maximum(jnp.mean(jax.lax.stop_gradient(kl_logps - ref_kl_logps)), 0.0)
    ratio = logps - jax.lax.stop_gradient(ref_logps)
    losses = jnp.where(
        desirable,
        desirable_weight * (1 - jax.nn.sigmoid(beta * (ratio - kl))),
        undesirable_weight * (1 - jax.nn.sigmoid(beta * (kl - ratio))),
    )
    rewards = jax.lax.stop_gradient(beta * ratio)
    n_chosen = jnp.sum(desirable)
    n_rejected = desirable.shape[0] - n_chosen
    lp = jax.lax.stop_gradient(logps)
    chosen_rewards = jnp.sum(jnp.where(desirable, rewards, 0.0)) / jnp.maximum(n_chosen, 1)
    rejected_rewards = jnp.sum(jnp.where(desirable, 0.0, rewards)) / jnp.maximum(n_rejected, 1)
    metrics = {
        "kl": kl,
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": jnp.sum(jnp.where(desirable, lp, 0.0)) / jnp.maximum(n_chosen, 1),
        "logps/rejected": jnp.sum(jnp.where(desirable, 0.0, lp)) / jnp.maximum(n_rejected, 1),
    }
    return jnp.mean(losses), metrics
