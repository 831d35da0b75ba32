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

import argparse
import dataclasses
import json
import statistics
import time

import jax
import jax.numpy as jnp

from pallas_kernels.rms_norm import RmsNormBlock, rms_norm, rms_norm_reference

HBM_GBPS = 4300.0
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


def _median_ms(fn, args, iters: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


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
        op = lambda *a: rms_norm(*a, weight_offset=1.0, block=block, interpret=interpret)  # noqa: E731
    else:
        op = lambda *a: rms_norm_reference(*a, weight_offset=1.0)  # noqa: E731

    def fwd_bwd(args, ct):
        out, vjp = jax.vjp(op, *args)
        return out, vjp(ct)

    return jax.jit(lambda args, ct: op(*args)), jax.jit(fwd_bwd)


def measure(impl, n, d, dtype, residual, iters, block=RmsNormBlock(), interpret=None) -> dict:
    args, ct = _inputs(n, d, jnp.dtype(dtype), residual)
    fwd, fwd_bwd = _fns(impl, block, interpret)
    got = jax.block_until_ready(fwd_bwd(args, ct))
    want = _fns("xla_reference", block, interpret)[1](args, ct)
    max_err = max(
        float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))
    )
    fwd_ms = _median_ms(fwd, (args, ct), iters)
    fwd_bwd_ms = _median_ms(fwd_bwd, (args, ct), iters)
    tile = n * d * jnp.dtype(dtype).itemsize
    # Forward reads x (and residual), writes y (and the sum); backward reads x or the sum, dy (and the sum's
    # cotangent) and writes dx. Weight and per-row rstd are negligible.
    fwd_bytes = tile * (4 if residual else 2)
    bwd_bytes = tile * (4 if residual else 3)
    fwd_bwd_gbps = (fwd_bytes + bwd_bytes) / fwd_bwd_ms * 1e-6
    return {
        "op": "rms_norm" + ("+residual" if residual else ""),
        "impl": impl,
        "shape": f"{n}x{d}",
        "dtype": str(jnp.dtype(dtype)),
        "fwd_ms": fwd_ms,
        "fwd_bwd_ms": fwd_bwd_ms,
        "gbps_or_tflops": fwd_bwd_gbps,
        "unit": "GB/s fwd+bwd",
        "fwd_gbps": fwd_bytes / fwd_ms * 1e-6,
        "fwd_frac_hbm": fwd_bytes / fwd_ms * 1e-6 / HBM_GBPS,
        "fwd_bwd_frac_hbm": fwd_bwd_gbps / HBM_GBPS,
        "max_err": max_err,
        "block": dataclasses.asdict(block) if impl == "pallas" else None,
        "resolved_block": block.resolved(d) if impl == "pallas" else None,
        "iters": iters,
        "jax": jax.__version__,
        "device_kind": jax.devices()[0].device_kind,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="JSON lines file (default: stdout only)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, few iterations (CPU check)")
    parser.add_argument("--sweep", action="store_true", help="time the SWEEP launch configurations")
    parser.add_argument("--rows", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args(argv)

    if args.smoke:
        rows = [measure(impl, 37, 200, "float32", res, 3) for impl in ("pallas", "xla_reference") for res in (0, 1)]
    elif args.sweep:
        rows = [
            measure("pallas", n, args.hidden, args.dtype, res, args.iters, block)
            for n in args.rows
            for res in (False, True)
            for block in SWEEP
        ]
    else:
        rows = [
            measure(impl, n, args.hidden, args.dtype, res, args.iters)
            for n in args.rows
            for res in (False, True)
            for impl in ("pallas", "xla_reference")
        ]

    lines = [json.dumps(row) for row in rows]
    print("\n".join(lines), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
