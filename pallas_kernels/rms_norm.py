"""RMSNorm, optionally fused with the residual add.

y = (x * rsqrt(mean(x^2) + eps)) * (weight + weight_offset), computed in f32 and cast to x.dtype.
Gemma stores the weight minus one, hence ``weight_offset=1.0`` there.

Kernels: the rows of x [..., D] are flattened to [N, D]; each program holds ``block_rows`` whole rows in
registers (next_power_of_2(D) lanes, masked past D), so x is read once and y written once. The forward saves
x (or the sum x + residual) and the f32 rstd per row; the backward recomputes x_hat from them. dweight is a
sum over all rows: each backward program walks a contiguous run of row blocks, keeps its partial sum in
registers, and writes one f32 row of a [programs, D] buffer that the wrapper reduces.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import cdiv, lowered_once, next_power_of_2, resolve_interpret, triton_compiler_params

# The whole row lives in registers; past this a row would spill.
MAX_HIDDEN = 8192


@dataclasses.dataclass(frozen=True)
class RmsNormBlock:
    """Launch configuration; None picks a default from the row width (tuned by reasoning for the H200).

    block_rows / bwd_block_rows: rows per program (power of two) in the forward / backward kernel.
    num_warps / bwd_num_warps: Triton warps per program.
    bwd_programs: most programs of the backward kernel, i.e. rows of the f32 dweight partial-sum buffer.
    """

    block_rows: int | None = None
    num_warps: int | None = None
    bwd_block_rows: int | None = None
    bwd_num_warps: int | None = None
    bwd_programs: int = 512

    def __post_init__(self):
        for name in ("block_rows", "bwd_block_rows", "num_warps", "bwd_num_warps"):
            v = getattr(self, name)
            if v is not None and (v < 1 or v & (v - 1)):
                raise ValueError(f"RmsNormBlock.{name} must be a positive power of two, got {v}")
        if self.bwd_programs < 1:
            raise ValueError(f"RmsNormBlock.bwd_programs must be >= 1, got {self.bwd_programs}")

    def resolved(self, d: int) -> tuple[int, int, int, int]:
        """(block_rows, num_warps, bwd_block_rows, bwd_num_warps) for rows of width d."""
        lanes = next_power_of_2(d)
        # About 8K f32 values per program (32 per thread at 8 warps): enough bytes in flight per program to
        # stream HBM, few enough registers that several programs share an SM. The backward holds ~4 row
        # tiles at once (x, dy, x_hat, w*dy), so it takes half the rows.
        rows = self.block_rows or max(1, min(16, 8192 // lanes))
        bwd_rows = self.bwd_block_rows or max(1, rows // 2)
        warps = self.num_warps or (8 if rows * lanes >= 4096 else 4)
        bwd_warps = self.bwd_num_warps or (8 if bwd_rows * lanes >= 4096 else 4)
        return rows, warps, bwd_rows, bwd_warps


def _row_tile(row0, block_rows, n_rows, block_d, d):
    """Index vectors and masks of a [block_rows, block_d] tile; the padded lanes run past d, which static
    slices reject, so tiles are addressed with index vectors."""
    rows = row0 + jnp.arange(block_rows)
    cols = jnp.arange(block_d)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols < d)[None, :]
    return (rows[:, None], cols[None, :]), rows, row_ok, mask


def _load_weight(w_ref, block_d, d, weight_offset):
    cols = jnp.arange(block_d)
    w = plgpu.load(w_ref.at[cols], mask=cols < d, other=0.0)
    return w.astype(jnp.float32) + weight_offset


def _fwd_kernel(*refs, n_rows, d, block_rows, block_d, eps, weight_offset, has_residual):
    if has_residual:
        x_ref, r_ref, w_ref, y_ref, s_ref, rstd_ref = refs
    else:
        x_ref, w_ref, y_ref, rstd_ref = refs
    row0 = pl.program_id(0) * block_rows
    idx, rows, row_ok, mask = _row_tile(row0, block_rows, n_rows, block_d, d)
    x = plgpu.load(x_ref.at[idx], mask=mask, other=0.0)
    if has_residual:
        # Added in the input dtype, as the reference does: the sum is rounded before it is normalised.
        x = x + plgpu.load(r_ref.at[idx], mask=mask, other=0.0)
        plgpu.store(s_ref.at[idx], x, mask=mask)
    x = x.astype(jnp.float32)
    rstd = lax.rsqrt(jnp.sum(x * x, axis=1) / d + eps)
    w = _load_weight(w_ref, block_d, d, weight_offset)
    y = x * rstd[:, None] * w[None, :]
    plgpu.store(y_ref.at[idx], y.astype(y_ref.dtype), mask=mask)
    plgpu.store(rstd_ref.at[rows], rstd, mask=row_ok)


def _bwd_kernel(*refs, n_rows, d, block_rows, block_d, steps, weight_offset, has_residual):
    if has_residual:
        x_ref, w_ref, rstd_ref, dy_ref, ds_ref, dx_ref, dw_ref = refs
    else:
        x_ref, w_ref, rstd_ref, dy_ref, dx_ref, dw_ref = refs
    pid = pl.program_id(0)
    w = _load_weight(w_ref, block_d, d, weight_offset)

    def body(step, dw_acc):
        row0 = (pid * steps + step) * block_rows
        idx, rows, row_ok, mask = _row_tile(row0, block_rows, n_rows, block_d, d)
        x = plgpu.load(x_ref.at[idx], mask=mask, other=0.0).astype(jnp.float32)
        dy = plgpu.load(dy_ref.at[idx], mask=mask, other=0.0).astype(jnp.float32)
        rstd = plgpu.load(rstd_ref.at[rows], mask=row_ok, other=0.0)
        x_hat = x * rstd[:, None]
        wdy = dy * w[None, :]
        # d/dx of x * rstd(x): the rstd term projects out the component of w*dy along x_hat.
        c = jnp.sum(x_hat * wdy, axis=1) / d
        dx = (wdy - x_hat * c[:, None]) * rstd[:, None]
        if has_residual:
            # The sum output feeds the next residual branch; its cotangent joins here, and x and the
            # residual share this gradient.
            dx = dx + plgpu.load(ds_ref.at[idx], mask=mask, other=0.0).astype(jnp.float32)
        plgpu.store(dx_ref.at[idx], dx.astype(dx_ref.dtype), mask=mask)
        return dw_acc + jnp.sum(dy * x_hat, axis=0)

    dw = lax.fori_loop(0, steps, body, jnp.zeros((block_d,), jnp.float32))
    cols = jnp.arange(block_d)
    plgpu.store(dw_ref.at[pid, cols], dw, mask=cols < d)


@lowered_once("eps", "weight_offset", "interpret", "block")
def _forward(x2, r2, weight, eps, weight_offset, interpret, block):
    n, d = x2.shape
    rows, warps, _, _ = block.resolved(d)
    has_residual = r2 is not None
    kernel = functools.partial(
        _fwd_kernel,
        n_rows=n,
        d=d,
        block_rows=rows,
        block_d=next_power_of_2(d),
        eps=eps,
        weight_offset=weight_offset,
        has_residual=has_residual,
    )
    out_shape = [jax.ShapeDtypeStruct((n, d), x2.dtype)]
    if has_residual:
        out_shape.append(jax.ShapeDtypeStruct((n, d), x2.dtype))
    out_shape.append(jax.ShapeDtypeStruct((n,), jnp.float32))
    inputs = (x2, r2, weight) if has_residual else (x2, weight)
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(cdiv(n, rows),),
        compiler_params=triton_compiler_params(num_warps=warps, num_stages=1),
        interpret=interpret,
        name="rms_norm_fwd",
    )(*inputs)


@lowered_once("weight_offset", "interpret", "block")
def _backward(x2, weight, rstd, dy2, ds2, weight_offset, interpret, block):
    n, d = x2.shape
    _, _, rows, warps = block.resolved(d)
    row_blocks = cdiv(n, rows)
    steps = cdiv(row_blocks, min(row_blocks, block.bwd_programs))
    programs = cdiv(row_blocks, steps)
    has_residual = ds2 is not None
    kernel = functools.partial(
        _bwd_kernel,
        n_rows=n,
        d=d,
        block_rows=rows,
        block_d=next_power_of_2(d),
        steps=steps,
        weight_offset=weight_offset,
        has_residual=has_residual,
    )
    inputs = (x2, weight, rstd, dy2) + ((ds2,) if has_residual else ())
    dx, dw_partial = pl.pallas_call(
        kernel,
        out_shape=[
            jax.ShapeDtypeStruct((n, d), x2.dtype),
            jax.ShapeDtypeStruct((programs, d), jnp.float32),
        ],
        grid=(programs,),
        compiler_params=triton_compiler_params(num_warps=warps, num_stages=1),
        interpret=interpret,
        name="rms_norm_bwd",
    )(*inputs)
    return dx, jnp.sum(dw_partial, axis=0).astype(weight.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _rms_norm(x2, weight, eps, weight_offset, interpret, block):
    y, _ = _forward(x2, None, weight, eps, weight_offset, interpret, block)
    return y


def _rms_norm_fwd(x2, weight, eps, weight_offset, interpret, block):
    y, rstd = _forward(x2, None, weight, eps, weight_offset, interpret, block)
    return y, (x2, weight, rstd)


def _rms_norm_bwd(eps, weight_offset, interpret, block, res, dy):
    x2, weight, rstd = res
    return _backward(x2, weight, rstd, dy, None, weight_offset, interpret, block)


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _rms_norm_add(x2, r2, weight, eps, weight_offset, interpret, block):
    y, s, _ = _forward(x2, r2, weight, eps, weight_offset, interpret, block)
    return y, s


def _rms_norm_add_fwd(x2, r2, weight, eps, weight_offset, interpret, block):
    y, s, rstd = _forward(x2, r2, weight, eps, weight_offset, interpret, block)
    return (y, s), (s, weight, rstd)


def _rms_norm_add_bwd(eps, weight_offset, interpret, block, res, cotangents):
    s, weight, rstd = res
    dy, ds = cotangents
    dx, dw = _backward(s, weight, rstd, dy, ds, weight_offset, interpret, block)
    return dx, dx, dw


_rms_norm_add.defvjp(_rms_norm_add_fwd, _rms_norm_add_bwd)


def rms_norm(
    x: jax.Array,
    weight: jax.Array,
    residual: jax.Array | None = None,
    *,
    eps: float = 1e-6,
    weight_offset: float = 0.0,
    interpret: bool | None = None,
    block: RmsNormBlock | None = None,
):
    """x: [..., D], weight: [D], residual: like x or None; D <= 8192.

    Returns y (x.dtype) when ``residual`` is None, else ``(y, s)`` with s = x + residual and y = norm(s),
    as :func:`rms_norm_reference`. Differentiable in x, weight and residual (Pallas backward).
    """
    d = x.shape[-1]
    if weight.shape != (d,):
        raise ValueError(f"rms_norm: weight must be [{d}] to match x {x.shape}, got {weight.shape}")
    if d > MAX_HIDDEN:
        raise ValueError(f"rms_norm: hidden size {d} (x {x.shape}) exceeds the kernel's limit {MAX_HIDDEN}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"rms_norm: residual must match x, got residual {residual.shape} {residual.dtype} and x {x.shape} {x.dtype}"
        )
    interpret = resolve_interpret(interpret)
    block = block or RmsNormBlock()
    x2 = x.reshape(-1, d)
    if residual is None:
        return _rms_norm(x2, weight, float(eps), float(weight_offset), interpret, block).reshape(x.shape)
    y, s = _rms_norm_add(x2, residual.reshape(-1, d), weight, float(eps), float(weight_offset), interpret, block)
    return y.reshape(x.shape), s.reshape(x.shape)


def rms_norm_reference(
    x: jax.Array,
    weight: jax.Array,
    residual: jax.Array | None = None,
    *,
    eps: float = 1e-6,
    weight_offset: float = 0.0,
):
    """x: [..., D], weight: [D], residual: like x or None.

    Returns y (x.dtype) when ``residual`` is None, else ``(y, s)`` with s = x + residual (x.dtype) and
    y = norm(s): the sum is what the next residual branch adds to.
    """
    if residual is not None:
        x = x + residual
    x32 = x.astype(jnp.float32)
    var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(var + eps) * (weight.astype(jnp.float32) + weight_offset)
    y = y.astype(x.dtype)
    return y if residual is None else (y, x)
