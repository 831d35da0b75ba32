"""The frozen model configuration: every family difference of the generic decoder is a field here."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

SUPPORTED_MODEL_TYPES = (
    "llama",
    "mistral",
    "gemma",
    "gemma2",
    "qwen2",
    "phi3",
    "qwen3",
    "gemma3_text",
    "qwen3_moe",
    "mixtral",
)
# config.json model types read as one of the above: Gemma 3's multimodal checkpoints, whose text tower is read alone.
TEXT_TOWER_MODEL_TYPES = ("gemma3",)

# Gemma3TextConfig's defaults: the text_config of a multimodal Gemma 3 config.json lists only what differs from them.
GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "sliding_window_pattern": 6,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
    "tie_word_embeddings": True,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "pad_token_id": 0,
}


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """RoPE frequency settings. ``kind``: default, linear, llama3, yarn or longrope."""

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    partial_rotary_factor: float = 1.0

    def __post_init__(self):
        if self.kind not in ("default", "linear", "llama3", "yarn", "longrope"):
            raise ValueError(f"unsupported rope_type {self.kind!r}; supported: default, linear, llama3, yarn, longrope")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One decoder, every family: the HF config's meaning, with derived values as properties.

    Layer kinds: ``layer_types[i]`` is "full_attention" or "sliding_attention" (window ``sliding_window``); sliding
    layers rotate with ``local_rope`` where the family gives them their own RoPE (Gemma 3), else with ``rope``.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = dataclasses.field(default_factory=RopeConfig)
    local_rope: RopeConfig | None = None  # Gemma 3: sliding layers' own base frequency, without global scaling
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    activation: str = "silu"  # silu (SwiGLU) or gelu_tanh (GeGLU)
    norm_weight_offset: float = 0.0  # Gemma stores RMSNorm weights minus one
    scale_embeddings: bool = False  # Gemma multiplies embeddings by sqrt(hidden_size)
    qkv_bias: bool = False  # Qwen 2
    qk_norm: bool = False  # Qwen 3, Gemma 3: RMSNorm over each head of q and k (weights [head_dim]) before RoPE
    post_norms: bool = False  # Gemma 2 and 3: norms after attention and after the MLP too
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    query_pre_attn_scalar: float | None = None
    fused_qkv: bool = False  # Phi-3 checkpoints fuse q,k,v and gate,up; the converter splits them
    # Mixture of experts (Qwen 3 MoE, Mixtral; 0 experts: a dense MLP): every layer's MLP is ``num_experts`` GLU
    # experts of width ``moe_intermediate_size``, of which a router picks ``num_experts_per_tok`` per token.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # the top-k routing weights renormalised to sum to one (Mixtral always)
    router_aux_loss_coef: float = 0.0
    output_router_logits: bool = False  # training adds router_aux_loss_coef x the load-balancing loss
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    hf_config: str = ""  # the original config.json text, written back unchanged on export

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.activation not in ("silu", "gelu_tanh"):
            raise ValueError(f"unsupported activation {self.activation!r}; supported: silu, gelu_tanh")
        if not self.layer_types:
            kind = "sliding_attention" if self.sliding_window else "full_attention"
            object.__setattr__(self, "layer_types", (kind,) * self.num_layers)
        if len(self.layer_types) != self.num_layers:
            raise ValueError(f"{len(self.layer_types)} layer_types for {self.num_layers} layers")
        bad = set(self.layer_types) - {"full_attention", "sliding_attention"}
        if bad:
            raise ValueError(f"unsupported layer_types {sorted(bad)}")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ValueError("sliding_attention layers need a sliding_window")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} for {self.num_experts} experts")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        return tuple(t == "sliding_attention" for t in self.layer_types)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rope.partial_rotary_factor)

    def window_for(self, sliding: bool) -> int | None:
        return self.sliding_window if sliding else None

    def rope_for(self, sliding: bool) -> RopeConfig:
        return self.local_rope if sliding and self.local_rope is not None else self.rope


def _get(d: dict, *names, default=None):
    for n in names:
        if d.get(n) is not None:
            return d[n]
    return default


def rope_config_from_hf(d: dict[str, Any], layer_type: str = "full_attention") -> RopeConfig:
    """Reads both transformers 5's ``rope_parameters`` and older ``rope_theta`` + ``rope_scaling``.

    ``layer_type``: whose RoPE to read where ``rope_parameters`` holds one per layer type (Gemma 3); older Gemma 3
    configs give sliding layers ``rope_local_base_freq`` and no scaling."""
    params = dict(d.get("rope_parameters") or {})
    if isinstance(params.get(layer_type), dict):
        params = dict(params[layer_type])
    elif layer_type == "sliding_attention":
        return RopeConfig(theta=float(d.get("rope_local_base_freq") or 10000.0))
    elif "full_attention" in params and isinstance(params["full_attention"], dict):
        params = dict(params["full_attention"])
    scaling = dict(d.get("rope_scaling") or {})
    merged = {**scaling, **params}
    kind = merged.get("rope_type") or merged.get("type") or "default"
    if kind == "su":  # Phi-3's early name for longrope
        kind = "longrope"
    theta = _get(merged, "rope_theta", default=_get(d, "rope_theta", default=10000.0))
    orig = _get(merged, "original_max_position_embeddings", default=d.get("original_max_position_embeddings"))
    return RopeConfig(
        theta=float(theta),
        kind=kind,
        factor=float(merged.get("factor") or 1.0),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=orig,
        attention_factor=merged.get("attention_factor"),
        beta_fast=float(merged.get("beta_fast") or 32.0),
        beta_slow=float(merged.get("beta_slow") or 1.0),
        mscale=merged.get("mscale"),
        mscale_all_dim=merged.get("mscale_all_dim"),
        truncate=bool(merged.get("truncate", True)),
        short_factor=tuple(merged["short_factor"]) if merged.get("short_factor") else None,
        long_factor=tuple(merged["long_factor"]) if merged.get("long_factor") else None,
        partial_rotary_factor=float(_get(merged, "partial_rotary_factor", default=d.get("partial_rotary_factor", 1.0))),
    )


def text_config(d: dict[str, Any]) -> dict[str, Any]:
    """The config.json of the text model alone, as transformers reads it: Gemma 3's (a multimodal checkpoint's
    ``text_config``, with the top level's token ids) with Gemma3TextConfig's defaults for the fields it leaves out;
    any other config as it is."""
    if d.get("model_type") not in ("gemma3", "gemma3_text"):
        return d
    text = d
    if d["model_type"] == "gemma3":
        shared = ("bos_token_id", "eos_token_id", "pad_token_id", "quantization_config")
        tower = {k: d[k] for k in shared if d.get(k) is not None}
        text = {**tower, **(d.get("text_config") or {}), "architectures": ["Gemma3ForCausalLM"]}
    given = {k: v for k, v in text.items() if v is not None}
    return {**GEMMA3_TEXT_DEFAULTS, **given, "model_type": "gemma3_text"}


def config_from_hf_dict(d: dict[str, Any]) -> ModelConfig:
    """Hugging Face ``config.json`` contents -> ModelConfig. Raises ValueError naming what is unsupported.

    A multimodal Gemma 3 config gives its text tower's ModelConfig (``hf_config`` then holds the text config, so a
    merged export is a text-only Gemma 3 checkpoint)."""
    mt = d.get("model_type")
    known = SUPPORTED_MODEL_TYPES + TEXT_TOWER_MODEL_TYPES
    if mt not in known:
        raise ValueError(f"unsupported model_type {mt!r}; supported: {', '.join(known)}")
    # What export writes back: the config as given, but a multimodal one's text config (the export is text-only).
    original = d if mt in SUPPORTED_MODEL_TYPES else None
    d = text_config(d)
    mt = d["model_type"]
    if d.get("use_bidirectional_attention"):
        raise ValueError(f"use_bidirectional_attention=true (an embedding model) is unsupported for {mt!r}")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in d:
            raise ValueError(f"config.json lacks required field {key!r} for model_type {mt!r}")
    heads = d["num_attention_heads"]
    head_dim = d.get("head_dim") or d["hidden_size"] // heads
    gemma = mt in ("gemma", "gemma2", "gemma3_text")
    # Gemma 2 and 3 read softcaps (null in Gemma 3's configs) and query_pre_attn_scalar from the config.
    gemma_attention = mt in ("gemma2", "gemma3_text")
    act = d.get("hidden_activation") or d.get("hidden_act") or "silu"
    if act in ("gelu_pytorch_tanh", "gelu_tanh", "gelu") and gemma:
        # transformers runs Gemma with the tanh approximation even when the config says "gelu".
        activation = "gelu_tanh"
    elif act == "silu":
        activation = "silu"
    else:
        raise ValueError(f"unsupported activation {act!r} for model_type {mt!r}")
    n_layers = d["num_hidden_layers"]
    window = d.get("sliding_window")
    if mt in ("qwen2", "qwen3", "qwen3_moe") and not d.get("use_sliding_window", False):
        window = None
    layer_types = tuple(d.get("layer_types") or ())
    if mt == "gemma2" and not layer_types:
        layer_types = tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers))
    if mt == "gemma3_text" and not layer_types:  # every sliding_window_pattern-th layer is global
        pattern = d.get("sliding_window_pattern") or 6
        layer_types = tuple(
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers)
        )
    if not window:
        layer_types = ("full_attention",) * n_layers
        window = None
    eos = d.get("eos_token_id")
    moe = moe_fields_from_hf(d, mt, n_layers)
    return ModelConfig(
        model_type=mt,
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope=rope_config_from_hf(d),
        local_rope=rope_config_from_hf(d, "sliding_attention") if mt == "gemma3_text" else None,
        max_position_embeddings=d.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", gemma)),
        activation=activation,
        norm_weight_offset=1.0 if gemma else 0.0,
        scale_embeddings=gemma,
        qkv_bias=bool(d.get("attention_bias", mt == "qwen2")),
        qk_norm=mt in ("qwen3", "gemma3_text", "qwen3_moe"),
        post_norms=mt in ("gemma2", "gemma3_text"),
        sliding_window=window,
        layer_types=layer_types,
        attn_logit_softcap=d.get("attn_logit_softcapping") if gemma_attention else None,
        final_logit_softcap=d.get("final_logit_softcapping") if gemma_attention else None,
        query_pre_attn_scalar=d.get("query_pre_attn_scalar") if gemma_attention else None,
        fused_qkv=mt == "phi3",
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=d.get("pad_token_id"),
        hf_config=json.dumps(original or d, sort_keys=True),
        **moe,
    )


def moe_fields_from_hf(d: dict[str, Any], model_type: str, num_layers: int) -> dict[str, Any]:
    """The mixture-of-experts fields of ModelConfig from a Qwen 3 MoE or Mixtral config.json ({} for dense models).

    Layers with a dense MLP among the sparse ones (Qwen 3 MoE's ``mlp_only_layers``, ``decoder_sparse_step`` > 1) and
    Mixtral's router jitter are unsupported: every published checkpoint of both families has neither."""
    if model_type not in ("qwen3_moe", "mixtral"):
        return {}
    if model_type == "mixtral":
        experts, width, norm = _get(d, "num_local_experts", "num_experts", default=8), d["intermediate_size"], True
        if d.get("router_jitter_noise"):
            raise ValueError(f"router_jitter_noise={d['router_jitter_noise']} is unsupported (published Mixtrals: 0)")
    else:
        # transformers 5 writes num_local_experts, the Hub's configs num_experts
        experts = _get(d, "num_experts", "num_local_experts", default=128)
        width, norm = d.get("moe_intermediate_size", 768), d.get("norm_topk_prob")
        dense = sorted(set(d.get("mlp_only_layers") or ()) & set(range(num_layers)))
        step = d.get("decoder_sparse_step", 1)
        if dense or (experts and any((i + 1) % step for i in range(num_layers))):
            raise ValueError(
                f"dense MLP layers among the expert layers (mlp_only_layers={dense}, decoder_sparse_step={step}) "
                "are unsupported; every layer must be a mixture of experts"
            )
    return dict(
        num_experts=int(experts),
        num_experts_per_tok=int(d.get("num_experts_per_tok", 2)),
        moe_intermediate_size=int(width),
        norm_topk_prob=bool(norm),
        router_aux_loss_coef=float(d.get("router_aux_loss_coef", 0.001)),
        output_router_logits=bool(d.get("output_router_logits", False)),
    )


def rope_inv_freq(config: ModelConfig, seq_len: int | None = None, sliding: bool = False):
    """The (inv_freq [rotary_dim / 2] as numpy f32, attention_scaling) pair transformers computes.

    ``seq_len`` picks longrope's long factors when it exceeds the original context (Phi-3), as transformers does;
    ``sliding``: the RoPE of sliding-window layers (``ModelConfig.rope_for``).
    """
    import numpy as np

    r = config.rope_for(sliding)
    dim = config.rotary_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim
    pos_freqs = np.float32(r.theta) ** exponents
    inv = (1.0 / pos_freqs).astype(np.float32)
    scaling = 1.0
    if r.kind == "linear":
        inv = inv / np.float32(r.factor)
    elif r.kind == "llama3":
        old = r.original_max_position_embeddings
        low_wl, high_wl = old / r.low_freq_factor, old / r.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wl, inv / r.factor, inv)
        smooth = (old / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
        smoothed = (1 - smooth) * scaled / r.factor + smooth * scaled
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    elif r.kind == "yarn":
        inv, scaling = _yarn(config, r, pos_freqs, dim)
    elif r.kind == "longrope":
        orig = r.original_max_position_embeddings or config.max_position_embeddings
        factor = r.factor if r.factor != 1.0 else config.max_position_embeddings / orig
        scaling = r.attention_factor
        if scaling is None:
            scaling = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
        ext = r.long_factor if seq_len and seq_len > orig else r.short_factor
        inv = (1.0 / (np.asarray(ext, np.float32) * pos_freqs)).astype(np.float32)
    return inv.astype(np.float32), float(scaling)


def _yarn(config: ModelConfig, r: RopeConfig, pos_freqs, dim):
    import numpy as np

    factor = r.factor
    orig = r.original_max_position_embeddings or config.max_position_embeddings

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    scaling = r.attention_factor
    if scaling is None:
        if r.mscale and r.mscale_all_dim:
            scaling = mscale(factor, r.mscale) / mscale(factor, r.mscale_all_dim)
        else:
            scaling = mscale(factor)

    def corr_dim(rot):
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(r.theta))

    low, high = corr_dim(r.beta_fast), corr_dim(r.beta_slow)
    if r.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrap = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrap) + (1.0 / pos_freqs) * extrap
    return inv.astype(np.float32), float(scaling)
