"""AdamW whose two moments are stored in float32 or in 8 bits (the profile's ``optimizer_state``).

float32: both moments in f32 whatever the weights' dtype (bf16 weights in full fine-tuning keep f32 moments; for
f32 weights this is optax's AdamW, state for state). 8bit: bitsandbytes' Adam8bit (Dettmers et al. 2022, "8-bit
Optimizers via Block-wise Quantization"): each moment tensor is cut into blocks of 256 values, each block stored as
uint8 indices into a 256-value dynamic quantization map (signed for the first moment, unsigned for the second)
scaled by the block's absmax (f32): 1 + 4/256 bytes per value instead of 4. Each step dequantizes, updates the
moments in f32, takes the update from the f32 moments, and quantizes them again (nearest map value). Tensors under
4096 values (norms, biases) keep f32 moments, as bitsandbytes' ``min_8bit_size``.

One departure from bitsandbytes: the second moment is stored as its square root (the gradient's running RMS), so
it spans the same range as the first moment. Stored as is, it spans the square of that range: a value whose gradient
is below ~4e-4 of its block's largest falls under the map's smallest step and is stored as 0 while its first moment
is not, and the next step divides that first moment by eps alone (a jump of lr / eps x the moment).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

BLOCK = 256  # values per absmax block (bitsandbytes' blockwise 8-bit optimizers)
MIN_8BIT_SIZE = 4096  # smaller tensors keep f32 moments (bitsandbytes' min_8bit_size)
OPTIMIZER_STATES = ("float32", "8bit")


@functools.cache
def dynamic_map(signed: bool) -> np.ndarray:
    """bitsandbytes' dynamic (tree) quantization map: 256 sorted f32 values in [-1, 1] (signed) or [0, 1].

    Each value is a decimal exponent 10^-(6-i) times a linear fraction; the exponent takes the leading bits, so the
    map is dense near 0 (small moments keep relative precision) and sparse near 1."""
    max_exponent_bits, total_bits = 7, 8
    non_sign_bits = total_bits - 1
    data: list[float] = []
    for i in range(max_exponent_bits):
        # The signed map spends one bit on the sign: half as many fractions per exponent.
        items = 2 ** (i + non_sign_bits - max_exponent_bits + (0 if signed else 1)) + 1
        bounds = np.linspace(0.1, 1, items, dtype=np.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = np.float32(10.0 ** (-(max_exponent_bits - 1) + i))
        data += (scale * means).tolist()
        if signed:
            data += (-scale * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2**total_bits - len(data))
    return np.sort(np.asarray(data, np.float32))


class QuantizedMoment(NamedTuple):
    """A moment tensor in 8 bits. codes: [blocks, 256] uint8 indices into the dynamic map; absmax: [blocks] f32."""

    codes: jax.Array
    absmax: jax.Array


def quantize_blockwise(x: jax.Array, signed: bool) -> QuantizedMoment:
    """x: any shape -> its blocks of 256 (zero-padded at the end), each value the nearest map value x / absmax."""
    code = jnp.asarray(dynamic_map(signed))
    flat = x.reshape(-1).astype(jnp.float32)
    blocks = -(-flat.size // BLOCK)
    flat = jnp.pad(flat, (0, blocks * BLOCK - flat.size)).reshape(blocks, BLOCK)
    absmax = jnp.max(jnp.abs(flat), axis=1)
    normed = flat / jnp.where(absmax > 0, absmax, 1.0)[:, None]
    # Unrolled: the 8 bisection steps fuse with the rest of the update into one pass over the tensor.
    hi = jnp.clip(jnp.searchsorted(code, normed, method="scan_unrolled"), 1, code.size - 1)
    lo = hi - 1
    nearest = jnp.where(code[hi] - normed < normed - code[lo], hi, lo)
    return QuantizedMoment(nearest.astype(jnp.uint8), absmax)


def dequantize_blockwise(q: QuantizedMoment, signed: bool, shape: tuple[int, ...]) -> jax.Array:
    """The f32 tensor of ``shape`` that ``q`` stores."""
    code = jnp.asarray(dynamic_map(signed))
    flat = (code[q.codes.astype(jnp.int32)] * q.absmax[:, None]).reshape(-1)
    return flat[: int(np.prod(shape))].reshape(shape)


def _quantized(x) -> bool:
    return isinstance(x, QuantizedMoment)


def scale_by_adam_stored(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, state: str = "float32"
) -> optax.GradientTransformation:
    """optax.scale_by_adam with its moments stored as ``state`` says ("float32" or "8bit"); the state is optax's
    ScaleByAdamState (count, mu, nu), with QuantizedMoment leaves in mu / nu for the 8-bit tensors."""
    if state not in OPTIMIZER_STATES:
        raise ValueError(f"unknown optimizer_state {state!r}; choose one of: {', '.join(OPTIMIZER_STATES)}")
    eight_bit = state == "8bit"

    def stored(x, first: bool):
        """The first moment, or the second (signed=False; 8-bit: as its square root)."""
        if eight_bit and x.size >= MIN_8BIT_SIZE:
            return quantize_blockwise(x if first else jnp.sqrt(x), signed=first)
        return x.astype(jnp.float32)

    def loaded(m, like, first: bool):
        if not _quantized(m):
            return m
        x = dequantize_blockwise(m, first, like.shape)
        return x if first else jnp.square(x)

    def zeros(p):
        if eight_bit and p.size >= MIN_8BIT_SIZE:  # absmax 0: every code dequantizes to 0
            blocks = -(-p.size // BLOCK)
            return QuantizedMoment(jnp.zeros((blocks, BLOCK), jnp.uint8), jnp.zeros((blocks,), jnp.float32))
        return jnp.zeros(p.shape, jnp.float32)

    def init_fn(params):
        mu, nu = jax.tree.map(zeros, params), jax.tree.map(zeros, params)
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu)

    def update_fn(updates, adam_state, params=None):
        del params
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), updates)
        mu = jax.tree.map(lambda m, g: loaded(m, g, True), adam_state.mu, grads, is_leaf=_quantized)
        nu = jax.tree.map(lambda v, g: loaded(v, g, False), adam_state.nu, grads, is_leaf=_quantized)
        mu = optax.tree.update_moment(grads, mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(grads, nu, b2, 2)
        # The new moments materialised once, the update reading them: without the barrier XLA fuses the moment update
        # into each consumer, two fusions read the donated old moments that one of them overwrites, and XLA copies
        # them at the start of the step (8 bytes per trained value, held through it).
        mu, nu = jax.lax.optimization_barrier((mu, nu))
        count = optax.safe_increment(adam_state.count)
        mu_hat = optax.tree.bias_correction(mu, b1, count)
        nu_hat = optax.tree.bias_correction(nu, b2, count)
        out = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu_hat, nu_hat)
        new_state = optax.ScaleByAdamState(
            count=count,
            mu=jax.tree.map(lambda m: stored(m, True), mu),
            nu=jax.tree.map(lambda v: stored(v, False), nu),
        )
        return out, new_state

    return optax.GradientTransformation(init_fn, update_fn)


def adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    mask,
    state: str = "float32",
) -> optax.GradientTransformation:
    """optax.adamw (decoupled weight decay on the leaves ``mask`` selects) with moments stored as ``state``."""
    return optax.chain(
        scale_by_adam_stored(b1, b2, eps, state),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
