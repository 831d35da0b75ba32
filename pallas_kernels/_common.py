"""Helpers shared by every Pallas kernel in this package (lowering choice, interpret mode, block math)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def default_interpret() -> bool:
    """Pallas GPU kernels run in interpret mode when there is no GPU (CPU tests, CI)."""
    return jax.default_backend() != "gpu"


def resolve_interpret(interpret: bool | None) -> bool:
    return default_interpret() if interpret is None else bool(interpret)


def lowered_once(*static_argnames: str):
    """Decorator for a function that launches a kernel: a jit over it with these arguments static. A training step
    calls each kernel at hundreds of sites (every layer's forward, recompute and backward), and Pallas lowers every
    call in Python (Triton tens of milliseconds, Mosaic GPU about a second); as one jitted function, all sites of
    the same shapes and settings call a single lowered function, so a step lowers each distinct kernel once."""
    return functools.partial(jax.jit, static_argnames=static_argnames)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Triton block shapes must be powers of two."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def triton_compiler_params(num_warps: int = 4, num_stages: int = 2):
    """Selects the Pallas Triton lowering (deprecated upstream in 0.11, but the one that runs on Ampere/Ada
    and in interpret mode)."""
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def dot_precision(dtype) -> lax.Precision | None:
    """The precision of every dot in these kernels and their XLA companions: IEEE f32 products for f32 inputs
    (Triton's and XLA:GPU's default for f32 dots is TF32, a 10-bit mantissa, far outside f32 tolerances: it
    failed the f32 GPU tests); 16-bit inputs keep the default, tensor cores at full input precision."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None
