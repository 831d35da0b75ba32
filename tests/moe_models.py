"""Tiny random mixture-of-experts models (Qwen 3 MoE, Mixtral) with their published configs' fields at tiny sizes,
built with transformers and saved with save_pretrained (one tensor per expert, as the Hub checkpoints are)."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

MOE_FAMILIES = ("qwen3_moe", "mixtral")

_COMMON = dict(
    vocab_size=131,
    hidden_size=96,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    rope_theta=1000000.0,
    output_router_logits=True,  # training adds the load-balancing loss (the published configs say false)
)


def hf_moe_config(family: str):
    from transformers import MixtralConfig, Qwen3MoeConfig

    if family == "qwen3_moe":  # Qwen3-30B-A3B: 128 experts, 8 per token, renormalised, q/k norms, coef 0.001
        return Qwen3MoeConfig(
            **_COMMON,
            intermediate_size=136,
            moe_intermediate_size=40,
            num_experts=8,
            num_experts_per_tok=3,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            router_aux_loss_coef=0.001,
            rms_norm_eps=1e-6,
            attention_bias=False,
            use_sliding_window=False,
            tie_word_embeddings=False,
        )
    if family == "mixtral":  # Mixtral-8x7B: 8 experts, 2 per token, coef 0.02, no window
        return MixtralConfig(
            **_COMMON,
            intermediate_size=56,
            num_local_experts=5,
            num_experts_per_tok=2,
            router_aux_loss_coef=0.02,
            router_jitter_noise=0.0,
            rms_norm_eps=1e-5,
            sliding_window=None,
            tie_word_embeddings=False,
        )
    raise ValueError(family)


@functools.cache
def saved_moe_model(family: str) -> Path:
    """Builds (seeded) and saves a tiny HF MoE model once per test session; returns its directory."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = hf_moe_config(family)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float()
    with torch.no_grad():  # non-identity norm weights, so a wrong norm convention cannot hide
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + 1.0)
    path = Path(tempfile.mkdtemp(prefix=f"tiny-{family}-")) / "model"
    model.save_pretrained(path)
    return path
