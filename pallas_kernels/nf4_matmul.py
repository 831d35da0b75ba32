"""NF4 (bitsandbytes 4-bit NormalFloat) dequantization fused into a matmul, with the LoRA term fused.

    y[M, N] = x[M, K] @ dequant(W)[N, K]^T + s * (x @ A^T)[M, r] @ B[N, r]^T        (PEFT: A [r, K], B [N, r])

W is stored in the bitsandbytes layout (see ``jaxsloth.quant``): the row-major flattened weight in blocks of
64 consecutive values, each block scaled by its absmax, two 4-bit codes per byte, first value in the high
nibble. With double quantization the absmax is itself an 8-bit code of (absmax - offset) on bnb's signed
dynamic map, in blocks of 256 with an f32 second-level absmax.

Kernels (Pallas Triton). Because K is a multiple of 64, the quant blocks never cross rows: the packed bytes
view as [N, K/2] and the absmax as [N, K/64], so a [bn, 64] column chunk of W is 32 bytes per row plus one
scale per row. Every chunk is dequantized in registers (nibble shift/mask, 16-entry table via a select tree
or a gather, times the scale, rounded to x.dtype exactly as the reference does) right before its dot, so no
16-bit copy of W is ever written to HBM.
- forward, grid (M tiles, N tiles): a K loop accumulates x @ W^T and, from the same x tile, u = x @ A^T;
  the epilogue adds s * u @ B^T. The N-tile-0 program also writes u (rounded to x.dtype) as the only
  residual the backward needs besides x.
- backward dx, grid (M tiles, K tiles): an N loop accumulates dy @ W (W dequantized again, in-kernel) and
  v = dy @ B; the epilogue adds (s v) @ A. The K-tile-0 program writes s v for dA.
- dA = (s v)^T @ x and dB = s dy^T @ u are plain XLA matmuls: r is 16-ish, so they are bandwidth-bound
  reads of x and dy that XLA's GEMMs already stream at HBM speed, and fusing them into the dx kernel would
  need a cross-program reduction over M (atomics or a second pass).
- No gradient flows to W (NF4 weights are frozen); the backward returns zeros for the NF4 arrays.

K not a multiple of 64, or a block size other than 64, falls back to the reference (the quant blocks then
straddle rows, which the tiled kernel does not handle).

This file also holds ``NF4Weight`` (the one operand type of every NF4 function here and the model's quantized
weight: ``jaxsloth.quant`` builds it) and ``nf4_matmul_xla16``, the plain-XLA path the GPU profiles use
(dequantize, 16-bit GEMM in PEFT's rounding order, custom VJP). The Triton kernels are kept for GPUs where a
fused dequantization may pay; on the H200 they trail XLA's GEMMs (BENCHMARKS.md, NF4 matmul).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import (
    cdiv,
    dot_precision,
    lowered_once,
    next_power_of_2,
    resolve_interpret,
    triton_compiler_params,
)
from pallas_kernels.lora_matmul import lora_delta

# The 16 NF4 levels (QLoRA, arXiv:2305.14314 section 3): quantiles of N(0, 1) scaled to [-1, 1], with an
# exact zero. Code i is NF4_CODE[i]; these are the f32 values bitsandbytes stores as `quant_map`.
NF4_CODE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)

# Double quantization: absmax values are grouped in blocks of this many.
NESTED_BLOCKSIZE = 256
# The only quant block size the tiled kernel handles (bitsandbytes' default for 4-bit).
KERNEL_BLOCKSIZE = 64


@dataclasses.dataclass(frozen=True)
class NF4Weight:
    """One NF4-quantized weight W of logical shape (out, in) (or a stack of them along leading axes, all leaves
    alike), in the bitsandbytes layout (see ``jaxsloth.quant``).

    Leaves: packed uint8 [..., cdiv(out*in, 2)]; absmax f32 [..., nblocks] or, with double_quant, uint8
    [..., nblocks] plus nested_absmax f32 [..., cdiv(nblocks, 256)] and offset f32 [...]; without double
    quantization nested_absmax and offset are None. Static fields describe ONE layer: shape (out, in),
    blocksize, double_quant and the dtype name of the original weight.
    """

    packed: jax.Array
    absmax: jax.Array
    nested_absmax: jax.Array | None
    offset: jax.Array | None
    shape: tuple[int, int]
    blocksize: int = 64
    double_quant: bool = True
    dtype: str = "bfloat16"

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nblocks(self) -> int:
        return cdiv(self.numel, self.blocksize)

    @property
    def lead_shape(self) -> tuple[int, ...]:
        """The leading (layer) axes shared by every leaf; () for a single weight."""
        return tuple(self.packed.shape[:-1])


jax.tree_util.register_dataclass(
    NF4Weight,
    data_fields=["packed", "absmax", "nested_absmax", "offset"],
    meta_fields=["shape", "blocksize", "double_quant", "dtype"],
)


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=float32), bit for bit: an f32 step, then start + step * i
    (one rounding, as its fused multiply-add does) for the first half and end - step * (steps - 1 - i) for
    the second half."""
    s, e = np.float32(start), np.float32(end)
    step = np.float64((e - s) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    first = np.float64(s) + step * i
    second = np.float64(e) - step * (steps - 1 - i)
    return np.where(i < steps // 2, first, second).astype(np.float32)


@functools.cache
def dynamic_code_map() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic code (create_dynamic_map(signed=True, max_exponent_bits=7)) as the
    256 sorted f32 values it stores as `nested_quant_map`.

    Dettmers, 8-bit Approximations for Parallelism in Deep Learning (arXiv:1511.04561): for exponent
    e = 0..6, 2^e evenly spaced fractions (midpoints of linspace(0.1, 1, 2^e + 1)) times 10^(e - 6), both
    signs, plus 0 and 1.
    """
    values = [np.float32(0.0), np.float32(1.0)]
    for e in range(7):
        bounds = _torch_linspace_f32(0.1, 1.0, 2**e + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        scaled = np.float32(10.0 ** (e - 6)) * means
        values.extend(scaled.tolist())
        values.extend((-scaled).tolist())
    code = np.sort(np.asarray(values, dtype=np.float32))
    assert code.shape == (256,)
    return code


@dataclasses.dataclass(frozen=True)
class NF4MatmulBlock:
    """Launch configuration (powers of two; the k sizes are multiples of 64).

    block_m / block_n / block_k: forward tile of x rows, W rows (outputs) and the K step; block_k is halved
        until it divides K.
    bwd_block_m / bwd_block_n / bwd_block_k: dx tile of rows, the N step of its loop, and dx columns.
    lookup: "select" (a 15-select tree on the nibble bits, ALU only) or "gather" (a load from a 16-entry
        table, which stays in L1).
    fuse_lora_a: compute u = x @ A^T inside the forward K loop (x read once; each N tile redoes the r-wide
        product) instead of one XLA matmul before the kernel.
    """

    block_m: int = 128
    block_n: int = 128
    block_k: int = 128
    num_warps: int = 8
    num_stages: int = 3
    bwd_block_m: int = 128
    bwd_block_n: int = 64
    bwd_block_k: int = 128
    bwd_num_warps: int = 8
    bwd_num_stages: int = 3
    lookup: str = "select"
    fuse_lora_a: bool = True

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k", "bwd_block_m", "bwd_block_n", "bwd_block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"NF4MatmulBlock.{name} must be a power of two >= 16, got {v}")
        for name in ("block_k", "bwd_block_k"):
            if getattr(self, name) % KERNEL_BLOCKSIZE:
                raise ValueError(f"NF4MatmulBlock.{name} must be a multiple of 64, got {getattr(self, name)}")
        if self.lookup not in ("select", "gather"):
            raise ValueError(f"NF4MatmulBlock.lookup must be 'select' or 'gather', got {self.lookup!r}")


def _divisor_block(block: int, k: int) -> int:
    """Largest of block, block/2, ..., 64 that divides k (k is a multiple of 64), so no K tail is masked."""
    while k % block:
        block //= 2
    return block


class _WRefs(NamedTuple):
    """The NF4 arrays as the kernels see them; nested/offset/qmap only with double quant, table only with the
    gather lookup."""

    packed: object  # uint8 [N, K/2]
    absmax: object  # f32 or uint8 [N, K/64]
    nested: object  # f32 [cdiv(N*K/64, 256)]
    offset: object  # f32 [1]
    qmap: object  # f32 [256]
    table: object  # f32 [16]


def _take_w_refs(it, double_quant: bool, lookup: str) -> _WRefs:
    packed, absmax = next(it), next(it)
    nested = offset = qmap = table = None
    if double_quant:
        nested, offset, qmap = next(it), next(it), next(it)
    if lookup == "gather":
        table = next(it)
    return _WRefs(packed, absmax, nested, offset, qmap, table)


def _nf4_values(codes: jax.Array, table_ref) -> jax.Array:
    """codes int32 in [0, 16) -> f32 NF4 levels. Triton has no register table lookup: either a binary tree
    of selects on the 4 code bits (constants at the leaves) or a gather from the 16-entry table in memory."""
    if table_ref is not None:
        return table_ref[codes]
    level = [jnp.float32(v) for v in NF4_CODE]
    for bit in range(4):
        take_odd = (codes & (1 << bit)) != 0
        level = [jnp.where(take_odd, level[2 * j + 1], level[2 * j]) for j in range(len(level) // 2)]
    return level[0]


def _dequant_chunk(w: _WRefs, n0, bn: int, n_mask, col, k_blocks: int, dtype) -> jax.Array:
    """W[n0 : n0 + bn, 64 col : 64 col + 64] as dtype, [bn, 64]. Rows past N come out finite (their
    loads are masked to 0); callers zero their contribution through the other operand."""
    byte_start = pl.multiple_of(col * (KERNEL_BLOCKSIZE // 2), KERNEL_BLOCKSIZE // 2)
    packed = plgpu.load(
        w.packed.at[pl.ds(n0, bn), pl.ds(byte_start, KERNEL_BLOCKSIZE // 2)], mask=n_mask[:, None], other=0
    ).astype(jnp.int32)
    hi = _nf4_values((packed >> 4) & 15, w.table)
    lo = _nf4_values(packed & 15, w.table)
    # Interleave so element 2j is the high nibble of byte j (bnb's order): join + reshape, Triton's interleave.
    vals = jnp.stack([hi, lo], axis=-1).reshape(bn, KERNEL_BLOCKSIZE)
    if w.qmap is not None:
        q = plgpu.load(w.absmax.at[pl.ds(n0, bn), col], mask=n_mask, other=0).astype(jnp.int32)
        flat_block = jnp.where(n_mask, (n0 + jnp.arange(bn)) * k_blocks + col, 0)
        # Same two f32 roundings as bnb's dequantize_blockwise followed by `absmax += offset`.
        scale = w.qmap[q] * w.nested[flat_block // NESTED_BLOCKSIZE] + w.offset[0]
    else:
        scale = plgpu.load(w.absmax.at[pl.ds(n0, bn), col], mask=n_mask, other=0.0)
    return (vals * scale[:, None]).astype(dtype)


def _dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [m, k] @ b [n, k]^T with f32 accumulation."""
    dims = (((1,), (1,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=dot_precision(a.dtype), preferred_element_type=jnp.float32)


def _dot_nn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [m, k] @ b [k, n] with f32 accumulation."""
    dims = (((1,), (0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=dot_precision(a.dtype), preferred_element_type=jnp.float32)


def _fwd_kernel(*refs, m, n, k, bm, bn, bk, lookup, double_quant, has_lora, fuse_lora_a, scale):
    it = iter(refs)
    x_ref = next(it)
    w = _take_w_refs(it, double_quant, lookup)
    a_ref = b_ref = uc_in_ref = uc_out_ref = None
    if has_lora:
        a_ref, b_ref = next(it), next(it)
        if not fuse_lora_a:
            uc_in_ref = next(it)
    o_ref = next(it)
    if has_lora and fuse_lora_a:
        uc_out_ref = next(it)

    pid_m, pid_n = pl.program_id(0), pl.program_id(1)
    m0, n0 = pid_m * bm, pid_n * bn
    m_mask = m0 + jnp.arange(bm) < m
    n_mask = n0 + jnp.arange(bn) < n
    k_blocks, chunks = k // KERNEL_BLOCKSIZE, bk // KERNEL_BLOCKSIZE

    def body(step, carry):
        acc, u = carry
        for s in range(chunks):
            col = step * chunks + s
            k_start = pl.multiple_of(col * KERNEL_BLOCKSIZE, KERNEL_BLOCKSIZE)
            xs = plgpu.load(x_ref.at[pl.ds(m0, bm), pl.ds(k_start, KERNEL_BLOCKSIZE)], mask=m_mask[:, None], other=0)
            acc = acc + _dot_nt(xs, _dequant_chunk(w, n0, bn, n_mask, col, k_blocks, x_ref.dtype))
            if u is not None:
                u = u + _dot_nt(xs, a_ref[:, pl.ds(k_start, KERNEL_BLOCKSIZE)])
        return acc, u

    u0 = jnp.zeros((bm, a_ref.shape[0]), jnp.float32) if uc_out_ref is not None else None
    acc, u = lax.fori_loop(0, k // bk, body, (jnp.zeros((bm, bn), jnp.float32), u0))

    if has_lora:
        if uc_out_ref is not None:
            uc = u.astype(x_ref.dtype)

            @pl.when(pid_n == 0)
            def _():
                plgpu.store(uc_out_ref.at[pl.ds(m0, bm), :], uc, mask=m_mask[:, None])

        else:
            uc = plgpu.load(uc_in_ref.at[pl.ds(m0, bm), :], mask=m_mask[:, None], other=0)
        b = plgpu.load(b_ref.at[pl.ds(n0, bn), :], mask=n_mask[:, None], other=0)
        acc = acc + scale * _dot_nt(uc, b)
    plgpu.store(o_ref.at[pl.ds(m0, bm), pl.ds(n0, bn)], acc.astype(o_ref.dtype), mask=m_mask[:, None] & n_mask[None, :])


def _dx_kernel(*refs, m, n, k, bm, bn, bk, lookup, double_quant, has_lora, scale):
    it = iter(refs)
    dy_ref = next(it)
    w = _take_w_refs(it, double_quant, lookup)
    a_ref = b_ref = None
    if has_lora:
        a_ref, b_ref = next(it), next(it)
    dx_ref = next(it)
    sv_ref = next(it) if has_lora else None

    pid_m, pid_k = pl.program_id(0), pl.program_id(1)
    m0 = pid_m * bm
    m_mask = m0 + jnp.arange(bm) < m
    k_blocks, chunks = k // KERNEL_BLOCKSIZE, bk // KERNEL_BLOCKSIZE
    col0 = pid_k * chunks

    def body(step, carry):
        accs, v = carry
        n0 = step * bn
        n_mask = n0 + jnp.arange(bn) < n
        # Masked dy columns are zero, which cancels the finite garbage of W rows past N.
        dy = plgpu.load(dy_ref.at[pl.ds(m0, bm), pl.ds(n0, bn)], mask=m_mask[:, None] & n_mask[None, :], other=0)
        accs = tuple(
            acc + _dot_nn(dy, _dequant_chunk(w, n0, bn, n_mask, col0 + s, k_blocks, dy_ref.dtype))
            for s, acc in enumerate(accs)
        )
        if v is not None:
            v = v + _dot_nn(dy, plgpu.load(b_ref.at[pl.ds(n0, bn), :], mask=n_mask[:, None], other=0))
        return accs, v

    accs0 = tuple(jnp.zeros((bm, KERNEL_BLOCKSIZE), jnp.float32) for _ in range(chunks))
    v0 = jnp.zeros((bm, a_ref.shape[0]), jnp.float32) if has_lora else None
    accs, v = lax.fori_loop(0, cdiv(n, bn), body, (accs0, v0))

    if has_lora:
        sv = (scale * v).astype(dy_ref.dtype)

        @pl.when(pid_k == 0)
        def _():
            plgpu.store(sv_ref.at[pl.ds(m0, bm), :], sv, mask=m_mask[:, None])

    for s, acc in enumerate(accs):
        k_start = pl.multiple_of((col0 + s) * KERNEL_BLOCKSIZE, KERNEL_BLOCKSIZE)
        if has_lora:
            acc = acc + _dot_nn(sv, a_ref[:, pl.ds(k_start, KERNEL_BLOCKSIZE)])
        plgpu.store(
            dx_ref.at[pl.ds(m0, bm), pl.ds(k_start, KERNEL_BLOCKSIZE)],
            acc.astype(dx_ref.dtype),
            mask=m_mask[:, None],
        )


class KernelStatic(NamedTuple):
    """Everything about one call that is not an array (hashable: it is a custom_vjp nondiff argument)."""

    shape: tuple[int, int]
    double_quant: bool
    scale: float
    interpret: bool
    block: NF4MatmulBlock


def _w_operands(packed, absmax, nested_absmax, offset, st: KernelStatic) -> list[jax.Array]:
    n, k = st.shape
    ops = [packed.reshape(n, k // 2), absmax.reshape(n, k // KERNEL_BLOCKSIZE)]
    if st.double_quant:
        ops += [
            nested_absmax.astype(jnp.float32),
            jnp.reshape(offset, (1,)).astype(jnp.float32),
            jnp.asarray(dynamic_code_map()),
        ]
    if st.block.lookup == "gather":
        ops.append(jnp.asarray(NF4_CODE))
    return ops


@lowered_once("st")
def forward(x, w_ops, a, b, st: KernelStatic):
    """Returns y [M, N] and, with LoRA, uc = (x @ A^T).astype(x.dtype) [M, R] (R = padded rank)."""
    (m, k), (n, _) = x.shape, st.shape
    blk = st.block
    bm = min(blk.block_m, max(16, next_power_of_2(m)))
    bn = min(blk.block_n, max(16, next_power_of_2(n)))
    bk = _divisor_block(blk.block_k, k)
    has_lora = a is not None
    fuse = has_lora and blk.fuse_lora_a
    operands = [x, *w_ops]
    out_shape = [jax.ShapeDtypeStruct((m, n), x.dtype)]
    uc = None
    if has_lora:
        operands += [a, b]
        if fuse:
            out_shape.append(jax.ShapeDtypeStruct((m, a.shape[0]), x.dtype))
        else:
            uc = _dot_nt(x, a).astype(x.dtype)
            operands.append(uc)
    kernel = functools.partial(
        _fwd_kernel,
        m=m,
        n=n,
        k=k,
        bm=bm,
        bn=bn,
        bk=bk,
        lookup=blk.lookup,
        double_quant=st.double_quant,
        has_lora=has_lora,
        fuse_lora_a=fuse,
        scale=st.scale,
    )
    outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(cdiv(m, bm), cdiv(n, bn)),
        compiler_params=triton_compiler_params(blk.num_warps, blk.num_stages),
        interpret=st.interpret,
        name="nf4_matmul_fwd",
    )(*operands)
    return outs[0], (outs[1] if fuse else uc)


@lowered_once("k", "st")
def backward_dx(dy, w_ops, a, b, k: int, st: KernelStatic):
    """Returns dx [M, K] and, with LoRA, sv = (s dy @ B).astype(dy.dtype) [M, R]."""
    m, n = dy.shape
    blk = st.block
    bm = min(blk.bwd_block_m, max(16, next_power_of_2(m)))
    bn = min(blk.bwd_block_n, max(16, next_power_of_2(n)))
    bk = _divisor_block(blk.bwd_block_k, k)
    has_lora = a is not None
    operands = [dy, *w_ops] + ([a, b] if has_lora else [])
    out_shape = [jax.ShapeDtypeStruct((m, k), dy.dtype)]
    if has_lora:
        out_shape.append(jax.ShapeDtypeStruct((m, a.shape[0]), dy.dtype))
    kernel = functools.partial(
        _dx_kernel,
        m=m,
        n=n,
        k=k,
        bm=bm,
        bn=bn,
        bk=bk,
        lookup=blk.lookup,
        double_quant=st.double_quant,
        has_lora=has_lora,
        scale=st.scale,
    )
    outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(cdiv(m, bm), k // bk),
        compiler_params=triton_compiler_params(blk.bwd_num_warps, blk.bwd_num_stages),
        interpret=st.interpret,
        name="nf4_matmul_dx",
    )(*operands)
    return outs[0], (outs[1] if has_lora else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _nf4_matmul_2d(st: KernelStatic, x, packed, absmax, nested_absmax, offset, a, b):
    w_ops = _w_operands(packed, absmax, nested_absmax, offset, st)
    return forward(x, w_ops, a, b, st)[0]


def _nf4_matmul_2d_fwd(st, x, packed, absmax, nested_absmax, offset, a, b):
    w_ops = _w_operands(packed, absmax, nested_absmax, offset, st)
    y, uc = forward(x, w_ops, a, b, st)
    return y, (x, packed, absmax, nested_absmax, offset, a, b, uc)


def lora_grads(st: KernelStatic, x, dy, sv, uc, a, b):
    """dA = (s v)^T @ x and dB = s dy^T @ u (plain XLA: r-wide, bandwidth-bound); (None, None) without LoRA."""
    if a is None:
        return None, None
    da = lax.dot_general(sv, x, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    db = st.scale * lax.dot_general(dy, uc, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return da.astype(a.dtype), db.astype(b.dtype)


def _nf4_matmul_2d_bwd(st, res, dy):
    x, packed, absmax, nested_absmax, offset, a, b, uc = res
    w_ops = _w_operands(packed, absmax, nested_absmax, offset, st)
    dx, sv = backward_dx(dy.astype(x.dtype), w_ops, a, b, x.shape[1], st)
    # None: a zero cotangent for the frozen NF4 arrays, which JAX materializes only if something asks for it.
    return (dx, None, None, None, None, *lora_grads(st, x, dy, sv, uc, a, b))


_nf4_matmul_2d.defvjp(_nf4_matmul_2d_fwd, _nf4_matmul_2d_bwd)


def _check_operands(x, w: NF4Weight, lora_a, lora_b) -> None:
    if not isinstance(w, NF4Weight):
        raise TypeError(f"the weight must be an NF4Weight, got {type(w).__name__}")
    if len(w.shape) != 2:
        raise ValueError(f"shape must be (out, in), got {w.shape}")
    n, k = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"x.shape={x.shape} does not end in the weight's in-features {k} (shape={w.shape})")
    packed, absmax, nested_absmax, offset = w.packed, w.absmax, w.nested_absmax, w.offset
    if packed.shape != (cdiv(n * k, 2),) or packed.dtype != jnp.uint8:
        raise ValueError(
            f"packed must be uint8 [{cdiv(n * k, 2)}] for shape={w.shape}, got {packed.dtype}{packed.shape}"
        )
    want_absmax = jnp.uint8 if w.double_quant else jnp.float32
    if absmax.shape != (w.nblocks,) or absmax.dtype != want_absmax:
        raise ValueError(
            f"absmax must be {jnp.dtype(want_absmax).name} [{w.nblocks}] for shape={w.shape}, "
            f"double_quant={w.double_quant}, got {absmax.dtype}{absmax.shape}"
        )
    if w.double_quant:
        nn = cdiv(w.nblocks, NESTED_BLOCKSIZE)
        if nested_absmax is None or nested_absmax.shape != (nn,):
            got = None if nested_absmax is None else nested_absmax.shape
            raise ValueError(f"nested_absmax must be f32 [{nn}] for shape={w.shape}, got {got}")
        if offset is None or jnp.shape(offset) != ():
            raise ValueError(f"offset must be an f32 scalar with double_quant, got {offset!r}")
    if (lora_a is None) != (lora_b is None):
        raise ValueError("lora_a and lora_b must be given together")
    if lora_a is not None:
        r = lora_a.shape[0]
        if lora_a.shape != (r, k) or lora_b.shape != (n, r):
            raise ValueError(
                f"LoRA shapes must be lora_a [r, {k}] and lora_b [{n}, r], got {lora_a.shape} and {lora_b.shape}"
            )


def pad_rank(lora_a, lora_b, dtype):
    """LoRA factors in ``dtype`` with the rank padded to a dot-friendly width (>= 16, a power of two); the zero
    rows/columns add nothing. (None, None) without LoRA."""
    if lora_a is None:
        return None, None
    r = lora_a.shape[0]
    rp = max(16, next_power_of_2(r))
    return (
        jnp.pad(lora_a.astype(dtype), ((0, rp - r), (0, 0))),
        jnp.pad(lora_b.astype(dtype), ((0, 0), (0, rp - r))),
    )


def nf4_matmul(
    x: jax.Array,
    w: NF4Weight,
    lora_a: jax.Array | None = None,
    lora_b: jax.Array | None = None,
    lora_scale: float = 1.0,
    *,
    interpret: bool | None = None,
    block: NF4MatmulBlock | None = None,
) -> jax.Array:
    """x @ dequant(W)^T + lora_scale * (x @ lora_a^T) @ lora_b^T through the fused Pallas kernels.

    x: [..., K]; w: one NF4Weight of shape (N, K); lora_a: [r, K], lora_b: [N, r] (PEFT layouts, cast to
    x.dtype); lora_scale: a Python float. Returns [..., N] in x.dtype. Gradients flow to x, lora_a and lora_b;
    the NF4 arrays get zeros. Falls back to ``nf4_matmul_reference`` when K % 64 != 0 or blocksize != 64.
    """
    _check_operands(x, w, lora_a, lora_b)
    n, k = w.shape
    if k % KERNEL_BLOCKSIZE or w.blocksize != KERNEL_BLOCKSIZE:
        return nf4_matmul_reference(x, w, lora_a, lora_b, lora_scale)
    st = KernelStatic(
        shape=(n, k),
        double_quant=bool(w.double_quant),
        scale=float(lora_scale),
        interpret=resolve_interpret(interpret),
        block=block or NF4MatmulBlock(),
    )
    a, b = pad_rank(lora_a, lora_b, x.dtype)
    y = _nf4_matmul_2d(st, x.reshape(-1, k), w.packed, w.absmax, w.nested_absmax, w.offset, a, b)
    return y.reshape(*x.shape[:-1], n)


def nf4_dequantize_reference(w: NF4Weight, dtype=jnp.float32) -> jax.Array:
    """bnb's dequantize_4bit in plain jnp: code[q] * absmax in f32, then cast to dtype.

    w: an NF4Weight, with any leading (layer) axes. Returns [..., out, in]. The quantization state is frozen:
    no gradient flows into it.
    """
    lead = w.lead_shape
    numel, nblocks = w.numel, w.nblocks
    p = w.packed.astype(jnp.int32)
    codes = jnp.stack([p >> 4, p & 15], axis=-1).reshape(*lead, -1)[..., :numel]
    values = jnp.asarray(NF4_CODE)[codes]
    if w.double_quant:
        nested = jnp.repeat(lax.stop_gradient(w.nested_absmax), NESTED_BLOCKSIZE, axis=-1)[..., :nblocks]
        scale = jnp.asarray(dynamic_code_map())[w.absmax.astype(jnp.int32)] * nested
        scale = scale + lax.stop_gradient(jnp.asarray(w.offset, jnp.float32))[..., None]
    else:
        scale = lax.stop_gradient(w.absmax)
    scale = jnp.repeat(scale, w.blocksize, axis=-1)[..., :numel]
    return (values * scale).astype(dtype).reshape(*lead, *w.shape)


def _matmul_nt(x: jax.Array, w: jax.Array, out_dtype=jnp.float32) -> jax.Array:
    """x [..., K] @ w[N, K]^T, accumulated in f32 and returned in ``out_dtype``."""
    return lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=out_dtype)


def _lora_term_f32(x: jax.Array, lora_a: jax.Array, lora_b: jax.Array, lora_scale: float) -> jax.Array:
    """lora_scale * (x @ A^T) @ B^T in f32, the intermediate rounded to x.dtype as PEFT's lora_A output is."""
    u = _matmul_nt(x, lora_a.astype(x.dtype)).astype(x.dtype)
    return lora_scale * _matmul_nt(u, lora_b.astype(x.dtype))


def nf4_matmul_reference(
    x: jax.Array,
    w: NF4Weight,
    lora_a: jax.Array | None = None,
    lora_b: jax.Array | None = None,
    lora_scale: float = 1.0,
) -> jax.Array:
    """x [..., K] @ dequant(W)^T [K, N] + lora_scale * (x @ lora_a^T) @ lora_b^T -> [..., N] in x.dtype.

    W is dequantized to x.dtype (as bnb does before its 16-bit matmul); products accumulate in f32; the
    LoRA intermediate u = x @ lora_a^T is rounded to x.dtype, as PEFT's lora_A output is.
    """
    y = _matmul_nt(x, nf4_dequantize_reference(w, x.dtype))
    if lora_a is not None:
        y = y + _lora_term_f32(x, lora_a, lora_b, lora_scale)
    return y.astype(x.dtype)


def nf4_dequantize_xla(w: NF4Weight, dtype=jnp.bfloat16) -> jax.Array:
    """The reference's values (bit for bit), formulated for one fused XLA pass: each block's scale broadcasts
    over its block instead of being repeated into a full-size array. The 16-entry table stays a gather: a tree
    of 15 selects computes the same, but XLA did not fuse it whole, and inside the scanned, rematerialized
    layers its f32 intermediates cost over a GiB of temporaries on a 1B model (measured with --compile-only).
    Weights whose element count is not a multiple of the block size use the reference."""
    if w.numel % w.blocksize:
        return nf4_dequantize_reference(w, dtype)
    lead, nblocks = w.lead_shape, w.nblocks
    p = w.packed.astype(jnp.int32)
    codes = jnp.stack([p >> 4, p & 15], axis=-1).reshape(*lead, nblocks, w.blocksize)
    if w.double_quant:
        nested = lax.stop_gradient(w.nested_absmax)
        nested = jnp.broadcast_to(nested[..., None], (*nested.shape, NESTED_BLOCKSIZE))
        nested = nested.reshape(*lead, -1)[..., :nblocks]
        scale = jnp.asarray(dynamic_code_map())[w.absmax.astype(jnp.int32)] * nested
        scale = scale + lax.stop_gradient(jnp.asarray(w.offset, jnp.float32))[..., None]
    else:
        scale = lax.stop_gradient(w.absmax)
    values = jnp.asarray(NF4_CODE)[codes] * scale[..., None]
    return values.astype(dtype).reshape(*lead, *w.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _xla_base_matmul(dtype: str, treedef, x, *leaves):
    """x [M, K] @ dequant(W)^T in ``dtype``; W's arrays are ``leaves`` of ``treedef`` (an NF4Weight)."""
    return _matmul_nt(x, nf4_dequantize_xla(treedef.unflatten(leaves), dtype), jnp.dtype(dtype))


def _xla_base_matmul_fwd(dtype, treedef, x, *leaves):
    # Residuals are the NF4 arrays (already resident), never the 16-bit W: the backward dequantizes again.
    return _xla_base_matmul(dtype, treedef, x, *leaves), leaves


def _xla_base_matmul_bwd(dtype, treedef, leaves, dy):
    # The GEMM runs on 16-bit operands as the forward's, accumulating in f32 inside.
    w = nf4_dequantize_xla(treedef.unflatten(leaves), dtype)
    dx = lax.dot_general(dy.astype(dtype), w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.dtype(dtype))
    return (dx, *(None for _ in leaves))  # None: the NF4 arrays are frozen


_xla_base_matmul.defvjp(_xla_base_matmul_fwd, _xla_base_matmul_bwd)


def nf4_matmul_xla16(
    x: jax.Array,
    w: NF4Weight,
    lora_a: jax.Array | None = None,
    lora_b: jax.Array | None = None,
    lora_scale: float = 1.0,
) -> jax.Array:
    """``nf4_matmul_reference`` as XLA runs it fastest, in PEFT + bitsandbytes' order: W dequantized by
    ``nf4_dequantize_xla`` right before each 16-bit GEMM, forward and backward; the base product leaves the GEMM
    in x.dtype, the LoRA output is computed in x.dtype (``lora_delta``) and the two are added in x.dtype, i.e.
    ``lora_matmul_reference(x, dequant(W), A, B)``.

    Why not autodiff of the reference: it keeps dequant(W) alive from forward to backward (a second, 16-bit
    model across the layers) and runs the backward GEMM on an f32 cotangent; and f32 products write and read
    f32 [tokens, N] arrays that this order never creates (BENCHMARKS.md, NF4 paths: the QLoRA step's speed).
    The custom VJP keeps only the 4-bit arrays as residuals.
    """
    _check_operands(x, w, lora_a, lora_b)
    x2 = x.reshape(-1, w.shape[1])
    leaves, treedef = jax.tree.flatten(w)
    y = _xla_base_matmul(jnp.dtype(x.dtype).name, treedef, x2, *leaves)
    if lora_a is not None:
        y = y + lora_delta(x2, lora_a, lora_b, lora_scale)
    return y.astype(x.dtype).reshape(*x.shape[:-1], w.shape[0])
