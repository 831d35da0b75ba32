"""TRL's preference trainers over ``jaxsloth.train(..., method=...)``: ``DPOTrainer`` / ``DPOConfig``,
``ORPOTrainer`` / ``ORPOConfig``, ``CPOTrainer`` / ``CPOConfig`` (SimPO is TRL's ``CPOConfig(loss_type="simpo")``)
and ``KTOTrainer`` / ``KTOConfig``, shaped as TRL's: ``DPOTrainer(model, args=DPOConfig(...), train_dataset=...,
processing_class=tokenizer, peft_config=...).train()``.

The configs take TRL's names with TRL's defaults (learning rate 1e-6, beta 0.1, max_length 1024, ...); the
TrainingArguments names translate as in ``SFTConfig``. The reference model (DPO, KTO) is ``ref_model`` when given
(a jaxsloth Model or a model path / Hub id, as TRL's), else the policy with its adapter off (TRL's with a peft
model), or with full fine-tuning a frozen copy of the initial weights (TRL's ``create_reference_model``).
``eval_dataset`` is evaluated as TRL does (eval_loss, eval_rewards/..., every eval_steps and at the end). Names with
no effect are listed in one warning.
"""

from __future__ import annotations

import os
import time
import warnings

from jaxsloth import api
from jaxsloth.config import TrainConfig
from jaxsloth.faces.trl import SFTConfig, SFTTrainer, lora_settings, resolve_model

# TRL's defaults shared by every preference config (where they differ from SFTConfig's).
_PREFERENCE_DEFAULTS = {"learning_rate": 1e-6, "max_length": 1024}


class _PreferenceConfig(SFTConfig):
    """TRL's preference config: ``names`` are the method's settings (same names in jaxsloth's TrainConfig)."""

    method = "dpo"
    names: dict[str, object] = {}  # name -> TRL's default

    def __getattr__(self, name: str):
        values = self.__dict__.get("values", {})
        if name not in values and name in self.names:
            return self.names[name]
        if name not in values and name in _PREFERENCE_DEFAULTS:
            return _PREFERENCE_DEFAULTS[name]
        return super().__getattr__(name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.values.items())})"

    def _method_settings(self, given: dict) -> tuple[dict, list[str]]:
        """-> (the method's jaxsloth settings, ignored names)."""
        out = {"method": self.method, **{k: given.get(k, v) for k, v in self.names.items()}}
        return out, []

    def to_settings(self, model: api.Model | None = None) -> tuple[dict, int | None, list[str]]:
        given = {k: v for k, v in self.values.items() if v is not None}
        common = {k: v for k, v in given.items() if k not in self.names and k != "truncation_mode"}
        settings, length, ignored = SFTConfig(**common).to_settings(model)
        settings.pop("packing", None)  # preference rows are always packed pair by pair
        if "learning_rate" not in given:
            settings["learning_rate"] = _PREFERENCE_DEFAULTS["learning_rate"]
        if given.get("truncation_mode", "keep_start") != "keep_start":
            ignored.append(f"truncation_mode={given['truncation_mode']!r} (jaxsloth keeps the start)")
        method, method_ignored = self._method_settings(given)
        settings.update(method)
        length = length if length is not None else _PREFERENCE_DEFAULTS["max_length"]
        return settings, length, ignored + method_ignored


class DPOConfig(_PreferenceConfig):
    """TRL's DPOConfig: beta, loss_type ("sigmoid", "ipo", "hinge"; a one-element list as TRL 1.x writes it),
    label_smoothing, precompute_ref_log_probs, max_length (each prompt + completion, keeping the start)."""

    method = "dpo"
    names = {"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0, "precompute_ref_log_probs": False}

    def _method_settings(self, given: dict) -> tuple[dict, list[str]]:
        out, ignored = super()._method_settings(given)
        loss_type = out["loss_type"]
        if isinstance(loss_type, list | tuple):
            if len(loss_type) != 1:
                raise NotImplementedError(f"loss_type={loss_type!r}: jaxsloth trains one DPO loss at a time")
            out["loss_type"] = loss_type[0]
        return out, ignored


class ORPOConfig(_PreferenceConfig):
    """TRL's ORPOConfig: beta (the paper's lambda), max_length. No reference model."""

    method = "orpo"
    names = {"beta": 0.1}


class CPOConfig(_PreferenceConfig):
    """TRL's CPOConfig; jaxsloth trains its loss_type="simpo" (SimPO: beta, simpo_gamma, label_smoothing, and
    cpo_alpha, TRL's default 1.0, weighing the chosen NLL; set cpo_alpha=0 for pure SimPO)."""

    method = "simpo"
    names = {"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0, "simpo_gamma": 0.5, "cpo_alpha": 1.0}

    def _method_settings(self, given: dict) -> tuple[dict, list[str]]:
        out, ignored = super()._method_settings(given)
        if out.pop("loss_type") != "simpo":
            raise NotImplementedError(
                f"CPOConfig(loss_type={given.get('loss_type', 'sigmoid')!r}): jaxsloth trains CPOTrainer's "
                'loss_type="simpo" (SimPO); for a DPO-style loss use DPOConfig / DPOTrainer'
            )
        return out, ignored


class KTOConfig(_PreferenceConfig):
    """TRL's KTOConfig: beta, desirable_weight, undesirable_weight, precompute_ref_log_probs, max_length; loss_type
    "kto" (the only one jaxsloth trains)."""

    method = "kto"
    names = {"beta": 0.1, "loss_type": "kto", "desirable_weight": 1.0, "undesirable_weight": 1.0,
             "precompute_ref_log_probs": False}  # fmt: skip

    def _method_settings(self, given: dict) -> tuple[dict, list[str]]:
        out, ignored = super()._method_settings(given)
        if out.pop("loss_type") != "kto":
            raise NotImplementedError(f"KTOConfig(loss_type={given['loss_type']!r}): jaxsloth trains loss_type='kto'")
        return out, ignored


class _PreferenceTrainer(SFTTrainer):
    """TRL's preference trainer on jaxsloth (see SFTTrainer: model, processing_class / tokenizer, peft_config,
    eval_dataset, callbacks). ref_model: the reference (see the module docstring). Config names given directly (as
    Unsloth's notebooks pass beta, max_length) override ``args``'s."""

    config_class: type[_PreferenceConfig] = DPOConfig

    def __init__(
        self,
        model,
        ref_model=None,
        args: _PreferenceConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        peft_config=None,
        tokenizer=None,
        callbacks: list | None = None,
        **config_args,
    ):
        name = type(self).__name__
        if train_dataset is None:
            raise ValueError(f"{name} needs a train_dataset")
        if args is not None and not isinstance(args, self.config_class):
            raise TypeError(
                f"{name}: args must be a jaxsloth {self.config_class.__name__} (from jaxsloth import "
                f"{self.config_class.__name__}), got {type(args)}"
            )
        self.args = self.config_class(**{**(args.values if args is not None else {}), **config_args})
        model, self.tokenizer = resolve_model(model, processing_class, tokenizer, name)
        if model.full_finetuning and peft_config is not None:
            raise ValueError(f"{name}: the model trains every weight (full_finetuning=True); drop peft_config")
        no_adapter = peft_config is None and model.trainable is None and not model.full_finetuning
        if peft_config is not None or no_adapter:
            lora = {} if peft_config is None else lora_settings(peft_config)
            model = api.add_lora(model, seed=self.args.seed, overwrite=peft_config is not None, **lora)
        self.model = model
        self.settings, self.max_length, ignored = self.args.to_settings(model)
        if ref_model is not None:
            if not isinstance(ref_model, str | os.PathLike | api.Model):
                raise TypeError(
                    f"{name}: ref_model must be a jaxsloth Model or a model path / Hub id, got {type(ref_model)}"
                )
            self.settings["ref_model"] = ref_model
        if no_adapter:
            ignored.append("full fine-tuning without peft_config (jaxsloth trains its default LoRA adapter instead)")
        self.callbacks = [cb for cb in callbacks or () if callable(cb) or hasattr(cb, "on_evaluate")]
        for cb in callbacks or ():
            if hasattr(cb, "early_stopping_patience"):  # transformers' EarlyStoppingCallback
                self.settings["early_stopping_patience"] = cb.early_stopping_patience
                self.settings["early_stopping_threshold"] = cb.early_stopping_threshold
            elif not (callable(cb) or hasattr(cb, "on_evaluate")):
                ignored.append(f"callback {type(cb).__name__} (jaxsloth's take cb(record) / cb.on_evaluate)")
        self.eval_dataset = eval_dataset
        if eval_dataset is not None:
            self.settings["eval_dataset"] = eval_dataset
        if data_collator is not None:
            ignored.append("data_collator (jaxsloth tokenizes and packs itself)")
        if ignored:
            warnings.warn(f"{name}: ignored (no effect in jaxsloth): {', '.join(ignored)}", stacklevel=2)
        self.train_config = TrainConfig(**self.settings)  # every setting checked before training
        self.lora_config = model.lora
        self.train_dataset = train_dataset

    def evaluate(self, eval_dataset=None) -> dict[str, float]:
        """TRL's eval metrics (eval_loss, eval_rewards/chosen, eval_rewards/accuracies, ...) of the model as it is
        now over eval_dataset (default: the one given to the trainer), plus eval_runtime."""
        from jaxsloth.methods.preference_train import evaluate_preferences

        data = self.eval_dataset if eval_dataset is None else eval_dataset
        if data is None:
            raise ValueError(f"{type(self).__name__}.evaluate needs an eval_dataset (here or in the trainer)")
        model, start, length = self.model, time.perf_counter(), self.model.max_seq_length
        if self.max_length is not None:
            model.max_seq_length = self.max_length
        try:
            metrics = evaluate_preferences(model, self.tokenizer, data, **self.settings)
        finally:
            model.max_seq_length = length
        return {**metrics, "eval_runtime": time.perf_counter() - start}


class DPOTrainer(_PreferenceTrainer):
    """TRL's DPOTrainer: DPO (sigmoid, ipo, hinge) on prompt/chosen/rejected data (strings or conversations,
    explicit or implicit prompt)."""

    config_class = DPOConfig


class ORPOTrainer(_PreferenceTrainer):
    """TRL's ORPOTrainer: ORPO on prompt/chosen/rejected data, no reference model."""

    config_class = ORPOConfig


class CPOTrainer(_PreferenceTrainer):
    """TRL's CPOTrainer with CPOConfig(loss_type="simpo"): SimPO on prompt/chosen/rejected data."""

    config_class = CPOConfig


class KTOTrainer(_PreferenceTrainer):
    """TRL's KTOTrainer: KTO on prompt/completion/label data (paired data is unpaired first, as TRL does)."""

    config_class = KTOConfig
