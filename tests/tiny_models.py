"""Tiny random Hugging Face models with odd sizes (no power-of-two dimension where the architecture allows), built
with transformers and saved with save_pretrained: the independent reference for every model test."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np

# hidden 96, intermediate 136, vocab 131, 6 query / 2 kv heads of dim 16 (rope needs an even head dim; 16 keeps
# GQA grouping 3), 3 layers (4 for Gemma 2 so its alternating layers scan in two groups).
_COMMON = dict(
    vocab_size=131,
    hidden_size=96,
    intermediate_size=136,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    initializer_range=0.1,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

FAMILIES = ("llama", "llama_tied", "mistral", "gemma", "gemma2", "qwen2", "phi3", "phi3_longrope")
SLIDING_WINDOW = 7


def hf_config(family: str):
    from transformers import (
        Gemma2Config,
        GemmaConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
    )

    c = dict(_COMMON)
    if family == "llama":
        return LlamaConfig(
            **c,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    if family == "llama_tied":
        return LlamaConfig(**c, tie_word_embeddings=True)
    if family == "mistral":
        return MistralConfig(**c, sliding_window=SLIDING_WINDOW)
    if family == "gemma":
        return GemmaConfig(**c, hidden_activation="gelu_pytorch_tanh")
    if family == "gemma2":
        c["num_hidden_layers"] = 4
        return Gemma2Config(
            **c,
            sliding_window=SLIDING_WINDOW,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
        )
    if family == "qwen2":
        return Qwen2Config(**c)
    if family == "phi3":
        return Phi3Config(**c)
    if family == "phi3_longrope":
        half = c["head_dim"] // 2
        rng = np.random.default_rng(0)
        return Phi3Config(
            **c,
            original_max_position_embeddings=64,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "short_factor": [float(x) for x in 1 + rng.random(half)],
                "long_factor": [float(x) for x in 2 + rng.random(half)],
            },
        )
    raise ValueError(family)


@functools.cache
def saved_model(family: str, dtype: str = "float32") -> Path:
    """Builds (seeded) and saves a tiny HF model once per test session; returns its directory."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = hf_config(family)
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").to(getattr(torch, dtype))
    with torch.no_grad():  # non-identity norm weights, so a wrong norm convention cannot hide
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (0.0 if "gemma" in family else 1.0))
    path = Path(tempfile.mkdtemp(prefix=f"tiny-{family}-")) / "model"
    model.save_pretrained(path)
    return path


def hf_model(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    return m.eval()


def random_trainable(config, params, lora, seed=0):
    """A LoRA tree with every leaf random and non-zero (B included; trained embedding copies perturbed away from
    the frozen ones), so an export that drops or misplaces any part changes the logits."""
    import jax

    from jaxsloth.lora import init_lora

    tree = init_lora(config, lora, jax.random.key(seed), params=params)
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(
        treedef, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)]
    )


def lora_logits(params, trainable, lora, config, ids):
    """jaxsloth's logits [B, T, V] with the adapter applied unmerged."""
    import jax.numpy as jnp

    from jaxsloth.lora import with_trainable
    from jaxsloth.models import forward

    p, tree = with_trainable(params, trainable)
    return np.asarray(forward(p, jnp.asarray(ids), config=config, lora=tree, lora_rt=lora.runtime))
