"""Cross-entropy fused with the LM head: never the [tokens, vocab] logits in HBM (kernel), f32 LSE.

loss_n = lse_n - z[n, t_n] with z = hidden @ head.T (f32 accumulation, optionally softcapped) over the
tokens whose target is not ``ignore_index``; the op returns (sum of loss_n, number of such tokens).

Forward (one Pallas kernel): every program owns one [block_n, block_v] tile of z, computed as a GEMM tile
(D walked in block_d steps, f32 accumulator), then reduced in registers to a per-token partial
log-sum-exp and the target logit if the target falls in the tile. The [vocab tiles, N] partials are
combined in the wrapper. Residuals: the inputs and lse [N] f32.

Backward: with lse known, dz = (softmax - onehot) * g (times 1 - tanh^2 under a softcap), zero for ignored
tokens. dhidden = dz @ head sums over the whole vocabulary and dhead = dz.T @ hidden over all tokens; with
D = 4096 neither [block, D] f32 accumulator fits in a program's registers or shared memory, so a kernel
that owned one of them would have to read-modify-write it in HBM once per tile of the other axis. Instead
the vocabulary is walked in chunks of ``chunk_v`` columns: a Pallas kernel recomputes the logit tiles of
the chunk and writes dz for it ([N, chunk_v], input dtype, the only logits-sized buffer that ever exists),
and two plain GEMMs (XLA, f32 accumulation) fold it into an f32 dhidden accumulator and write the chunk's
rows of dhead. ``head_grad=False`` (frozen head, the usual LoRA case) skips the dhead GEMM entirely.

Tiles are handed out token-tile-fastest inside groups of ``group_n`` token tiles (a 1-D grid, like
Triton's grouped matmul ordering): the programs in flight share a few head tiles and a group of hidden
rows, so both stay in L2 instead of being re-read from HBM once per tile of the other axis.

``cross_entropy_chunked`` is the other fused path (no Pallas): ``CHUNK_TOKENS`` tokens at a time, their
[chunk, V] f32 logits from one cuBLAS GEMM feed the loss and dz at once, and a second GEMM gives the chunk's
dhidden, all in the forward pass. It runs two GEMMs for a frozen head where the kernel path runs three (the
kernel recomputes the logits in its backward because its logits never leave registers), so it is the faster
of the two; the kernel is the leaner when the head is trained (no f32 [V, D] accumulator).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import cdiv, dot_precision, next_power_of_2, resolve_interpret, triton_compiler_params

IGNORE_INDEX = -100
# Tokens per chunk of ``cross_entropy_chunked``: [1024, 128256] f32 logits are 0.5 GB, and a 1024-row GEMM
# still runs cuBLAS at full rate.
CHUNK_TOKENS = 1024


@dataclasses.dataclass(frozen=True)
class CrossEntropyBlocks:
    """Tile sizes (powers of two) and Triton launch settings.

    The defaults target the H200 (132 SMs, 228 KB shared memory per SM): a 128 x 256 f32 accumulator is
    128 registers per thread at 8 warps, the bf16 operand tiles take (128 + 256) * 64 * 2 B = 48 KB per
    pipeline stage (3 stages = 144 KB), and 4096 tokens x 128256 vocab give 16k tiles, ~120 waves.
    ``chunk_v``: vocabulary columns per backward chunk; the dz buffer is [N, chunk_v] in the input dtype
    (64 MiB at 4096 bf16 tokens), and larger chunks amortise the f32 dhidden read-modify-write better.
    ``group_n``: token tiles per L2 group (32 x 128 tokens x 4096 x 2 B = 32 MiB of hidden rows).
    """

    block_n: int = 128
    block_v: int = 256
    block_d: int = 64
    num_warps: int = 8
    num_stages: int = 3
    group_n: int = 32
    chunk_v: int = 8192

    def __post_init__(self):
        for name in ("block_n", "block_v", "block_d"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name}={value} must be a power of two >= 16 (Triton dot operands)")
        if self.group_n < 1:
            raise ValueError(f"group_n={self.group_n} must be >= 1")
        if self.chunk_v < self.block_v or self.chunk_v % self.block_v:
            raise ValueError(f"chunk_v={self.chunk_v} must be a positive multiple of block_v={self.block_v}")


@dataclasses.dataclass(frozen=True)
class _Config:
    """Everything static about one call (hashable: it is a custom_vjp nondiff argument)."""

    softcap: float | None
    ignore_index: int
    interpret: bool
    head_grad: bool
    block_n: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int
    group_n: int
    chunk_v: int


def _tile_ids(n_tiles_n: int, n_tiles_v: int, group_n: int):
    """Maps the 1-D program id to (token tile, vocab tile), token tile fastest within each group."""
    pid = pl.program_id(0)
    per_group = group_n * n_tiles_v
    first_n = lax.div(pid, per_group) * group_n
    size = jnp.minimum(n_tiles_n - first_n, group_n)
    local = lax.rem(pid, per_group)
    return first_n + lax.rem(local, size), lax.div(local, size)


def _logits_tile(h_ref, w_ref, row0, col0, *, n: int, v: int, d: int, cfg: _Config, precision):
    """z[row0 : row0 + block_n, col0 : col0 + block_v] in f32 (softcapped); rows >= n and cols >= v
    load zeros."""
    bn, bv, bd = cfg.block_n, cfg.block_v, cfg.block_d
    h_mask = (row0 + jnp.arange(bn) < n)[:, None]
    w_mask = (col0 + jnp.arange(bv) < v)[:, None]

    def body(k, acc):
        start = k * bd
        hm, wm = h_mask, w_mask
        if d % bd:
            d_ok = (start + jnp.arange(bd) < d)[None, :]
            hm, wm = hm & d_ok, wm & d_ok
        h = plgpu.load(h_ref.at[pl.ds(row0, bn), pl.ds(start, bd)], mask=hm, other=0.0)
        w = plgpu.load(w_ref.at[pl.ds(col0, bv), pl.ds(start, bd)], mask=wm, other=0.0)
        return acc + plgpu.dot(h, w, trans_b=True, precision=precision)

    z = lax.fori_loop(0, cdiv(d, bd), body, jnp.zeros((bn, bv), jnp.float32))
    if cfg.softcap is not None:
        z = cfg.softcap * jnp.tanh(z / cfg.softcap)
    return z


def _forward_kernel(h_ref, w_ref, t_ref, lse_ref, pick_ref, *, n, v, d, n_pad, cfg: _Config, precision):
    """Writes the tile's partial log-sum-exp and target logit per token to flat [vocab tiles * n_pad]."""
    bn, bv = cfg.block_n, cfg.block_v
    n_tiles_n, n_tiles_v = n_pad // bn, cdiv(v, bv)
    i, j = _tile_ids(n_tiles_n, n_tiles_v, cfg.group_n)
    row0, col0 = i * bn, j * bv
    z = _logits_tile(h_ref, w_ref, row0, col0, n=n, v=v, d=d, cfg=cfg, precision=precision)
    cols = col0 + jnp.arange(bv)
    # Padded vocabulary columns must not enter the sum; every tile has at least one real column, so the
    # max stays finite.
    z = jnp.where((cols < v)[None, :], z, -jnp.inf)
    m = jnp.max(z, axis=1)
    lse = m + jnp.log(jnp.sum(jnp.exp(z - m[:, None]), axis=1))
    t = plgpu.load(t_ref.at[pl.ds(row0, bn)], mask=row0 + jnp.arange(bn) < n, other=-1)
    picked = jnp.sum(jnp.where(cols[None, :] == t[:, None], z, 0.0), axis=1)
    out = pl.ds(j * n_pad + row0, bn)
    lse_ref[out] = lse
    pick_ref[out] = picked


def _dlogits_kernel(h_ref, w_ref, t_ref, lse_ref, g_ref, start_ref, dz_ref, *, n, v, d, width, cfg: _Config, precision):
    """dz for vocab columns [start, start + width) of every token, stored as [N, width]."""
    bn, bv = cfg.block_n, cfg.block_v
    i, j = _tile_ids(cdiv(n, bn), cdiv(width, bv), cfg.group_n)
    row0, local0 = i * bn, j * bv
    col0 = start_ref[0] + local0
    z = _logits_tile(h_ref, w_ref, row0, col0, n=n, v=v, d=d, cfg=cfg, precision=precision)
    rows_ok = row0 + jnp.arange(bn) < n
    cols = col0 + jnp.arange(bv)
    lse = plgpu.load(lse_ref.at[pl.ds(row0, bn)], mask=rows_ok, other=0.0)
    t = plgpu.load(t_ref.at[pl.ds(row0, bn)], mask=rows_ok, other=cfg.ignore_index)
    dz = jnp.exp(z - lse[:, None]) - jnp.where(cols[None, :] == t[:, None], 1.0, 0.0)
    if cfg.softcap is not None:
        # d/dx cap * tanh(x / cap) = 1 - tanh^2 = 1 - (z / cap)^2.
        dz = dz * (1.0 - jnp.square(z / cfg.softcap))
    scale = jnp.where(t != cfg.ignore_index, g_ref[0], 0.0)
    dz = dz * scale[:, None]
    mask = rows_ok[:, None] & (local0 + jnp.arange(bv) < width)[None, :]
    plgpu.store(dz_ref.at[pl.ds(row0, bn), pl.ds(local0, bv)], dz.astype(dz_ref.dtype), mask=mask)


def _forward_lse(hidden, head, targets, cfg: _Config):
    """Returns (lse [N] f32, target logit [N] f32)."""
    (n, d), v = hidden.shape, head.shape[0]
    bn, bv = cfg.block_n, cfg.block_v
    n_pad, n_tiles_v = cdiv(n, bn) * bn, cdiv(v, bv)
    kernel = functools.partial(
        _forward_kernel, n=n, v=v, d=d, n_pad=n_pad, cfg=cfg, precision=dot_precision(hidden.dtype)
    )
    part = jax.ShapeDtypeStruct((n_tiles_v * n_pad,), jnp.float32)
    lse_parts, pick_parts = pl.pallas_call(
        kernel,
        grid=(n_tiles_v * (n_pad // bn),),
        out_shape=[part, part],
        compiler_params=triton_compiler_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret,
        name="cross_entropy_forward",
    )(hidden, head, targets)
    lse = jax.nn.logsumexp(lse_parts.reshape(n_tiles_v, n_pad), axis=0)[:n]
    picked = jnp.sum(pick_parts.reshape(n_tiles_v, n_pad), axis=0)[:n]
    return lse, picked


def _dlogits(hidden, head, targets, lse, g, start, width: int, cfg: _Config):
    """dz [N, width] in hidden.dtype for vocab columns [start, start + width); start: [1] int32."""
    (n, d), v = hidden.shape, head.shape[0]
    kernel = functools.partial(
        _dlogits_kernel, n=n, v=v, d=d, width=width, cfg=cfg, precision=dot_precision(hidden.dtype)
    )
    return pl.pallas_call(
        kernel,
        grid=(cdiv(n, cfg.block_n) * cdiv(width, cfg.block_v),),
        out_shape=jax.ShapeDtypeStruct((n, width), hidden.dtype),
        compiler_params=triton_compiler_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret,
        name="cross_entropy_dlogits",
    )(hidden, head, targets, lse, g, start)


def _loss(hidden, head, targets, cfg: _Config):
    lse, picked = _forward_lse(hidden, head, targets, cfg)
    valid = targets != cfg.ignore_index
    loss = jnp.sum(jnp.where(valid, lse - picked, 0.0))
    return (loss, jnp.sum(valid).astype(jnp.int32)), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _cross_entropy(hidden, head, targets, cfg: _Config):
    return _loss(hidden, head, targets, cfg)[0]


def _cross_entropy_fwd(hidden, head, targets, cfg: _Config):
    out, lse = _loss(hidden, head, targets, cfg)
    return out, (hidden, head, targets, lse)


def _cross_entropy_bwd(cfg: _Config, residuals, cotangents):
    hidden, head, targets, lse = residuals
    g = cotangents[0].astype(jnp.float32).reshape(1)  # count is an integer: no cotangent
    v = head.shape[0]
    width = min(cfg.chunk_v, v)
    n_full, tail = divmod(v, width)
    precision = dot_precision(hidden.dtype)

    def chunk(start, size, carry):
        dh, dw = carry
        dz = _dlogits(hidden, head, targets, lse, g, jnp.reshape(start, (1,)).astype(jnp.int32), size, cfg)
        w = lax.dynamic_slice_in_dim(head, start, size, axis=0)
        dh = dh + jnp.dot(dz, w, precision=precision, preferred_element_type=jnp.float32)
        if cfg.head_grad:
            # cuBLAS accumulates a bf16 GEMM in f32; asking for the head dtype avoids an f32 [chunk, D] temp.
            dw_chunk = jnp.einsum("nv,nd->vd", dz, hidden, precision=precision, preferred_element_type=head.dtype)
            dw = lax.dynamic_update_slice_in_dim(dw, dw_chunk, start, axis=0)
        return dh, dw

    # A loop (not unrolled chunks) so that XLA keeps exactly one dz chunk alive at a time.
    carry = (jnp.zeros(hidden.shape, jnp.float32), jnp.zeros_like(head) if cfg.head_grad else None)
    carry = lax.fori_loop(0, n_full, lambda c, carry: chunk(c * width, width, carry), carry)
    if tail:
        carry = chunk(n_full * width, tail, carry)
    dh, dw = carry
    return dh.astype(hidden.dtype), dw, None


_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)
# Jitted so eager callers (and interpret mode) compile once per static config instead of dispatching op by op.
_cross_entropy_jit = jax.jit(_cross_entropy, static_argnums=3)


def _check_arguments(hidden, head, targets, softcap):
    if hidden.ndim != 2 or head.ndim != 2 or hidden.shape[1] != head.shape[1]:
        raise ValueError(f"expected hidden [N, D] and head [V, D], got {hidden.shape=} {head.shape=}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [N]={hidden.shape[:1]}, got {targets.shape=}")
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise TypeError(f"targets must be integers, got {targets.dtype=}")
    if hidden.dtype != head.dtype or not jnp.issubdtype(hidden.dtype, jnp.floating):
        raise TypeError(f"hidden and head must share a float dtype, got {hidden.dtype=} {head.dtype=}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive or None, got {softcap=}")


def cross_entropy(
    hidden: jax.Array,
    head: jax.Array,
    targets: jax.Array,
    *,
    softcap: float | None = None,
    ignore_index: int = IGNORE_INDEX,
    interpret: bool | None = None,
    block: CrossEntropyBlocks | None = None,
    head_grad: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Fused LM head + cross-entropy, same semantics as ``cross_entropy_reference``.

    hidden: [N, D], head: [V, D] (lm_head.weight, or the tied embedding), targets: [N] int in [0, V) or
    ``ignore_index``. Returns (loss_sum: f32 scalar, count: int32 scalar). Differentiable in hidden and
    head; peak extra memory is O(N * chunk_v + N * D), never O(N * V).

    head_grad=False (frozen head, e.g. LoRA): the backward skips the dhead GEMM and returns a symbolic
    zero for head's cotangent (jax.grad with respect to head then gives zeros, and no [V, D] buffer is
    written when head is not being differentiated).
    """
    _check_arguments(hidden, head, targets, softcap)
    blocks = block or CrossEntropyBlocks()
    (n, d), v = hidden.shape, head.shape[0]
    # Small problems get tiles no larger than the problem (still powers of two, >= 16 for the dot).
    bv = min(blocks.block_v, max(16, next_power_of_2(v)))
    cfg = _Config(
        softcap=None if softcap is None else float(softcap),
        ignore_index=int(ignore_index),
        interpret=resolve_interpret(interpret),
        head_grad=bool(head_grad),
        block_n=min(blocks.block_n, max(16, next_power_of_2(n))),
        block_v=bv,
        block_d=min(blocks.block_d, max(16, next_power_of_2(d))),
        num_warps=blocks.num_warps,
        num_stages=blocks.num_stages,
        group_n=blocks.group_n,
        chunk_v=blocks.chunk_v,
    )
    return _cross_entropy_jit(hidden, head, targets.astype(jnp.int32), cfg)


@dataclasses.dataclass(frozen=True)
class _ChunkedConfig:
    softcap: float | None
    ignore_index: int
    head_grad: bool
    chunk: int
    dtype: str  # of hidden and head: the gradients' dtype


def _chunked(hidden, targets, cfg: _ChunkedConfig):
    """(hidden [C, chunk, D], targets [C, chunk]), the last chunk padded with zeros and ignored targets."""
    pad = -hidden.shape[0] % cfg.chunk
    h = jnp.pad(hidden, [(0, pad), (0, 0)]).reshape(-1, cfg.chunk, hidden.shape[1])
    t = jnp.pad(targets, (0, pad), constant_values=cfg.ignore_index).reshape(-1, cfg.chunk)
    return h, t


def _valid_count(targets, cfg: _ChunkedConfig):
    return jnp.sum(targets != cfg.ignore_index).astype(jnp.int32)


def _chunk_logits(h, head, cfg: _ChunkedConfig):
    """One chunk's [chunk, V] logits in f32 (softcapped), from one GEMM with f32 accumulation."""
    z = jnp.einsum("nd,vd->nv", h, head, precision=dot_precision(h.dtype), preferred_element_type=jnp.float32)
    return z if cfg.softcap is None else cfg.softcap * jnp.tanh(z / cfg.softcap)


def _chunk_loss(z, t, cfg: _ChunkedConfig):
    """(sum of the chunk's per-token losses, lse [chunk], valid [chunk])."""
    valid = t != cfg.ignore_index
    lse = jax.nn.logsumexp(z, axis=-1)
    picked = jnp.take_along_axis(z, jnp.where(valid, t, 0)[:, None], axis=-1)[:, 0]
    return jnp.sum(jnp.where(valid, lse - picked, 0.0)), lse, valid


def _chunked_loss_only(hidden, head, targets, cfg: _ChunkedConfig):
    def step(total, chunk):
        h, t = chunk
        return total + _chunk_loss(_chunk_logits(h, head, cfg), t, cfg)[0], None

    total, _ = lax.scan(step, jnp.float32(0), _chunked(hidden, targets, cfg))
    return total, _valid_count(targets, cfg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _cross_entropy_chunked(hidden, head, targets, cfg: _ChunkedConfig):
    return _chunked_loss_only(hidden, head, targets, cfg)


def _cross_entropy_chunked_fwd(hidden, head, targets, cfg: _ChunkedConfig):
    """The loss and its gradient for a unit cotangent, chunk by chunk: each chunk's logits feed both the loss and
    dz, so the logits GEMM runs once (the kernel path recomputes it in its backward)."""
    precision = dot_precision(hidden.dtype)

    def step(carry, chunk):
        total, dw = carry
        h, t = chunk
        z = _chunk_logits(h, head, cfg)
        loss, lse, valid = _chunk_loss(z, t, cfg)
        dz = jnp.exp(z - lse[:, None]) - jax.nn.one_hot(t, z.shape[1], dtype=jnp.float32)
        if cfg.softcap is not None:
            dz = dz * (1.0 - jnp.square(z / cfg.softcap))
        # Rounded to the input dtype for the GEMMs, as the kernel path's dz (f32 accumulation either way).
        dz = jnp.where(valid[:, None], dz, 0.0).astype(hidden.dtype)
        dh = jnp.dot(dz, head, precision=precision, preferred_element_type=jnp.float32)
        if cfg.head_grad:
            dw = dw + jnp.einsum("nv,nd->vd", dz, h, precision=precision, preferred_element_type=jnp.float32)
        return (total + loss, dw), dh

    dw0 = jnp.zeros(head.shape, jnp.float32) if cfg.head_grad else None
    (total, dw), dh = lax.scan(step, (jnp.float32(0), dw0), _chunked(hidden, targets, cfg))
    dh = dh.reshape(-1, hidden.shape[1])[: hidden.shape[0]]
    count = _valid_count(targets, cfg)
    # Residuals: the unit-cotangent gradients in f32, so that scaling by the real cotangent rounds once.
    return (total, count), (dh, dw)


def _cross_entropy_chunked_bwd(cfg: _ChunkedConfig, residuals, cotangents):
    dh, dw = residuals
    g = cotangents[0].astype(jnp.float32)
    dtype = jnp.dtype(cfg.dtype)
    return (g * dh).astype(dtype), None if dw is None else (g * dw).astype(dtype), None


_cross_entropy_chunked.defvjp(_cross_entropy_chunked_fwd, _cross_entropy_chunked_bwd)


def cross_entropy_chunked(
    hidden: jax.Array,
    head: jax.Array,
    targets: jax.Array,
    *,
    softcap: float | None = None,
    ignore_index: int = IGNORE_INDEX,
    head_grad: bool = True,
    chunk: int = CHUNK_TOKENS,
) -> tuple[jax.Array, jax.Array]:
    """LM head + cross-entropy over ``chunk`` tokens at a time, with the gradient computed in the forward pass.

    Same semantics and arguments as ``cross_entropy``. Each chunk's [chunk, V] f32 logits come from one cuBLAS
    GEMM and are consumed at once for the loss and for dz = softmax - onehot, which a second GEMM turns into the
    chunk's rows of dhidden (a third into dhead when ``head_grad``); the backward only scales these by the loss
    cotangent. Two GEMMs for a frozen head where the kernel path runs three (it recomputes the logits in its
    backward), at the price of one chunk's logits in HBM ([chunk, V] f32: 0.5 GB at chunk 1024, V 128256)
    and, when the head is trained, an f32 [V, D] dhead accumulator. Evaluation without gradients runs one GEMM
    per chunk.
    """
    _check_arguments(hidden, head, targets, softcap)
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be >= 1")
    cfg = _ChunkedConfig(
        softcap=None if softcap is None else float(softcap),
        ignore_index=int(ignore_index),
        head_grad=bool(head_grad),
        chunk=max(1, min(int(chunk), hidden.shape[0])),
        dtype=jnp.dtype(hidden.dtype).name,
    )
    return _cross_entropy_chunked(hidden, head, targets.astype(jnp.int32), cfg)


def cross_entropy_reference(
    hidden: jax.Array,
    head: jax.Array,
    targets: jax.Array,
    *,
    softcap: float | None = None,
    ignore_index: int = IGNORE_INDEX,
):
    """hidden: [N, D], head: [V, D] (lm_head.weight, or the tied embedding), targets: [N] int.

    logits = hidden @ head.T accumulated in f32, softcapped (softcap * tanh(logits / softcap)) when set.
    Returns (loss_sum: f32 scalar over tokens whose target != ignore_index, count: int32 scalar).
    Differentiable in hidden and head.
    """
    logits = jnp.einsum("nd,vd->nv", hidden, head, preferred_element_type=jnp.float32)
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    valid = targets != ignore_index
    safe = jnp.where(valid, targets, 0)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, safe[:, None], axis=-1)[:, 0]
    loss = jnp.where(valid, lse - picked, 0.0)
    return jnp.sum(loss), jnp.sum(valid).astype(jnp.int32)
