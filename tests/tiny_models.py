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

# The families added through config fields alone (each with the fields of its published configs, at tiny sizes, 2
# layers; 4 for Gemma 3, so a global layer follows its sliding ones and the pattern ends part-way, as in its 26-,
# 34- and 62-layer models): the parity, export, generation and PEFT-step tests run them all.
NEW_FAMILIES = ("qwen3", "qwen2.5", "gemma3", "mistral_nemo", "phi4", "llama3.3", "smollm2")
# The new families whose forward or backward runs code the first ones do not (q/k norms, per-layer-kind RoPE,
# projections that are not hidden x hidden, fused projections with grouped kv heads). The others (Qwen 2.5,
# Llama 3.3, SmolLM2) are the Qwen 2 and Llama layouts with other values: the slower generation and training-step
# tests run their layouts once, with the first families.
NEW_CODE_FAMILIES = ("qwen3", "gemma3", "mistral_nemo", "phi4")
FAMILIES = ("llama", "llama_tied", "mistral", "gemma", "gemma2", "qwen2", "phi3", "phi3_longrope", *NEW_FAMILIES)
SLIDING_WINDOW = 7


def hf_config(family: str):
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        GemmaConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    c = dict(_COMMON)
    if family in NEW_FAMILIES:
        c["num_hidden_layers"] = 2
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
    if family == "qwen3":  # Qwen3-8B: q/k norms, no bias, head_dim 128 not hidden / heads on the smaller ones
        c.update(num_attention_heads=4, rms_norm_eps=1e-6)
        return Qwen3Config(
            **c, rope_theta=1000000.0, attention_bias=False, use_sliding_window=False, max_window_layers=2
        )
    if family == "qwen2.5":  # Qwen2.5-0.5B / 1.5B / 3B: tied, window fields present but unused
        c.update(rms_norm_eps=1e-6)
        return Qwen2Config(
            **c,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
            use_sliding_window=False,
            sliding_window=32768,
            max_window_layers=2,
        )
    if family == "gemma3":  # Gemma-3-4B/12B text: global layers at pattern 3 here (6 in the real models)
        c.update(num_hidden_layers=4, num_attention_heads=4, rms_norm_eps=1e-6)
        return Gemma3TextConfig(
            **c,
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=24,
            sliding_window=SLIDING_WINDOW,
            sliding_window_pattern=3,
            rope_theta=1000000.0,
            rope_local_base_freq=10000.0,
            rope_scaling={"rope_type": "linear", "factor": 8.0},
            final_logit_softcapping=None,
            attn_logit_softcapping=None,
        )
    if family == "mistral_nemo":  # Mistral-Nemo / Mistral-Small: head_dim 128 with hidden 5120 and 32 heads
        c.update(num_attention_heads=4)
        return MistralConfig(**c, rope_theta=1000000.0, sliding_window=None)
    if family == "phi4":  # Phi-4: the Phi-3 layout with grouped kv heads, no window
        return Phi3Config(**c, rope_theta=250000.0, sliding_window=None, original_max_position_embeddings=256)
    if family == "llama3.3":  # Llama-3.3-70B: llama3 RoPE, several EOS ids
        return LlamaConfig(
            **{**c, "eos_token_id": [2, 3, 4]},
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    if family == "smollm2":  # SmolLM2-1.7B: multi-head attention (kv heads = heads), tied, theta 130000
        c.update(num_key_value_heads=c["num_attention_heads"])
        return LlamaConfig(**c, rope_theta=130000.0, tie_word_embeddings=True)
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


@functools.cache
def saved_gemma3_multimodal() -> Path:
    """A tiny Gemma 3 image-text checkpoint (SigLIP tower of one layer) whose text tower is the "gemma3" family's
    config, saved as transformers saves Gemma3ForConditionalGeneration (the Hub's language_model.model.* names)."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    torch.manual_seed(0)
    vision = SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    cfg = Gemma3Config(
        text_config=hf_config("gemma3").to_dict(),
        vision_config=vision.to_dict(),
        mm_tokens_per_image=4,
        boi_token_index=128,
        eoi_token_index=129,
        image_token_index=130,
    )
    model = Gemma3ForConditionalGeneration(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    path = Path(tempfile.mkdtemp(prefix="tiny-gemma3-multimodal-")) / "model"
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
