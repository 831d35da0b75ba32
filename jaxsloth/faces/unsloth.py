"""Unsloth's face: ``FastLanguageModel.from_pretrained`` / ``get_peft_model`` / ``for_inference`` and the model's
``save_pretrained*`` and transformers-style ``generate``, each mapped onto ``jaxsloth.api``.

Unsloth arguments jaxsloth cannot honour fail with one line saying so when ignoring them would train a different
model than asked for (8-bit loading, LoRA bias, LoftQ, per-layer targets); arguments that only
tune Unsloth's own runtime (device_map, fast_inference, ...) are ignored with one warning naming them.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxsloth import api
from jaxsloth.config import LINEARS, LoadConfig, spellings

# Unsloth's use_gradient_checkpointing -> the profile's remat policy. "unsloth" offloads the per-layer checkpoints
# to host memory, as jaxsloth's "offload" policy does; True is plain recomputation.
_REMAT = {"unsloth": "offload", True: "full", False: "none"}
_TRAINED_COPIES = {"embed_tokens": "train_embeddings", "lm_head": "train_lm_head"}
_GGUF = {"f16": "f16", "bf16": "bf16", "q8_0": "q8_0", "fast_quantized": "q8_0", "not_quantized": "f16"}


def _warn_ignored(where: str, names: Sequence[str]) -> None:
    if names:
        warnings.warn(f"{where}: ignored (no effect in jaxsloth): {', '.join(sorted(names))}", stacklevel=3)


def _dtype_name(dtype) -> str | None:
    """None, a string or a torch / numpy dtype ("torch.bfloat16") -> jaxsloth's dtype name."""
    return None if dtype is None else str(dtype).removeprefix("torch.")


@dataclasses.dataclass
class UnslothModel(api.Model):
    """A ``jaxsloth.api.Model`` with the methods Unsloth users call on theirs."""

    for_inference_mode: bool = False
    tokenizer: object = dataclasses.field(default=None, repr=False, compare=False)  # for transformers-style generate

    def generate(self, tokenizer=None, prompts=None, max_new_tokens: int = 64, *, input_ids=None, **kwargs):
        """jaxsloth's ``generate(tokenizer, prompts)`` (text out), or transformers' ``generate(input_ids=...,
        attention_mask=..., max_new_tokens=...)`` (ids out: each row's prompt then its new tokens, right-padded
        with the pad id, as a numpy array [batch, prompt + new]); use_cache is accepted (there is always a KV
        cache)."""
        if input_ids is None:
            return super().generate(tokenizer, prompts, max_new_tokens=max_new_tokens, **kwargs)
        return _generate_ids(self, input_ids, max_new_tokens, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, tokenizer=None, **kwargs) -> Path:
        """The LoRA adapter in PEFT format (``jaxsloth.save_adapter``); with full_finetuning, the whole model in its
        own dtype (``jaxsloth.save_merged``), as transformers' save_pretrained."""
        _warn_ignored("save_pretrained", list(kwargs))
        if self.full_finetuning:
            return api.save_merged(self, save_directory, dtype=self.profile.dtype.name, tokenizer=tokenizer)
        return api.save_adapter(self, save_directory, tokenizer=tokenizer)

    def save_pretrained_merged(
        self, save_directory: str | os.PathLike, tokenizer=None, save_method: str = "merged_16bit", **kwargs
    ) -> Path:
        """save_method "merged_16bit": a 16-bit Hugging Face checkpoint with the adapter merged in
        (``jaxsloth.save_merged``); "lora": the adapter alone. Unsloth's "merged_4bit" is not written."""
        _warn_ignored("save_pretrained_merged", list(kwargs))
        if save_method == "lora":
            return api.save_adapter(self, save_directory, tokenizer=tokenizer)
        if save_method != "merged_16bit":
            raise ValueError(f"save_method {save_method!r} is not supported; choose merged_16bit or lora")
        return api.save_merged(self, save_directory, tokenizer=tokenizer)

    def save_pretrained_gguf(
        self, save_directory: str | os.PathLike, tokenizer, quantization_method: str = "fast_quantized", **kwargs
    ) -> Path:
        """One GGUF file, save_directory/model-<quantization>.gguf (``jaxsloth.save_gguf``). quantization_method:
        f16, bf16, q8_0; Unsloth's "fast_quantized" is q8_0 and "not_quantized" f16."""
        _warn_ignored("save_pretrained_gguf", list(kwargs))
        if quantization_method not in _GGUF:
            raise ValueError(
                f"GGUF quantization_method {quantization_method!r} is not supported; choose one of: {', '.join(_GGUF)}"
            )
        quant = _GGUF[quantization_method]
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        return api.save_gguf(self, tokenizer, out / f"model-{quant}.gguf", quantization=quant)


def _host(x) -> np.ndarray:
    """A numpy array from numpy, lists or a (possibly CUDA) torch tensor, without importing torch."""
    return np.asarray(x.cpu() if hasattr(x, "cpu") else x)


def _generate_ids(model: UnslothModel, input_ids, max_new_tokens: int, attention_mask=None, use_cache: bool = True,
                  pad_token_id: int | None = None, **sampling) -> np.ndarray:  # fmt: skip
    """input_ids: [batch, prompt] (numpy, torch or lists; padded where attention_mask is 0) -> [batch, prompt + new]
    ids, each row right-padded with the pad id (transformers' layout for a decoder's generate)."""
    from jaxsloth.generate import generate, sampling_settings, stop_token_ids
    from jaxsloth.lora import with_trainable

    del use_cache  # there is always a KV cache
    ids = _host(input_ids)
    mask = np.ones_like(ids) if attention_mask is None else _host(attention_mask)
    prompts = [row[m.astype(bool)].tolist() for row, m in zip(ids, mask, strict=True)]
    seed = sampling.pop("seed", 0)
    names = ("do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty")
    settings = sampling_settings(*(sampling.pop(k, None) for k in names))
    _warn_ignored("generate", list(sampling))
    params, lora, lora_rt = model.params, None, None
    if model.trainable is not None:
        params, lora = with_trainable(model.params, model.trainable)
        lora_rt = model.lora.runtime
    if model.tokenizer is not None:
        stops = stop_token_ids(model, model.tokenizer)
    else:
        eos = model.config.eos_token_id
        stops = [] if eos is None else list(eos) if isinstance(eos, tuple) else [eos]
    new = generate(params, model.config, prompts, max_new_tokens=max_new_tokens, seed=seed, stop_tokens=stops,
                   lora=lora, lora_rt=lora_rt, ops=model.profile.ops, compute_dtype=model.profile.dtype,
                   **settings)  # fmt: skip
    rows = [p + n for p, n in zip(prompts, new, strict=True)]
    pad = pad_token_id if pad_token_id is not None else (model.config.pad_token_id or 0)
    out = np.full((len(rows), max(map(len, rows))), pad, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _as_unsloth(model: api.Model, tokenizer=None) -> UnslothModel:
    if isinstance(model, UnslothModel):
        return model
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(api.Model)}
    return UnslothModel(**fields, tokenizer=tokenizer)


# Unsloth arguments that only tune its own PyTorch runtime: nothing to do in jaxsloth.
_RUNTIME_ONLY = {
    "device_map", "trust_remote_code", "fix_tokenizer", "use_exact_model_name", "attn_implementation",
    "fast_inference", "gpu_memory_utilization", "float8_kv_cache", "max_lora_rank", "disable_log_stats",
    "temporary_location", "rope_scaling", "resize_model_vocab", "local_files_only", "use_cache",
}  # fmt: skip


class FastLanguageModel:
    """Unsloth's entry points, on jaxsloth: ``from jaxsloth import FastLanguageModel`` in place of
    ``from unsloth import FastLanguageModel``."""

    @staticmethod
    def from_pretrained(
        model_name: str = "unsloth/Llama-3.2-1B-Instruct",
        max_seq_length: int = 2048,
        dtype=None,
        load_in_4bit: bool = True,
        token: str | None = None,
        full_finetuning: bool = False,
        load_in_8bit: bool = False,
        **kwargs,
    ) -> tuple[UnslothModel, object]:
        """``jaxsloth.load`` with Unsloth's defaults (QLoRA: load_in_4bit=True) -> (model, tokenizer).

        dtype: None (the profile's: bfloat16 on GPUs), a name or a torch dtype. full_finetuning: train every weight
        (no adapter; pass the model to SFTTrainer as it is); as in Unsloth it turns 4-bit and 8-bit loading off,
        with a warning naming them. kwargs: any other ``jaxsloth.load`` setting (profile, remat, attention,
        optimizer_state, ...); Unsloth's runtime-only arguments (device_map, fast_inference, ...) are ignored
        with a warning."""
        if full_finetuning and (load_in_4bit or load_in_8bit):
            # Unsloth's own rule: full fine-tuning trains 16-bit weights, so it loads them unquantized.
            named = " and ".join(n for n, on in (("load_in_4bit", load_in_4bit), ("load_in_8bit", load_in_8bit)) if on)
            warnings.warn(f"full_finetuning=True trains every 16-bit weight: {named} turned off", stacklevel=2)
            load_in_4bit = load_in_8bit = False
        if load_in_8bit:
            raise NotImplementedError("load_in_8bit=True: jaxsloth quantizes to NF4 only; use load_in_4bit=True")
        names = spellings((LoadConfig,))
        _warn_ignored("FastLanguageModel.from_pretrained", [k for k in kwargs if k in _RUNTIME_ONLY])
        settings = {k: v for k, v in kwargs.items() if k not in _RUNTIME_ONLY}
        unknown = [k for k in settings if k not in names]
        if unknown:  # one line naming them, where jaxsloth.load would name only the first
            raise TypeError(f"FastLanguageModel.from_pretrained: unknown arguments: {', '.join(sorted(unknown))}")
        model, tokenizer = api.load(model_name, token=token, max_seq_length=max_seq_length, dtype=_dtype_name(dtype),
                                    load_in_4bit=load_in_4bit, full_finetuning=full_finetuning,
                                    **settings)  # fmt: skip
        return _as_unsloth(model, tokenizer), tokenizer

    @staticmethod
    def get_peft_model(
        model: api.Model,
        r: int = 16,
        target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        bias: str = "none",
        layers_to_transform=None,
        layers_pattern=None,
        use_gradient_checkpointing: str | bool = "unsloth",
        random_state: int = 3407,
        max_seq_length: int | None = None,
        use_rslora: bool = False,
        modules_to_save: Sequence[str] | None = None,
        init_lora_weights: bool = True,
        loftq_config=None,
        **kwargs,
    ) -> UnslothModel:
        """``jaxsloth.add_lora`` in Unsloth's names.

        target_modules: q_proj .. down_proj; embed_tokens / lm_head there or in modules_to_save train full copies
        (train_embeddings / train_lm_head). use_gradient_checkpointing: "unsloth" -> the profile's remat "offload",
        True -> "full", False -> "none". random_state: the LoRA initialisation seed. max_seq_length: the row length
        for training (default: from_pretrained's). bias other than "none", LoftQ, init_lora_weights other than True
        and layers_to_transform raise: jaxsloth does not implement them, and dropping them would silently train a
        different adapter than the one asked for. A model loaded with full_finetuning=True is returned as it is,
        with a warning (as Unsloth): every weight trains already."""
        if model.full_finetuning:
            warnings.warn("get_peft_model: the model trains every weight (full_finetuning=True); no adapter added",
                          stacklevel=2)  # fmt: skip
            return _as_unsloth(model)
        refused = {
            "bias": bias != "none",
            "loftq_config": bool(loftq_config),
            "init_lora_weights": init_lora_weights is not True,
            "layers_to_transform": layers_to_transform is not None or layers_pattern is not None,
        }
        for name, bad in refused.items():
            if bad:
                raise NotImplementedError(
                    f"get_peft_model: {name} is not supported by jaxsloth (it would change the adapter); leave it at "
                    "its default"
                )
        if use_gradient_checkpointing not in _REMAT:
            raise ValueError(
                f"use_gradient_checkpointing must be 'unsloth', True or False, got {use_gradient_checkpointing!r}"
            )
        _warn_ignored("FastLanguageModel.get_peft_model", [k for k in kwargs if k in _RUNTIME_ONLY])
        extra = {k: v for k, v in kwargs.items() if k not in _RUNTIME_ONLY}  # other jaxsloth.add_lora settings
        named = set(target_modules) | set(modules_to_save or ())
        unknown = named - set(LINEARS) - set(_TRAINED_COPIES)
        if unknown:
            raise ValueError(
                f"get_peft_model: unknown modules {', '.join(sorted(unknown))}; choose from: "
                f"{', '.join((*LINEARS, *_TRAINED_COPIES))}"
            )
        copies = {flag: True for name, flag in _TRAINED_COPIES.items() if name in named}
        model = _as_unsloth(model)
        model = dataclasses.replace(
            model,
            profile=model.profile.replace(remat=_REMAT[use_gradient_checkpointing]),
            max_seq_length=model.max_seq_length if max_seq_length is None else max_seq_length,
        )
        targets = tuple(m for m in LINEARS if m in target_modules)
        return api.add_lora(model, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets,
                            use_rslora=use_rslora, seed=random_state, **copies, **extra)  # fmt: skip

    @staticmethod
    def for_training(model: api.Model, use_gradient_checkpointing: bool = True) -> api.Model:
        """The model, marked for training (jaxsloth trains any model with an adapter)."""
        if isinstance(model, UnslothModel):
            model.for_inference_mode = False
        return model

    @staticmethod
    def for_inference(model: api.Model) -> api.Model:
        """The model, marked for inference (jaxsloth generates with a KV cache from any model)."""
        if isinstance(model, UnslothModel):
            model.for_inference_mode = True
        return model
