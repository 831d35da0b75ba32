"""What a checkpoint belongs to: the base model, the LoRA and optimizer settings and the data, as plain JSON.

A resume compares the stored identity with the current run's and names the first setting that differs, so a
checkpoint never silently continues under another base model, rank, alpha, target list, optimizer or dataset.
The total step count is not part of it: raising --max-steps to train further is a legitimate resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import jax
import numpy as np

from jaxsloth.lora import LoraConfig
from jaxsloth.models.config import ModelConfig
from jaxsloth.quant import is_nf4
from jaxsloth.train.step import TrainConfig

# Names users know the settings by (CLI flag / Python argument), for the one-line mismatch error.
LABELS = {
    "base_model.config": "base model config",
    "base_model.quantized": "base model quantization (--load-in-4bit)",
    "base_model.weights": "base model weights",
    "lora": "full fine-tuning (--full-finetuning) or a LoRA adapter",
    "lora.r": "LoRA rank (--r)",
    "lora.lora_alpha": "LoRA alpha (--lora-alpha)",
    "lora.lora_dropout": "LoRA dropout (--lora-dropout)",
    "lora.target_modules": "LoRA target modules (--target-modules)",
    "lora.use_rslora": "rsLoRA (--use-rslora)",
    "lora.train_embeddings": "train_embeddings",
    "lora.train_lm_head": "train_lm_head",
    "optimizer.learning_rate": "learning rate (--learning-rate)",
    "optimizer.warmup_steps": "warmup steps (--warmup-steps)",
    "optimizer.warmup_ratio": "warmup ratio (--warmup-ratio)",
    "optimizer.lr_scheduler_type": "learning-rate schedule (--lr-scheduler-type)",
    "optimizer.weight_decay": "weight decay (--weight-decay)",
    "optimizer.max_grad_norm": "max grad norm (--max-grad-norm)",
    "optimizer.gradient_accumulation_steps": "gradient accumulation (--gradient-accumulation-steps)",
    "optimizer.seed": "seed (--seed)",
}


class ResumeMismatchError(ValueError):
    """The checkpoint to resume from was written by a run with other settings, model or data."""


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _samples(x) -> bytes:
    """Shape, and 8 evenly spaced values rounded to bf16 (so the compute dtype a run loads with does not count)."""
    flat = x.reshape(-1)
    idx = np.linspace(0, flat.shape[0] - 1, num=min(8, flat.shape[0])).astype(np.int64)
    values = np.asarray(flat[idx])
    if values.dtype.kind == "f" or values.dtype.name == "bfloat16":
        values = values.astype(jax.numpy.bfloat16)
    return repr(tuple(x.shape[-2:])).encode() + values.tobytes()


def weights_fingerprint(params: dict) -> str:
    """A cheap hash of the frozen weights: every non-layer leaf and the first and last layer's leaves, sampled.

    params: stacked ([layers, ...] leaves) or split per layer (a tuple); both give the same fingerprint."""
    h = hashlib.sha256()
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        ends = [layers[0], layers[-1]]
    else:
        ends = [jax.tree.map(lambda x: x[0], layers), jax.tree.map(lambda x: x[-1], layers)]
    rest = {k: v for k, v in params.items() if k != "layers"}
    for tree in (rest, *ends):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if hasattr(leaf, "shape") and leaf.size:
                h.update(jax.tree_util.keystr(path).encode() + _samples(leaf))
    return h.hexdigest()[:16]


def run_identity(config: ModelConfig, params: dict, lora: LoraConfig | None, tc: TrainConfig, loader) -> dict:
    """The JSON identity stored with every checkpoint (see the module docstring); lora None: full fine-tuning."""
    model = {k: v for k, v in dataclasses.asdict(config).items() if k != "hf_config"}
    quantized = any(is_nf4(x) for x in jax.tree.leaves(params, is_leaf=is_nf4))
    data = None
    if hasattr(loader, "state_dict"):
        data = {k: v for k, v in loader.state_dict().items() if k not in ("epoch", "index")}
    return {
        "base_model": {"config": _digest(model), "quantized": quantized, "weights": weights_fingerprint(params)},
        "lora": None  # full fine-tuning
        if lora is None
        else {
            "r": lora.r,
            "lora_alpha": float(lora.lora_alpha),
            "lora_dropout": float(lora.lora_dropout),
            "target_modules": sorted(lora.target_modules),
            "use_rslora": lora.use_rslora,
            "train_embeddings": lora.train_embeddings,
            "train_lm_head": lora.train_lm_head,
        },
        "optimizer": {
            "learning_rate": tc.learning_rate,
            "warmup_steps": tc.warmup_steps,
            "warmup_ratio": tc.warmup_ratio,
            "lr_scheduler_type": tc.lr_scheduler_type,
            "weight_decay": tc.weight_decay,
            "max_grad_norm": tc.max_grad_norm,
            "gradient_accumulation_steps": tc.gradient_accumulation_steps,
            "seed": tc.seed,
        },
        "data": data,
    }


def _differences(saved, current, prefix: str = ""):
    if isinstance(saved, dict) and isinstance(current, dict):
        for key in dict.fromkeys([*current, *saved]):  # in the identity's order (a set's would vary per process)
            yield from _differences(saved.get(key), current.get(key), f"{prefix}.{key}" if prefix else key)
    elif saved != current:
        yield prefix, saved, current


def check_identity(saved: dict, current: dict, where: str) -> None:
    """Raises ResumeMismatchError naming the first differing setting (in the order of run_identity)."""
    order = list(LABELS)
    diffs = sorted(_differences(saved, current), key=lambda d: order.index(d[0]) if d[0] in order else len(order))
    if not diffs:
        return
    name, old, new = diffs[0]
    label = LABELS.get(name, name.replace("data.", "data ").replace(".", " "))
    raise ResumeMismatchError(
        f"cannot resume from {where}: it was trained with {label} = {old!r}, this run has {new!r}; start fresh "
        "there with --overwrite (overwrite=True), or choose another output directory"
    )
