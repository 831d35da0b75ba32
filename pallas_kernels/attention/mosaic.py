"""Flash attention's forward, dK/dV and dQ as Mosaic GPU kernels (Hopper wgmma + TMA), for 16-bit inputs
without segments.

Why a second backend: at head dim 256 the Triton dK/dV kernel holds two f32 [block_k, 256] accumulators per
program, which caps its key tile at 32 rows and keeps its dots off wgmma (BENCHMARKS.md, attention kernels). Here each CTA runs three warpgroups: a memory warpgroup streams the Q, dO, log-sum-exp and delta tiles
of every query head of the kv head's group through a ``stages``-deep ring in shared memory (TMA), and two compute
warpgroups hold f32 wgmma accumulators of 64 keys each in registers. At head dim 256 the CTA owns 64 keys and
the warpgroups split the roles: warpgroup 0 accumulates dV = sum P^T dO, warpgroup 1 dK = sum dS^T Q (128
registers per thread each), both recomputing the transposed scores S^T = K Q^T (25% more tensor work than one
program holding both accumulators, which does not fit at D = 256). Up to head dim 128 the CTA can own 128 keys
and each warpgroup computes dK and dV of its own 64. The forward and dQ share one query-major kernel: two compute
warpgroups of 64 query rows each, K and V tiles streamed by the memory warpgroup. The score transform, masks,
block ranges and softmax steps are ``common``'s, as the Triton kernels', so both backends skip the same blocks and
mask the same pairs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.attention import common as att

WG_KEYS = 64  # keys per compute warpgroup in dK/dV: one wgmma M tile
WG_ROWS = 64  # query rows per compute warpgroup in the forward: one wgmma M tile
_MEMORY_WG = 2


def supports(dtype, head_dim: int, has_segments: bool) -> bool:
    """Whether these kernels can express the case (16-bit wgmma operands, the padded head dim in whole 128-byte
    swizzle groups, no segment ids); which GPU runs them is the caller's choice: wgmma exists on Hopper only."""
    return jnp.dtype(dtype).itemsize == 2 and head_dim % 64 == 0 and not has_segments


def _mma(acc, a, b, shape, interpret: bool):
    """acc + a @ b on the tensor cores (acc None: a fresh f32 accumulator of ``shape``).

    The interpreter (CPU tests) cannot run an accumulator initialised from registers (``ACC.init``: no CPU
    lowering in jax 0.11.2) nor a wgmma whose A operand is in registers, so there the sum is taken outside
    the wgmma and a register operand goes through ``lax.dot``; same arithmetic, f32 accumulation either way.
    """
    if interpret and isinstance(a, jax.Array):
        out = lax.dot(a, b[...], preferred_element_type=jnp.float32)
        return out if acc is None else acc + out
    if acc is None or interpret:

        def fresh(ref):
            plgpu.wgmma(ref, a, b)
            return ref[...]

        out = pl.run_scoped(fresh, plgpu.ACC(shape, jnp.float32))
        return out if acc is None else acc + out

    def accumulate(ref):
        plgpu.wgmma(ref, a, b)

    return pl.run_state(accumulate)(plgpu.ACC.init(acc))


def _stream(n_steps, stages: int, issue, consumed) -> None:
    """The memory warpgroup's ring: ``issue(step, slot)`` starts the TMA copies of each step into slot
    ``step % stages``, once both compute warpgroups have released that slot (``consumed``)."""
    plgpu.set_max_registers(40, action="decrease")
    for i in range(stages):
        pl.when(i < n_steps)(functools.partial(issue, jnp.int32(i), i))

    @pl.loop(jnp.int32(stages), n_steps)
    def _(step):
        slot = lax.rem(step, stages)
        plgpu.barrier_wait(consumed.at[slot])
        issue(step, slot)

    # Observe the last slots' releases too: no effect on the GPU, but the interpreter requires every phase of a
    # barrier a thread waits on to be observed.
    @pl.loop(jnp.maximum(n_steps - stages, 0), n_steps)
    def _(step):
        plgpu.barrier_wait(consumed.at[lax.rem(step, stages)])


def _launch(kernel, st, out_type, scratch, grid, grid_names, name):
    """Three warpgroups per CTA: two compute, one memory (``_MEMORY_WG``)."""
    return plgpu.kernel(
        kernel,
        out_type=out_type,
        scratch_types=scratch,
        grid=grid,
        grid_names=grid_names,
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if st.interpret else None,
        kernel_name=name,
    )


_TILES = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))  # 64 16-bit columns per 128-byte row


def dkv(q, k, v, do, lse, delta, st):
    """dK, dV [B, Sp, Hk, D] for padded q, do [B, Tp, Hq, D], k, v [B, Sp, Hk, D], lse, delta [B, Hq, Tp] f32.

    Tiles: ``st.blocks.block_k_dkv`` keys per CTA: 64 (warpgroup 0 dV, warpgroup 1 dK, for head dims whose two
    accumulators do not fit one warpgroup's registers) or 128 (each warpgroup dK and dV of its own 64: no
    recomputed scores; head dims up to 128); ``block_q_dkv`` query rows per step, ``num_stages_dkv`` steps in flight.
    Interpreted (``st.interpret``), each warpgroup runs as an XLA CPU computation blocking on simulated barriers:
    with fewer than three CPU runtime threads (XLA sizes its pool by the cores; ``NPROC`` overrides it) the
    blocked ones starve the rest and the call hangs, hence ``NPROC=8`` in the tests' conftest.
    """
    b, tp, hq, d = q.shape
    sp, hk = k.shape[1], k.shape[2]
    bq, bk, stages, g = st.blocks.block_q_dkv, st.blocks.block_k_dkv, st.blocks.num_stages_dkv, st.groups
    fused = bk == 2 * WG_KEYS
    if fused and d > 128:
        raise ValueError(f"128 keys per CTA hold dK and dV of 64 keys per warpgroup: head dim {d} > 128 does not fit")
    if sp % bk or tp % bq:
        raise ValueError(f"padded lengths {tp=} {sp=} must be multiples of {bq=} and {bk=}")
    dtype = q.dtype
    wgmma_layout = plgpu.Layout.WGMMA
    row_layout = plgpu.Layout.WGMMA.reduce(0)  # a [bq] vector broadcast along the keys of S^T [bk, bq]
    iota = functools.partial(plgpu.broadcasted_iota, layout=wgmma_layout)
    mma = functools.partial(_mma, interpret=bool(st.interpret))

    def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, smem, bars):
        k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem = smem
        kv_bar, q_bar, do_bar, lse_bar, delta_bar, consumed, done = bars
        k_start = lax.axis_index("kv") * bk
        bi, h, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
        bounds = att.q_block_range(k_start, bq, bk, st)
        lo, hi = bounds[0], bounds[3]
        n_q = hi - lo
        n_steps = g * n_q  # steps run over (query head of the group, query block), heads outermost

        @pl.when(wg == _MEMORY_WG)
        def _memory():
            keys = (bi, pl.ds(k_start, bk), h)
            plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem, kv_bar.at[0])
            plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem, kv_bar.at[1])

            def issue(step, slot):
                head = h * g + lax.div(step, n_q)
                rows = pl.ds((lo + lax.rem(step, n_q)) * bq, bq)
                plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, head], q_smem.at[slot], q_bar.at[slot])
                plgpu.copy_gmem_to_smem(do_ref.at[bi, rows, head], do_smem.at[slot], do_bar.at[slot])
                plgpu.copy_gmem_to_smem(lse_ref.at[bi, head, rows], lse_smem.at[slot], lse_bar.at[slot])
                plgpu.copy_gmem_to_smem(delta_ref.at[bi, head, rows], delta_smem.at[slot], delta_bar.at[slot])

            _stream(n_steps, stages, issue, consumed)

        def compute(wg_index: int, want_dk: bool, want_dv: bool):
            plgpu.set_max_registers(232, action="increase")
            # This warpgroup's keys: all 64 of the CTA (roles split), or its own half of 128 (both outputs).
            first = wg_index * WG_KEYS if fused else 0
            keys = pl.ds(first, WG_KEYS)
            k_tile, v_tile = k_smem.at[keys], v_smem.at[keys]
            wg_start = k_start + first
            plgpu.barrier_wait(kv_bar.at[0])
            if want_dk:
                plgpu.barrier_wait(kv_bar.at[1])

            def body(qb, carry, masked):
                dk, dv, step = carry
                slot = lax.rem(step, stages)
                for bar in (q_bar, do_bar, lse_bar) + ((delta_bar,) if want_dk else ()):
                    plgpu.barrier_wait(bar.at[slot])
                s_t = mma(None, k_tile, q_smem.at[slot].transpose((1, 0)), (WG_KEYS, bq))
                s_t, tanh = att.scale_scores(s_t, st)
                if masked:
                    vis = att.visible(qb * bq, wg_start, bq, WG_KEYS, None, None, st, kv_major=True, iota=iota)
                    if vis is not None:
                        s_t = jnp.where(vis, s_t, att.MASK_VALUE)
                lse = plgpu.load(lse_smem.at[slot], layout=row_layout)
                p_t = jnp.exp2(s_t - lax.broadcast_in_dim(lse, s_t.shape, [1]))
                if want_dv:
                    dv = mma(dv, p_t.astype(dtype), do_smem.at[slot], (WG_KEYS, d))
                if want_dk:
                    if tanh is not None:
                        p_t = p_t * (1.0 - tanh * tanh)  # d(cap * tanh(x / cap)) / dx, folded in before dP
                    dp_t = mma(None, v_tile, do_smem.at[slot].transpose((1, 0)), (WG_KEYS, bq))
                    delta = plgpu.load(delta_smem.at[slot], layout=row_layout)
                    ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta, dp_t.shape, [1]))
                    dk = mma(dk, ds_t.astype(dtype), q_smem.at[slot], (WG_KEYS, d))
                plgpu.barrier_arrive(consumed.at[slot])
                return dk, dv, step + 1

            def group(_, carry):
                # The CTA's block range: the union over its keys; with two 64-key halves a block left unmasked
                # is fully visible to both, and each half masks its own keys elsewhere.
                return att.masked_loops(bounds, body, carry)

            zeros = plgpu.layout_cast(jnp.zeros((WG_KEYS, d), jnp.float32), wgmma_layout)
            init = (zeros if want_dk else None, zeros if want_dv else None, jnp.int32(0))
            dk, dv, _ = lax.fori_loop(0, g, group, init)
            # Both warpgroups are past their last read of K and V: each stages its results in its own rows.
            plgpu.barrier_arrive(done)
            plgpu.barrier_wait(done)
            rows = (bi, pl.ds(wg_start, WG_KEYS), h)
            if want_dk:
                k_tile[...] = (dk * st.scale).astype(dtype)
            if want_dv:
                v_tile[...] = dv.astype(dtype)
            plgpu.commit_smem()
            if want_dk:
                plgpu.copy_smem_to_gmem(k_tile, dk_ref.at[rows])
            if want_dv:
                plgpu.copy_smem_to_gmem(v_tile, dv_ref.at[rows])
            plgpu.wait_smem_to_gmem(0)

        if fused:
            pl.when(wg == 0)(functools.partial(compute, 0, True, True))
            pl.when(wg == 1)(functools.partial(compute, 1, True, True))
        else:
            pl.when(wg == 0)(functools.partial(compute, 0, False, True))
            pl.when(wg == 1)(functools.partial(compute, 1, True, False))

    smem = (
        plgpu.SMEM((bk, d), dtype, transforms=_TILES),  # K, then dK
        plgpu.SMEM((bk, d), dtype, transforms=_TILES),  # V, then dV
        plgpu.SMEM((stages, bq, d), dtype, transforms=_TILES),  # Q ring
        plgpu.SMEM((stages, bq, d), dtype, transforms=_TILES),  # dO ring
        plgpu.SMEM((stages, bq), jnp.float32),
        plgpu.SMEM((stages, bq), jnp.float32),
    )
    bars = (
        plgpu.Barrier(num_barriers=2),
        *(plgpu.Barrier(num_barriers=stages),) * 4,
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        plgpu.Barrier(num_arrivals=2),
    )
    out_type = (jax.ShapeDtypeStruct(k.shape, dtype),) * 2
    call = _launch(kernel, st, out_type, (smem, bars), (sp // bk, b, hk), ("kv", "batch", "heads"), "flash_dkv_mgpu")
    return call(q, k, v, do, lse, delta)


def forward(q, k, v, st):
    """(out [B, Tp, Hq, D], lse [B, Hq, Tp] f32, log2 units) for padded q [B, Tp, Hq, D], k, v [B, Sp, Hk, D]:
    the Triton forward's online softmax (same formulas, so the backward kernels take either's lse), with each
    compute warpgroup owning 64 query rows of the CTA's 128 and the memory warpgroup streaming K and V tiles of
    ``st.blocks.block_k`` keys through a ``num_stages``-deep ring."""
    return _query_major(st, q, k, v)


def dq(q, k, v, do, lse, delta, st):
    """dQ [B, Tp, Hq, D]: the forward's layout (two warpgroups of 64 query rows, K and V tiles of
    ``block_k_dq`` keys streamed through ``num_stages_dq`` stages), each warpgroup recomputing P and dP and
    accumulating dQ = sum dS K in registers. Head dims up to 128: at 256 the Q and dO tiles and two K + V stages
    exceed shared memory."""
    return _query_major(st, q, k, v, (do, lse, delta))


def _query_major(st, q, k, v, grad_inputs=None):
    """The forward (``grad_inputs`` None) or the dQ kernel (``grad_inputs`` = (dO, lse, delta))."""
    want_dq = grad_inputs is not None
    b, tp, hq, d = q.shape
    sp = k.shape[1]
    blocks = st.blocks
    bk, stages = (blocks.block_k_dq, blocks.num_stages_dq) if want_dq else (blocks.block_k, blocks.num_stages)
    bq, g = 2 * WG_ROWS, st.groups
    if sp % bk or tp % bq:
        raise ValueError(f"padded lengths {tp=} {sp=} must be multiples of {bq=} and {bk=}")
    if want_dq and d > 128:
        raise ValueError(f"the Mosaic dQ kernel takes head dims up to 128 (shared memory), not {d}")
    dtype = q.dtype
    nq = tp // bq
    wgmma_layout = plgpu.Layout.WGMMA
    row_layout = wgmma_layout.reduce(1)  # a [64] vector broadcast along the keys of S [64, bk]
    iota = functools.partial(plgpu.broadcasted_iota, layout=wgmma_layout)
    mma = functools.partial(_mma, interpret=bool(st.interpret))
    # Per warpgroup: [64, d] tiles of Q (then the output) and for dQ of dO; [64] rows of lse and delta read by dQ,
    # or of the lse the forward writes.
    n_tiles, n_rows, n_row_inputs = (2, 2, 2) if want_dq else (1, 1, 0)

    def kernel(*refs):
        q_ref, k_ref, v_ref = refs[:3]
        grad_refs = refs[3:6] if want_dq else ()
        out_refs = refs[3 + len(grad_refs) : -2]
        (tiles, rows_smem, k_smem, v_smem), (in_bars, k_bar, v_bar, consumed) = refs[-2:]
        q_start = (nq - 1 - lax.axis_index("q")) * bq  # longest rows first, as the Triton kernels
        bi, h, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
        kv_head = lax.div(h, g)
        bounds = att.kv_block_range(q_start, bq, bk, st)  # the union over the CTA's 128 rows
        lo, hi = bounds[0], bounds[3]

        @pl.when(wg == _MEMORY_WG)
        def _memory():
            for w in range(2):
                rows = pl.ds(q_start + w * WG_ROWS, WG_ROWS)
                sources = [q_ref.at[bi, rows, h]]
                if want_dq:
                    do_ref, lse_ref, delta_ref = grad_refs
                    sources += [do_ref.at[bi, rows, h], lse_ref.at[bi, h, rows], delta_ref.at[bi, h, rows]]
                targets = [tiles.at[i, w] for i in range(n_tiles)]
                targets += [rows_smem.at[i, w] for i in range(n_row_inputs)]
                for i, (src, dst) in enumerate(zip(sources, targets, strict=True)):
                    plgpu.copy_gmem_to_smem(src, dst, in_bars.at[i, w])

            def issue(step, slot):
                keys = (bi, pl.ds((lo + step) * bk, bk), kv_head)
                plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_bar.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_bar.at[slot])

            _stream(hi - lo, stages, issue, consumed)

        def compute(w: int):
            plgpu.set_max_registers(232, action="increase")
            rows_start = q_start + w * WG_ROWS
            q_tile = tiles.at[0, w]
            for i in range(n_tiles + n_row_inputs):
                plgpu.barrier_wait(in_bars.at[i, w])
            if want_dq:
                lse = plgpu.load(rows_smem.at[0, w], layout=row_layout)
                delta = plgpu.load(rows_smem.at[1, w], layout=row_layout)

            def body(kb, carry, masked):
                slot = lax.rem(kb - lo, stages)
                plgpu.barrier_wait(k_bar.at[slot])
                s_ = mma(None, q_tile, k_smem.at[slot].transpose((1, 0)), (WG_ROWS, bk))
                s_, tanh = att.scale_scores(s_, st)
                if masked:
                    vis = att.visible(rows_start, kb * bk, WG_ROWS, bk, None, None, st, iota=iota)
                    if vis is not None:
                        s_ = jnp.where(vis, s_, att.MASK_VALUE)
                if want_dq:
                    p = jnp.exp2(s_ - lax.broadcast_in_dim(lse, s_.shape, [0]))
                    if tanh is not None:
                        p = p * (1.0 - tanh * tanh)  # d(cap * tanh(x / cap)) / dx, folded in before dP
                    plgpu.barrier_wait(v_bar.at[slot])
                    dp = mma(None, tiles.at[1, w], v_smem.at[slot].transpose((1, 0)), (WG_ROWS, bk))
                    ds = p * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))
                    carry = mma(carry, ds.astype(dtype), k_smem.at[slot], (WG_ROWS, d))
                else:
                    acc, m, l = carry
                    p, alpha, m, l = att.online_softmax(s_, m, l)
                    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                    plgpu.barrier_wait(v_bar.at[slot])
                    carry = mma(acc, p.astype(dtype), v_smem.at[slot], (WG_ROWS, d)), m, l
                plgpu.barrier_arrive(consumed.at[slot])
                return carry

            zeros = plgpu.layout_cast(jnp.zeros((WG_ROWS, d), jnp.float32), wgmma_layout)
            rows = pl.ds(rows_start, WG_ROWS)
            if want_dq:
                q_tile[...] = (att.masked_loops(bounds, body, zeros) * st.scale).astype(dtype)
            else:
                init = (
                    zeros,
                    plgpu.layout_cast(jnp.full((WG_ROWS,), -jnp.inf, jnp.float32), row_layout),
                    plgpu.layout_cast(jnp.zeros((WG_ROWS,), jnp.float32), row_layout),
                )
                out, rows_smem.at[0, w][...] = att.softmax_result(*att.masked_loops(bounds, body, init))
                q_tile[...] = out.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_tile, out_refs[0].at[bi, rows, h])
            if not want_dq:
                plgpu.copy_smem_to_gmem(rows_smem.at[0, w], out_refs[1].at[bi, h, rows])
            plgpu.wait_smem_to_gmem(0)

        pl.when(wg == 0)(functools.partial(compute, 0))
        pl.when(wg == 1)(functools.partial(compute, 1))

    smem = (
        plgpu.SMEM((n_tiles, 2, WG_ROWS, d), dtype, transforms=_TILES),  # [Q (then the output), dO] x warpgroup
        plgpu.SMEM((n_rows, 2, WG_ROWS), jnp.float32),  # [lse, delta] (dQ) or [lse out] (forward) x warpgroup
        plgpu.SMEM((stages, bk, d), dtype, transforms=_TILES),
        plgpu.SMEM((stages, bk, d), dtype, transforms=_TILES),
    )
    bars = (
        plgpu.Barrier(num_barriers=(n_tiles + n_row_inputs, 2)),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),
    )
    grid, names = (nq, b, hq), ("q", "batch", "heads")
    if want_dq:
        call = _launch(kernel, st, jax.ShapeDtypeStruct(q.shape, dtype), (smem, bars), grid, names, "flash_dq_mgpu")
        return call(q, k, v, *grad_inputs)
    out_type = (jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((b, hq, tp), jnp.float32))
    return _launch(kernel, st, out_type, (smem, bars), grid, names, "flash_fwd_mgpu")(q, k, v)
