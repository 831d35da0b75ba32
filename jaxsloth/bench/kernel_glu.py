"""Micro-benchmark: gated MLP activations (SwiGLU, GeGLU), Pallas kernels against the jitted references
(XLA), Llama-3.1-8B MLP width (F=14336) in bf16.

Per measurement: forward and forward+backward median time, achieved HBM bandwidth (forward: gate and up
read, out written; backward: gate, up and dout read, dgate and dup written) and its fraction of the H200's
~4.3 TB/s, and the max abs error of outputs and gradients against the reference (checked before timing).

    python -m jaxsloth.bench.kernel_glu --out glu.jsonl             # the table (swiglu)
    python -m jaxsloth.bench.kernel_glu --out glu.jsonl --ops swiglu geglu
    python -m jaxsloth.bench.kernel_glu --out sweep.jsonl --sweep   # launch configurations, Pallas only
    python -m jaxsloth.bench.kernel_glu --out smoke.jsonl --smoke   # tiny, CPU (interpret mode)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxsloth.bench import timing
from pallas_kernels.glu import GluBlock, geglu, geglu_reference, swiglu, swiglu_reference

OPS = {"swiglu": (swiglu, swiglu_reference), "geglu": (geglu, geglu_reference)}
SWEEP = (
    GluBlock(),
    GluBlock(block_rows=1, block_cols=2048, num_warps=4, bwd_block_rows=1, bwd_block_cols=2048, bwd_num_warps=4),
    GluBlock(block_rows=1, block_cols=1024, num_warps=4, bwd_block_rows=1, bwd_block_cols=1024, bwd_num_warps=4),
    GluBlock(block_rows=4, block_cols=2048, num_warps=8, bwd_block_rows=2, bwd_block_cols=2048, bwd_num_warps=4),
    GluBlock(block_rows=1, block_cols=4096, num_warps=8, bwd_block_rows=1, bwd_block_cols=4096, bwd_num_warps=8),
    GluBlock(block_rows=4, block_cols=2048, num_warps=16, bwd_block_rows=4, bwd_block_cols=2048, bwd_num_warps=16),
    GluBlock(block_rows=8, block_cols=1024, num_warps=8, bwd_block_rows=8, bwd_block_cols=512, bwd_num_warps=8),
)


def _fns(op: str, impl: str, block: GluBlock, interpret: bool | None):
    kernel, reference = OPS[op]
    fn = (lambda g, u: kernel(g, u, block=block, interpret=interpret)) if impl == "pallas" else reference
    return (*timing.jit_fwd_and_fwd_bwd(fn), timing.jit_bwd(fn))


def measure(op, impl, n, f, dtype, iters, block=GluBlock(), interpret=None) -> dict:
    keys = jax.random.split(jax.random.key(0), 3)
    dtype = jnp.dtype(dtype)
    gate, up, ct = (jax.random.normal(k, (n, f), jnp.float32).astype(dtype) for k in keys)
    args = (gate, up)
    fwd, fwd_bwd, bwd = _fns(op, impl, block, interpret)
    got = jax.block_until_ready(fwd_bwd(*args, ct))
    max_err = timing.max_abs_err(got, _fns(op, "xla_reference", block, interpret)[1](*args, ct))
    fwd_ms = timing.kernel_ms(fwd, args, iters)
    fwd_bwd_ms = timing.kernel_ms(fwd_bwd, (*args, ct), iters)
    bwd_ms = timing.kernel_ms(bwd, (*args, ct), iters)
    tile = n * f * dtype.itemsize
    fwd_bytes, bwd_bytes = 3 * tile, 5 * tile
    return timing.kernel_record(
        op,
        impl,
        f"{n}x{f}",
        str(dtype),
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
    )


def main(argv: list[str] | None = None) -> None:
    parser = timing.kernel_bench_parser(__doc__, iters=50, sweep_help="time the SWEEP launch configurations")
    parser.add_argument("--ops", nargs="+", default=["swiglu"], choices=sorted(OPS))
    parser.add_argument("--rows", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--width", type=int, default=14336)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args(argv)

    if args.smoke:
        small = GluBlock(block_rows=4, block_cols=128, bwd_block_rows=2, bwd_block_cols=256)
        rows = (measure(op, impl, 7, 300, "float32", 3, small) for op in OPS for impl in ("pallas", "xla_reference"))
    elif args.sweep:
        rows = (
            measure(op, "pallas", n, args.width, args.dtype, args.iters, block)
            for op in args.ops
            for n in args.rows
            for block in SWEEP
        )
    else:
        rows = (
            measure(op, impl, n, args.width, args.dtype, args.iters)
            for op in args.ops
            for n in args.rows
            for impl in ("pallas", "xla_reference")
        )
    timing.emit_jsonl(rows, args.out)


if __name__ == "__main__":
    main()
