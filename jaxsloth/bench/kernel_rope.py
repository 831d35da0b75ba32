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

import argparse
import dataclasses
import json
import statistics
import time

import jax
import jax.numpy as jnp

from pallas_kernels.rope import RopeBlock, rope, rope_reference

HBM_GBPS = 4300.0
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


def _median_ms(fn, args, iters: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


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
    if impl == "pallas":
        op = lambda q, k, p, f: rope(q, k, p, f, block=block, interpret=interpret)  # noqa: E731
    else:
        op = rope_reference

    def fwd_bwd(args, ct):
        q, k, p, f = args
        out, vjp = jax.vjp(lambda q, k: op(q, k, p, f), q, k)
        return out, vjp(ct)

    return jax.jit(lambda args, ct: op(*args)), jax.jit(fwd_bwd)


def measure(impl, b, t, hq, hk, hd, dtype, iters, block=RopeBlock(), interpret=None, theta=500000.0) -> dict:
    args, ct = _inputs(b, t, hq, hk, hd, jnp.dtype(dtype), theta)
    fwd, fwd_bwd = _fns(impl, block, interpret)
    got = jax.block_until_ready(fwd_bwd(args, ct))
    want = _fns("xla_reference", block, interpret)[1](args, ct)
    max_err = max(
        float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))
    )
    fwd_ms = _median_ms(fwd, (args, ct), iters)
    fwd_bwd_ms = _median_ms(fwd_bwd, (args, ct), iters)
    # Each direction reads and writes q and k once.
    one_way = 2 * b * t * (hq + hk) * hd * jnp.dtype(dtype).itemsize
    fwd_bwd_gbps = 2 * one_way / fwd_bwd_ms * 1e-6
    return {
        "op": "rope",
        "impl": impl,
        "shape": f"B={b},T={t},Hq={hq},Hk={hk},hd={hd}",
        "dtype": str(jnp.dtype(dtype)),
        "fwd_ms": fwd_ms,
        "fwd_bwd_ms": fwd_bwd_ms,
        "gbps_or_tflops": fwd_bwd_gbps,
        "unit": "GB/s fwd+bwd",
        "fwd_gbps": one_way / fwd_ms * 1e-6,
        "fwd_frac_hbm": one_way / fwd_ms * 1e-6 / HBM_GBPS,
        "fwd_bwd_frac_hbm": fwd_bwd_gbps / HBM_GBPS,
        "max_err": max_err,
        "block": dataclasses.asdict(block) if impl == "pallas" else None,
        "iters": iters,
        "jax": jax.__version__,
        "device_kind": jax.devices()[0].device_kind,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="JSON lines file (default: stdout only)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, few iterations (CPU check)")
    parser.add_argument("--sweep", action="store_true", help="time the SWEEP launch configurations")
    parser.add_argument("--batch", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args(argv)
    heads = (args.q_heads, args.kv_heads, args.head_dim)

    if args.smoke:
        rows = [measure(impl, 2, 19, 5, 3, 80, "float32", 3) for impl in ("pallas", "xla_reference")]
    elif args.sweep:
        rows = [
            measure("pallas", b, args.seq, *heads, args.dtype, args.iters, block) for b in args.batch for block in SWEEP
        ]
    else:
        rows = [
            measure(impl, b, args.seq, *heads, args.dtype, args.iters)
            for b in args.batch
            for impl in ("pallas", "xla_reference")
        ]

    lines = [json.dumps(row) for row in rows]
    print("\n".join(lines), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
