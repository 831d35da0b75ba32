"""The reference model of a DPO or KTO run, as TRL chooses it.

With a LoRA adapter and no ``ref_model`` the reference is the policy's own weights with the adapter off (no second
copy; the step runs them twice). An explicit ``ref_model`` (a model directory, Hub id or jaxsloth Model, as TRL's
``DPOTrainer(model, ref_model=...)``) is loaded once and held frozen beside the policy, and so is, in full
fine-tuning without one, a copy of the initial weights (TRL's ``create_reference_model``) unless the reference
log-probs are precomputed, which needs no copy at all. The reference must read the policy's tokens: a different
vocabulary or tokenizer is an error.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp

from jaxsloth.config import TrainConfig
from jaxsloth.models.config import ModelConfig
from jaxsloth.quant import is_nf4

log = logging.getLogger("jaxsloth")


@dataclasses.dataclass
class Reference:
    """A frozen reference model: its architecture and weights (stacked layers, maybe NF4)."""

    config: ModelConfig
    params: dict


def _quantized(params: dict) -> bool:
    return any(is_nf4(x) for x in jax.tree.leaves(params, is_leaf=is_nf4))


def _gib(params: dict) -> float:
    return sum(x.nbytes for x in jax.tree.leaves(params)) / 2**30


def _load(model: Any, path: str | os.PathLike, tokenizer: Any) -> Reference:
    """A reference from a model directory or Hub id, in the policy's dtype (NF4 where the policy is), its
    tokenizer (when it has one) checked against the policy's."""
    from converters.hf import load_hf_model
    from jaxsloth.hub import load_tokenizer, resolve_model

    local = resolve_model(path)
    config, params = load_hf_model(local, dtype=model.profile.dtype, load_in_4bit=_quantized(model.params))
    if tokenizer is not None and config.vocab_size == model.config.vocab_size:
        theirs = load_tokenizer(local)
        if theirs is not None and theirs.get_vocab() != tokenizer.get_vocab():
            raise ValueError(
                f"ref_model {os.fspath(path)}: its tokenizer differs from the policy's (another vocabulary); the "
                "reference must score the policy's tokens"
            )
    return Reference(config, params)


def _from_model(model: Any, ref: Any) -> Reference:
    """A reference from a jaxsloth Model (its adapter merged in, as a PEFT model given as TRL's ref_model)."""
    from jaxsloth.lora import merge

    params = ref.params if ref.trainable is None else merge(ref.params, ref.trainable, ref.lora)
    policy = {id(x) for x in jax.tree.leaves(model.params)}
    if any(id(x) in policy for x in jax.tree.leaves(params)):
        # The policy's own arrays: training takes (donates) or re-lays them out, so the reference holds its own.
        params = jax.tree.map(jnp.copy, params)
    return Reference(ref.config, params)


def resolve_reference(model: Any, tokenizer: Any, tc: TrainConfig, needs_reference: bool) -> Reference | None:
    """The run's separate reference model, or None where the adapter-off policy is the reference (LoRA without
    ref_model). model: the policy (``jaxsloth.api.Model``). Raises ValueError for a reference whose vocabulary or
    tokenizer is not the policy's."""
    ref = tc.ref_model
    if not needs_reference:
        if ref is not None:
            log.warning("ref_model ignored: method=%r uses no reference model", tc.method)
        return None
    if ref is None:
        if not model.full_finetuning:
            return None
        if tc.precompute_ref_log_probs:  # scored once before the first step changes them: no copy needed
            return Reference(model.config, model.params)
        log.info(
            "full fine-tuning: the reference is a frozen copy of the initial weights (%.1f GiB; "
            "precompute_ref_log_probs=True scores the data once instead)",
            _gib(model.params),
        )
        return Reference(model.config, jax.tree.map(jnp.copy, model.params))
    if isinstance(ref, str | os.PathLike):
        name, reference = os.fspath(ref), _load(model, ref, tokenizer)
    elif hasattr(ref, "config") and hasattr(ref, "params"):
        name, reference = getattr(ref, "path", None) or "(a jaxsloth Model)", _from_model(model, ref)
    else:
        raise TypeError(f"ref_model must be a model directory, a Hub id or a jaxsloth Model, got {type(ref).__name__}")
    if reference.config.vocab_size != model.config.vocab_size:
        raise ValueError(
            f"ref_model {name}: vocab_size {reference.config.vocab_size} differs from the policy's "
            f"{model.config.vocab_size}; the reference must share the policy's tokenizer"
        )
    return reference
