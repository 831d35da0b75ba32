"""GPU profiles: one frozen choice of dtype, kernels, block sizes, remat and chunking per device kind.

The one place that decides per GPU: which implementation each op takes, which kernel backend (Triton or Mosaic GPU)
and which tiles. The training step is built and jitted from (model config, train config, profile). Every field can
be overridden: ``profile_for_device(remat="offload")`` or ``dataclasses.replace(profile, ...)``. Kernel choices on
Hopper follow the measurements in BENCHMARKS.md (a kernel becomes a default only where it beat the best XLA path
on the H200).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxsloth.models.decoder import LAYER_LOOPS, REMAT_POLICIES
from jaxsloth.ops import BlocksByHeadDim, KernelChoice, Ops
from jaxsloth.train.optim8bit import OPTIMIZER_STATES
from pallas_kernels.attention.common import AttentionBlocks

EMBEDDING_PLACES = ("device", "host")


@dataclasses.dataclass(frozen=True)
class Profile:
    """name: profile name; compute_dtype: activations and frozen weights; kernels: implementation per op;
    remat: per-layer policy (none / dots / full / offload); micro_batch: default sequences per micro-batch;
    mlp_chunk: tokens per MLP tile for long sequences (None = whole sequence); loss_chunk: tokens per loss tile;
    remat_group: layers per residual checkpoint (2 halves the stored residual stream, for the longest sequences);
    layer_loop: "scan" over stacked layer weights, "unrolled" over per-layer arrays (``jaxsloth.train`` unstacks
    the frozen weights for the step; one device only: a mesh keeps the scan), or "auto": unrolled except under the
    memory-lean remat policies (full, offload), where the unrolled program held more memory than the scan
    (BENCHMARKS.md, layer loop); dots_layers: the first this many layers remat "dots" (every
    projection output kept) while the rest use ``remat``, a memory budget between the two that needs the unrolled
    loop; optimizer_state: how AdamW stores its two moments: float32, or 8bit (blockwise int8 with a dynamic
    quantization map, as bitsandbytes' Adam8bit: about a quarter of the memory; jaxsloth.train.optim8bit);
    embedding: where the frozen input embedding table lives while training: on the "device", or on the "host", where
    each batch's rows are looked up before the step (no device copy of the table: 1 GiB at Llama-3 8B; models with
    an untied LM head; jaxsloth.train.host_embedding)."""

    name: str
    compute_dtype: str = "bfloat16"
    kernels: KernelChoice = KernelChoice()
    remat: str = "full"
    micro_batch: int = 2
    mlp_chunk: int | None = None
    loss_chunk: int | None = None
    remat_group: int = 1
    layer_loop: str = "scan"
    dots_layers: int = 0
    optimizer_state: str = "float32"
    embedding: str = "device"

    def __post_init__(self):
        if self.layer_loop not in LAYER_LOOPS:
            raise ValueError(f"unknown layer_loop {self.layer_loop!r}; choose one of {LAYER_LOOPS}")
        if self.dots_layers < 0:
            raise ValueError(f"dots_layers={self.dots_layers} must be >= 0")
        if self.dots_layers and self.layer_loop == "scan":
            raise ValueError(f"dots_layers={self.dots_layers} needs layer_loop 'unrolled' or 'auto', not 'scan'")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {self.remat!r}; choose one of {REMAT_POLICIES}")
        if self.optimizer_state not in OPTIMIZER_STATES:
            raise ValueError(
                f"unknown optimizer_state {self.optimizer_state!r}; choose one of: {', '.join(OPTIMIZER_STATES)}"
            )
        if self.embedding not in EMBEDDING_PLACES:
            raise ValueError(f"unknown embedding {self.embedding!r}; choose one of: {', '.join(EMBEDDING_PLACES)}")
        if self.compute_dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"unsupported compute_dtype {self.compute_dtype!r}")

    @property
    def unrolled_layers(self) -> bool:
        """Whether the training step runs the unrolled layer loop (``layer_loop`` resolved)."""
        if self.layer_loop == "auto":
            return self.remat not in ("full", "offload") or self.dots_layers > 0
        return self.layer_loop == "unrolled"

    @property
    def dtype(self):
        return jnp.dtype(self.compute_dtype)

    @property
    def forward_settings(self) -> dict:
        """The decoder's memory and precision settings of this profile (``decoder.forward_hidden``'s keywords)."""
        return dict(
            remat=self.remat,
            compute_dtype=self.dtype,
            mlp_chunk=self.mlp_chunk,
            remat_group=self.remat_group,
            dots_layers=self.dots_layers,
        )

    @property
    def ops(self) -> Ops:
        return Ops(self.kernels)

    def replace(self, **overrides) -> Profile:
        kernel_fields = {f.name for f in dataclasses.fields(KernelChoice)}
        kernels = {k: overrides.pop(k) for k in list(overrides) if k in kernel_fields}
        if kernels:
            overrides["kernels"] = dataclasses.replace(self.kernels, **kernels)
        return dataclasses.replace(self, **overrides)


def _hopper_attention_tiles() -> BlocksByHeadDim:
    """16-bit head dims 65-128 and 129-256 run the forward and dK/dV on the Mosaic GPU kernels (wgmma, TMA), faster
    than the Triton ones on the H200 at both shapes measured (BENCHMARKS.md, attention kernels); dQ stays Triton
    (the Mosaic dQ is an untimed opt-in). Other head dims and dtypes take the kernel's default Triton tiles."""
    # Padded head dim -> Mosaic tiles. d128: 128 keys per dK/dV CTA (each compute warpgroup dK and dV of its own
    # 64) and 128 keys per forward step, two stages (a third exceeds shared memory). d256: 64 keys per dK/dV CTA
    # with two 64-row Q + dO stages (192 KiB of shared memory, the most that fits) and two 64-key forward stages.
    mosaic = {
        128: dict(block_q_dkv=64, block_k_dkv=128, num_stages_dkv=2, block_q=128, block_k=128, num_stages=2),
        256: dict(block_q_dkv=64, block_k_dkv=64, num_stages_dkv=2, block_q=128, block_k=64, num_stages=2),
    }
    backends = dict(fwd_backend="mosaic", dkv_backend="mosaic")
    entries = tuple(
        (width, dtype, dataclasses.replace(AttentionBlocks.for_head_dim(width, dtype), **tiles, **backends))
        for width, tiles in mosaic.items()
        for dtype in ("bfloat16", "float16")
    )
    return BlocksByHeadDim(entries)


# Hopper, from the H200 measurements in BENCHMARKS.md: cuDNN attention where it applies (causal GQA; softcap and
# segments take the Pallas kernel, Mosaic tiles per head dim); Pallas RMSNorm and RoPE (faster forward+backward
# than XLA); the token-chunked loss with the gradient in the forward pass (two GEMMs where the fused Pallas loss
# runs three: faster than the full-logits loss at a fraction of its memory); XLA for SwiGLU (its fused elementwise
# backward beat the kernel) and the XLA NF4 path in PEFT's 16-bit order (no f32 [tokens, N] products).
# nf4_matmul="mosaic" (the weight decoded in registers by Mosaic GPU kernels) is an opt-in until the H200 measures it
# faster in the step (`--op nf4_matmul=mosaic`; jaxsloth/bench/suites/nf4_mosaic_h200.sh).
_HOPPER = KernelChoice(
    rms_norm="pallas",
    rope="pallas",
    glu="reference",
    attention="cudnn",
    cross_entropy="chunked",
    nf4_matmul="xla16",
    # The Pallas grouped matmul: one launch over every (row tile, expert) item, where the tiled XLA loop runs them one
    # after another (2.8x the Qwen3-30B-A3B QLoRA step's speed at half its peak on the H200: BENCHMARKS.md).
    grouped_matmul="pallas",
    blocks=(("attention", _hopper_attention_tiles()),),
)
# Ampere/Ada: no cuDNN flash path through XLA for every shape; the Triton kernels run there, on their default tiles.
# The loss and NF4 take the same plain-XLA paths as Hopper (measured on the H200 only: they win by doing fewer GEMMs
# and writing no f32 [tokens, N] arrays, which holds on any GPU; the Triton NF4 kernel trails XLA on the H200). The
# mixture-of-experts projections stay on the tiled loop (KernelChoice's default) until the Pallas grouped matmul is
# measured on these cards.
_AMPERE = KernelChoice.all("pallas", cross_entropy="chunked", nf4_matmul="xla16", grouped_matmul="tiled")

PROFILES: dict[str, Profile] = {
    # attn_dots: faster than full remat on the 8B QLoRA step at 2 x 2048 for a few GiB more (BENCHMARKS.md, remat);
    # "full" stays one override away for the leanest run. Unrolled layers (but for full and offload remat): no scan
    # copies of each layer's weights, faster at about the same peak, longer compiles (BENCHMARKS.md, layer loop).
    "h200": Profile("h200", kernels=_HOPPER, remat="attn_dots", micro_batch=2, layer_loop="auto"),
    "h100": Profile("h100", kernels=_HOPPER, remat="attn_dots", micro_batch=2, layer_loop="auto"),
    "a100": Profile("a100", kernels=_AMPERE, remat="full", micro_batch=2),
    "ada": Profile("ada", kernels=_AMPERE, remat="full", micro_batch=1),
    "ampere": Profile("ampere", kernels=_AMPERE, remat="full", micro_batch=1),
    "t4": Profile("t4", compute_dtype="float16", kernels=KernelChoice(nf4_matmul="xla16"), remat="full", micro_batch=1),
    "cpu": Profile("cpu", compute_dtype="float32", kernels=KernelChoice(), remat="none", micro_batch=1),
}

# (substring of device_kind, lowercase) -> profile name; first match wins.
_DEVICE_KINDS = (
    ("h200", "h200"),
    ("h100", "h100"),
    ("h800", "h100"),
    ("gh200", "h200"),
    ("a100", "a100"),
    ("a800", "a100"),
    ("l4", "ada"),
    ("l40", "ada"),
    ("4090", "ada"),
    ("4080", "ada"),
    ("ada", "ada"),
    ("3090", "ampere"),
    ("3080", "ampere"),
    ("a10", "ampere"),
    ("a6000", "ampere"),
    ("t4", "t4"),
)


# The long-sequence settings: per-layer residual checkpoints offloaded to pinned host memory, the MLP in 8192-token
# tiles, the loss in 16384-token tiles through the Pallas loss (the leanest: no [1024, V] logits chunk; the loss's
# time is small beside attention's at these lengths; the configuration the long runs measured, with the layer scan).
# Every remaining per-token term is in jaxsloth.train.memory.
LONG_CONTEXT = {
    "remat": "offload",
    "mlp_chunk": 8192,
    "loss_chunk": 16384,
    "cross_entropy": "pallas",
    "layer_loop": "scan",
}


def long_context(profile: Profile) -> Profile:
    return profile.replace(**LONG_CONTEXT)


def profile_name_for(device_kind: str, platform: str = "gpu") -> str:
    if platform == "cpu":
        return "cpu"
    kind = device_kind.lower()
    for needle, name in _DEVICE_KINDS:
        if needle in kind:
            return name
    return "ampere"  # an unknown NVIDIA GPU: the Triton kernels run on every architecture since Ampere


def profile_for_device(device=None, name: str | None = None, **overrides) -> Profile:
    """The profile for ``device`` (default: jax.devices()[0]) or by ``name``, with field overrides
    (any Profile or KernelChoice field, e.g. ``remat="offload"``, ``attention="pallas"``)."""
    if name is None:
        device = device or jax.devices()[0]
        name = profile_name_for(device.device_kind, device.platform)
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; known: {', '.join(PROFILES)}")
    return PROFILES[name].replace(**overrides)
