"""TRL's face: ``SFTTrainer(model, train_dataset, args=SFTConfig(...), peft_config=...).train()`` on
``jaxsloth.load`` / ``add_lora`` / ``train``.

``SFTConfig`` takes TRL's (and transformers' TrainingArguments') names with TRL's defaults; ``to_settings``
translates them into ``jaxsloth.train`` settings (``jaxsloth.config.TrainConfig`` fields). Names jaxsloth has no
use for are accepted and listed in one warning, never dropped silently.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

from jaxsloth import api
from jaxsloth.config import LINEARS, LoraConfig, TrainConfig
from jaxsloth.train.trackers import TRACKERS, split_foreign_report_to

# TRL's SFTConfig defaults where they differ from jaxsloth.train's (transformers' TrainingArguments' seed is 42,
# TRL's SFT learning rate 2e-5, 3 epochs unless max_steps is given, no packing).
_TRL_DEFAULTS = {
    "output_dir": "trainer_output",
    "learning_rate": 2e-5,
    "num_train_epochs": 3,
    "per_device_train_batch_size": 8,
    "seed": 42,
    "packing": False,
    "eval_strategy": "no",
}
# Same name, same meaning in TrainConfig.
_DIRECT = (
    "output_dir", "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type",
    "warmup_steps", "warmup_ratio", "num_train_epochs", "max_steps", "save_steps", "packing", "seed",
    "dataset_text_field", "dataset_num_proc", "weight_decay", "max_grad_norm", "adam_beta1", "adam_beta2",
    "adam_epsilon", "run_name", "project", "eval_strategy", "eval_steps", "per_device_eval_batch_size",
    "load_best_model_at_end", "save_total_limit",
)  # fmt: skip
# transformers' name -> TrainConfig's.
_RENAMED = {"overwrite_output_dir": "overwrite"}
# Accepted with no effect on training: jaxsloth logs every step (metrics.jsonl, TensorBoard), checkpoints every
# save_steps and at the end, and recomputes activations as the profile's remat says.
_NO_EFFECT = {
    "logging_steps", "logging_strategy", "logging_first_step", "logging_dir", "gradient_checkpointing",
    "gradient_checkpointing_kwargs", "remove_unused_columns", "dataloader_num_workers", "dataloader_pin_memory",
    "disable_tqdm", "save_strategy", "do_train",
}  # fmt: skip
_ADAMW = {"adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit",
          "paged_adamw_32bit", "adamw_apex_fused", "adamw_torch_xla", "adamw"}  # fmt: skip
_SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant", "constant_with_warmup": "constant"}


def resolve_model(model, processing_class, tokenizer, trainer: str):
    """A trainer's (model, tokenizer): the model as given (a jaxsloth Model) or loaded from a path / Hub id; the
    tokenizer as given (processing_class, or the older tokenizer=), else the one loaded with the model."""
    tokenizer = processing_class if processing_class is not None else tokenizer
    if isinstance(model, str | os.PathLike):
        model, loaded_tokenizer = api.load(model)
        tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
    if not isinstance(model, api.Model):
        raise TypeError(f"{trainer}: model must be a jaxsloth Model or a model path / Hub id, got {type(model)}")
    return model, tokenizer


class SFTConfig:
    """TRL's SFTConfig (and TrainingArguments) names and defaults. max_length (max_seq_length in older TRL):
    tokens per row for the run (default: the model's max_seq_length); completion_only_loss / assistant_only_loss:
    True masks prompts and user turns (jaxsloth's train_on_inputs=False), False trains on every token; unset,
    jaxsloth's default (prompts masked). bf16 / fp16 are checked against the model's dtype (set at load)."""

    def __init__(self, output_dir: str | os.PathLike | None = None, **kwargs):
        self.values = {"output_dir": output_dir, **kwargs} if output_dir is not None else dict(kwargs)

    def __getattr__(self, name: str):
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        if name in _TRL_DEFAULTS:
            return _TRL_DEFAULTS[name]
        raise AttributeError(name)

    def __repr__(self) -> str:
        return f"SFTConfig({', '.join(f'{k}={v!r}' for k, v in self.values.items())})"

    def to_settings(self, model: api.Model | None = None) -> tuple[dict, int | None, list[str]]:
        """-> (jaxsloth.train settings, the row length to train with or None for the model's, ignored names)."""
        given = {k: v for k, v in self.values.items() if v is not None}
        out = {k: v for k, v in _TRL_DEFAULTS.items() if k not in given}
        ignored = []
        for name, value in given.items():
            if name in _DIRECT:
                out[name] = value
            elif name in _RENAMED:
                out[_RENAMED[name]] = value
            elif name in ("max_length", "max_seq_length", "completion_only_loss", "assistant_only_loss"):
                continue  # below
            elif name == "evaluation_strategy":  # transformers' older name
                out["eval_strategy"] = value
            elif name in ("metric_for_best_model", "greater_is_better"):
                if (name == "greater_is_better" and value) or value not in (False, "loss", "eval_loss"):
                    raise ValueError(f"{name}={value!r}: jaxsloth picks the best step by the lowest eval_loss")
            elif name == "optim":
                if value not in _ADAMW:
                    ignored.append(f"optim={value!r} (jaxsloth trains with AdamW)")
            elif name == "report_to":
                out["report_to"], others = split_foreign_report_to(value)
                if others:
                    ignored.append(f"report_to={others!r} (jaxsloth reports to {', '.join(TRACKERS)})")
            elif name in ("bf16", "fp16"):
                want = {"bf16": "bfloat16", "fp16": "float16"}[name]
                if value and model is not None and model.profile.dtype.name != want:
                    ignored.append(f"{name}=True (the model computes in {model.profile.dtype.name}: set dtype at load)")
            elif name not in _NO_EFFECT:
                ignored.append(name)
        if out.get("max_steps", -1) is not None and out.get("max_steps", -1) > 0:
            out.pop("num_train_epochs", None)  # transformers: a positive max_steps overrides the epochs
        else:
            out.pop("max_steps", None)  # transformers' -1: train num_train_epochs
        epochs = out.get("num_train_epochs")
        if epochs is not None and not float(epochs).is_integer():
            raise ValueError(f"num_train_epochs={epochs}: jaxsloth trains whole epochs; give max_steps instead")
        warmup = out.get("warmup_steps")
        if isinstance(warmup, float) and 0 < warmup < 1:  # transformers: a float below 1 is a ratio of the run
            out["warmup_ratio"] = out.pop("warmup_steps")
        if "lr_scheduler_type" in out:
            name = str(getattr(out["lr_scheduler_type"], "value", out["lr_scheduler_type"]))
            out["lr_scheduler_type"] = _SCHEDULES.get(name, name)  # an unknown one: TrainConfig names the choices
        if "eval_strategy" in out:
            out["eval_strategy"] = str(getattr(out["eval_strategy"], "value", out["eval_strategy"]))
            if out["eval_strategy"] == "steps" and "eval_steps" not in out:  # transformers: every logging_steps
                out["eval_steps"] = given.get("logging_steps", 10)
        masks = [given[k] for k in ("completion_only_loss", "assistant_only_loss") if k in given]
        if masks:
            out["train_on_inputs"] = not any(masks)
        length = given.get("max_length", given.get("max_seq_length"))
        return out, length, ignored


class TrainOutput(NamedTuple):
    """transformers' TrainOutput: global_step, training_loss (mean over the run's steps) and metrics."""

    global_step: int
    training_loss: float
    metrics: dict


def lora_settings(peft_config) -> dict:
    """A peft.LoraConfig (or a dict / any object with its attributes) -> jaxsloth.add_lora settings."""
    get = peft_config.get if isinstance(peft_config, Mapping) else lambda k, d=None: getattr(peft_config, k, d)
    if (get("bias", "none") or "none") != "none":
        raise NotImplementedError("peft_config.bias: jaxsloth trains no biases; use bias='none'")
    out = {"r": get("r", 8), "lora_alpha": get("lora_alpha", 8), "lora_dropout": get("lora_dropout", 0.0) or 0.0,
           "use_rslora": bool(get("use_rslora", False))}  # fmt: skip
    targets = get("target_modules")
    if targets is not None and targets != "all-linear":
        names = {targets} if isinstance(targets, str) else set(targets)
        names |= set(get("modules_to_save") or ())
        out["target_modules"] = tuple(m for m in LINEARS if m in names)
        out["train_embeddings"] = "embed_tokens" in names
        out["train_lm_head"] = "lm_head" in names
        unknown = names - set(LINEARS) - {"embed_tokens", "lm_head"}
        if unknown:
            raise ValueError(f"peft_config.target_modules: unknown {', '.join(sorted(unknown))}; known: {LINEARS}")
    return out


def _formatted(data, formatting_func: Callable):
    """Each example's formatting_func(example) as its "text" column (a one-element list is read as its string)."""

    def text(example):
        out = formatting_func(example)
        return {"text": out[0] if isinstance(out, list | tuple) and len(out) == 1 else out}

    if hasattr(data, "map"):
        return data.map(text, remove_columns=list(data.column_names))
    return [text(e) for e in data]


class SFTTrainer:
    """TRL's SFTTrainer, on jaxsloth. model: a jaxsloth Model (with its adapter, e.g. from
    FastLanguageModel.get_peft_model) or a model path / Hub id, loaded with jaxsloth.load and given the adapter in
    ``peft_config`` (a peft.LoraConfig, a dict, or None for jaxsloth's default adapter). processing_class (or
    Unsloth's ``tokenizer``): the tokenizer (default: the model's). Any SFTConfig name given here directly (Unsloth's
    notebooks pass dataset_text_field, max_seq_length, packing so) overrides ``args``'s."""

    def __init__(
        self,
        model,
        args: SFTConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        peft_config=None,
        formatting_func: Callable | None = None,
        tokenizer=None,
        callbacks: list | None = None,
        **sft_args,
    ):
        if train_dataset is None:
            raise ValueError("SFTTrainer needs a train_dataset")
        if args is not None and not isinstance(args, SFTConfig):
            raise TypeError(
                f"SFTTrainer: args must be a jaxsloth SFTConfig (from jaxsloth import SFTConfig), got {type(args)}"
            )
        self.args = SFTConfig(**{**(args.values if args is not None else {}), **sft_args})
        model, self.tokenizer = resolve_model(model, processing_class, tokenizer, "SFTTrainer")
        if model.full_finetuning and peft_config is not None:
            raise ValueError("SFTTrainer: the model trains every weight (full_finetuning=True); drop peft_config")
        no_adapter = peft_config is None and model.trainable is None and not model.full_finetuning
        if peft_config is not None or no_adapter:
            lora = {} if peft_config is None else lora_settings(peft_config)
            model = api.add_lora(model, seed=self.args.seed, overwrite=peft_config is not None, **lora)
        self.model = model
        self.settings, self.max_length, ignored = self.args.to_settings(model)
        if no_adapter:
            ignored.append("full fine-tuning without peft_config (jaxsloth trains its default LoRA adapter instead)")
        self.callbacks = []
        for cb in callbacks or ():
            if hasattr(cb, "early_stopping_patience"):  # transformers' EarlyStoppingCallback
                self.settings["early_stopping_patience"] = cb.early_stopping_patience
                self.settings["early_stopping_threshold"] = cb.early_stopping_threshold
            elif callable(cb) or hasattr(cb, "on_evaluate"):  # a jaxsloth callback (jaxsloth.train.evaluate)
                self.callbacks.append(cb)
            else:
                ignored.append(
                    f"callback {type(cb).__name__} (jaxsloth's take cb(record) / cb.on_evaluate(record, model))"
                )
        if formatting_func is not None and eval_dataset is not None:
            eval_dataset = _formatted(eval_dataset, formatting_func)
        self.eval_dataset = eval_dataset
        if eval_dataset is not None:
            self.settings["eval_dataset"] = eval_dataset
        if data_collator is not None:
            ignored.append("data_collator (jaxsloth tokenizes and packs itself)")
        if ignored:
            warnings.warn(f"SFTTrainer: ignored (no effect in jaxsloth): {', '.join(ignored)}", stacklevel=2)
        self.train_config = TrainConfig(**self.settings)  # every setting checked before training
        self.lora_config: LoraConfig = model.lora
        self.train_dataset = train_dataset if formatting_func is None else _formatted(train_dataset, formatting_func)
        if formatting_func is not None:
            self.settings["dataset_text_field"] = "text"

    def train(self, resume_from_checkpoint: bool | str | os.PathLike | None = None, **kwargs) -> TrainOutput:
        """``jaxsloth.train`` over train_dataset. resume_from_checkpoint: True continues the run in output_dir from
        its latest checkpoint (none yet: a fresh start), a path (output_dir/checkpoints/<step>) from that checkpoint;
        None or False start fresh, refused over another run's checkpoints unless SFTConfig(overwrite_output_dir=True)."""
        from jaxsloth.train.run_dir import check_output_dir

        settings = {**self.settings, **kwargs}
        if resume_from_checkpoint not in (None, False):
            settings["resume"] = resume_from_checkpoint
            settings.pop("overwrite", None)  # as in transformers' scripts, an asked-for resume wins over it
        if settings.get("output_dir") is not None:
            asks = ("train(resume_from_checkpoint=True)", "SFTConfig(overwrite_output_dir=True)")
            resume, overwrite = settings.get("resume", False), settings.get("overwrite", False)
            check_output_dir(settings["output_dir"], resume=resume, overwrite=overwrite, asks=asks)
        model, start = self.model, time.perf_counter()
        length = model.max_seq_length
        if self.max_length is not None:
            model.max_seq_length = self.max_length  # for this run only
        settings.setdefault("callbacks", self.callbacks)
        try:
            result = api.train(model, self.tokenizer, self.train_dataset, **settings)
        finally:
            model.max_seq_length = length
        runtime = time.perf_counter() - start
        losses = [r["loss"] for r in result.history]
        loss = sum(losses) / len(losses) if losses else math.nan
        metrics = {"train_runtime": runtime, "train_loss": loss, "train_steps_per_second": len(losses) / runtime}
        self.state = result
        return TrainOutput(result.step, loss, metrics)

    def evaluate(self, eval_dataset=None) -> dict[str, float]:
        """{"eval_loss", "eval_tokens", "eval_runtime"} of the model as it is now over eval_dataset (default: the
        one given to the trainer), packed and masked as training packs and masks it."""
        from jaxsloth.train.evaluate import evaluate_model

        data = self.eval_dataset if eval_dataset is None else eval_dataset
        if data is None:
            raise ValueError("SFTTrainer.evaluate needs an eval_dataset (here or in SFTTrainer(...))")
        model, start, length = self.model, time.perf_counter(), self.model.max_seq_length
        if self.max_length is not None:
            model.max_seq_length = self.max_length
        try:
            metrics = evaluate_model(model, self.tokenizer, data, **self.settings)
        finally:
            model.max_seq_length = length
        return {**metrics, "eval_runtime": time.perf_counter() - start}

    def save_model(self, output_dir: str | os.PathLike | None = None) -> Path:
        """The adapter in PEFT format with the tokenizer (default: output_dir); with full fine-tuning, the whole
        model in its own dtype."""
        out = output_dir if output_dir is not None else self.settings["output_dir"]
        if self.model.full_finetuning:
            dtype = self.model.profile.dtype.name
            return api.save_merged(self.model, out, dtype=dtype, tokenizer=self.tokenizer, overwrite=True)
        return api.save_adapter(self.model, out, tokenizer=self.tokenizer, overwrite=True)
