"""Gated MLP activations: SwiGLU (Llama, Mistral, Qwen 2, Phi-3) and GeGLU with tanh GELU (Gemma).

Kernels: elementwise, so gate and up [..., F] are viewed as flat vectors (a free reshape) and split into
power-of-two blocks, masked at the tail; F need not be a power of two (14336 is not). The forward saves only
gate and up; the backward recomputes the activation and its derivative from gate and writes dgate and dup in
one pass.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import cdiv, resolve_interpret, triton_compiler_params

_SQRT_2_OVER_PI = 0.7978845608028654
_GELU_CUBIC = 0.044715
# Element offsets are int32 inside the kernel.
_MAX_ELEMENTS = 2**31 - 2**24


@dataclasses.dataclass(frozen=True)
class GluBlock:
    """Launch configuration (tuned by reasoning for the H200): elements per program and Triton warps, for
    the forward and the backward kernel. All powers of two."""

    block: int = 4096
    num_warps: int = 4
    bwd_block: int = 4096
    bwd_num_warps: int = 8

    def __post_init__(self):
        for name in ("block", "num_warps", "bwd_block", "bwd_num_warps"):
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


def _tile(n, block):
    idx = pl.program_id(0) * block + jnp.arange(block)
    return idx, idx < n


def _fwd_kernel(g_ref, u_ref, o_ref, *, n, block, kind):
    idx, ok = _tile(n, block)
    g = plgpu.load(g_ref.at[idx], mask=ok, other=0.0).astype(jnp.float32)
    u = plgpu.load(u_ref.at[idx], mask=ok, other=0.0).astype(jnp.float32)
    act, _ = _ACTIVATIONS[kind](g)
    plgpu.store(o_ref.at[idx], (act * u).astype(o_ref.dtype), mask=ok)


def _bwd_kernel(g_ref, u_ref, do_ref, dg_ref, du_ref, *, n, block, kind):
    idx, ok = _tile(n, block)
    g = plgpu.load(g_ref.at[idx], mask=ok, other=0.0).astype(jnp.float32)
    u = plgpu.load(u_ref.at[idx], mask=ok, other=0.0).astype(jnp.float32)
    do = plgpu.load(do_ref.at[idx], mask=ok, other=0.0).astype(jnp.float32)
    act, dact = _ACTIVATIONS[kind](g)
    plgpu.store(dg_ref.at[idx], (do * u * dact).astype(dg_ref.dtype), mask=ok)
    plgpu.store(du_ref.at[idx], (do * act).astype(du_ref.dtype), mask=ok)


def _forward(g1, u1, kind, interpret, block):
    n = g1.shape[0]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, n=n, block=block.block, kind=kind),
        out_shape=jax.ShapeDtypeStruct((n,), g1.dtype),
        grid=(cdiv(n, block.block),),
        compiler_params=triton_compiler_params(num_warps=block.num_warps, num_stages=1),
        interpret=interpret,
        name=f"{kind}_fwd",
    )(g1, u1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _glu(g1, u1, kind, interpret, block):
    return _forward(g1, u1, kind, interpret, block)


def _glu_fwd(g1, u1, kind, interpret, block):
    return _forward(g1, u1, kind, interpret, block), (g1, u1)


def _glu_bwd(kind, interpret, block, res, do):
    g1, u1 = res
    n = g1.shape[0]
    return pl.pallas_call(
        functools.partial(_bwd_kernel, n=n, block=block.bwd_block, kind=kind),
        out_shape=[jax.ShapeDtypeStruct((n,), g1.dtype), jax.ShapeDtypeStruct((n,), u1.dtype)],
        grid=(cdiv(n, block.bwd_block),),
        compiler_params=triton_compiler_params(num_warps=block.bwd_num_warps, num_stages=1),
        interpret=interpret,
        name=f"{kind}_bwd",
    )(g1, u1, do)


_glu.defvjp(_glu_fwd, _glu_bwd)


def _gated(kind, gate, up, interpret, block):
    if gate.shape != up.shape:
        raise ValueError(f"{kind}: gate and up must have the same shape, got {gate.shape} and {up.shape}")
    n = math.prod(gate.shape)
    if n > _MAX_ELEMENTS:
        raise ValueError(
            f"{kind}: {gate.shape} has {n} elements, over the kernel's int32 limit {_MAX_ELEMENTS}"
        )
    out = _glu(gate.reshape(-1), up.reshape(-1), kind, resolve_interpret(interpret), block or GluBlock())
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
