"""Gated MLP activations: SwiGLU (Llama, Mistral, Qwen 2, Phi-3) and GeGLU with tanh GELU (Gemma)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _gelu_tanh(x: jax.Array) -> jax.Array:
    return 0.5 * x * (1.0 + jnp.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))


def swiglu_reference(gate: jax.Array, up: jax.Array) -> jax.Array:
    """gate, up: [..., F] -> silu(gate) * up, in f32, cast to gate.dtype."""
    g = gate.astype(jnp.float32)
    return (g * jax.nn.sigmoid(g) * up.astype(jnp.float32)).astype(gate.dtype)


def geglu_reference(gate: jax.Array, up: jax.Array) -> jax.Array:
    """gate, up: [..., F] -> gelu_tanh(gate) * up, in f32, cast to gate.dtype."""
    return (_gelu_tanh(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(gate.dtype)
