"""The NF4 projection as Mosaic GPU kernels (Hopper: TMA + wgmma), decoding the 4-bit weight in registers.

    y[M, N] = x[M, K] @ dequant(W)[N, K]^T           (forward)
    dx[M, K] = dy[M, N] @ dequant(W)[N, K]            (backward; W is frozen: no dW)

W is an ``NF4Weight`` in the bitsandbytes layout (``pallas_kernels.nf4_matmul``): because K is a multiple of 64 the
quant blocks never cross rows, so the packed bytes view as [N, K/2] (byte j of a row holds columns 2j in its high
nibble and 2j + 1 in its low one) and the block scales as [N, K/64]. The double-quantized absmax is decoded first,
in XLA, to f32 scales (as bitsandbytes' dequantize_4bit decodes it before its kernel): N K / 64 values, 1/32 of a
16-bit copy of W. The 4-bit codes are decoded inside the kernels only.

Each CTA runs three warpgroups. A memory warpgroup streams, through a ``num_stages``-deep ring in shared memory
(TMA), the 16-bit operand tile (x, or dy for the backward) and the packed-byte and scale tiles of the W slice of
the step. Two compute warpgroups each own half of the CTA's output columns: each decodes its own W slice in
registers (the 16-level table as a select tree on the code's bits, times the block scale in f32, rounded to
x.dtype exactly as ``nf4_dequantize_reference``), stores it to one of its two shared-memory staging tiles and
issues the wgmma of the shared operand tile against it with f32 accumulation, which runs while the next step
decodes into the other staging tile. The forward stages W[n, k] tiles and multiplies by their transpose; the
backward stages the same kind of tile for its own (N step, K columns) and multiplies it as is, so no 16-bit W ever
reaches HBM.

Why the bytes become 32-bit words: each packed byte decodes to two adjacent 16-bit values. Mosaic GPU register
arrays cannot interleave two [R, C/2] arrays into one [R, C], but one 32-bit word per byte, the first value in
the low half (little-endian), is elementwise; the staging tile is a ``RefUnion`` of a 16-bit [R, C] view (what
wgmma reads) and a 32-bit [R, C/2] view (what the decode writes) with the same 128-byte tiling and swizzle, so
both views name the same bytes. The GPU interpreter (CPU tests) allocates each view of a union separately, so
there the words are split into 16-bit pairs in registers and written through the 16-bit view: same words, same
tile.

Requirements: x in bfloat16 or float16, K a multiple of 64 and the weight's blocksize 64 (``ValueError``
otherwise; the projections of the common models qualify: their hidden and intermediate sizes are multiples of
64). M and N need not be multiples of the tiles: operands are
zero-padded to whole tiles (a copy only when ragged), the result sliced. LoRA factors, when given, add PEFT's
16-bit term; the forward kernel computes its A product u = x @ A^T from the x tiles it already holds when
``MosaicNF4Block.fuse_lora_a`` is set (the rest, u @ B^T and the A and B gradients, are r-wide XLA products).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._common import cdiv, lowered_once, resolve_interpret
from pallas_kernels.lora_matmul import lora_delta
from pallas_kernels.nf4_matmul import (
    KERNEL_BLOCKSIZE,
    NESTED_BLOCKSIZE,
    NF4_CODE,
    NF4Weight,
    _check_operands,
    dynamic_code_map,
    pad_rank,
)

_CHUNK = KERNEL_BLOCKSIZE  # columns of W per scale: one packed [rows, 32] byte tile per chunk
_MEMORY_WG = 2


@dataclasses.dataclass(frozen=True)
class MosaicNF4Block:
    """Tiles of the two kernels (each CTA: two compute warpgroups, each owning half its output columns).

    block_m: x rows per CTA; block_n: W rows (outputs) per forward CTA; block_k: the forward's K step (halved
    down to 64 until it divides K); num_stages: ring depth. bwd_block_m: dy rows per CTA; bwd_block_n: the
    backward's N step; bwd_block_k: dx columns per CTA (halved down to 128 until it divides K; K is padded when
    128 does not); bwd_num_stages: its ring depth.

    Every W tile is decoded once per CTA and multiplied by block_m rows: the decode (a select tree per 4-bit
    code) costs about as much ALU time per element as a 256-row wgmma costs tensor time, so the default takes the
    most rows one warpgroup's f32 accumulator holds at 64 columns each (256 x 64: 128 registers per thread).
    Limits: rows and columns per TMA box at most 256; accumulator columns per warpgroup (block_n / 2,
    bwd_block_k / 2) whole 64-column chunks.
    """

    block_m: int = 256
    block_n: int = 128
    block_k: int = 64
    num_stages: int = 3
    bwd_block_m: int = 256
    bwd_block_n: int = 64
    bwd_block_k: int = 128
    bwd_num_stages: int = 3
    fuse_lora_a: bool = False

    def __post_init__(self):
        multiples = dict(block_m=64, block_n=128, block_k=64, bwd_block_m=64, bwd_block_n=64, bwd_block_k=128)
        for name, unit in multiples.items():
            v = getattr(self, name)
            if v < unit or v % unit or v > 256:
                raise ValueError(f"MosaicNF4Block.{name} must be a multiple of {unit} up to 256, got {v}")
        for name in ("num_stages", "bwd_num_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"MosaicNF4Block.{name} must be >= 1, got {getattr(self, name)}")


def _tiles(dtype, row_bytes: int = 128) -> tuple:
    """Rows of ``row_bytes`` (32, 64 or 128), swizzled: the wgmma operand layout (the 32-bit one is the staging
    tile's word view: the same bytes)."""
    return (plgpu.TilingTransform((8, row_bytes // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(row_bytes))


def block_scales(w: NF4Weight) -> jax.Array:
    """The f32 scale of every 64-value block, [N, K/64]: bitsandbytes' absmax, its double quantization decoded
    (the code map value times the nested absmax, plus the offset: the reference's two f32 roundings)."""
    n, k = w.shape
    if w.double_quant:
        nested = jnp.repeat(lax.stop_gradient(w.nested_absmax), NESTED_BLOCKSIZE)[: w.nblocks]
        scale = jnp.asarray(dynamic_code_map())[w.absmax.astype(jnp.int32)] * nested
        scale = scale + lax.stop_gradient(jnp.asarray(w.offset, jnp.float32))
    else:
        scale = lax.stop_gradient(w.absmax)
    return scale.reshape(n, k // _CHUNK)


def _nf4_level(packed: jax.Array, shift: int) -> jax.Array:
    """The f32 NF4 level of the 4-bit code at bit ``shift`` of each packed byte: a tree of selects on the code's
    bits (registers have no table). Built depth-first, so about one partial result per level is live at a time
    beside the wgmma accumulator, instead of the 8 a level-by-level tree holds."""
    high = [(packed & (1 << (bit + shift))) != 0 for bit in range(4)]

    def pick(bit: int, base: int):
        if bit < 0:
            return jnp.float32(NF4_CODE[base])
        return jnp.where(high[bit], pick(bit - 1, base + (1 << bit)), pick(bit - 1, base))

    return pick(3, 0)


def _decoded_words(packed: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """packed uint8 [R, 32] and scale f32 [R, 32] (each row's block scale) -> uint32 [R, 32]: word j holds the
    two values of byte j rounded to ``dtype``, column 2j (the high nibble) in the low 16 bits."""
    p = packed.astype(jnp.uint32)

    def value_bits(shift):
        value = (_nf4_level(p, shift) * scale).astype(dtype)
        return lax.bitcast_convert_type(value, jnp.uint16).astype(jnp.uint32)

    return value_bits(4) | (value_bits(0) << 16)


def _stage_chunk(words: jax.Array, stage_values, stage_words, cols: int, dtype, interpret: bool) -> None:
    """Writes decoded words [R, 32] as the 64 columns starting at ``cols`` of the staging tile."""
    if interpret:
        pairs = lax.bitcast_convert_type(words, dtype)  # [R, 32, 2], the low half first
        stage_values[:, pl.ds(cols, _CHUNK)] = pairs.reshape(words.shape[0], _CHUNK)
    else:
        stage_words[:, pl.ds(cols // 2, _CHUNK // 2)] = words


@lowered_once("out_shape", "bm", "bc", "step", "n_steps", "transposed", "stages", "interpret", "name")
def _matmul_kernel(
    a, packed, scales_t, lora_a, out_shape, *, bm, bc, step, n_steps, transposed, stages, interpret, name
):
    """The shared kernel of both directions; returns the product, or (product, a @ lora_a^T) with ``lora_a``.

    a: [Mp, n_steps * step] 16-bit (x or dy); packed: [Np, K/2] uint8; scales_t: [K/64, Np] f32.
    Forward (``transposed``): output columns are W rows; step s reads x[:, s step : +step] and each warpgroup's
    W[rows of its half, s step : +step], multiplied as a @ W^T. Backward: output columns are W columns; step s
    reads dy[:, s step : +step] and W[s step : +step, columns of the warpgroup's half], multiplied as a @ W.
    bm: rows per CTA; bc: output columns per CTA (two warpgroups of bc / 2).
    lora_a: None, or (forward only) the LoRA A factor [rp, K] (rp a multiple of 16): warpgroup 0 also accumulates
    u = x @ A^T from the x tiles already in shared memory (x read once for W and A); every CTA does (an rp-wide
    wgmma beside the decode, which bounds the kernel) and those of the first column block write u [Mp, rp].
    """
    dtype = a.dtype
    bw = bc // 2
    # The staging tile of one warpgroup: [W rows, W columns] = forward [bw, step], backward [step, bw].
    w_rows, w_cols = (bw, step) if transposed else (step, bw)
    chunks = w_cols // _CHUNK
    scale_rows = step // _CHUNK if transposed else bc // _CHUNK  # [scale_rows, scale_cols] of scales_t per step
    scale_cols = bc if transposed else step
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    fused = lora_a is not None
    rp = lora_a.shape[0] if fused else 0

    def kernel(*refs):
        if fused:
            a_ref, packed_ref, scales_ref, lora_ref, out_ref, u_ref, smem, bars = refs
            *smem, lora_smem = smem
            *bars, lora_bar = bars
            # u's staging tile: warpgroup 0's staging buffers, free once its last wgmma has read them.
            (stage_values, stage_words, u_smem) = smem.pop(3)
        else:
            a_ref, packed_ref, scales_ref, out_ref, smem, bars = refs
            smem = list(smem)
            (stage_values, stage_words) = smem.pop(3)
        a_smem, packed_smem, scale_smem, out_smem = smem
        a_bar, packed_bar, scale_bar, consumed = bars
        m0, c0 = lax.axis_index("m") * bm, lax.axis_index("c") * bc
        wg = lax.axis_index("wg")

        @pl.when(wg == _MEMORY_WG)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            def issue(s, slot):
                plgpu.copy_gmem_to_smem(a_ref.at[pl.ds(m0, bm), pl.ds(s * step, step)], a_smem.at[slot], a_bar.at[slot])
                if fused:
                    plgpu.copy_gmem_to_smem(
                        lora_ref.at[:, pl.ds(s * step, step)], lora_smem.at[slot], lora_bar.at[slot]
                    )
                if transposed:
                    scale_src = scales_ref.at[pl.ds(s * (step // _CHUNK), scale_rows), pl.ds(c0, bc)]
                else:
                    scale_src = scales_ref.at[pl.ds(c0 // _CHUNK, scale_rows), pl.ds(s * step, step)]
                plgpu.copy_gmem_to_smem(scale_src, scale_smem.at[slot], scale_bar.at[slot])
                for w in range(2):
                    for c in range(chunks):
                        if transposed:
                            rows, byte0 = pl.ds(c0 + w * bw, bw), s * (step // 2) + c * (_CHUNK // 2)
                        else:
                            rows, byte0 = pl.ds(s * step, step), (c0 + w * bw + c * _CHUNK) // 2
                        src = packed_ref.at[rows, pl.ds(byte0, _CHUNK // 2)]
                        plgpu.copy_gmem_to_smem(src, packed_smem.at[slot, w, c], packed_bar.at[slot, w, c])

            for i in range(min(stages, n_steps)):
                issue(i, i)

            @pl.loop(jnp.int32(stages), jnp.int32(n_steps))
            def _(s):
                slot = lax.rem(s, stages)
                plgpu.barrier_wait(consumed.at[slot])
                issue(s, slot)

            # Observe the last releases too: the interpreter requires every phase a thread waits on to be observed.
            @pl.loop(jnp.int32(max(n_steps - stages, 0)), jnp.int32(n_steps))
            def _(s):
                plgpu.barrier_wait(consumed.at[lax.rem(s, stages)])

        def compute(w: int):
            plgpu.set_max_registers(232, action="increase")

            def accumulate(acc_ref, u_acc=None):
                @pl.loop(jnp.int32(0), jnp.int32(n_steps))
                def _(s):
                    slot, buf = lax.rem(s, stages), lax.rem(s, 2)
                    values, words = stage_values.at[w, buf], stage_words.at[w, buf]
                    plgpu.barrier_wait(scale_bar.at[slot])
                    for c in range(chunks):
                        plgpu.barrier_wait(packed_bar.at[slot, w, c])
                        codes = plgpu.load(packed_smem.at[slot, w, c], (), layout=plgpu.Layout.WGMMA)
                        if transposed:
                            scale = plgpu.load(scale_smem.at[slot, c, pl.ds(w * bw, bw)], (), layout=row_layout)
                        else:
                            scale = plgpu.load(scale_smem.at[slot, w * chunks + c], (), layout=row_layout)
                        scale = lax.broadcast_in_dim(scale, codes.shape, [0])
                        _stage_chunk(_decoded_words(codes, scale, dtype), values, words, c * _CHUNK, dtype, interpret)
                    plgpu.commit_smem()  # the staged tile, visible to the wgmma's async proxy
                    plgpu.barrier_wait(a_bar.at[slot])
                    if u_acc is not None:  # issued first: the wait below leaves only the main product in flight
                        plgpu.barrier_wait(lora_bar.at[slot])
                        plgpu.wgmma(u_acc, a_smem.at[slot], lora_smem.at[slot].transpose((1, 0)))
                    plgpu.wgmma(acc_ref, a_smem.at[slot], values.transpose((1, 0)) if transposed else values)
                    # The wgmma runs while the next tile decodes into the other staging buffer; the previous one
                    # has then read its ring slot and staging buffer, which are released for reuse.
                    plgpu.wgmma_wait(1)

                    @pl.when(s > 0)
                    def _():
                        plgpu.barrier_arrive(consumed.at[lax.rem(s - 1, stages)])

                plgpu.wgmma_wait(0)
                plgpu.barrier_arrive(consumed.at[(n_steps - 1) % stages])
                return acc_ref[...], None if u_acc is None else u_acc[...]

            accs = [plgpu.ACC((bm, bw), jnp.float32)] + ([plgpu.ACC((bm, rp), jnp.float32)] if fused and w == 0 else [])
            acc, u = pl.run_scoped(accumulate, *accs)
            out_smem.at[w][...] = acc.astype(dtype)
            if u is not None:
                u_smem[...] = u.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem.at[w], out_ref.at[pl.ds(m0, bm), pl.ds(c0 + w * bw, bw)])
            if u is not None:

                @pl.when(lax.axis_index("c") == 0)
                def _():
                    plgpu.copy_smem_to_gmem(u_smem, u_ref.at[pl.ds(m0, bm)])

            plgpu.wait_smem_to_gmem(0)

        pl.when(wg == 0)(functools.partial(compute, 0))
        pl.when(wg == 1)(functools.partial(compute, 1))

    smem = [
        plgpu.SMEM((stages, bm, step), dtype, transforms=_tiles(dtype)),
        plgpu.SMEM((stages, 2, chunks, w_rows, _CHUNK // 2), jnp.uint8),
        plgpu.SMEM((stages, scale_rows, scale_cols), jnp.float32),
        plgpu.RefUnion(
            plgpu.SMEM((2, 2, w_rows, w_cols), dtype, transforms=_tiles(dtype)),
            plgpu.SMEM((2, 2, w_rows, w_cols // 2), jnp.uint32, transforms=_tiles(jnp.uint32)),
        ),
        plgpu.SMEM((2, bm, bw), dtype, transforms=_tiles(dtype)),
    ]
    bars = (
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=(stages, 2, chunks)),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),
    )
    out_type = jax.ShapeDtypeStruct(out_shape, dtype)
    operands = (a, packed, scales_t)
    if fused:
        if rp % 16 or rp > 32 or bm * rp > 2 * w_rows * w_cols:
            raise ValueError(f"the fused LoRA A product takes padded ranks 16 or 32 within the staging tiles, got {rp}")
        staging = plgpu.RefUnion(*smem[3].refs, plgpu.SMEM((bm, rp), dtype, transforms=_tiles(dtype, rp * 2)))
        smem = (*smem[:3], staging, smem[4], plgpu.SMEM((stages, rp, step), dtype, transforms=_tiles(dtype)))
        bars += (plgpu.Barrier(num_barriers=stages),)
        out_type = (out_type, jax.ShapeDtypeStruct((out_shape[0], rp), dtype))
        operands += (lora_a,)
    smem = tuple(smem)
    grid = (out_shape[0] // bm, out_shape[1] // bc)
    call = plgpu.kernel(
        kernel,
        out_type=out_type,
        scratch_types=(smem, bars),
        grid=grid,
        grid_names=("m", "c"),
        num_threads=3,
        thread_name="wg",
        interpret=plgpu.InterpretGPUParams() if interpret else None,
        kernel_name=name,
    )
    return call(*operands)


def _divisor_step(block: int, total: int, unit: int) -> int:
    """Largest of block, block / 2, ... (down to ``unit``) that divides ``total``; ``unit`` if none does."""
    while block > unit and total % block:
        block //= 2
    return block


def _pad_to(a: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Zero-pads ``a`` at the end of each axis to ``shape`` (no copy when it already has it)."""
    if a.shape == shape:
        return a
    return jnp.pad(a, [(0, t - s) for s, t in zip(a.shape, shape, strict=True)])


def _weight_operands(w: NF4Weight, rows: int, cols: int) -> tuple[jax.Array, jax.Array]:
    """packed uint8 [rows, cols / 2] and scales_t f32 [cols / 64, rows]: W's arrays zero-padded to rows x cols."""
    n, k = w.shape
    packed = _pad_to(lax.stop_gradient(w.packed).reshape(n, k // 2), (rows, cols // 2))
    scales_t = _pad_to(block_scales(w).T, (cols // _CHUNK, rows))
    return packed, scales_t


def forward(x: jax.Array, w: NF4Weight, lora_a: jax.Array | None, block: MosaicNF4Block, interpret: bool):
    """x [M, K] @ dequant(W)^T -> y [M, N] in x.dtype; with lora_a [rp, K] (rp a multiple of 16) also
    u = x @ lora_a^T [M, rp] in x.dtype, from the same kernel: (y, u)."""
    (m, k), (n, _) = x.shape, w.shape
    bm, bn = block.block_m, block.block_n
    bk = _divisor_step(block.block_k, k, _CHUNK)
    mp, np_ = cdiv(m, bm) * bm, cdiv(n, bn) * bn
    packed, scales_t = _weight_operands(w, np_, k)
    out = _matmul_kernel(
        _pad_to(x, (mp, k)),
        packed,
        scales_t,
        lora_a,
        (mp, np_),
        bm=bm,
        bc=bn,
        step=bk,
        n_steps=k // bk,
        transposed=True,
        stages=block.num_stages,
        interpret=interpret,
        name="nf4_matmul_fwd_mgpu",
    )
    if lora_a is None:
        return out[:m, :n]
    return out[0][:m, :n], out[1][:m]


def backward_dx(dy: jax.Array, w: NF4Weight, block: MosaicNF4Block, interpret: bool) -> jax.Array:
    """dy [M, N] @ dequant(W) -> dx [M, K] in dy.dtype."""
    (m, n), (_, k) = dy.shape, w.shape
    bm, bns = block.bwd_block_m, block.bwd_block_n
    bkx = _divisor_step(block.bwd_block_k, k, 2 * _CHUNK)
    mp, np_, kp = cdiv(m, bm) * bm, cdiv(n, bns) * bns, cdiv(k, bkx) * bkx
    packed, scales_t = _weight_operands(w, np_, kp)
    dx = _matmul_kernel(
        _pad_to(dy, (mp, np_)),
        packed,
        scales_t,
        None,
        (mp, kp),
        bm=bm,
        bc=bkx,
        step=bns,
        n_steps=np_ // bns,
        transposed=False,
        stages=block.bwd_num_stages,
        interpret=interpret,
        name="nf4_matmul_dx_mgpu",
    )
    return dx[:m, :k]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _base_matmul(treedef, block: MosaicNF4Block, interpret: bool, x, *leaves):
    return forward(x, treedef.unflatten(leaves), None, block, interpret)


def _base_matmul_fwd(treedef, block, interpret, x, *leaves):
    # Residuals: the NF4 arrays only (already resident); the backward decodes W again, in its own kernel.
    return _base_matmul(treedef, block, interpret, x, *leaves), leaves


def _base_matmul_bwd(treedef, block, interpret, leaves, dy):
    dx = backward_dx(dy, treedef.unflatten(leaves), block, interpret)
    return (dx, *(None for _ in leaves))  # None: the NF4 arrays are frozen


_base_matmul.defvjp(_base_matmul_fwd, _base_matmul_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _base_matmul_and_lora_a(treedef, block: MosaicNF4Block, interpret: bool, x, lora_a, *leaves):
    """(x @ dequant(W)^T, x @ lora_a^T), both in x.dtype, from one forward kernel."""
    return forward(x, treedef.unflatten(leaves), lora_a, block, interpret)


def _base_matmul_and_lora_a_fwd(treedef, block, interpret, x, lora_a, *leaves):
    out = _base_matmul_and_lora_a(treedef, block, interpret, x, lora_a, *leaves)
    return out, (x, lora_a, leaves)


def _base_matmul_and_lora_a_bwd(treedef, block, interpret, res, cotangents):
    x, lora_a, leaves = res
    dy, du = cotangents
    dx = backward_dx(dy, treedef.unflatten(leaves), block, interpret)
    # The LoRA A product's gradients in x.dtype, as XLA's autodiff of PEFT's 16-bit einsum computes them.
    dx = dx + jnp.dot(du.astype(x.dtype), lora_a)
    da = lax.dot_general(du.astype(x.dtype), x, (((0,), (0,)), ((), ())))
    return (dx, da, *(None for _ in leaves))


_base_matmul_and_lora_a.defvjp(_base_matmul_and_lora_a_fwd, _base_matmul_and_lora_a_bwd)


def fuses_lora_a(block: MosaicNF4Block, k: int, rank: int) -> bool:
    """Whether the forward kernel takes the LoRA A product at this rank: u's [block_m, rank] tile (rank padded to
    16 or 32) is staged in warpgroup 0's W staging buffers, and wider ranks' A tiles exceed shared memory."""
    rp = max(16, 1 << max(rank - 1, 0).bit_length())
    staging = block.block_n * _divisor_step(block.block_k, k, _CHUNK)  # two [block_n / 2, step] buffers
    return rp <= 32 and block.block_m * rp <= staging


def check_supported(x: jax.Array, w: NF4Weight) -> None:
    """One clear error for what these kernels do not take: a non-16-bit x, K not a multiple of 64, or a quant
    block size other than 64."""
    if jnp.dtype(x.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"the Mosaic NF4 matmul takes bfloat16 or float16 x (wgmma operands), got {x.dtype}")
    if w.shape[1] % KERNEL_BLOCKSIZE or w.blocksize != KERNEL_BLOCKSIZE:
        raise ValueError(
            f"the Mosaic NF4 matmul needs in-features K a multiple of 64 and blocksize 64 (quant blocks within "
            f"rows), got shape={w.shape}, blocksize={w.blocksize}"
        )


def nf4_matmul_mosaic(
    x: jax.Array,
    w: NF4Weight,
    lora_a: jax.Array | None = None,
    lora_b: jax.Array | None = None,
    lora_scale: float = 1.0,
    *,
    interpret: bool | None = None,
    block: MosaicNF4Block | None = None,
) -> jax.Array:
    """x @ dequant(W)^T + lora_scale * (x @ lora_a^T) @ lora_b^T through the Mosaic GPU kernels.

    x: [..., K] bfloat16 or float16; w: one NF4Weight of shape (N, K), K a multiple of 64, blocksize 64; lora_a:
    [r, K], lora_b: [N, r] (PEFT layouts). Returns [..., N] in x.dtype, in PEFT's 16-bit order (the base product
    and the LoRA term each rounded to x.dtype, then added), as ``nf4_matmul_xla16``. With ``block.fuse_lora_a``
    the forward kernel also computes u = x @ lora_a^T (x read once); otherwise u is an XLA product. Gradients
    flow to x (the dx kernel), lora_a and lora_b; the NF4 arrays are frozen.
    """
    _check_operands(x, w, lora_a, lora_b)
    check_supported(x, w)
    n, k = w.shape
    block = block or MosaicNF4Block()
    x2 = x.reshape(-1, k)
    leaves, treedef = jax.tree.flatten(w)
    static = (treedef, block, resolve_interpret(interpret))
    if lora_a is not None and block.fuse_lora_a and fuses_lora_a(block, k, lora_a.shape[0]):
        a, b = pad_rank(lora_a, lora_b, x.dtype)
        y, u = _base_matmul_and_lora_a(*static, x2, a, *leaves)
        y = y + lora_scale * jnp.einsum("mr,nr->mn", u, b)  # lora_delta's second product
    else:
        y = _base_matmul(*static, x2, *leaves)
        if lora_a is not None:
            y = y + lora_delta(x2, lora_a, lora_b, lora_scale)
    return y.astype(x.dtype).reshape(*x.shape[:-1], n)
