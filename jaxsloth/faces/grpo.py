"""TRL's GRPO face: ``GRPOTrainer(model, reward_funcs, args=GRPOConfig(...), train_dataset, processing_class)
.train()`` on jaxsloth's sampler (``methods.rollout``), rewards (``methods.rewards``) and jitted GRPO step
(``methods.grpo_step``).

Each optimizer step, as TRL's with ``steps_per_generation = gradient_accumulation_steps``: per_device_train_batch_size
x gradient_accumulation_steps completions (num_generations per prompt) are sampled with the current adapter,
scored on the host and trained on as gradient_accumulation_steps micro-batches; with num_iterations > 1 the same
samples serve that many steps, their sampling-time log-probs kept as the old ones. Metrics (TRL's names) go to
output_dir/metrics.jsonl and TensorBoard, one record per step.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxsloth import api
from jaxsloth.config import TrainConfig
from jaxsloth.faces.trl import TrainOutput, lora_settings
from jaxsloth.generate import prompt_token_ids, stop_token_ids
from jaxsloth.methods.grpo import GRPOLossConfig, completion_metrics, group_advantages
from jaxsloth.methods.grpo_step import make_grpo_step, make_logps_fn
from jaxsloth.methods.rewards import reward_name, score
from jaxsloth.methods.rollout import completion_batch, sample_completions
from jaxsloth.train.metrics import JsonlWriter, TensorBoardWriter, close_all
from jaxsloth.train.step import learning_rate_schedule, make_optimizer

# TRL's GRPOConfig defaults (and TrainingArguments' where GRPOConfig keeps them).
GRPO_DEFAULTS = {
    "output_dir": "trainer_output",
    "learning_rate": 1e-6,
    "max_steps": -1,
    "num_train_epochs": 1,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "logging_steps": 10,
    "seed": 42,
    "lr_scheduler_type": "linear",
    "warmup_steps": 0,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-8,
    "num_generations": 8,
    "max_completion_length": 512,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": None,
    "repetition_penalty": 1.0,
    "beta": 0.0,
    "epsilon": 0.2,
    "epsilon_high": None,
    "loss_type": "dapo",
    "scale_rewards": "group",
    "num_iterations": 1,
    "mask_truncated_completions": False,
    "reward_weights": None,
    "use_bias_correction_kl": True,
}
_TRAIN = ("learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm", "adam_beta1",
          "adam_beta2", "adam_epsilon", "seed", "per_device_train_batch_size", "gradient_accumulation_steps")  # fmt: skip
# Accepted with no effect: jaxsloth logs every step and recomputes activations as the profile says.
_NO_EFFECT = {"logging_strategy", "logging_first_step", "logging_dir", "gradient_checkpointing",
              "gradient_checkpointing_kwargs", "remove_unused_columns", "report_to", "run_name", "bf16", "fp16",
              "disable_tqdm", "save_strategy", "overwrite_output_dir", "do_train", "log_completions"}  # fmt: skip


class GRPOConfig:
    """TRL's GRPOConfig names and defaults (``GRPO_DEFAULTS``). Names jaxsloth does not use are kept and listed in
    one warning when the trainer is built, never dropped silently."""

    def __init__(self, output_dir: str | os.PathLike | None = None, **kwargs):
        self.values = {"output_dir": output_dir, **kwargs} if output_dir is not None else dict(kwargs)
        if self.values.get("scale_rewards") in (True, False):  # TRL's older boolean spelling
            self.values["scale_rewards"] = "group" if self.values["scale_rewards"] else "none"

    def __getattr__(self, name: str):
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        if name in GRPO_DEFAULTS:
            return GRPO_DEFAULTS[name]
        raise AttributeError(name)

    def __repr__(self) -> str:
        return f"GRPOConfig({', '.join(f'{k}={v!r}' for k, v in self.values.items())})"

    def ignored(self) -> list[str]:
        return sorted(k for k in self.values if k not in GRPO_DEFAULTS and k not in _NO_EFFECT)

    def loss_config(self) -> GRPOLossConfig:
        return GRPOLossConfig(
            beta=self.beta,
            epsilon=self.epsilon,
            epsilon_high=self.epsilon_high,
            loss_type=self.loss_type,
            max_completion_length=self.max_completion_length,
            use_bias_correction_kl=self.use_bias_correction_kl,
        )


def _as_list(data) -> list[dict]:
    if hasattr(data, "to_list"):
        return data.to_list()
    return [dict(x) for x in data]


class GRPOTrainer:
    """TRL's GRPOTrainer, on jaxsloth. model: a jaxsloth Model (with its adapter) or a model path / Hub id (loaded,
    given the adapter in ``peft_config`` or jaxsloth's default); reward_funcs: one callable or a list, TRL's
    signature (``jaxsloth.methods.rewards``); train_dataset: rows with "prompt" (text or a conversation) and any
    columns the rewards read; processing_class: the tokenizer (default: the model's)."""

    def __init__(
        self,
        model,
        reward_funcs: Callable | Sequence[Callable],
        args: GRPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        peft_config=None,
        callbacks: Sequence[Callable] = (),
    ):
        if train_dataset is None:
            raise ValueError("GRPOTrainer needs a train_dataset")
        self.args = args if args is not None else GRPOConfig()
        if not isinstance(self.args, GRPOConfig):
            raise TypeError(f"GRPOTrainer: args must be a jaxsloth GRPOConfig, got {type(self.args)}")
        self.tokenizer = processing_class
        if isinstance(model, str | os.PathLike):
            model, loaded = api.load(model)
            self.tokenizer = self.tokenizer if self.tokenizer is not None else loaded
        if not isinstance(model, api.Model):
            raise TypeError(f"GRPOTrainer: model must be a jaxsloth Model or a model path / Hub id, got {type(model)}")
        if self.tokenizer is None:
            raise ValueError("GRPOTrainer needs processing_class (the tokenizer)")
        if peft_config is not None or model.trainable is None:
            lora = {} if peft_config is None else lora_settings(peft_config)
            model = api.add_lora(model, seed=self.args.seed, overwrite=peft_config is not None, **lora)
        self.model = model
        self.reward_funcs = [reward_funcs] if callable(reward_funcs) else list(reward_funcs)
        if not self.reward_funcs or not all(callable(f) for f in self.reward_funcs):
            raise ValueError("reward_funcs: give a callable or a list of callables (TRL's reward signature)")
        weights = self.args.reward_weights
        self.reward_weights = np.ones(len(self.reward_funcs)) if weights is None else np.asarray(weights, float)
        if len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights has {len(self.reward_weights)} values for {len(self.reward_funcs)} reward functions"
            )
        self.loss_config = self.args.loss_config()
        a = self.args
        completions = a.per_device_train_batch_size * a.gradient_accumulation_steps
        if completions % a.num_generations:
            raise ValueError(
                f"per_device_train_batch_size x gradient_accumulation_steps = {completions} completions per step is not "
                f"a multiple of num_generations={a.num_generations}"
            )
        if a.num_generations < 2:
            raise ValueError(f"num_generations={a.num_generations}: GRPO compares at least 2 completions per prompt")
        self.prompts_per_step = completions // a.num_generations
        self.rows = _as_list(train_dataset)
        if not self.rows or "prompt" not in self.rows[0]:
            raise ValueError("train_dataset: every row needs a 'prompt' (text or a conversation)")
        ignored = self.args.ignored()
        if eval_dataset is not None:
            ignored.append("eval_dataset (no evaluation loop yet)")
        if ignored:
            warnings.warn(f"GRPOTrainer: ignored (no effect in jaxsloth): {', '.join(ignored)}", stacklevel=2)
        self.callbacks = list(callbacks)
        self.history: list[dict] = []

    @property
    def total_steps(self) -> int:
        a = self.args
        if a.max_steps is not None and a.max_steps > 0:
            return a.max_steps
        return math.ceil(len(self.rows) / self.prompts_per_step) * a.num_iterations * int(a.num_train_epochs)

    def _prompt_batches(self, rng: np.random.Generator):
        """Endless batches of prompts_per_step rows, each epoch in a new shuffled order (TRL's RandomSampler)."""
        while True:
            order = rng.permutation(len(self.rows))
            for start in range(0, len(order) - self.prompts_per_step + 1, self.prompts_per_step):
                yield [self.rows[i] for i in order[start : start + self.prompts_per_step]]

    def _score(self, rows: list[dict], rollout, step: int) -> tuple[np.ndarray, dict]:
        g = self.args.num_generations
        texts = [self.tokenizer.decode(c, skip_special_tokens=True) for c in rollout.completion_ids]
        prompts = [r["prompt"] for r in rows for _ in range(g)]
        if not isinstance(prompts[0], str):  # conversational: completions as assistant messages, as TRL gives them
            texts = [[{"role": "assistant", "content": t}] for t in texts]
        columns = {k: [r[k] for r in rows for _ in range(g)] for k in rows[0] if k != "prompt"}
        state = type("TrainerState", (), {"global_step": step})()
        rewards = score(self.reward_funcs, prompts, texts, rollout.completion_ids, columns, trainer_state=state)
        names = [reward_name(f) for f in self.reward_funcs]
        advantages, metrics = group_advantages(rewards, self.reward_weights, g, self.args.scale_rewards, names)
        metrics |= completion_metrics(rollout.lengths, rollout.truncated)
        return advantages, metrics

    def train(self) -> TrainOutput:
        a, model = self.args, self.model
        lora, profile = model.lora, model.profile
        tc = TrainConfig(max_steps=self.total_steps, **{k: getattr(a, k) for k in _TRAIN})
        trainable = model.trainable
        optimizer = make_optimizer(tc, lora, trainable)
        opt_state = optimizer.init(trainable)
        forward = dict(remat=profile.remat, compute_dtype=profile.dtype)
        step_fn = make_grpo_step(model.config, lora, self.loss_config, optimizer, profile.ops, **forward)
        logps_fn = make_logps_fn(model.config, lora, profile.ops, **forward) if a.num_iterations > 1 else None
        stops = stop_token_ids(model, self.tokenizer)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out_dir = Path(a.output_dir)
        sinks = [JsonlWriter(out_dir / "metrics.jsonl"), TensorBoardWriter(out_dir / "tensorboard"), *self.callbacks]
        rng = np.random.default_rng(a.seed)
        batches = self._prompt_batches(rng)
        schedule = learning_rate_schedule(tc)
        step, start = 0, time.perf_counter()
        try:
            while step < tc.max_steps:
                rows = next(batches)
                prompt_ids = [prompt_token_ids(self.tokenizer, r["prompt"]) for r in rows]
                t0 = time.perf_counter()
                rollout = sample_completions(
                    model.params, trainable, model.config, lora, prompt_ids,
                    num_generations=a.num_generations, max_completion_length=a.max_completion_length,
                    stop_tokens=stops, pad_token_id=pad, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                    min_p=a.min_p, repetition_penalty=a.repetition_penalty, seed=a.seed + step,
                    ops=profile.ops, compute_dtype=profile.dtype,
                )  # fmt: skip
                sample_s = time.perf_counter() - t0
                advantages, host_metrics = self._score(rows, rollout, step)
                batch = completion_batch(
                    rollout.prompt_ids, rollout.completion_ids, a.max_completion_length, truncated=rollout.truncated,
                    mask_truncated_completions=a.mask_truncated_completions, pad_token_id=pad,
                )  # fmt: skip
                batch["advantages"] = advantages
                order = rng.permutation(len(advantages))  # TRL shuffles the generation batch before splitting it
                batch = {k: jnp.asarray(v[order]) for k, v in batch.items()}
                if logps_fn is not None:
                    batch["old_logps"] = logps_fn(trainable, model.params, batch)
                micro = {k: v.reshape(a.gradient_accumulation_steps, -1, *v.shape[1:]) for k, v in batch.items()}
                for _ in range(a.num_iterations):
                    if step >= tc.max_steps:
                        break
                    t0 = time.perf_counter()
                    trainable, opt_state, metrics = step_fn(trainable, opt_state, model.params, micro)
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    step += 1
                    record = {"step": step, **host_metrics, **metrics, "learning_rate": float(schedule(step - 1))}
                    record |= {"sample_s": sample_s, "train_s": time.perf_counter() - t0}
                    self.history.append(record)
                    for sink in sinks:
                        sink(record)
        finally:
            model.trainable = trainable
            close_all(sinks)
        runtime = time.perf_counter() - start
        losses = [r["loss"] for r in self.history]
        loss = sum(losses) / len(losses) if losses else math.nan
        metrics = {"train_runtime": runtime, "train_loss": loss, "train_steps_per_second": step / runtime}
        return TrainOutput(step, loss, metrics)

    def save_model(self, output_dir: str | os.PathLike | None = None) -> Path:
        """The adapter in PEFT format with the tokenizer (default: output_dir)."""
        out = output_dir if output_dir is not None else self.args.output_dir
        return api.save_adapter(self.model, out, tokenizer=self.tokenizer, overwrite=True)
