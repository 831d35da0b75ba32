"""TRL's GRPO face: ``GRPOTrainer(model, reward_funcs, args=GRPOConfig(...), train_dataset, processing_class)
.train()`` over ``jaxsloth.train(..., method="grpo")`` (``jaxsloth.methods.grpo_train``).

``GRPOConfig`` takes TRL's names: the GRPO settings are TrainConfig's own (``GRPO_SETTINGS``, the schema fields whose
help starts "grpo:", with beta and loss_type), defaulting as the schema does for method="grpo"; the TrainingArguments
names translate as in ``SFTConfig``, with TRL's GRPO learning rate (1e-6). Names with no effect are listed in one
warning.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence

from jaxsloth import api
from jaxsloth.config import TrainConfig
from jaxsloth.faces.trl import SFTConfig, TrainOutput, lora_settings, resolve_model

# The schema's GRPO settings and their defaults for method="grpo" (reward_funcs come as the trainer's argument).
_GRPO = TrainConfig(method="grpo", reward_funcs=("format",))
GRPO_SETTINGS = {
    f.name: getattr(_GRPO, f.name)
    for f in dataclasses.fields(TrainConfig)
    if (f.metadata["help"].startswith("grpo:") or f.name in ("beta", "loss_type")) and f.name != "reward_funcs"
}
_TRL_GRPO_DEFAULTS = {"learning_rate": 1e-6}
# Accepted with no effect: jaxsloth samples in JAX (no vLLM) and logs every step.
_NO_EFFECT = {"use_vllm", "vllm_mode", "log_completions", "num_completions_to_print", "max_prompt_length_left",
              "ds3_gather_for_generation", "bf16", "fp16"}  # fmt: skip


class GRPOConfig(SFTConfig):
    """TRL's GRPOConfig: num_generations, max_completion_length, temperature, top_p, top_k, min_p,
    repetition_penalty, beta (KL coefficient, 0 by default), epsilon, epsilon_high, loss_type (grpo, bnpo, dr_grpo,
    dapo), scale_rewards ("group", "batch", "none"; TRL's older True / False), num_iterations,
    mask_truncated_completions, reward_weights, use_bias_correction_kl, and TrainingArguments' names."""

    def __getattr__(self, name: str):
        values = self.__dict__.get("values", {})
        if name not in values and name in GRPO_SETTINGS:
            return GRPO_SETTINGS[name]
        if name not in values and name in _TRL_GRPO_DEFAULTS:
            return _TRL_GRPO_DEFAULTS[name]
        return super().__getattr__(name)

    def __repr__(self) -> str:
        return f"GRPOConfig({', '.join(f'{k}={v!r}' for k, v in self.values.items())})"

    def to_settings(self, model: api.Model | None = None) -> tuple[dict, int | None, list[str]]:
        """-> (jaxsloth.train settings with method="grpo", None, ignored names)."""
        given = {k: v for k, v in self.values.items() if v is not None}
        common = {k: v for k, v in given.items() if k not in GRPO_SETTINGS and k not in _NO_EFFECT}
        settings, _, ignored = SFTConfig(**common).to_settings(model)
        settings.pop("packing", None)  # GRPO's rows are laid out by the sampler
        if "learning_rate" not in given:
            settings["learning_rate"] = _TRL_GRPO_DEFAULTS["learning_rate"]
        grpo = {k: v for k, v in given.items() if k in GRPO_SETTINGS}
        if grpo.get("scale_rewards") in (True, False):  # TRL's older boolean spelling
            grpo["scale_rewards"] = "group" if grpo["scale_rewards"] else "none"
        return {**settings, **grpo, "method": "grpo"}, None, ignored


def _as_list(data) -> list[dict]:
    if hasattr(data, "to_list"):
        return data.to_list()
    return [dict(x) for x in data]


class GRPOTrainer:
    """TRL's GRPOTrainer, on jaxsloth. model: a jaxsloth Model (with its adapter) or a model path / Hub id (loaded,
    given the adapter in ``peft_config`` or jaxsloth's default); reward_funcs: one or a list of callables with TRL's
    signature (``jaxsloth.methods.rewards``), built-in names or "module.path:function"; train_dataset: rows with
    "prompt" (text or a conversation) and any columns the rewards read; processing_class: the tokenizer (default:
    the model's); eval_dataset: rows as train_dataset's, evaluated as TRL does (``jaxsloth.methods.grpo_eval``);
    callbacks: jaxsloth's, cb(record)."""

    def __init__(
        self,
        model,
        reward_funcs: Callable | str | Sequence[Callable | str],
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
        model, self.tokenizer = resolve_model(model, processing_class, None, "GRPOTrainer")
        if self.tokenizer is None:
            raise ValueError("GRPOTrainer needs processing_class (the tokenizer)")
        if peft_config is not None or model.trainable is None:
            lora = {} if peft_config is None else lora_settings(peft_config)
            model = api.add_lora(model, seed=self.args.seed, overwrite=peft_config is not None, **lora)
        self.model = model
        funcs = [reward_funcs] if callable(reward_funcs) or isinstance(reward_funcs, str) else list(reward_funcs)
        self.settings, _, ignored = self.args.to_settings(model)
        self.settings["reward_funcs"] = tuple(funcs)
        ignored += sorted(k for k in self.args.values if k in _NO_EFFECT and k not in ("bf16", "fp16"))
        self.eval_dataset = None if eval_dataset is None else _as_list(eval_dataset)
        if self.eval_dataset is not None:
            self.settings["eval_dataset"] = self.eval_dataset
        if ignored:
            warnings.warn(f"GRPOTrainer: ignored (no effect in jaxsloth): {', '.join(ignored)}", stacklevel=2)
        self.train_config = TrainConfig(**self.settings)  # every setting checked before training
        self.callbacks = [cb for cb in callbacks if callable(cb)]
        self.train_dataset = _as_list(train_dataset)
        self.history: list[dict] = []

    def train(self, resume_from_checkpoint: bool | str | os.PathLike | None = None) -> TrainOutput:
        """GRPO over train_dataset, evaluated on eval_dataset as eval_strategy / eval_steps say (records with TRL's
        eval_ names). resume_from_checkpoint: True continues the run in output_dir from its latest checkpoint (none
        yet: a fresh start), a path (output_dir/checkpoints/<step>) from that checkpoint; None or False start fresh,
        refused over another run's checkpoints unless GRPOConfig(overwrite_output_dir=True)."""
        from jaxsloth.train.run_dir import check_output_dir

        settings = dict(self.settings)
        if resume_from_checkpoint not in (None, False):
            settings["resume"] = resume_from_checkpoint
            settings.pop("overwrite", None)  # as in transformers' scripts, an asked-for resume wins over it
        if settings.get("output_dir") is not None:
            asks = ("train(resume_from_checkpoint=True)", "GRPOConfig(overwrite_output_dir=True)")
            resume, overwrite = settings.get("resume", False), settings.get("overwrite", False)
            check_output_dir(settings["output_dir"], resume=resume, overwrite=overwrite, asks=asks)
        start = time.perf_counter()
        result = api.train(
            self.model, self.tokenizer, self.train_dataset, callbacks=self.callbacks, progress=False, **settings
        )
        self.history = result.history
        runtime = time.perf_counter() - start
        losses = [r["loss"] for r in result.history]
        loss = sum(losses) / len(losses) if losses else math.nan
        metrics = {"train_runtime": runtime, "train_loss": loss, "train_steps_per_second": result.step / runtime}
        return TrainOutput(result.step, loss, metrics)

    def evaluate(self, eval_dataset=None) -> dict[str, float | None]:
        """TRL's evaluation of the adapter as it is now on eval_dataset (default: the trainer's): {"eval_loss",
        "eval_reward", "eval_rewards/<name>/mean", ..., "eval_runtime"}, the values a run's evaluation of this
        adapter records (``jaxsloth.methods.grpo_eval``)."""
        from jaxsloth.methods.grpo_train import evaluate_grpo

        data = self.eval_dataset if eval_dataset is None else _as_list(eval_dataset)
        if data is None:
            raise ValueError("GRPOTrainer.evaluate needs an eval_dataset (here or in GRPOTrainer(...))")
        start = time.perf_counter()
        metrics = evaluate_grpo(self.model, self.tokenizer, data, **self.settings)
        return {**metrics, "eval_runtime": time.perf_counter() - start}

    def save_model(self, output_dir: str | os.PathLike | None = None):
        """The adapter in PEFT format with the tokenizer (default: output_dir)."""
        out = output_dir if output_dir is not None else self.settings.get("output_dir", "trainer_output")
        return api.save_adapter(self.model, out, tokenizer=self.tokenizer, overwrite=True)
