"""Micro-benchmark: RMSNorm (optionally fused with the residual add), Pallas kernel against the jitted
reference (XLA), Llama-3.1-8B rows (D=4096) in bf16.

Per measurement: forward and forward+backward median time, achieved HBM bandwidth (bytes the op must move,
divided by time) and its fraction of the H200's ~4.3 TB/s copy rate, and the max abs error of outputs and
gradients against the reference (checked before timing).

    python -m jaxsloth.bench.kernel_rms_norm --out rms.jsonl           # the table
    python -m jaxsloth.bench.kernel_rms_norm --out sweep.jsonl --sweep # launch configurations, Pallas only
    python -m jaxsloth.bench.kernel_rms_norm --out smoke.jsonl --smoke # tiny, CPU (interpret mode)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxsloth.bench import timing
from pallas_kernels.rms_norm import RmsNormBlock, rms_norm, rms_norm_reference

SWEEP = (
    RmsNormBlock(),
    RmsNormBlock(block_rows=1, num_warps=4, bwd_block_rows=1, bwd_num_warps=4),
    RmsNormBlock(block_rows=1, num_warps=8, bwd_block_rows=1, bwd_num_warps=8),
    RmsNormBlock(block_rows=2, num_warps=4, bwd_block_rows=2, bwd_num_warps=8),
    RmsNormBlock(block_rows=4, num_warps=8, bwd_block_rows=2, bwd_num_warps=16),
    RmsNormBlock(block_rows=4, num_warps=16, bwd_block_rows=1, bwd_num_warps=4),
    RmsNormBlock(block_rows=8, num_warps=16, bwd_programs=264),
    RmsNormBlock(bwd_programs=1024),
    RmsNormBlock(bwd_programs=2048),
)


def _inputs(n: int, d: int, dtype, residual: bool):
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (n, d), jnp.float32).astype(dtype)
    w = (1.0 + 0.1 * jax.random.normal(keys[1], (d,), jnp.float32)).astype(dtype)
    r = jax.random.normal(keys[2], (n, d), jnp.float32).astype(dtype)
    ct_y = jax.random.normal(keys[3], (n, d), jnp.float32).astype(dtype)
    ct_s = jax.random.normal(keys[4], (n, d), jnp.float32).astype(dtype)
    return ((x, w, r), (ct_y, ct_s)) if residual else ((x, w), ct_y)


def _fns(impl: str, block: RmsNormBlock, interpret: bool | None):
    if impl == "pallas":
        fn = lambda *a: rms_norm(*a, weight_offset=1.0, block=block, interpret=interpret)  # noqa: E731
    else:
        fn = lambda *a: rms_norm_reference(*a, weight_offset=1.0)  # noqa: E731
    return (*timing.jit_fwd_and_fwd_bwd(fn), timing.jit_bwd(fn))


def measure(impl, n, d, dtype, residual, iters, block=RmsNormBlock(), interpret=None) -> dict:
    args, ct = _inputs(n, d, jnp.dtype(dtype), residual)
    fwd, fwd_bwd, bwd = _fns(impl, block, interpret)
    got = jax.block_until_ready(fwd_bwd(*args, ct))
    max_err = timing.max_abs_err(got, _fns("xla_reference", block, interpret)[1](*args, ct))
    fwd_ms = timing.kernel_ms(fwd, args, iters)
    fwd_bwd_ms = timing.kernel_ms(fwd_bwd, (*args, ct), iters)
    bwd_ms = timing.kernel_ms(bwd, (*args, ct), iters)
    tile = n * d * jnp.dtype(dtype).itemsize
    # Forward reads x (and residual), writes y (and the sum); backward reads x or the sum, dy (and the sum's
    # cotangent) and writes dx. Weight and per-row rstd are negligible.
    fwd_bytes = tile * (4 if residual else 2)
    bwd_bytes = tile * (4 if residual else 3)
    return timing.kernel_record(
        "rms_norm" + ("+residual" if residual else ""),
        impl,
        f"{n}x{d}",
        str(jnp.dtype(dtype)),
        fwd_ms,
        fwd_bwd_ms,
        iters,
        **timing.hbm_fields(fwd_bytes, fwd_ms, fwd_bytes + bwd_bytes, fwd_bwd_ms),
        # The backward alone (jit_bwd): what a training step runs. For the Pallas RMSNorm it includes the
        # forward kernel, whose per-row rstd the backward reads.
        bwd_ms=bwd_ms,
        bwd_gbps=bwd_bytes / bwd_ms * 1e-6,
        max_err=max_err,
        block=dataclasses.asdict(block) if impl == "pallas" else None,
        resolved_block=block.resolved(d) if impl == "pallas" else None,
    )


def main(argv: list[str] | None = None) -> None:
    parser = timing.kernel_bench_parser(__doc__, iters=50, sweep_help="time the SWEEP launch configurations")
    parser.add_argument("--rows", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args(argv)

    if args.smoke:
        rows = (measure(impl, 37, 200, "float32", res, 3) for impl in ("pallas", "xla_reference") for res in (0, 1))
    elif args.sweep:
        rows = (
            measure("pallas", n, args.hidden, args.dtype, res, args.iters, block)
            for n in args.rows
            for res in (False, True)
            for block in SWEEP
        )
    else:
        rows = (
            measure(impl, n, args.hidden, args.dtype, res, args.iters)
            for n in args.rows
            for res in (False, True)
            for impl in ("pallas", "xla_reference")
        )
    timing.emit_jsonl(rows, args.out)


if __name__ == "__main__":
    main()
