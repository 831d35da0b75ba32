"""A per-token memory model of the training step (LoRA, QLoRA, full fine-tuning), to say before compiling whether a
length fits and which length is the longest that does.

Bytes, for hidden D, MLP width F, kv width K (kv heads x head dim), Hq query heads, L layers, e bytes per
activation (2 for bf16), g = remat_group (layers per residual checkpoint):

- fixed: frozen weights (bf16: 2 per weight; NF4: 0.5 + block statistics, ~0.516), LoRA weights with their
  gradient and two AdamW moments (4 x 4 bytes each; 8-bit moments: 2 x (1 + 4/256)), or in full fine-tuning a
  gradient (e) and the two moments for every weight (the per-tensor temporaries of the update are not counted:
  XLA fuses each tensor's update; the compiled plan check sees them), 1 GiB of XLA workspace, and the tiles of the MLP
  (3 F e per tiled token, x2 for gradients) and of the loss (the Pallas loss's [tile, 8192] gradient buffer; the
  chunked loss's [1024, V] f32 logits and their 16-bit gradient, beyond a layer's recompute temporaries).
- the input embedding table (V D e) moves from the device to the host with ``embedding="host"`` (untied heads).
- per token, residual checkpoints: (L / g) D e; on the host when remat is "offload", else on the device.
- per token, the recomputed scan step during backward: g x [(6 D + 2 K) e (normed input, q, k, v, attention
  output, o, residual) + 2 D e (gradients in flight) + 4 Hq (attention log-sum-exp)], plus 6 F e when the MLP
  is not tiled (gate, up, activation and their gradients).
- per token, outside the layers: the embedding output, final hidden and its f32 gradient (3 D e + 4 D), token
  arrays (16), and when the loss is not tiled the Pallas loss's gradient tile (8192 e), or the reference loss's
  f32 logits and their gradient (8 V); the chunked loss's f32 dhidden is the f32 gradient already counted.
- per token and layer, what the remat policy saves besides the residual (``_saved_by_policy``).
- context parallelism over c devices (``context``): each device holds tokens / c of every per-token term, and
  ring attention adds, per local token of the layer in flight, the K/V block received plus the one in transit
  (4 K e), the travelling f32 dK/dV accumulators and their copy in transit (16 K), and the f32 output / dQ
  accumulator with its log-sum-exp (4 Hq hd + 4 Hq). Weights are replicated over the context axis.
- mixture of experts (``_moe_terms``, fitted to XLA's compiled plan of the Qwen3-30B-A3B QLoRA step at 2 x 2048
  with 2 to 16 of its layers; tests/test_memory_model.py checks one and two): the MLP of the layer in flight works on
  k routed rows per token, k x [4 D e (gathered rows, expert outputs, their gradients) + 5 I e (gate/up, activation,
  gradients) + 8 I (the activation's f32 intermediates)] per token instead of 6 F e; the experts of that layer
  dequantized to 16 bits (QLoRA), fixed. The remat policies save no expert output (only the attention projections
  carry names). With 8-bit moments, 8 bytes per trained adapter value: the update holds the moments dequantized to
  f32, a GiB-scale term for expert adapters (0.6 billion values at r=16 in Qwen3-30B-A3B); f32 moments are updated
  in place (jaxsloth.train.optim8bit). Each layer's f32 adapters are sliced from the stacked tree inside its remat,
  so no slice is held from a layer's forward to its backward; the gradient's 4 bytes are in the trained bytes.
Checked against the H200 (8B QLoRA; BENCHMARKS.md, long context, and tests/test_long_context.py): the estimate stays
above every long-context measurement and XLA's compiled plan for 600,000 tokens, and within 20% of them; the
"gradients in flight" term is 2 D e, which keeps it so. It falls below one configuration no profile uses: offload
with an untiled MLP.
"""

from __future__ import annotations

import dataclasses

from jaxsloth.models.config import ModelConfig
from jaxsloth.models.decoder import ATTN_DOTS, linear_shapes, param_count
from jaxsloth.models.moe import expert_shapes
from jaxsloth.profiles import Profile

GIB = 2**30
XLA_WORKSPACE_BYTES = GIB  # reserved beside XLA's plan (GEMM workspaces, allocator slack): in ``fixed``
_CE_TILE = 8192  # the Pallas loss's vocabulary chunk (CrossEntropyBlocks.chunk_v)


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    device_gib: float
    host_gib: float
    fixed_gib: float
    device_bytes_per_token: float
    host_bytes_per_token: float
    host_fixed_gib: float = 0.0  # the input embedding table kept on the host


@dataclasses.dataclass(frozen=True)
class Longest:
    tokens: int
    limited_by: str  # "device" or "host"


def _mlp_width(config: ModelConfig) -> int:
    """Per-token width of the MLP's activations: a mixture of experts runs each token through k experts."""
    return config.num_experts_per_tok * config.moe_intermediate_size if config.is_moe else config.intermediate_size


def _lora_width(config: ModelConfig) -> int:
    """Sum of in + out over one layer's LoRA-adapted matrices (every expert's, in a mixture of experts)."""
    width = sum(o + i for o, i in linear_shapes(config).values())
    if config.is_moe:
        width += sum(e * (o + i) for e, o, i in expert_shapes(config).values())
    return width


def _weight_counts(config: ModelConfig) -> tuple[int, int]:
    """(projection weights, experts' included, every other weight: embeddings, LM head, norms, router)."""
    proj = sum(o * i for o, i in linear_shapes(config).values()) * config.num_layers
    if config.is_moe:
        proj += sum(e * o * i for e, o, i in expert_shapes(config).values()) * config.num_layers
    other = param_count(config) - proj  # embeddings, head and every norm (post- and q/k norms included)
    return proj, other


def _weights_bytes(config: ModelConfig, quantized: bool, e: int) -> float:
    proj, other = _weight_counts(config)
    per_weight = 0.5 + 1 / 64 + 4 / (64 * 256) if quantized else e
    return proj * per_weight + other * e


def _moment_bytes(profile: Profile) -> float:
    """Bytes of AdamW's two moments per trained value: f32, or 8-bit codes with an f32 absmax per 256."""
    return 8.0 if profile.optimizer_state == "float32" else 2 * (1 + 4 / 256)


def _trained_bytes(config: ModelConfig, lora_r: int | None, e: int, profile: Profile) -> float:
    """LoRA (f32 weights and gradients, and the moments), or in full fine-tuning (lora_r None) a gradient in the
    weights' dtype and the moments for every weight (the weights themselves are in ``_weights_bytes``)."""
    if lora_r is None:
        return sum(_weight_counts(config)) * (e + _moment_bytes(profile))
    return (8 + _moment_bytes(profile)) * lora_r * _lora_width(config) * config.num_layers


def _moe_terms(
    config: ModelConfig, quantized: bool, lora_r: int | None, e: int, profile: Profile
) -> tuple[float, float]:
    """(fixed bytes, per-token bytes of the layer in flight) of a mixture of experts' MLP, beyond the dense terms
    (see the module docstring)."""
    d, i, k = config.hidden_size, config.moe_intermediate_size, config.num_experts_per_tok
    per_token = k * (4 * d * e + 5 * i * e + 8 * i)
    fixed = sum(n * o * c for n, o, c in expert_shapes(config).values()) * e if quantized else 0.0
    if lora_r is not None and profile.optimizer_state == "8bit":
        fixed += 8.0 * lora_r * _lora_width(config) * config.num_layers  # the moments dequantized to f32
    return fixed, per_token


def _saved_by_policy(config: ModelConfig, profile: Profile, e: int) -> float:
    """Per-token bytes a remat policy keeps for every layer beyond the residual checkpoint: the projection outputs
    it saves by name ("dots": all, and the attention output and its f32 log-sum-exp per head; "attn_dots": q, k, v,
    o, down; with ``dots_layers``, "dots" for that many layers), or, without remat, every activation the
    backward reads. The no-remat term is fitted to the 8B QLoRA step at 2 x 2048 on the H200 without remat and with
    full remat (BENCHMARKS.md, training step): (13 D + 2 K) e + 10 F e per layer, the f32 norm and SwiGLU
    intermediates included."""
    L = config.num_layers
    k = min(profile.dots_layers, L)
    if k:  # the first k layers keep what "dots" keeps, the others what their own policy keeps
        dots = _saved_by_policy(config, profile.replace(remat="dots", dots_layers=0), e)
        rest = _saved_by_policy(config, profile.replace(dots_layers=0), e)
        return (k * dots + (L - k) * rest) / L
    shapes = linear_shapes(config)
    D, F = config.hidden_size, _mlp_width(config)
    if profile.remat == "dots":
        attention = config.num_heads * (config.head_dim * e + 4)
        return L * (e * sum(o for o, _ in shapes.values()) + attention)
    if profile.remat == "attn_dots":
        return L * e * sum(o for name, (o, _) in shapes.items() if name in ATTN_DOTS)
    if profile.remat == "none":
        return L * ((13 * D + 2 * config.num_kv_heads * config.head_dim) * e + 10 * F * e)
    return 0.0


def estimate_step_memory(
    config: ModelConfig,
    profile: Profile,
    *,
    batch: int,
    seq_len: int,
    quantized: bool,
    lora_r: int | None = 16,
    context: int = 1,
) -> MemoryEstimate:
    """One device's memory. lora_r None: full fine-tuning (every weight with its gradient and AdamW moments);
    context: the mesh's context axis size (each sequence split over that many devices)."""
    e = profile.dtype.itemsize
    D, F, L = config.hidden_size, _mlp_width(config), config.num_layers
    K, Hq, g = config.num_kv_heads * config.head_dim, config.num_heads, max(profile.remat_group, 1)
    tokens = -(-batch * seq_len // context)  # this device's share
    fixed = _weights_bytes(config, quantized, e) + _trained_bytes(config, lora_r, e, profile) + XLA_WORKSPACE_BYTES
    # The input embedding kept on the host (untied head; jaxsloth.train.host_embedding): its rows come with the batch.
    host_table = config.vocab_size * D * e if profile.embedding == "host" and not config.tie_word_embeddings else 0
    fixed -= host_table
    residual = (L / g) * D * e
    layer = (6 * D + 2 * K) * e + 2 * D * e + 4 * Hq
    # Ring attention's buffers, for the one layer whose attention runs (not per layer of a remat group).
    ring = 4 * K * e + 16 * K + 4 * Hq * config.head_dim + 4 * Hq if context > 1 else 0
    if config.is_moe:  # routed rows, never tiled by mlp_chunk
        moe_fixed, moe_layer = _moe_terms(config, quantized, lora_r, e, profile)
        fixed += moe_fixed
        layer += moe_layer
    elif profile.mlp_chunk:
        fixed += min(profile.mlp_chunk, tokens) * 6 * F * e
    else:
        layer += 6 * F * e
    outside = 3 * D * e + 4 * D + 16
    if profile.kernels.cross_entropy == "chunked":
        from pallas_kernels.cross_entropy import CHUNK_TOKENS  # here: the Pallas modules load on first use only

        # One chunk's f32 logits and 16-bit gradient live between the last layer's forward and the first layer's
        # backward, when no layer's recompute temporaries do: they count only where they exceed those.
        fixed += max(0.0, min(CHUNK_TOKENS, tokens) * config.vocab_size * (4 + e) - g * layer * tokens)
    elif profile.loss_chunk:
        fixed += min(profile.loss_chunk, tokens) * (_CE_TILE * e + 4 * D)
    elif profile.kernels.cross_entropy == "pallas":
        outside += _CE_TILE * e
    else:
        outside += 8 * config.vocab_size
    device_pt = (
        g * layer
        + ring
        + outside
        + (0 if profile.remat == "offload" else residual)
        + _saved_by_policy(config, profile, e)
    )
    host_pt = residual if profile.remat == "offload" else 0.0
    return MemoryEstimate(
        device_gib=(fixed + device_pt * tokens) / GIB,
        host_gib=(host_table + host_pt * tokens) / GIB,
        fixed_gib=fixed / GIB,
        device_bytes_per_token=device_pt,
        host_bytes_per_token=host_pt,
        host_fixed_gib=host_table / GIB,
    )


def longest_sequence(
    config: ModelConfig,
    profile: Profile,
    *,
    batch: int = 1,
    quantized: bool,
    device_gib: float,
    host_gib: float,
    lora_r: int | None = 16,
    context: int = 1,
) -> Longest:
    """The longest seq_len (a multiple of 1024) the model says fits in ``device_gib`` and ``host_gib`` of each
    device, with each sequence split over ``context`` devices (the mesh's context axis). The devices of one host
    share its memory: with offload, ``host_gib`` is this device's share."""
    est = estimate_step_memory(
        config, profile, batch=batch, seq_len=context, quantized=quantized, lora_r=lora_r, context=context
    )
    dev_tokens = (device_gib - est.fixed_gib) * GIB / est.device_bytes_per_token
    host_left = (host_gib - est.host_fixed_gib) * GIB
    host_tokens = host_left / est.host_bytes_per_token if est.host_bytes_per_token else float("inf")
    tokens = max(int(min(dev_tokens, host_tokens) * context / batch) // 1024 * 1024, 0)
    return Longest(tokens, "device" if dev_tokens <= host_tokens else "host")


# Pinned host buffers (offloaded checkpoints) come from XLA's host allocator, capped at this variable's value in GiB.
PINNED_HOST_LIMIT_ENV = "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"
PINNED_HOST_LIMIT_DEFAULT = 64.0
_HOST_HINT = (
    f"; the host figure is the smaller of 85% of RAM and XLA's pinned-memory cap ({PINNED_HOST_LIMIT_ENV}, default "
    f"{PINNED_HOST_LIMIT_DEFAULT:.0f}), which that variable raises"
)


def pinned_host_limit_gib() -> float:
    """XLA's cap on pinned host memory in GiB (``XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB``, read when the GPU client starts)."""
    import os

    value = os.environ.get(PINNED_HOST_LIMIT_ENV)
    if value is None:
        return PINNED_HOST_LIMIT_DEFAULT
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{PINNED_HOST_LIMIT_ENV}={value!r} is not a number of GiB") from None


def machine_memory_gib() -> tuple[float, float] | None:
    """(device, host) memory in GiB, or None where the backend reports no device limit (CPU). Host: what pinned
    buffers may take, 85% of RAM (not all of it can be pinned) or XLA's pinned-memory cap if lower."""
    import os

    import jax

    stats = jax.local_devices()[0].memory_stats() or {}  # on multi-host runs devices()[0] may be another host's
    if "bytes_limit" not in stats:
        return None
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    return stats["bytes_limit"] / GIB, min(0.85 * host, pinned_host_limit_gib())


def check_fits(
    config: ModelConfig,
    profile: Profile,
    *,
    batch: int,
    seq_len: int,
    quantized: bool,
    device_gib: float,
    host_gib: float,
    lora_r: int | None = 16,
    context: int = 1,
) -> MemoryEstimate:
    """Raises MemoryError naming the longest length that fits when ``seq_len`` does not (before compiling)."""
    est = estimate_step_memory(
        config, profile, batch=batch, seq_len=seq_len, quantized=quantized, lora_r=lora_r, context=context
    )
    if est.device_gib <= device_gib and est.host_gib <= host_gib:
        return est
    longest = longest_sequence(
        config,
        profile,
        batch=batch,
        quantized=quantized,
        device_gib=device_gib,
        host_gib=host_gib,
        lora_r=lora_r,
        context=context,
    )
    raise MemoryError(
        f"batch {batch} x {seq_len:,} tokens needs about {est.device_gib:.1f} GiB of device memory and "
        f"{est.host_gib:.1f} GiB of host memory (profile {profile.name!r}: remat={profile.remat!r}, "
        f"mlp_chunk={profile.mlp_chunk}, loss_chunk={profile.loss_chunk}, remat_group={profile.remat_group}); "
        f"this machine has {device_gib:.0f} and {host_gib:.0f}. The longest that fits is about {longest.tokens:,} "
        f"tokens ({longest.limited_by} memory is the limit); long_context settings and remat_group=2 lower the "
        "per-token cost" + (_HOST_HINT if longest.limited_by == "host" else "") + "."
    )


def check_compiled_plan(
    stats,
    *,
    batch: int,
    seq_len: int,
    device_gib: float,
    host_gib: float,
    longest_tokens: int | None = None,
) -> tuple[float, float]:
    """After compiling, before running: XLA's own plan (``compiled.memory_analysis()``: arguments + temporaries on
    the device, temporaries on the host) against the machine. Returns (device GiB, host GiB) of the plan; raises
    MemoryError naming both and, when given, the memory model's longest length that fits. Catches what the
    per-token model misses, before a long step runs out of memory minutes in."""
    device = (stats.argument_size_in_bytes + stats.temp_size_in_bytes) / GIB
    host = getattr(stats, "host_temp_size_in_bytes", 0) / GIB
    if device <= device_gib and host <= host_gib:
        return device, host
    hint = f" The memory model's longest length that fits is about {longest_tokens:,} tokens." if longest_tokens else ""
    raise MemoryError(
        f"batch {batch} x {seq_len:,} tokens: XLA's compiled step needs {device:.1f} GiB of device memory "
        f"({stats.temp_size_in_bytes / GIB:.1f} temporaries + {stats.argument_size_in_bytes / GIB:.1f} arguments) "
        f"and {host:.1f} GiB of pinned host memory; this machine allows {device_gib:.1f} and {host_gib:.1f} "
        "(the device figure is JAX's allocator cap: XLA_PYTHON_CLIENT_MEM_FRACTION raises it, default 0.75"
        + (_HOST_HINT if host > host_gib else "")
        + ")."
        + hint
    )
