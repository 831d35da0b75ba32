"""Micro-benchmark: rotary embedding of q and k, Pallas kernel (one launch each way) against the jitted
reference (XLA), Llama-3.1-8B heads (32 q / 8 kv, head dim 128, theta 500000) in bf16.

Per measurement: forward and forward+backward median time, achieved HBM bandwidth (q and k read and
written once each way) and its fraction of the H200's ~4.3 TB/s, and the max abs error of outputs and
gradients against the reference (checked before timing).

    python -m jaxsloth.bench.kernel_rope --out rope.jsonl           # the table
    python -m jaxsloth.bench.kernel_rope --out sweep.jsonl --sweep # launch configurations, Pallas only
    python -m jaxsloth.bench.kernel_rope --out smoke.jsonl --smoke # tiny, CPU (interpret mode)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxsloth.bench import timing
from pallas_kernels.rope import RopeBlock, rope, rope_reference

SWEEP = (
    RopeBlock(),
    RopeBlock(block_tokens=2, block_heads=8, num_warps=4),
    RopeBlock(block_tokens=8, block_heads=8, num_warps=4),
    RopeBlock(block_tokens=8, block_heads=8, num_warps=8),
    RopeBlock(block_tokens=2, block_heads=32, num_warps=4),
    RopeBlock(block_tokens=4, block_heads=32, num_warps=8),
    RopeBlock(block_tokens=1, block_heads=32, num_warps=2),
    RopeBlock(block_tokens=16, block_heads=4, num_warps=8),
)


def _inputs(b, t, hq, hk, hd, dtype, theta):
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, t, hq, hd), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (b, t, hk, hd), jnp.float32).astype(dtype)
    cts = (
        jax.random.normal(keys[2], q.shape, jnp.float32).astype(dtype),
        jax.random.normal(keys[3], k.shape, jnp.float32).astype(dtype),
    )
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    inv_freq = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    return (q, k, positions, inv_freq), cts


def _fns(impl: str, block: RopeBlock, interpret: bool | None):
    # Gradients of q and k only: positions and frequencies are not trained.
    if impl == "pallas":
        return timing.jit_fwd_and_fwd_bwd(
            lambda q, k, p, f: rope(q, k, p, f, block=block, interpret=interpret), num_diff=2
        )
    return timing.jit_fwd_and_fwd_bwd(rope_reference, num_diff=2)


def measure(impl, b, t, hq, hk, hd, dtype, iters, block=RopeBlock(), interpret=None, theta=500000.0) -> dict:
    args, ct = _inputs(b, t, hq, hk, hd, jnp.dtype(dtype), theta)
    fwd, fwd_bwd = _fns(impl, block, interpret)
    got = jax.block_until_ready(fwd_bwd(*args, ct))
    max_err = timing.max_abs_err(got, _fns("xla_reference", block, interpret)[1](*args, ct))
    fwd_ms = timing.kernel_ms(fwd, args, iters)
    fwd_bwd_ms = timing.kernel_ms(fwd_bwd, (*args, ct), iters)
    # Each direction reads and writes q and k once.
    one_way = 2 * b * t * (hq + hk) * hd * jnp.dtype(dtype).itemsize
    return timing.kernel_record(
        "rope",
        impl,
        f"B={b},T={t},Hq={hq},Hk={hk},hd={hd}",
        str(jnp.dtype(dtype)),
        fwd_ms,
        fwd_bwd_ms,
        iters,
        **timing.hbm_fields(one_way, fwd_ms, 2 * one_way, fwd_bwd_ms),
        max_err=max_err,
        block=dataclasses.asdict(block) if impl == "pallas" else None,
    )


def main(argv: list[str] | None = None) -> None:
    parser = timing.kernel_bench_parser(__doc__, iters=50, sweep_help="time the SWEEP launch configurations")
    parser.add_argument("--batch", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args(argv)
    heads = (args.q_heads, args.kv_heads, args.head_dim)

    if args.smoke:
        rows = (measure(impl, 2, 19, 5, 3, 80, "float32", 3) for impl in ("pallas", "xla_reference"))
    elif args.sweep:
        rows = (
            measure("pallas", b, args.seq, *heads, args.dtype, args.iters, block) for b in args.batch for block in SWEEP
        )
    else:
        rows = (
            measure(impl, b, args.seq, *heads, args.dtype, args.iters)
            for b in args.batch
            for impl in ("pallas", "xla_reference")
        )
    timing.emit_jsonl(rows, args.out)


if __name__ == "__main__":
    main()
