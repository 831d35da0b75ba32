"""The frozen model configuration: every family difference of the generic decoder is a field here."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "gemma", "gemma2", "qwen2", "phi3")


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

    Layer kinds: ``layer_types[i]`` is "full_attention" or "sliding_attention" (window ``sliding_window``).
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
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    activation: str = "silu"  # silu (SwiGLU) or gelu_tanh (GeGLU)
    norm_weight_offset: float = 0.0  # Gemma stores RMSNorm weights minus one
    scale_embeddings: bool = False  # Gemma multiplies embeddings by sqrt(hidden_size)
    qkv_bias: bool = False  # Qwen 2
    post_norms: bool = False  # Gemma 2: norms after attention and after the MLP too
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    query_pre_attn_scalar: float | None = None
    fused_qkv: bool = False  # Phi-3 checkpoints fuse q,k,v and gate,up; the converter splits them
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


def _get(d: dict, *names, default=None):
    for n in names:
        if d.get(n) is not None:
            return d[n]
    return default


def rope_config_from_hf(d: dict[str, Any]) -> RopeConfig:
    """Reads both transformers 5's ``rope_parameters`` and older ``rope_theta`` + ``rope_scaling``."""
    params = dict(d.get("rope_parameters") or {})
    if "full_attention" in params and isinstance(params["full_attention"], dict):
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


def config_from_hf_dict(d: dict[str, Any]) -> ModelConfig:
    """Hugging Face ``config.json`` contents -> ModelConfig. Raises ValueError naming what is unsupported."""
    mt = d.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {mt!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in d:
            raise ValueError(f"config.json lacks required field {key!r} for model_type {mt!r}")
    heads = d["num_attention_heads"]
    head_dim = d.get("head_dim") or d["hidden_size"] // heads
    gemma = mt in ("gemma", "gemma2")
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
    if mt == "qwen2" and not d.get("use_sliding_window", False):
        window = None
    layer_types = tuple(d.get("layer_types") or ())
    if mt == "gemma2" and not layer_types:
        layer_types = tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers))
    if not window:
        layer_types = ("full_attention",) * n_layers
        window = None
    eos = d.get("eos_token_id")
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
        max_position_embeddings=d.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", gemma)),
        activation=activation,
        norm_weight_offset=1.0 if gemma else 0.0,
        scale_embeddings=gemma,
        qkv_bias=bool(d.get("attention_bias", mt == "qwen2")),
        post_norms=mt == "gemma2",
        sliding_window=window,
        layer_types=layer_types,
        attn_logit_softcap=d.get("attn_logit_softcapping") if mt == "gemma2" else None,
        final_logit_softcap=d.get("final_logit_softcapping") if mt == "gemma2" else None,
        query_pre_attn_scalar=d.get("query_pre_attn_scalar") if mt == "gemma2" else None,
        fused_qkv=mt == "phi3",
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=d.get("pad_token_id"),
        hf_config=json.dumps(d, sort_keys=True),
    )


def rope_inv_freq(config: ModelConfig, seq_len: int | None = None):
    """The (inv_freq [rotary_dim / 2] as numpy f32, attention_scaling) pair transformers computes.

    ``seq_len`` picks longrope's long factors when it exceeds the original context (Phi-3), as transformers does.
    """
    import numpy as np

    r = config.rope
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
        inv, scaling = _yarn(config, pos_freqs, dim)
    elif r.kind == "longrope":
        orig = r.original_max_position_embeddings or config.max_position_embeddings
        factor = r.factor if r.factor != 1.0 else config.max_position_embeddings / orig
        scaling = r.attention_factor
        if scaling is None:
            scaling = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
        ext = r.long_factor if seq_len and seq_len > orig else r.short_factor
        inv = (1.0 / (np.asarray(ext, np.float32) * pos_freqs)).astype(np.float32)
    return inv.astype(np.float32), float(scaling)


def _yarn(config: ModelConfig, pos_freqs, dim):
    import numpy as np

    r = config.rope
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
