"""GRPO inside ``jaxsloth.train(..., method="grpo")``: sampling (``rollout``), rewards on the host (``rewards``),
advantages (``grpo``) and the jitted step (``grpo_step``), as TRL's GRPOTrainer with ``steps_per_generation =
gradient_accumulation_steps``.

Each generation: per_device_train_batch_size x gradient_accumulation_steps completions (num_generations per prompt)
are sampled with the current adapter, scored, and trained on as gradient_accumulation_steps micro-batches; with
num_iterations > 1 the same samples serve that many optimizer steps, their sampling-time log-probs kept as the old
ones.

Rewards run on the host while the device works: a generation can be sampled in ``sampling_chunks`` pieces (whole
groups, each with its own seed, so the samples do not depend on the order), piece j + 1 dispatched to the device
(JAX's async dispatch) before piece j's completions are decoded and scored; and the reference's and old log-probs
(beta > 0, num_iterations > 1) are dispatched before the last piece is scored. One piece (the default) samples the
whole generation in one batch, the fastest on a GPU unless the rewards are slow.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsloth.config import TrainConfig
from jaxsloth.generate import prompt_token_ids, stop_token_ids
from jaxsloth.methods.grpo import GRPOLossConfig, completion_metrics, group_advantages
from jaxsloth.methods.grpo_step import grpo_forward_settings, make_grpo_step, make_logps_fn
from jaxsloth.methods.rewards import resolve_reward_funcs, reward_name, score
from jaxsloth.methods.rollout import Rollout, completion_batch, start_sampling
from jaxsloth.train.loop import TrainResult
from jaxsloth.train.step import learning_rate_schedule, make_optimizer

log = logging.getLogger("jaxsloth")


def grpo_loss_config(tc: TrainConfig) -> GRPOLossConfig:
    """The GRPO loss settings of a TrainConfig (the one mapping the CLI, the API and the TRL face share)."""
    return GRPOLossConfig(
        beta=tc.beta,
        epsilon=tc.epsilon,
        epsilon_high=tc.epsilon_high,
        loss_type=tc.loss_type,
        max_completion_length=tc.max_completion_length,
        use_bias_correction_kl=tc.use_bias_correction_kl,
    )


class _Scorer:
    """Decodes and scores one chunk of samples (TRL's reward call: prompts, completions as text, or as assistant
    messages when the prompts are conversations, completion_ids, the dataset's other columns, trainer_state)."""

    def __init__(self, tokenizer, reward_funcs: Sequence[Callable]):
        self.tokenizer, self.reward_funcs = tokenizer, reward_funcs

    def __call__(self, rows: list[dict], rollout: Rollout, g: int, step: int) -> np.ndarray:
        texts = [self.tokenizer.decode(c, skip_special_tokens=True) for c in rollout.completion_ids]
        prompts = [r["prompt"] for r in rows for _ in range(g)]
        if not isinstance(prompts[0], str):
            texts = [[{"role": "assistant", "content": t}] for t in texts]
        columns = {k: [r[k] for r in rows for _ in range(g)] for k in rows[0] if k != "prompt"}
        state = type("TrainerState", (), {"global_step": step})()
        return score(self.reward_funcs, prompts, texts, rollout.completion_ids, columns, trainer_state=state)


def _prompt_batches(rows: list[dict], per_step: int, rng: np.random.Generator):
    """Endless batches of per_step rows, each epoch in a new shuffled order (TRL's RandomSampler)."""
    while True:
        order = rng.permutation(len(rows))
        for start in range(0, len(order) - per_step + 1, per_step):
            yield [rows[i] for i in order[start : start + per_step]]


def grpo_train(
    model: Any,
    tokenizer,
    data,
    tc: TrainConfig,
    *,
    callbacks: Sequence[Callable] = (),
    progress: bool = True,
    overlap: bool = True,
    stop_tokens: Sequence[int] | None = None,
) -> TrainResult:
    """Trains ``model``'s adapter with GRPO on ``data`` (rows with "prompt": text or a conversation, and the columns
    the rewards read) -> TrainResult; ``model.trainable`` is updated. Each step's record (TRL's metric names, plus
    generate_s / reward_s / train_s seconds) goes to ``jaxsloth.train``'s sinks (progress bar, output_dir's
    metrics.jsonl and loss.png, report_to's trackers) and to callbacks. overlap=False scores each chunk before the
    next is dispatched (the same results, without the overlap). stop_tokens: the ids that end a completion (default: the
    model's EOS and end-of-turn tokens; () samples every completion to max_completion_length)."""
    from jaxsloth.data import load_records
    from jaxsloth.train.metrics import close_all, standard_callbacks
    from jaxsloth.train.trackers import run_config

    if tc.streaming or type(data).__name__ == "IterableDataset":
        raise ValueError("method='grpo': the prompts are read whole; streaming is for SFT")
    for given, what in ((tc.has_eval_data, "evaluation (eval_dataset / val_set_size)"), (tc.resume, "resume"),
                        (tc.mesh is not None, "a device mesh (it runs on one device)")):  # fmt: skip
        if given:
            raise NotImplementedError(f"method='grpo' has no {what} yet")
    reward_funcs = resolve_reward_funcs(tc.reward_funcs)
    weights = np.ones(len(reward_funcs)) if tc.reward_weights is None else np.asarray(tc.reward_weights, float)
    rows = list(load_records(data, split=tc.split, name=tc.dataset_config))
    if not rows or "prompt" not in rows[0]:
        raise ValueError("method='grpo': every row of the data needs a 'prompt' (text or a conversation)")
    g, accum = tc.num_generations, tc.gradient_accumulation_steps
    per_device = tc.per_device_train_batch_size or g
    completions = per_device * accum
    if completions % g:
        raise ValueError(
            f"per_device_train_batch_size x gradient_accumulation_steps = {completions} completions per step is not a "
            f"multiple of num_generations={g}"
        )
    prompts_per_step = completions // g
    chunks = tc.sampling_chunks
    if prompts_per_step % chunks:
        raise ValueError(f"sampling_chunks={chunks} does not divide the {prompts_per_step} prompts of a generation")
    per_chunk = prompts_per_step // chunks
    if tc.max_steps is not None:
        total = tc.max_steps
    else:
        total = math.ceil(len(rows) / prompts_per_step) * tc.num_iterations * (tc.num_train_epochs or 1)
    tc_run = dataclasses.replace(tc, max_steps=total, num_train_epochs=None)
    lora, profile = model.lora, model.profile
    trainable = model.trainable
    optimizer = make_optimizer(tc_run, lora, trainable)
    opt_state = optimizer.init(trainable)
    forward = grpo_forward_settings(profile.forward_settings)
    step_fn = make_grpo_step(model.config, lora, grpo_loss_config(tc), optimizer, profile.ops, **forward)
    logps_fn = make_logps_fn(model.config, lora, profile.ops, **forward)
    stops = stop_token_ids(model, tokenizer) if stop_tokens is None else list(stop_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    names = [reward_name(f) for f in reward_funcs]
    scorer = _Scorer(tokenizer, reward_funcs)
    rng = np.random.default_rng(tc.seed)
    batches = _prompt_batches(rows, prompts_per_step, rng)
    schedule = learning_rate_schedule(tc_run)
    history: list[dict] = []
    step = generation = 0
    out = tc.output_dir
    sinks = standard_callbacks(
        out, progress=progress, total_steps=total, report_to=tc.report_to, run_config=run_config(model, tc_run, data),
        project=tc.project, run_name=tc.run_name,
    )  # fmt: skip
    sinks += list(callbacks)
    try:
        while step < total:
            batch_rows = next(batches)
            prompt_ids = [prompt_token_ids(tokenizer, r["prompt"]) for r in batch_rows]
            if tc.max_prompt_length is not None:  # the end of a longer prompt, as TRL kept it
                prompt_ids = [ids[-tc.max_prompt_length :] for ids in prompt_ids]

            def dispatch(j: int, trainable=trainable, prompt_ids=prompt_ids, generation=generation):
                return start_sampling(
                    model.params, trainable, model.config, lora, prompt_ids[j * per_chunk : (j + 1) * per_chunk],
                    num_generations=g, max_completion_length=tc.max_completion_length, stop_tokens=stops,
                    pad_token_id=pad, temperature=tc.temperature, top_p=tc.top_p, top_k=tc.top_k, min_p=tc.min_p,
                    repetition_penalty=tc.repetition_penalty, seed=tc.seed + generation * chunks + j,
                    ops=profile.ops, compute_dtype=profile.dtype,
                )  # fmt: skip

            t0 = time.perf_counter()
            rollouts, rewards, reward_s = [], [], 0.0
            pending = dispatch(0)
            for j in range(chunks):
                following = dispatch(j + 1) if overlap and j + 1 < chunks else None
                rollout = pending()
                if j + 1 < chunks:
                    t1 = time.perf_counter()
                    rewards.append(scorer(batch_rows[j * per_chunk : (j + 1) * per_chunk], rollout, g, step))
                    reward_s += time.perf_counter() - t1
                    pending = following if following is not None else dispatch(j + 1)
                rollouts.append(rollout)
            generation += 1
            rollout = Rollout(
                [p for r in rollouts for p in r.prompt_ids],
                [c for r in rollouts for c in r.completion_ids],
                np.concatenate([r.truncated for r in rollouts]),
            )
            batch = completion_batch(
                rollout.prompt_ids, rollout.completion_ids, tc.max_completion_length, truncated=rollout.truncated,
                mask_truncated_completions=tc.mask_truncated_completions, pad_token_id=pad,
            )  # fmt: skip
            order = rng.permutation(len(rollout.completion_ids))  # TRL shuffles the generation batch to split it
            batch = {k: jnp.asarray(v[order]) for k, v in batch.items()}
            # Dispatched before the last chunk is scored, so the device computes them while the host scores.
            if tc.num_iterations > 1:
                batch["old_logps"] = logps_fn(trainable, model.params, batch)
            if tc.beta != 0.0:
                batch["ref_logps"] = logps_fn(None, model.params, batch)
            t1 = time.perf_counter()
            rewards.append(scorer(batch_rows[(chunks - 1) * per_chunk :], rollouts[-1], g, step))
            reward_s += time.perf_counter() - t1
            generate_s = time.perf_counter() - t0 - reward_s
            advantages, host_metrics = group_advantages(np.concatenate(rewards), weights, g, tc.scale_rewards, names)
            host_metrics |= completion_metrics(rollout.lengths, rollout.truncated)
            batch["advantages"] = jnp.asarray(advantages[order])
            micro = {k: v.reshape(accum, -1, *v.shape[1:]) for k, v in batch.items()}
            for _ in range(tc.num_iterations):
                if step >= total:
                    break
                t0 = time.perf_counter()
                trainable, opt_state, metrics = step_fn(trainable, opt_state, model.params, micro)
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                step += 1
                if not metrics["finite"] and tc.on_nonfinite == "stop":
                    raise FloatingPointError(
                        f"non-finite GRPO loss or gradient at step {step} (the update was skipped)"
                    )
                train_s = time.perf_counter() - t0
                seconds = generate_s + reward_s + train_s
                tokens = int(rollout.lengths.sum())
                record = {"step": step, **host_metrics, **metrics, "learning_rate": float(schedule(step - 1))}
                record |= {"generate_s": generate_s, "reward_s": reward_s, "train_s": train_s, "step_time_s": seconds,
                           "tokens": tokens, "tokens_per_s": tokens / seconds, "peak_gib": _peak_gib(),
                           "total_steps": total}  # fmt: skip
                generate_s = reward_s = 0.0  # a reused generation costs nothing more
                history.append(record)
                for sink in sinks:
                    sink(record)
    finally:
        model.trainable = trainable
        close_errors = close_all(sinks)
    if close_errors:
        raise close_errors[0]
    return TrainResult(trainable, opt_state, step, history)


def _peak_gib() -> float | None:
    """The first local device's peak memory in use so far (GiB), where the backend reports it."""
    peak = (jax.local_devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30
