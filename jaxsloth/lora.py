"""LoRA / rsLoRA adapters: the trainable pytree beside the frozen params.

Layout follows PEFT so export is a rename: for a projection W [out, in], A [r, in] (``lora_A.weight``) and
B [out, r] (``lora_B.weight``); the layer computes ``x @ W^T + scale * (dropout(x) @ A^T) @ B^T`` with
scale = lora_alpha / r, or lora_alpha / sqrt(r) for rsLoRA (``LoraConfig``, defined in jaxsloth.config). Stacked
per layer like the params: A [L, r, in], B [L, out, r].

Trainable tree::

    {"layers": {name: {"a", "b"}}, "embed": [V, D] (optional), "lm_head": [V, D] (optional)}

Embeddings and LM head, when trained (continued pretraining), are full copies, like PEFT's ``modules_to_save``.
In a mixture of experts, target_modules' gate_proj/up_proj/down_proj adapt every expert (``jaxsloth.models.moe``:
"experts_gate_up", "experts_down" with A [L, E, r, in], B [L, E, out, r]).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxsloth.config import LoraConfig
from jaxsloth.models.config import ModelConfig
from jaxsloth.models.decoder import linear_shapes
from jaxsloth.models.moe import expert_shapes
from jaxsloth.models.moe import lora_targets as moe_lora_targets

__all__ = ["LoraConfig", "count_trainable", "init_lora", "lora_delta", "merge", "unmerge", "with_trainable"]


def init_lora(config: ModelConfig, lora: LoraConfig, key: jax.Array, params=None, dtype=jnp.float32) -> dict:
    """PEFT's initialisation: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0.

    ``params`` is needed only when embeddings / LM head are trained (their copies start from the frozen values).
    """
    shapes = {name: (config.num_layers, *shape) for name, shape in linear_shapes(config).items()}
    targets = [name for name in lora.target_modules if name in shapes]
    if config.is_moe:  # PEFT's target_parameters LoRA per expert: [L, E, r, in] and [L, E, out, r]
        shapes.update({name: (config.num_layers, *shape) for name, shape in expert_shapes(config).items()})
        experts = moe_lora_targets(config, lora.target_modules)
        if experts and lora.lora_dropout:
            raise ValueError(
                f"lora_dropout={lora.lora_dropout} with LoRA on experts: PEFT's expert LoRA (target_parameters) has "
                "no dropout; set lora_dropout=0 or leave gate_proj, up_proj and down_proj out of target_modules"
            )
        targets += experts
    layers = {}
    keys = jax.random.split(key, len(targets))
    for k, name in zip(keys, targets, strict=True):
        *lead, out, inp = shapes[name]
        bound = 1.0 / math.sqrt(inp)
        a = jax.random.uniform(k, (*lead, lora.r, inp), jnp.float32, -bound, bound).astype(dtype)
        layers[name] = {"a": a, "b": jnp.zeros((*lead, out, lora.r), dtype)}
    tree: dict = {"layers": layers}
    if lora.train_embeddings or lora.train_lm_head:
        if params is None:
            raise ValueError("training embeddings or the LM head needs the params to copy them from")
        if lora.train_embeddings:
            tree["embed"] = jnp.asarray(params["embed"], dtype)
        if lora.train_lm_head:
            if config.tie_word_embeddings:
                raise ValueError("train_lm_head with tied embeddings: set train_embeddings instead")
            tree["lm_head"] = jnp.asarray(params["lm_head"], dtype)
    return tree


def with_trainable(params: dict, trainable: dict) -> tuple[dict, dict]:
    """(params with trained embed / lm_head copies swapped in, the LoRA tree for the decoder)."""
    overrides = {k: trainable[k] for k in ("embed", "lm_head") if k in trainable}
    return ({**params, **overrides} if overrides else params), {"layers": trainable["layers"]}


def lora_delta(ab: dict, scale: float) -> jax.Array:
    """scale * B @ A: the change LoRA makes to W, [..., out, in] in f32."""
    return scale * jnp.einsum("...or,...ri->...oi", ab["b"].astype(jnp.float32), ab["a"].astype(jnp.float32))


def merge(params: dict, trainable: dict, lora: LoraConfig, dtype=None) -> dict:
    """W + scale * B @ A for every adapted projection (NF4 weights are dequantized first); embed / lm_head copies
    replace the frozen ones. Returns dense params in ``dtype`` (default: each weight's own dtype, bf16 for NF4)."""
    from jaxsloth.quant import dequantize_nf4, is_nf4

    params, lora_tree = with_trainable(params, trainable)
    layers = dict(params["layers"])
    for name, ab in lora_tree["layers"].items():
        w = layers[name]["weight"]
        dense = dequantize_nf4(w, dtype or jnp.bfloat16) if is_nf4(w) else w
        merged = (dense.astype(jnp.float32) + lora_delta(ab, lora.scale)).astype(dtype or dense.dtype)
        layers[name] = {**layers[name], "weight": merged}
    return {**params, "layers": layers}


def unmerge(params: dict, trainable: dict, lora: LoraConfig) -> dict:
    """Inverse of ``merge`` for dense weights: W - scale * B @ A (up to rounding in low precision)."""
    layers = dict(params["layers"])
    for name, ab in trainable["layers"].items():
        w = layers[name]["weight"]
        layers[name] = {**layers[name], "weight": (w.astype(jnp.float32) - lora_delta(ab, lora.scale)).astype(w.dtype)}
    return {**params, "layers": layers}


def count_trainable(trainable: dict) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(trainable))
