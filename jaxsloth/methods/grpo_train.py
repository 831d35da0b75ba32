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

On a data mesh of n devices (``grpo_mesh``) each piece is split again over the devices: piece j's part d samples on
device d from seed + (generation x sampling_chunks + j) x n + d, so one device with sampling_chunks x n pieces
samples the very same completions. Checkpoints may fall inside a generation that serves several steps: its batch is
saved with them (``grpo_state``), so a resumed run trains on the same samples.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsloth.config import TrainConfig
from jaxsloth.generate import prompt_token_ids, stop_token_ids
from jaxsloth.methods.grpo import GRPOLossConfig, completion_metrics, group_advantages
from jaxsloth.methods.grpo_eval import GRPOEvaluator, hold_out
from jaxsloth.methods.grpo_mesh import device_views, grpo_mesh, mesh_devices, place_rows, sharded_step
from jaxsloth.methods.grpo_state import Generation, PromptOrder, PromptsIdentity
from jaxsloth.methods.grpo_step import grpo_forward_settings, make_grpo_loss_fn, make_grpo_step, make_logps_fn
from jaxsloth.methods.rewards import resolve_reward_funcs, reward_name, score
from jaxsloth.methods.rollout import Rollout, completion_batch, start_sampling
from jaxsloth.sharding import ShardedOps, place_train_state
from jaxsloth.train.checkpoint import Checkpointer
from jaxsloth.train.host_embedding import check_host_embedding
from jaxsloth.train.identity import check_identity, run_identity
from jaxsloth.train.interrupts import InterruptGuard
from jaxsloth.train.loop import SAVE_EVERY_SECONDS, TrainResult
from jaxsloth.train.run_dir import (
    check_output_dir,
    clear_run_outputs,
    resume_step,
    run_lock,
    set_aside_later_checkpoints,
)
from jaxsloth.train.saving import RunSaver, consumed
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


def _merged(rollouts: Sequence[Rollout]) -> Rollout:
    return Rollout(
        [p for r in rollouts for p in r.prompt_ids],
        [c for r in rollouts for c in r.completion_ids],
        np.concatenate([r.truncated for r in rollouts]),
    )


class _Sampler:
    """Samples and scores prompts as the run's settings say, each batch split over the sampling devices (the mesh's,
    or the default device) and laid out as the loss's rows. params: the frozen weights, replicated over ``mesh``."""

    def __init__(self, model: Any, tokenizer, tc: TrainConfig, params, mesh, stop_tokens: Sequence[int] | None):
        self.model, self.tokenizer, self.tc, self.params, self.mesh = model, tokenizer, tc, params, mesh
        self.devices = mesh_devices(mesh) or [None]
        self.stops = stop_token_ids(model, tokenizer) if stop_tokens is None else list(stop_tokens)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        reward_funcs = resolve_reward_funcs(tc.reward_funcs)
        self.names = [reward_name(f) for f in reward_funcs]
        self.weights = np.ones(len(reward_funcs)) if tc.reward_weights is None else np.asarray(tc.reward_weights, float)
        self.score = _Scorer(tokenizer, reward_funcs)

    def token_ids(self, row: dict) -> list[int]:
        ids = prompt_token_ids(self.tokenizer, row["prompt"])
        return ids if self.tc.max_prompt_length is None else ids[-self.tc.max_prompt_length :]  # the end, as TRL

    def views(self, trainable) -> list[tuple]:
        """(params, trainable) on each sampling device."""
        if self.mesh is None:
            return [(self.params, trainable)]
        return list(zip(device_views(self.params, self.devices), device_views(trainable, self.devices), strict=True))

    def dispatch(self, on: list[tuple], prompt_ids: list, seed: int, num_generations: int) -> Callable[[], Rollout]:
        """Dispatches sampling ``prompt_ids`` split over the devices (part d on device d from seed + d) -> a
        function that waits for the samples."""
        tc, profile, waits = self.tc, self.model.profile, []
        for d, idx in enumerate(np.array_split(np.arange(len(prompt_ids)), len(on))):
            if len(idx):
                waits.append(start_sampling(
                    on[d][0], on[d][1], self.model.config, self.model.lora, [prompt_ids[i] for i in idx],
                    num_generations=num_generations, max_completion_length=tc.max_completion_length,
                    stop_tokens=self.stops, pad_token_id=self.pad, temperature=tc.temperature, top_p=tc.top_p,
                    top_k=tc.top_k, min_p=tc.min_p, repetition_penalty=tc.repetition_penalty, seed=seed + d,
                    ops=profile.ops, compute_dtype=profile.dtype,
                ))  # fmt: skip
        return lambda: _merged([w() for w in waits])

    def rows_batch(self, rollout: Rollout) -> dict[str, np.ndarray]:
        """The loss's rows of ``rollout`` (``rollout.completion_batch``)."""
        return completion_batch(
            rollout.prompt_ids, rollout.completion_ids, self.tc.max_completion_length, truncated=rollout.truncated,
            mask_truncated_completions=self.tc.mask_truncated_completions, pad_token_id=self.pad,
        )  # fmt: skip


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
    model's EOS and end-of-turn tokens; () samples every completion to max_completion_length).

    With output_dir, checkpoints (``grpo_state``) are written every save_steps steps and every 30 minutes, at the
    end and on Ctrl-C / SIGTERM, the latest save_total_limit kept, as SFT's loop writes them (``jaxsloth.train.loop``):
    a step's update, its record in every sink and its checkpoint state are committed together, so a checkpoint
    never runs ahead of metrics.jsonl; resume=True (or a checkpoint path) continues with exactly the samples, losses
    and weights of an uninterrupted run. eval_dataset / val_set_size: evaluated as TRL does (``grpo_eval``) every
    eval_steps and at the end. mesh: data-parallel over the devices of one host (``grpo_mesh``); per_device_train_batch_size
    counts completions per device."""
    from jaxsloth.data import load_records
    from jaxsloth.train.metrics import close_all, standard_callbacks
    from jaxsloth.train.trackers import run_config

    if tc.streaming or type(data).__name__ == "IterableDataset":
        raise ValueError("method='grpo': the prompts are read whole; streaming is for SFT")
    for name in ("early_stopping_patience", "load_best_model_at_end"):
        if getattr(tc, name):
            raise ValueError(
                f"method='grpo': {name} picks steps by eval_loss, which does not rank GRPO policies; compare "
                "eval_reward in the evaluation records instead"
            )
    mesh = grpo_mesh(tc.mesh)
    n_dev = 1 if mesh is None else mesh.size
    rows = list(load_records(data, split=tc.split, name=tc.dataset_config))
    if not rows or "prompt" not in rows[0]:
        raise ValueError("method='grpo': every row of the data needs a 'prompt' (text or a conversation)")
    eval_rows = None
    if tc.val_set_size:
        rows, eval_rows = hold_out(rows, tc.val_set_size, tc.seed)
    elif tc.evaluates:
        eval_rows = list(load_records(tc.eval_dataset, split=tc.eval_split or tc.split, name=tc.dataset_config))
    g, accum = tc.num_generations, tc.gradient_accumulation_steps
    per_device = tc.per_device_train_batch_size or g
    completions = per_device * n_dev * accum
    if completions % g:
        raise ValueError(
            f"per_device_train_batch_size x devices x gradient_accumulation_steps = {completions} completions per "
            f"step is not a multiple of num_generations={g}"
        )
    prompts_per_step = completions // g
    chunks = tc.sampling_chunks
    if prompts_per_step % (chunks * n_dev):
        raise ValueError(
            f"sampling_chunks={chunks} x {n_dev} devices do not divide the {prompts_per_step} prompts of a generation"
        )
    per_chunk = prompts_per_step // chunks  # sampled at once, split over the devices
    if tc.max_steps is not None:
        total = tc.max_steps
    else:
        total = math.ceil(len(rows) / prompts_per_step) * tc.num_iterations * (tc.num_train_epochs or 1)
    tc_run = dataclasses.replace(tc, max_steps=total, num_train_epochs=None)
    lora, profile = model.lora, model.profile
    if profile.embedding == "host":  # sampling reads the table on the device
        check_host_embedding(model.config, model.trainable, mesh, method="grpo")
    params, trainable = model.params, model.trainable
    optimizer = make_optimizer(tc_run, lora, trainable, profile.optimizer_state)
    forward, lc = grpo_forward_settings(profile.forward_settings), grpo_loss_config(tc)
    if mesh is None:
        opt_state, ops = optimizer.init(trainable), profile.ops
    else:
        params, trainable, opt_state, shardings = place_train_state(params, trainable, optimizer, mesh)
        ops = ShardedOps(profile.kernels, mesh=mesh)
    step_fn = make_grpo_step(model.config, lora, lc, optimizer, ops, **forward)
    if mesh is not None:
        step_fn = sharded_step(step_fn, shardings, mesh)
    logps_fn = make_logps_fn(model.config, lora, ops, **forward)
    sampler = _Sampler(model, tokenizer, tc, params, mesh, stop_tokens)
    scorer, weights, names = sampler.score, sampler.weights, sampler.names
    rng = np.random.default_rng(tc.seed)
    order = PromptOrder(len(rows), prompts_per_step, rng)
    schedule = learning_rate_schedule(tc_run)

    def place_micro(arrays: dict) -> dict:
        """[accumulation, rows, ...] arrays onto the devices, rows split over the mesh."""
        return place_rows(arrays, mesh, leading=1)

    def sample(trainable, step: int) -> Generation:
        """Samples, scores and lays out one generation (advancing the prompt order and the generation count)."""
        nonlocal generation
        batch_rows = [rows[i] for i in order.next()]
        prompt_ids = [sampler.token_ids(r) for r in batch_rows]
        on = sampler.views(trainable)

        def start(j: int) -> Callable[[], Rollout]:
            seed = tc.seed + generation * chunks * n_dev + j * n_dev
            return sampler.dispatch(on, prompt_ids[j * per_chunk : (j + 1) * per_chunk], seed, g)

        t0 = time.perf_counter()
        rollouts, rewards, reward_s = [], [], 0.0
        pending = start(0)
        for j in range(chunks):
            following = start(j + 1) if overlap and j + 1 < chunks else None
            rollout = pending()
            if j + 1 < chunks:
                t1 = time.perf_counter()
                rewards.append(scorer(batch_rows[j * per_chunk : (j + 1) * per_chunk], rollout, g, step))
                reward_s += time.perf_counter() - t1
                pending = following if following is not None else start(j + 1)
            rollouts.append(rollout)
        generation += 1
        rollout = _merged(rollouts)
        shuffle = rng.permutation(len(rollout.completion_ids))  # TRL shuffles the generation batch to split it
        batch = place_rows({k: v[shuffle] for k, v in sampler.rows_batch(rollout).items()}, mesh)
        # Dispatched before the last chunk is scored, so the device computes them while the host scores.
        if tc.num_iterations > 1:
            batch["old_logps"] = logps_fn(trainable, params, batch)
        if tc.beta != 0.0:
            batch["ref_logps"] = logps_fn(None, params, batch)
        t1 = time.perf_counter()
        rewards.append(scorer(batch_rows[(chunks - 1) * per_chunk :], rollouts[-1], g, step))
        reward_s += time.perf_counter() - t1
        generate_s = time.perf_counter() - t0 - reward_s
        advantages, metrics = group_advantages(np.concatenate(rewards), weights, g, tc.scale_rewards, names)
        metrics |= completion_metrics(rollout.lengths, rollout.truncated)
        batch["advantages"] = advantages[shuffle]
        micro = place_micro({k: jnp.reshape(v, (accum, -1, *v.shape[1:])) for k, v in batch.items()})
        tokens = int(rollout.lengths.sum())
        return Generation(micro, metrics, tokens, generate_s=generate_s, reward_s=reward_s)

    evaluator = None
    if eval_rows is not None:
        evaluator = _evaluator(sampler, eval_rows, ops, per_device)

    out = Path(tc.output_dir) if tc.output_dir is not None else None
    held = contextlib.ExitStack()  # the output directory's lock, held until training ends however it ends
    if out is not None:
        check_output_dir(out, resume=tc.resume, overwrite=tc.overwrite)
        held.enter_context(run_lock(out))
        if tc.overwrite:
            clear_run_outputs(out)
        elif not isinstance(tc.resume, bool):  # a checkpoint path: that step, not a later one, is the latest
            set_aside_later_checkpoints(out, resume_step(out, tc.resume))
    identity = run_identity(model.config, params, lora, tc_run, PromptsIdentity(rows, prompts_per_step, g))
    ckpt = Checkpointer(out / "checkpoints", keep=tc.save_total_limit) if out is not None else None
    step = generation = 0
    gen: Generation | None = None  # the generation being trained on
    history: list[dict] = []
    evals: list[dict] = []
    sinks: list = []
    try:
        found = ckpt.latest_good() if ckpt is not None and tc.resume is not False else None
        if found is not None:
            trainable, opt_state, step, generation, gen = _restore(
                ckpt, found, identity, trainable, opt_state, order, place_micro
            )
        sinks = standard_callbacks(
            out, progress=progress, total_steps=total, report_to=tc.report_to,
            run_config=run_config(model, tc_run, data), project=tc.project, run_name=tc.run_name,
        )  # fmt: skip
        sinks += list(callbacks)
        for cb in sinks:
            if hasattr(cb, "resume"):
                cb.resume(step)
        # The state of the last completed step: what every checkpoint holds, whatever interrupts the loop.
        committed = (order.state_dict(), generation, gen)
        start_step = step
        guard = InterruptGuard()
        saver = RunSaver(ckpt, guard, identity, step)

        def contents() -> tuple[dict, dict]:
            prompts, gen_count, pending = committed
            state = {"trainable": trainable, "opt_state": opt_state, "order": prompts["order"]}
            meta = {"step": step, "generation": gen_count, "position": prompts["position"], "rng": prompts["rng"],
                    "reuse": None}  # fmt: skip
            if pending is not None:
                state["reuse"], meta["reuse"] = pending.to_checkpoint()
            return state, meta

        def save() -> None:
            saver.save(step, (trainable, opt_state), contents)

        failure: BaseException | None = None
        with guard:
            try:
                while step < total:
                    if gen is None:
                        gen = sample(trainable, step)
                    t0 = time.perf_counter()
                    # The update, the state that goes with it and its record in every sink are committed together:
                    # a signal waits for them rather than leave a checkpointed step unlogged.
                    with guard.hold(f"finishing step {step + 1}"):
                        trainable, opt_state, metrics = step_fn(trainable, opt_state, params, gen.micro)
                        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                        if not metrics["finite"] and tc.on_nonfinite == "stop":  # the state is the last step's
                            raise FloatingPointError(
                                f"non-finite GRPO loss or gradient at step {step + 1} (the update was skipped)"
                            )
                        step += 1
                        gen.done += 1
                        train_s = time.perf_counter() - t0
                        first = gen.done == 1  # a reused generation costs nothing more
                        generate_s, reward_s = (gen.generate_s, gen.reward_s) if first else (0.0, 0.0)
                        seconds = generate_s + reward_s + train_s
                        record = {"step": step, **gen.metrics, **metrics, "learning_rate": float(schedule(step - 1))}
                        record |= {"generate_s": generate_s, "reward_s": reward_s, "train_s": train_s,
                                   "step_time_s": seconds, "tokens": gen.tokens, "tokens_per_s": gen.tokens / seconds,
                                   "peak_gib": _peak_gib(), "total_steps": total}  # fmt: skip
                        if gen.done >= tc.num_iterations:
                            gen = None
                        committed = (order.state_dict(), generation, gen)
                        history.append(record)
                        for sink in sinks:
                            sink(record)
                    if evaluator is not None and evaluator.due(step):
                        evals.append(evaluator.evaluate(step, trainable, sinks))
                    if saver.due(step, tc.save_steps, SAVE_EVERY_SECONDS):
                        save()
                    guard.check()  # a signal held during the step or the save stops the run here, its step recorded
                if evaluator is not None and step > start_step and evaluator.last_step != step:
                    evals.append(evaluator.evaluate(step, trainable, sinks))
            except BaseException as e:  # noqa: BLE001 - saved below, then re-raised
                failure = e
                if isinstance(e, KeyboardInterrupt) and ckpt is not None:
                    log.warning("%s at step %d: saving a checkpoint", e or "interrupted", step)
            failure = saver.finish(step, failure, save)
        if failure is not None:
            raise failure
    finally:
        if not consumed(trainable):
            model.trainable = trainable
        if ckpt is not None:
            ckpt.close()
        close_errors = close_all(sinks)
        held.close()
    if close_errors:
        raise close_errors[0]
    return TrainResult(trainable, opt_state, step, history, evals=evals)


def _restore(ckpt: Checkpointer, found: tuple, identity: dict, trainable, opt_state, order: PromptOrder, place):
    """(trainable, opt_state, step, generation, the generation being trained on or None) from the checkpoint
    ``found`` (latest_good's), the prompt order set to its position."""
    step_dir = ckpt.directory / str(found[0])
    check_identity(found[1].get("identity") or {}, identity, str(step_dir))
    reuse = ckpt.read_meta(found[0])["reuse"]
    abstract = {"trainable": trainable, "opt_state": opt_state, "order": np.zeros(order.n, np.int32)}
    if reuse is not None:
        abstract["reuse"] = Generation.abstract(reuse)
    state, meta = ckpt.restore(found[0], abstract)
    order.load_state_dict({"order": state["order"], "position": meta["position"], "rng": meta["rng"]})
    gen = None if reuse is None else Generation.from_checkpoint(state["reuse"], reuse, place)
    log.info("resumed from %s at step %d", step_dir, meta["step"])
    return state["trainable"], state["opt_state"], int(meta["step"]), int(meta["generation"]), gen


def _evaluator(sampler: _Sampler, eval_rows: list[dict], ops, per_device: int) -> GRPOEvaluator:
    """The run's GRPOEvaluator: TRL's eval batches (per_device_eval_batch_size completions per device)."""
    tc, model, params, mesh = sampler.tc, sampler.model, sampler.params, sampler.mesh
    g = tc.num_generations_eval or tc.num_generations
    per_batch = (tc.per_device_eval_batch_size or per_device) * len(sampler.devices)
    if per_batch % g:
        raise ValueError(
            f"per_device_eval_batch_size x devices = {per_batch} eval completions per batch is not a multiple of "
            f"num_generations_eval={g}"
        )
    loss_fn = make_grpo_loss_fn(
        model.config,
        model.lora,
        grpo_loss_config(tc),
        ops,
        **grpo_forward_settings(model.profile.forward_settings),
    )

    @jax.jit
    def loss(trainable, params, arrays):
        # One batch, not accumulated: its own completion tokens normalise dapo's loss, as TRL's evaluation.
        return loss_fn(trainable, params, arrays, jnp.sum(arrays["completion_mask"].astype(jnp.float32)), 1)

    def rollouts(trainable, rows: list[dict], seed: int, step: int):
        rollout = sampler.dispatch(sampler.views(trainable), [sampler.token_ids(r) for r in rows], seed, g)()
        return rollout, sampler.score(rows, rollout, g, step)

    return GRPOEvaluator(
        eval_rows, prompts_per_batch=per_batch // g, num_generations=g, devices=len(sampler.devices),
        rollouts=rollouts, batch=sampler.rows_batch,
        loss=lambda trainable, arrays: loss(trainable, params, place_rows(arrays, mesh)),
        reward_weights=sampler.weights, reward_names=sampler.names, scale_rewards=tc.scale_rewards,
        every=tc.eval_steps,
    )  # fmt: skip


def evaluate_grpo(model: Any, tokenizer, data, *, stop_tokens: Sequence[int] | None = None, **settings) -> dict:
    """{"eval_loss", "eval_reward", "eval_rewards/<name>/mean", ...} of ``model``'s adapter as it is now on the
    prompts of ``data``, sampled and scored as a GRPO run with these settings (TrainConfig fields: reward_funcs,
    num_generations_eval, per_device_eval_batch_size, mesh, ...) evaluates (``grpo_eval``: the same seeds, so the
    values equal that run's evaluation of the same adapter)."""
    from jaxsloth.data import load_records
    from jaxsloth.sharding import put, replicated
    from jaxsloth.train.evaluate import _DURING_TRAINING

    tc = TrainConfig(**{k: v for k, v in settings.items() if k not in _DURING_TRAINING} | {"method": "grpo"})
    if model.trainable is None:
        raise ValueError("the model has no adapter to evaluate: call jaxsloth.add_lora(model, ...) first")
    mesh = grpo_mesh(tc.mesh)
    params, trainable, ops = model.params, model.trainable, model.profile.ops
    if mesh is not None:
        params, trainable = put((params, trainable), replicated(mesh))
        ops = ShardedOps(model.profile.kernels, mesh=mesh)
    rows = list(load_records(data, split=tc.eval_split or tc.split, name=tc.dataset_config))
    sampler = _Sampler(model, tokenizer, tc, params, mesh, stop_tokens)
    evaluator = _evaluator(sampler, rows, ops, tc.per_device_train_batch_size or tc.num_generations)
    return {f"eval_{k}": v for k, v in evaluator.metrics(trainable, step=0).items()}


def _peak_gib() -> float | None:
    """The first local device's peak memory in use so far (GiB), where the backend reports it."""
    peak = (jax.local_devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30
