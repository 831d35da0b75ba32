"""The one dispatch point: every op the model calls goes through here, and here alone picks the Pallas kernel or
the plain-jnp reference (or cuDNN for attention) and the kernel's block config, as the active profile's
``KernelChoice`` says. Model code never imports a kernel; kernels never ask which GPU they run on."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxsloth.quant import is_nf4

# op -> implementation name -> (module, function). Pallas modules are imported lazily, on first use.
_IMPLEMENTATIONS: dict[str, dict[str, tuple[str, str]]] = {
    "rms_norm": {
        "reference": ("pallas_kernels.rms_norm", "rms_norm_reference"),
        "pallas": ("pallas_kernels.rms_norm", "rms_norm"),
    },
    "rope": {
        "reference": ("pallas_kernels.rope", "rope_reference"),
        "pallas": ("pallas_kernels.rope", "rope"),
    },
    "swiglu": {
        "reference": ("pallas_kernels.glu", "swiglu_reference"),
        "pallas": ("pallas_kernels.glu", "swiglu"),
    },
    "geglu": {
        "reference": ("pallas_kernels.glu", "geglu_reference"),
        "pallas": ("pallas_kernels.glu", "geglu"),
    },
    "attention": {
        "reference": ("pallas_kernels.attention", "attention_reference"),
        "pallas": ("pallas_kernels.attention", "attention"),
        "cudnn": ("jaxsloth.ops", "_cudnn_attention"),
    },
    # One block pair of ring attention (context parallelism): the forward with its log-sum-exp, and the backward
    # against the merged row's log-sum-exp; the attention op's choice picks these too (cuDNN: the Pallas kernels).
    "attention_block": {
        "reference": ("pallas_kernels.attention.blockwise", "attention_block_reference"),
        "pallas": ("pallas_kernels.attention.blockwise", "attention_block"),
    },
    "attention_block_grad": {
        "reference": ("pallas_kernels.attention.blockwise", "attention_block_grad_reference"),
        "pallas": ("pallas_kernels.attention.blockwise", "attention_block_grad"),
    },
    "cross_entropy": {
        "reference": ("pallas_kernels.cross_entropy", "cross_entropy_reference"),
        "pallas": ("pallas_kernels.cross_entropy", "cross_entropy"),
        "chunked": ("pallas_kernels.cross_entropy", "cross_entropy_chunked"),
    },
    "nf4_matmul": {
        "reference": ("pallas_kernels.nf4_matmul", "nf4_matmul_reference"),
        "pallas": ("pallas_kernels.nf4_matmul", "nf4_matmul"),
        "xla16": ("pallas_kernels.nf4_matmul", "nf4_matmul_xla16"),  # PEFT's 16-bit order (the GPU profiles')
        # Hopper only (wgmma): the weight decoded in registers, PEFT's order; a profile choice once measured faster.
        "mosaic": ("pallas_kernels.nf4_matmul_mosaic", "nf4_matmul_mosaic"),
    },
    # The 16-bit LoRA linear has no kernel: XLA's three GEMMs beat a fused Triton one (BENCHMARKS.md, LoRA linear).
    "lora_matmul": {"reference": ("pallas_kernels.lora_matmul", "lora_matmul_reference")},
    # Mixture-of-experts projections: row tiles against their experts' weights in a loop (XLA expands a ragged dot to
    # every row against every expert: gigabytes and 128x the FLOPs per projection at Qwen3-30B-A3B's 128 experts), or
    # every (tile, expert) work item in one Pallas launch.
    "grouped_matmul": {
        "reference": ("pallas_kernels.grouped_matmul", "grouped_matmul_reference"),
        "tiled": ("pallas_kernels.grouped_matmul", "grouped_matmul_tiled"),
        "pallas": ("pallas_kernels.grouped_matmul_pallas", "grouped_matmul"),
    },
    "grouped_lora": {"reference": ("pallas_kernels.grouped_matmul", "grouped_lora_reference")},
}


@dataclasses.dataclass(frozen=True)
class BlocksByHeadDim:
    """Block configs chosen by the operand's head dim and dtype: ``entries`` holds (padded head dim, the next
    power of two; dtype name; block config). An operand with no entry gets the kernel's own default."""

    entries: tuple[tuple[int, str, object], ...]

    def pick(self, head_dim: int, dtype) -> object | None:
        width = 1 << max(head_dim - 1, 0).bit_length()
        name = jnp.dtype(dtype).name
        return next((block for w, d, block in self.entries if (w, d) == (width, name)), None)


@dataclasses.dataclass(frozen=True)
class KernelChoice:
    """Which implementation each op uses; hashable, so it is a static argument of jitted functions.

    ``interpret`` runs Pallas kernels in interpret mode (CPU tests). ``blocks`` holds per-op block configs for the
    Pallas kernels (op name -> a frozen block dataclass, or a ``BlocksByHeadDim`` table for attention, whose tiles
    and backends depend on the head dim; "nf4_matmul_mosaic" for the Mosaic NF4 kernels); an op without one runs on
    its kernel's default blocks.
    """

    rms_norm: str = "reference"
    rope: str = "reference"
    glu: str = "reference"
    attention: str = "reference"
    cross_entropy: str = "reference"
    nf4_matmul: str = "reference"
    grouped_matmul: str = "tiled"
    interpret: bool | None = None
    blocks: tuple[tuple[str, object], ...] = ()

    def __post_init__(self):
        for op in KERNEL_OPS:
            choice = getattr(self, op)
            for name in ("swiglu", "geglu") if op == "glu" else (op,):
                if choice not in _IMPLEMENTATIONS[name]:
                    raise ValueError(
                        f"unknown implementation {choice!r} for op {op!r}; "
                        f"choose one of {sorted(_IMPLEMENTATIONS[name])}"
                    )

    @classmethod
    def all(cls, impl: str, **overrides) -> KernelChoice:
        """Every op on ``impl`` ("reference" or "pallas"), with per-op overrides."""
        fields = {f: impl for f in KERNEL_OPS}
        return cls(**{**fields, **overrides})

    def block_for(self, op: str, x: jax.Array) -> object | None:
        """The block config of ``op``'s Pallas kernel for first operand ``x`` (attention: q [B, T, Hq, hd]), or
        None for the kernel's default."""
        block = dict(self.blocks).get(op)
        if isinstance(block, BlocksByHeadDim):
            return block.pick(x.shape[-1], x.dtype)
        return block


# The ops a KernelChoice picks an implementation for (its string fields; glu stands for swiglu and geglu).
KERNEL_OPS = tuple(f.name for f in dataclasses.fields(KernelChoice) if f.type == "str")


def _cudnn_attention(q, k, v, *, causal=True, sliding_window=None, scale=None):
    """cuDNN flash attention (Hopper's fastest for plain causal GQA). It has no softcap and no segment ids:
    ``Ops.attention`` sends those calls to the Pallas kernel."""
    window = None if sliding_window is None else (sliding_window - 1, 0)
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=causal, local_window_size=window, implementation="cudnn"
    )


def _resolve(op: str, impl: str) -> Callable:
    module, name = _IMPLEMENTATIONS[op][impl]
    return getattr(importlib.import_module(module), name)


@dataclasses.dataclass(frozen=True)
class Ops:
    """The model's ops, bound to a KernelChoice."""

    kernels: KernelChoice = KernelChoice()

    def _call(self, op: str, impl: str, *args, **kwargs):
        fn = _resolve(op, impl)
        if impl in ("pallas", "mosaic"):
            kwargs["interpret"] = self.kernels.interpret
            # The block-pair ops run the attention kernels, on the attention op's tiles; a Mosaic kernel's tiles
            # are the "<op>_mosaic" entry.
            key = "attention" if op.startswith("attention") else op
            block = self.kernels.block_for(key if impl == "pallas" else f"{key}_{impl}", args[0])
            if block is not None:
                kwargs["block"] = block
        return fn(*args, **kwargs)

    def rms_norm(self, x, weight, residual=None, *, eps: float, weight_offset: float = 0.0):
        """x: [..., D]; returns y, or (y, x + residual) when residual is given."""
        return self._call("rms_norm", self.kernels.rms_norm, x, weight, residual, eps=eps, weight_offset=weight_offset)

    def rope(self, q, k, positions, inv_freq, *, attention_scaling: float = 1.0):
        """q: [B, T, Hq, hd], k: [B, T, Hk, hd], positions: [B, T]."""
        return self._call("rope", self.kernels.rope, q, k, positions, inv_freq, attention_scaling=attention_scaling)

    def glu(self, gate, up, *, activation: str):
        """silu(gate) * up for activation "silu", gelu_tanh(gate) * up for "gelu_tanh"."""
        op = "swiglu" if activation == "silu" else "geglu"
        return self._call(op, self.kernels.glu, gate, up)

    def attention(self, q, k, v, *, segment_ids=None, causal=True, sliding_window=None, softcap=None, scale=None):
        """q: [B, T, Hq, hd], k, v: [B, S, Hk, hd] -> [B, T, Hq, hd]."""
        impl = self.kernels.attention
        kwargs = dict(causal=causal, sliding_window=sliding_window, scale=scale)
        if impl == "cudnn":
            if softcap is None and segment_ids is None:
                return self._call("attention", impl, q, k, v, **kwargs)
            impl = "pallas"  # cuDNN has neither softcap nor segment ids: the Pallas kernel takes those calls
        return self._call("attention", impl, q, k, v, segment_ids=segment_ids, softcap=softcap, **kwargs)

    def attention_block(self, q, k, v, **kwargs):
        """One block pair of a longer sequence (``pallas_kernels.attention.blockwise.attention_block``'s keywords:
        q_segment_ids, kv_segment_ids, q_offset, causal, sliding_window, softcap, scale) -> (out, lse [B, Hq, T])."""
        return self._call("attention_block", self._block_impl(), q, k, v, **kwargs)

    def attention_block_grad(self, q, k, v, do, lse, delta, **kwargs):
        """That block pair's (dq, dk, dv) against the merged row's lse and delta [B, Hq, T]."""
        return self._call("attention_block_grad", self._block_impl(), q, k, v, do, lse, delta, **kwargs)

    def _block_impl(self) -> str:
        return "reference" if self.kernels.attention == "reference" else "pallas"

    def cross_entropy(self, hidden, head, targets, *, softcap=None, head_grad: bool = True):
        """hidden: [N, D], head: [V, D], targets: [N] -> (loss_sum, count).

        head_grad=False (a frozen head, the LoRA case) lets the Pallas kernel skip the [V, D] gradient entirely.
        A trained head takes the Pallas kernel where the profile says "chunked": the chunked path would hold an f32
        [V, D] gradient accumulator (2 GiB for a 128k vocabulary, several times the kernel's memory; BENCHMARKS.md,
        loss kernels), and the kernel is still faster than the full-logits loss.
        """
        impl = self.kernels.cross_entropy
        if impl == "chunked" and head_grad:
            impl = "pallas"
        extra = {} if impl == "reference" else {"head_grad": head_grad}
        return self._call("cross_entropy", impl, hidden, head, targets, softcap=softcap, **extra)

    def linear(self, x, weight, bias=None, lora=None, lora_scale: float = 0.0, lora_x=None):
        """y = x @ W^T (+ bias) + lora_scale * (lora_x @ A^T) @ B^T.

        x: [..., in]; weight: [out, in] array or a quantized NF4Weight; lora: {"a": [r, in], "b": [out, r]} or None;
        lora_x: the LoRA branch's input when it differs from x (dropout), else x.
        """
        if is_nf4(weight):
            y = self._nf4_linear(x, weight, lora, lora_scale, lora_x)
        elif lora is None:
            y = jnp.einsum("...i,oi->...o", x, weight.astype(x.dtype))
        else:
            lead = x.shape[:-1]
            flat = lambda a: None if a is None else a.reshape(-1, a.shape[-1])  # noqa: E731  (rows on axis 0)
            y = self._call(
                "lora_matmul", "reference", flat(x), weight, lora["a"], lora["b"], lora_scale, lora_x=flat(lora_x)
            ).reshape(*lead, -1)
        if bias is not None:
            y = y + bias.astype(y.dtype)
        return y

    def _nf4_linear(self, x, weight, lora, lora_scale, lora_x):
        fused_lora = lora is not None and lora_x is None
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if fused_lora:
            y = self._call("nf4_matmul", self.kernels.nf4_matmul, x2, weight, lora["a"], lora["b"], lora_scale)
        else:
            y = self._call("nf4_matmul", self.kernels.nf4_matmul, x2, weight)
            if lora is not None:
                from pallas_kernels.lora_matmul import lora_delta

                y = y + lora_delta(lora_x.reshape(x2.shape), lora["a"], lora["b"], lora_scale).astype(y.dtype)
        return y.reshape(*lead, -1)

    def grouped_matmul(self, x, weight, group_sizes, lora=None, lora_scale: float = 0.0):
        """Per-expert projections of rows sorted by expert: y = x @ W[g]^T + lora_scale * (x @ A[g]^T) @ B[g]^T for
        the rows of group g (PEFT's expert LoRA, factored). x: [M, in]; weight: [G, out, in] or NF4; group_sizes: [G];
        lora: {"a": [G, r, in], "b": [G, out, r]} or None."""
        impl = self.kernels.grouped_matmul

        def base(x, w, group_sizes):
            chosen = impl
            if impl == "pallas" and max(x.size, w.size, x.shape[0] * w.shape[1]) >= 2**31:
                chosen = "tiled"  # the kernel addresses its operands with int32 offsets
            return self._call("grouped_matmul", chosen, x, w, group_sizes)

        if is_nf4(weight):
            from jaxsloth.quant import dequantize_nf4

            # One layer's experts dequantized at a time, as bitsandbytes dequantizes before its matmul; rematerialised,
            # so the backward dequantizes again instead of keeping every layer's 16-bit experts as residuals.
            def nf4_grouped(x, weight, group_sizes):
                # The dequantization needs only the weights: without tying it to the layer's rows, XLA schedules the
                # unrolled loop's dequantizations early and holds every layer's 16-bit experts at once.
                x, weight = jax.lax.optimization_barrier((x, weight))
                return base(x, dequantize_nf4(weight, x.dtype), group_sizes)

            y = jax.checkpoint(nf4_grouped)(x, weight, group_sizes)
        else:
            y = base(x, weight, group_sizes)
        if lora is not None:
            y = y + lora_scale * self._call("grouped_lora", "reference", x, lora["a"], lora["b"], group_sizes)
        return y
