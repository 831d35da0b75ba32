"""Rotary position embedding applied to q and k (Hugging Face's rotate-half layout).

Kernel: tokens [B*T] are split into blocks; one program rotates every q head and every k head of its tokens,
so q and k take one launch. cos/sin are computed in registers from the positions and inv_freq (no [T, hd]
table in HBM). The two rotated halves are loaded as separate tiles (features [0, rot/2) and [rot/2, rot)),
each padded to a power of two and masked, which covers head dims such as 80 and 96; features past ``rot``
(partial rotary) are copied through. The backward is the same kernel rotating by the negative angle, since
each (x1, x2) pair is multiplied by a scaled rotation matrix whose transpose is the rotation by -angle.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import cdiv, lowered_once, next_power_of_2, resolve_interpret, triton_compiler_params


@dataclasses.dataclass(frozen=True)
class RopeBlock:
    """Launch configuration (tuned by reasoning for the H200, head dim 128).

    block_tokens: tokens per program; block_heads: heads per register tile (a program walks all heads of
    q and k in tiles of this many); num_warps: Triton warps per program. All powers of two.
    """

    block_tokens: int = 4
    block_heads: int = 8
    num_warps: int = 4

    def __post_init__(self):
        for name in ("block_tokens", "block_heads", "num_warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"RopeBlock.{name} must be a positive power of two, got {v}")


def _rotate_heads(src, dst, tok, tok_ok, cos, sin, *, n_heads, block_heads, half, lanes, pass_width):
    """Rotates src[tok, :, :rot] into dst and copies the features past rot, one head tile at a time.

    Tiles are addressed with index vectors rather than static slices: the padded lanes of a tile may run
    past the head dim (masked), which static slices reject.
    """
    lane = jnp.arange(lanes)[None, None, :]
    bh = min(block_heads, next_power_of_2(n_heads))
    c, s = cos[:, None, :], sin[:, None, :]
    t = tok[:, None, None]
    for h0 in range(0, n_heads, bh):
        h = (h0 + jnp.arange(bh))[None, :, None]
        tile_ok = tok_ok[:, None, None] & (h < n_heads)
        mask = tile_ok & (lane < half)
        x1 = plgpu.load(src.at[t, h, lane], mask=mask, other=0.0).astype(jnp.float32)
        x2 = plgpu.load(src.at[t, h, half + lane], mask=mask, other=0.0).astype(jnp.float32)
        plgpu.store(dst.at[t, h, lane], (x1 * c - x2 * s).astype(dst.dtype), mask=mask)
        plgpu.store(dst.at[t, h, half + lane], (x2 * c + x1 * s).astype(dst.dtype), mask=mask)
        if pass_width:
            rest = jnp.arange(next_power_of_2(pass_width))[None, None, :]
            rest_mask = tile_ok & (rest < pass_width)
            idx = (t, h, 2 * half + rest)
            plgpu.store(dst.at[idx], plgpu.load(src.at[idx], mask=rest_mask), mask=rest_mask)


def _rope_kernel(
    pos_ref, freq_ref, q_ref, k_ref, qo_ref, ko_ref, *, n_tokens, block_tokens, block_heads, sign, scaling
):
    half = freq_ref.shape[0]
    lanes = next_power_of_2(half)
    tok = pl.program_id(0) * block_tokens + jnp.arange(block_tokens)
    tok_ok = tok < n_tokens
    pos = plgpu.load(pos_ref.at[tok], mask=tok_ok, other=0).astype(jnp.float32)
    lane = jnp.arange(lanes)
    freq = plgpu.load(freq_ref.at[lane], mask=lane < half, other=0.0)
    angle = pos[:, None] * freq[None, :]
    cos = jnp.cos(angle) * scaling
    sin = jnp.sin(angle) * (sign * scaling)
    for src, dst in ((q_ref, qo_ref), (k_ref, ko_ref)):
        _rotate_heads(
            src,
            dst,
            tok,
            tok_ok,
            cos,
            sin,
            n_heads=src.shape[1],
            block_heads=block_heads,
            half=half,
            lanes=lanes,
            pass_width=src.shape[2] - 2 * half,
        )


@lowered_once("sign", "scaling", "interpret", "block")
def _apply(q3, k3, pos, inv_freq, *, sign, scaling, interpret, block):
    """q3: [M, Hq, hd], k3: [M, Hk, hd], pos: [M] int32 -> rotated (q3, k3) in one pallas_call."""
    m = q3.shape[0]
    kernel = functools.partial(
        _rope_kernel,
        n_tokens=m,
        block_tokens=block.block_tokens,
        block_heads=block.block_heads,
        sign=sign,
        scaling=scaling,
    )
    return pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct(q3.shape, q3.dtype), jax.ShapeDtypeStruct(k3.shape, k3.dtype)],
        grid=(cdiv(m, block.block_tokens),),
        compiler_params=triton_compiler_params(num_warps=block.num_warps, num_stages=1),
        interpret=interpret,
        name="rope_fwd" if sign > 0 else "rope_bwd",
    )(pos, inv_freq, q3, k3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _rope(q3, k3, pos, inv_freq, scaling, interpret, block):
    return _apply(q3, k3, pos, inv_freq, sign=1.0, scaling=scaling, interpret=interpret, block=block)


def _rope_fwd(q3, k3, pos, inv_freq, scaling, interpret, block):
    out = _apply(q3, k3, pos, inv_freq, sign=1.0, scaling=scaling, interpret=interpret, block=block)
    return out, (pos, inv_freq)


def _rope_bwd(scaling, interpret, block, res, cotangents):
    pos, inv_freq = res
    dq, dk = cotangents
    dq, dk = _apply(dq, dk, pos, inv_freq, sign=-1.0, scaling=scaling, interpret=interpret, block=block)
    return dq, dk, None, None


_rope.defvjp(_rope_fwd, _rope_bwd)


def rope(
    q: jax.Array,
    k: jax.Array,
    positions: jax.Array,
    inv_freq: jax.Array,
    *,
    attention_scaling: float = 1.0,
    interpret: bool | None = None,
    block: RopeBlock | None = None,
):
    """q: [B, T, Hq, hd], k: [B, T, Hk, hd], positions: [B, T] int, inv_freq: [rot/2] f32.

    Same result as :func:`rope_reference`: returns (q', k') in their input dtypes. Differentiable in q and
    k; positions and inv_freq are constants (their gradient is stopped).
    """
    if q.ndim != 4 or k.ndim != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"rope: q [B, T, Hq, hd] and k [B, T, Hk, hd] must agree, got {q.shape} and {k.shape}")
    if positions.shape != q.shape[:2] or not jnp.issubdtype(positions.dtype, jnp.integer):
        raise ValueError(f"rope: positions must be int [B, T] = {q.shape[:2]}, got {positions.shape} {positions.dtype}")
    if inv_freq.ndim != 1 or not 1 <= 2 * inv_freq.shape[0] <= q.shape[3]:
        raise ValueError(f"rope: inv_freq must be [rot/2] with rot <= head dim {q.shape[3]}, got {inv_freq.shape}")
    b, t, hq, hd = q.shape
    q3, k3 = q.reshape(b * t, hq, hd), k.reshape(b * t, k.shape[2], hd)
    pos = jax.lax.stop_gradient(positions).reshape(-1).astype(jnp.int32)
    freq = jax.lax.stop_gradient(inv_freq).astype(jnp.float32)
    q3, k3 = _rope(q3, k3, pos, freq, float(attention_scaling), resolve_interpret(interpret), block or RopeBlock())
    return q3.reshape(q.shape), k3.reshape(k.shape)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    rot = 2 * cos.shape[-1]
    xr, xp = x[..., :rot].astype(jnp.float32), x[..., rot:]
    half = rot // 2
    x1, x2 = xr[..., :half], xr[..., half:]
    c = jnp.concatenate([cos, cos], axis=-1)[:, :, None, :]
    s = jnp.concatenate([sin, sin], axis=-1)[:, :, None, :]
    rotated = xr * c + jnp.concatenate([-x2, x1], axis=-1) * s
    out = rotated.astype(x.dtype)
    return out if xp.shape[-1] == 0 else jnp.concatenate([out, xp], axis=-1)


def rope_reference(
    q: jax.Array,
    k: jax.Array,
    positions: jax.Array,
    inv_freq: jax.Array,
    *,
    attention_scaling: float = 1.0,
):
    """q: [B, T, Hq, hd], k: [B, T, Hk, hd], positions: [B, T] int, inv_freq: [rot/2] f32.

    Rotates the first ``rot = 2 * len(inv_freq)`` features of each head (partial rotary keeps the rest);
    angles = positions * inv_freq in f32; cos and sin are multiplied by ``attention_scaling`` (longrope,
    yarn). Packed sequences pass per-segment positions. Returns (q', k') in their input dtypes.
    """
    angles = positions.astype(jnp.float32)[..., None] * inv_freq.astype(jnp.float32)
    cos = jnp.cos(angles) * attention_scaling
    sin = jnp.sin(angles) * attention_scaling
    return _rotate(q, cos, sin), _rotate(k, cos, sin)
