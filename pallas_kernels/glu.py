"""Gated MLP activations: SwiGLU (Llama, Mistral, Qwen 2, Phi-3) and GeGLU with tanh GELU (Gemma).

Kernels: elementwise over gate and up viewed as [N, F] (a free reshape), in [block_rows, block_cols] tiles
masked at the edges, so F need not be a power of two (14336 = 7 * 2048). A 2-D grid rather than a flat
vector keeps element offsets within what the lowering widens to 64 bits for large arrays (a long sequence
times F passes 2^31 elements). The forward saves only gate and up; the backward recomputes the activation
and its derivative from gate and writes dgate and dup in one pass.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import cdiv, lowered_once, resolve_interpret, triton_compiler_params

_SQRT_2_OVER_PI = 0.7978845608028654
_GELU_CUBIC = 0.044715


@dataclasses.dataclass(frozen=True)
class GluBlock:
    """Launch configuration (tuned by reasoning for the H200): tile [rows, cols] and Triton warps of the
    forward and the backward kernel, all powers of two. 2 x 2048 tiles are 32 values per thread at 4 warps
    (four 16-byte loads of bf16 per operand) and split F=14336 exactly; the backward, with three operands
    live, spreads its tile over 8 warps."""

    block_rows: int = 2
    block_cols: int = 2048
    num_warps: int = 4
    bwd_block_rows: int = 2
    bwd_block_cols: int = 2048
    bwd_num_warps: int = 8

    def __post_init__(self):
        for name in ("block_rows", "block_cols", "num_warps", "bwd_block_rows", "bwd_block_cols", "bwd_num_warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"GluBlock.{name} must be a positive power of two, got {v}")


def _silu_and_grad(g):
    sig = 1.0 / (1.0 + jnp.exp(-g))
    return g * sig, sig * (1.0 + g * (1.0 - sig))


def _gelu_tanh_and_grad(g):
    t = jnp.tanh(_SQRT_2_OVER_PI * (g + _GELU_CUBIC * g * g * g))
    grad = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_CUBIC * g * g)
    return 0.5 * g * (1.0 + t), grad


_ACTIVATIONS = {"swiglu": _silu_and_grad, "geglu": _gelu_tanh_and_grad}


def _tile(shape, block_rows, block_cols):
    """Index vectors and mask of this program's tile; its padded edge may run past the array (masked)."""
    rows = pl.program_id(0) * block_rows + jnp.arange(block_rows)
    cols = pl.program_id(1) * block_cols + jnp.arange(block_cols)
    ok = (rows < shape[0])[:, None] & (cols < shape[1])[None, :]
    return (rows[:, None], cols[None, :]), ok


def _fwd_kernel(g_ref, u_ref, o_ref, *, block_rows, block_cols, kind):
    idx, ok = _tile(g_ref.shape, block_rows, block_cols)
    g = plgpu.load(g_ref.at[idx], mask=ok, other=0.0).astype(jnp.float32)
    u = plgpu.load(u_ref.at[idx], mask=ok, other=0.0).astype(jnp.float32)
    act, _ = _ACTIVATIONS[kind](g)
    plgpu.store(o_ref.at[idx], (act * u).astype(o_ref.dtype), mask=ok)


def _bwd_kernel(g_ref, u_ref, do_ref, dg_ref, du_ref, *, block_rows, block_cols, kind):
    idx, ok = _tile(g_ref.shape, block_rows, block_cols)
    g = plgpu.load(g_ref.at[idx], mask=ok, other=0.0).astype(jnp.float32)
    u = plgpu.load(u_ref.at[idx], mask=ok, other=0.0).astype(jnp.float32)
    do = plgpu.load(do_ref.at[idx], mask=ok, other=0.0).astype(jnp.float32)
    act, dact = _ACTIVATIONS[kind](g)
    plgpu.store(dg_ref.at[idx], (do * u * dact).astype(dg_ref.dtype), mask=ok)
    plgpu.store(du_ref.at[idx], (do * act).astype(du_ref.dtype), mask=ok)


@lowered_once("kernel", "kind", "out_dtypes", "rows", "cols", "warps", "name", "interpret")
def _launch(inputs, *, kernel, kind, out_dtypes, rows, cols, warps, name, interpret):
    n, f = inputs[0].shape
    return pl.pallas_call(
        functools.partial(kernel, block_rows=rows, block_cols=cols, kind=kind),
        out_shape=[jax.ShapeDtypeStruct((n, f), dtype) for dtype in out_dtypes],
        grid=(cdiv(n, rows), cdiv(f, cols)),
        compiler_params=triton_compiler_params(num_warps=warps, num_stages=1),
        interpret=interpret,
        name=name,
    )(*inputs)


def _forward(g2, u2, kind, interpret, block):
    (out,) = _launch(
        (g2, u2),
        kernel=_fwd_kernel,
        kind=kind,
        out_dtypes=(g2.dtype,),
        rows=block.block_rows,
        cols=block.block_cols,
        warps=block.num_warps,
        name=f"{kind}_fwd",
        interpret=interpret,
    )
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _glu(g2, u2, kind, interpret, block):
    return _forward(g2, u2, kind, interpret, block)


def _glu_fwd(g2, u2, kind, interpret, block):
    return _forward(g2, u2, kind, interpret, block), (g2, u2)


def _glu_bwd(kind, interpret, block, res, do):
    g2, u2 = res
    dg, du = _launch(
        (g2, u2, do),
        kernel=_bwd_kernel,
        kind=kind,
        out_dtypes=(g2.dtype, u2.dtype),
        rows=block.bwd_block_rows,
        cols=block.bwd_block_cols,
        warps=block.bwd_num_warps,
        name=f"{kind}_bwd",
        interpret=interpret,
    )
    return dg, du


_glu.defvjp(_glu_fwd, _glu_bwd)


def _gated(kind, gate, up, interpret, block):
    if gate.shape != up.shape:
        raise ValueError(f"{kind}: gate and up must have the same shape, got {gate.shape} and {up.shape}")
    if gate.ndim == 0:
        raise ValueError(f"{kind}: gate and up need a feature axis, got shape {gate.shape}")
    f = gate.shape[-1]
    out = _glu(gate.reshape(-1, f), up.reshape(-1, f), kind, resolve_interpret(interpret), block or GluBlock())
    return out.reshape(gate.shape)


def swiglu(gate: jax.Array, up: jax.Array, *, interpret: bool | None = None, block: GluBlock | None = None):
    """gate, up: [..., F] -> silu(gate) * up in gate.dtype (f32 math), as :func:`swiglu_reference`.

    Differentiable in gate and up (fused Pallas backward)."""
    return _gated("swiglu", gate, up, interpret, block)


def geglu(gate: jax.Array, up: jax.Array, *, interpret: bool | None = None, block: GluBlock | None = None):
    """gate, up: [..., F] -> gelu_tanh(gate) * up in gate.dtype (f32 math), as :func:`geglu_reference`.

    Differentiable in gate and up (fused Pallas backward)."""
    return _gated("geglu", gate, up, interpret, block)


def _gelu_tanh(x: jax.Array) -> jax.Array:
    return 0.5 * x * (1.0 + jnp.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))


def swiglu_reference(gate: jax.Array, up: jax.Array) -> jax.Array:
    """gate, up: [..., F] -> silu(gate) * up, in f32, cast to gate.dtype."""
    g = gate.astype(jnp.float32)
    return (g * jax.nn.sigmoid(g) * up.astype(jnp.float32)).astype(gate.dtype)


def geglu_reference(gate: jax.Array, up: jax.Array) -> jax.Array:
    """gate, up: [..., F] -> gelu_tanh(gate) * up, in f32, cast to gate.dtype."""
    return (_gelu_tanh(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(gate.dtype)
