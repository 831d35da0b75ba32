"""The two-call Python API, in Unsloth's shape::

model, tokenizer = jaxsloth.load("path/to/hf-model", load_in_4bit=True, max_seq_length=2048)
model = jaxsloth.add_lora(model, r=16, lora_alpha=16)
jaxsloth.train(model, tokenizer, "train.jsonl", max_steps=100, output_dir="runs/x")
print(model.generate(tokenizer, ["Hello"], max_new_tokens=32))
jaxsloth.save_adapter(model, "runs/x/adapter")      # PEFT format
jaxsloth.save_merged(model, "runs/x/merged")        # 16-bit Hugging Face checkpoint
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxsloth.lora import LoraConfig, init_lora, merge
from jaxsloth.models.config import ModelConfig
from jaxsloth.models.decoder import layers_unstacked, stack_layers, unstack_layers
from jaxsloth.profiles import Profile, profile_for_device
from jaxsloth.train.step import TrainConfig

log = logging.getLogger("jaxsloth")


@dataclasses.dataclass
class Model:
    """A loaded model: frozen params (maybe NF4), the profile it runs with, and its LoRA adapter once added."""

    config: ModelConfig
    params: dict
    profile: Profile
    max_seq_length: int = 2048
    path: str | None = None
    lora: LoraConfig | None = None
    trainable: dict | None = None

    def generate(self, tokenizer, prompts: Sequence[str] | str, max_new_tokens: int = 64, **sampling) -> list[str]:
        """Completes each prompt (KV cache; greedy unless temperature > 0). Returns the new text per prompt.

        sampling: temperature, top_k, top_p, seed, stop_tokens (ids; the tokenizer's EOS is always a stop token).
        """
        from jaxsloth.generate import generate_text

        return generate_text(self, tokenizer, prompts, max_new_tokens=max_new_tokens, **sampling)


def load(
    path: str | os.PathLike,
    *,
    load_in_4bit: bool = False,
    max_seq_length: int = 2048,
    dtype: str | None = None,
    profile: str | Profile | None = None,
    **profile_overrides,
):
    """Loads a Hugging Face model directory -> (Model, tokenizer or None when the directory has none).

    dtype: frozen weights and activations (default: the profile's, bf16 on GPUs). profile: a profile name or
    object (default: chosen from jax.devices()[0]); profile_overrides: any Profile/KernelChoice field.
    """
    from converters.hf import load_hf_model

    if isinstance(profile, Profile):
        prof = profile.replace(**profile_overrides) if profile_overrides else profile
    else:
        prof = profile_for_device(name=profile, **profile_overrides)
    if dtype is not None:
        prof = prof.replace(compute_dtype=jnp.dtype(dtype).name)
    config, params = load_hf_model(path, dtype=prof.dtype, load_in_4bit=load_in_4bit)
    if max_seq_length > config.max_position_embeddings:
        log.warning(
            "max_seq_length %d exceeds the model's max_position_embeddings %d",
            max_seq_length,
            config.max_position_embeddings,
        )
    return Model(config, params, prof, max_seq_length, str(path)), load_tokenizer(path)


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved beside the weights (tokenizer.json etc.), or None."""
    path = Path(path)
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        log.warning("no tokenizer files in %s", path)
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def add_lora(
    model: Model,
    r: int = 16,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    target_modules: Sequence[str] | None = None,
    use_rslora: bool = False,
    train_embeddings: bool = False,
    train_lm_head: bool = False,
    embedding_lr: float | None = None,
    seed: int = 0,
) -> Model:
    """Returns the model with a fresh LoRA adapter (PEFT's initialisation, from ``seed``)."""
    lora = LoraConfig(
        r=r,
        alpha=lora_alpha,
        dropout=lora_dropout,
        use_rslora=use_rslora,
        train_embeddings=train_embeddings,
        train_lm_head=train_lm_head,
        embedding_lr=embedding_lr,
        **({} if target_modules is None else {"target_modules": tuple(target_modules)}),
    )
    trainable = init_lora(model.config, lora, jax.random.key(seed), params=model.params)
    return dataclasses.replace(model, lora=lora, trainable=trainable)


def train(
    model: Model,
    tokenizer,
    data,
    *,
    format: str = "auto",
    batch_size: int | None = None,
    grad_accum: int = 1,
    max_steps: int | None = None,
    num_epochs: int | None = None,
    learning_rate: float = 2e-4,
    warmup_steps: int = 0,
    schedule: str = "linear",
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    pack: bool = True,
    train_on_inputs: bool = False,
    output_dir: str | os.PathLike | None = None,
    save_every: int = 0,
    resume: bool = True,
    on_nonfinite: str = "stop",
    seed: int = 0,
    callbacks: Sequence = (),
    progress: bool = True,
    mesh=None,
    shard_lora: bool = False,
):
    """Fine-tunes ``model``'s adapter on ``data`` (a file path, a list of records, or a datasets.Dataset).

    Steps: max_steps, or num_epochs over the data (default 1 epoch). With output_dir: checkpoints (resumable),
    metrics.jsonl, TensorBoard events and loss.png are written there. Updates ``model.trainable`` in place and
    returns the TrainResult (history of per-step metrics).

    mesh: a spec like "data=2,fsdp=4", a jax.sharding.Mesh, or None: every device data-parallel (one device: no
    mesh). batch_size is per data-parallel rank (each of data x fsdp devices takes that many sequences per
    micro-batch). shard_lora: shard LoRA and optimizer state over fsdp too (default: replicated).

    Under a profile with the unrolled layer loop (Hopper, one device), ``model.params`` is split per layer for the
    run and stacked back when it ends, however it ends (its arrays are replaced, not copied: the device never holds
    both layouts, beyond one projection's stack while they are converted).
    """
    from jaxsloth.data import BatchLoader, load_records, tokenize_dataset
    from jaxsloth.train.loop import fit
    from jaxsloth.train.metrics import standard_callbacks

    if model.trainable is None:
        raise ValueError("the model has no adapter to train: call jaxsloth.add_lora(model, ...) first")
    if tokenizer is None:
        raise ValueError("train needs a tokenizer (the model directory has none; pass one)")
    records = data if isinstance(data, list) else load_records(data)
    dataset = tokenize_dataset(
        records,
        tokenizer,
        format=format,
        max_seq_length=model.max_seq_length,
        train_on_inputs=train_on_inputs,
        vocab_size=model.config.vocab_size,
    )
    from jaxsloth.sharding import batch_devices, resolve_mesh

    device_mesh = resolve_mesh(mesh)
    micro = (batch_size or model.profile.micro_batch) * batch_devices(device_mesh)
    loader = BatchLoader(dataset, batch_size=micro * grad_accum, seq_len=model.max_seq_length, pack=pack, seed=seed)
    if max_steps is None:
        max_steps = sum(loader.num_batches(e) for e in range(num_epochs or 1))
    tc = TrainConfig(
        learning_rate=learning_rate,
        warmup_steps=warmup_steps,
        total_steps=max_steps,
        schedule=schedule,
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
        grad_accum=grad_accum,
        on_nonfinite=on_nonfinite,
        seed=seed,
    )
    out = Path(output_dir) if output_dir is not None else None
    # On several hosts every process trains; only the first writes metrics, plots and the progress bar.
    writers = standard_callbacks(out, progress=progress, total_steps=max_steps) if jax.process_index() == 0 else []
    cbs = list(callbacks) + writers
    # The profile's unrolled layer loop reads per-layer weight arrays: the model's own stacked weights are split for
    # the run (consumed, so the device never holds both layouts) and stacked back however it ends.
    unroll = model.profile.unrolled_layers and device_mesh is None and not layers_unstacked(model.params)
    if unroll:
        model.params = unstack_layers(model.params, consume=True)
    try:
        result = fit(
            model.config,
            model.params,
            model.trainable,
            loader,
            lora=model.lora,
            train_config=tc,
            profile=model.profile,
            checkpoint_dir=None if out is None else str(out / "checkpoints"),
            save_every=save_every,
            resume=resume,
            callbacks=cbs,
            mesh=device_mesh,
            shard_lora=shard_lora,
        )
    finally:
        for cb in cbs:
            if hasattr(cb, "close"):
                cb.close()
        if unroll:
            model.params = stack_layers(model.params, consume=True)
    model.trainable = result.trainable
    return result


def save_adapter(model: Model, path: str | os.PathLike) -> Path:
    """Writes the adapter in PEFT format (adapter_model.safetensors + adapter_config.json)."""
    from converters.peft import save_peft_adapter

    if model.trainable is None:
        raise ValueError("the model has no adapter: call jaxsloth.add_lora first")
    trainable = _on_host(model.trainable)
    if jax.process_index() != 0:
        return Path(path)
    return save_peft_adapter(trainable, model.lora, model.config, path, base_model_name_or_path=model.path)


def _on_host(tree):
    """The full value of every (possibly sharded over several hosts) array, on every process."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    # Only arrays split across hosts are gathered; process_allgather would concatenate a process-local array
    # (frozen params never placed on the mesh) with the other hosts' copies.
    return jax.tree.map(
        lambda x: (
            multihost_utils.process_allgather(x, tiled=True)
            if isinstance(x, jax.Array) and not x.is_fully_addressable
            else x
        ),
        tree,
    )


def save_merged(model: Model, path: str | os.PathLike, dtype: str = "bfloat16") -> Path:
    """Writes a 16-bit Hugging Face checkpoint with the adapter merged in (NF4 weights dequantized first)."""
    from converters.hf import save_hf_model

    params = (
        model.params if model.trainable is None else merge(model.params, model.trainable, model.lora, jnp.dtype(dtype))
    )
    params = _on_host(params)
    if jax.process_index() != 0:
        return Path(path)
    return save_hf_model(params, model.config, path, dtype=jnp.dtype(dtype))


def save_gguf(model: Model, tokenizer, path: str | os.PathLike, quantization: str = "f16") -> Path:
    """Writes one GGUF file for llama.cpp, Ollama and LM Studio: the adapter merged in (NF4 weights dequantized),
    the tokenizer and chat template included. quantization: "f16", "bf16" or "q8_0"."""
    from converters.gguf import QUANTIZATIONS, check_supported
    from converters.gguf import save_gguf as write_gguf

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unsupported GGUF quantization {quantization!r}; supported: {', '.join(QUANTIZATIONS)}")
    check_supported(model.config)
    # Merged once into the stored precision (q8_0 is quantized from the model's own dtype).
    dtype = {"f16": jnp.float16, "bf16": jnp.bfloat16}.get(quantization, model.profile.dtype)
    params = model.params if model.trainable is None else merge(model.params, model.trainable, model.lora, dtype)
    params = _on_host(params)
    if jax.process_index() != 0:
        return Path(path)
    return write_gguf(params, model.config, tokenizer, path, quantization=quantization)
