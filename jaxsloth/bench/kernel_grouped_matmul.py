"""Micro-benchmark: the mixture-of-experts grouped matmul, the Pallas kernel (several tiles) against the tiled XLA
loop the profiles run, at Qwen3-30B-A3B's expert projections in bf16: 2 x 2048 tokens, top-8 of 128 experts, so
32768 rows sorted by expert with the skewed group sizes of a router (random logits plus a per-expert bias); gate_up
(K=2048 -> N=1536, gate and up fused as jaxsloth holds them) and down (K=768 -> N=2048).

Per measurement (median device ms): fwd_ms, the forward; fwd_bwd_ms, forward + dx (what the QLoRA step runs: the
experts are frozen, so no dw); fwd_dx_dw_ms, forward + dx + dw (for the tiled loop, the default tiles and tiles that
change the dw kernel; the others share the default's dw kernel). TFLOP/s of forward + dx counts the useful products
only (2 x rows x K x N each). max_err: the largest difference of y, dx (and dw where timed) from the tiled loop's
(itself tested against ragged_dot; at full size XLA's ragged dot would expand every row against every expert). A
measurement that fails (a tile Triton cannot fit) is recorded with its error and the run goes on.

    python -m jaxsloth.bench.kernel_grouped_matmul --out gmm.jsonl            # tiled and pallas (default tiles)
    python -m jaxsloth.bench.kernel_grouped_matmul --out gmm.jsonl --sweep    # and pallas at the SWEEP tiles
    python -m jaxsloth.bench.kernel_grouped_matmul --out smoke.jsonl --smoke  # tiny, CPU (interpret mode)
"""

from __future__ import annotations

import dataclasses
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from jaxsloth.bench import timing
from pallas_kernels.grouped_matmul import grouped_matmul_reference, grouped_matmul_tiled
from pallas_kernels.grouped_matmul_pallas import GroupedMatmulBlock, grouped_matmul

# Projection -> (K, N) as multiples of (hidden, expert width): gate_up maps hidden -> 2 x width, down width -> hidden.
PROJECTIONS = {"gate_up": lambda d, i: (d, 2 * i), "down": lambda d, i: (i, d)}
# Likeliest first: a run cut short by its time limit keeps the measurements that matter most.
SWEEP = (
    GroupedMatmulBlock(block_m=64, block_n=128, block_k=64),
    GroupedMatmulBlock(n_fastest=True),
    GroupedMatmulBlock(block_m=128, block_n=256, block_k=64, num_warps=8),
    GroupedMatmulBlock(block_m=64, block_n=128, block_k=64, n_fastest=True),
    GroupedMatmulBlock(block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=2),
    GroupedMatmulBlock(dw_block_m=128, dw_block_n=128, dw_block_k=64, dw_num_warps=8),
)
DW_FIELDS = tuple(f.name for f in dataclasses.fields(GroupedMatmulBlock) if f.name.startswith("dw_"))


def group_sizes(tokens: int, experts: int, top_k: int, seed: int = 0) -> np.ndarray:
    """Rows per expert of ``tokens`` routed top-``top_k``: router logits N(0, 1) per token plus a per-expert bias
    N(0, 0.5), so popular experts get several times the rows of rare ones, as in a trained router's batch."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    logits = jax.random.normal(k1, (tokens, experts)) + 0.5 * jax.random.normal(k2, (experts,))
    _, chosen = jax.lax.top_k(logits, top_k)
    return np.bincount(np.asarray(chosen).reshape(-1), minlength=experts).astype(np.int32)


def _impl(impl: str, block: GroupedMatmulBlock):
    if impl == "pallas":  # interpret mode without a GPU (--smoke)
        return lambda x, w, gs: grouped_matmul(x, w, gs, block=block)
    return grouped_matmul_tiled


def _fns(fn):
    """Jitted forward, forward + dx (frozen w) and forward + dx + dw of ``fn(x, w, group_sizes)``."""

    def fwd_dx(x, w, gs, dy):
        y, vjp = jax.vjp(lambda x: fn(x, w, gs), x)
        return y, vjp(dy)[0]

    def fwd_dx_dw(x, w, gs, dy):
        y, vjp = jax.vjp(lambda x, w: fn(x, w, gs), x, w)
        return (y, *vjp(dy))

    return jax.jit(fn), jax.jit(fwd_dx), jax.jit(fwd_dx_dw)


def operands(rows_per_group: np.ndarray, k: int, n: int, dtype, seed: int = 1):
    """x [M, K], w [G, N, K] (scaled so outputs are O(1)), group sizes [G] and a cotangent dy [M, N]."""
    m = int(rows_per_group.sum())
    keys = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(keys[0], (m, k), jnp.float32).astype(dtype)
    w = (jax.random.normal(keys[1], (len(rows_per_group), n, k), jnp.float32) / np.sqrt(k)).astype(dtype)
    dy = jax.random.normal(keys[2], (m, n), jnp.float32).astype(dtype)
    return x, w, jnp.asarray(rows_per_group), dy


def measure(proj, impl, args_, truth, iters, block=GroupedMatmulBlock(), with_dw=True) -> tuple[dict, tuple]:
    """One record of ``impl`` on ``args_`` = (x, w, group_sizes, dy), errors against ``truth`` = (y, dx, dw) when
    given (dw only ``with_dw``), and ``impl``'s own (y, dx, dw) (None when it failed or without dw)."""
    x, w, gs, dy = args_
    (m, k), n = x.shape, w.shape[1]
    shape = f"{proj} {m}x{k}->{n} G={w.shape[0]}"
    fields = dict(block=dataclasses.asdict(block) if impl == "pallas" else None)
    try:
        fwd, fwd_dx, fwd_dx_dw = _fns(_impl(impl, block))
        got = jax.block_until_ready((fwd_dx_dw if with_dw else fwd_dx)(x, w, gs, dy))
        max_err = None if truth is None else timing.max_abs_err(got, truth[: len(got)])
        fwd_ms = timing.kernel_ms(fwd, (x, w, gs), iters)
        fwd_dx_ms = timing.kernel_ms(fwd_dx, (x, w, gs, dy), iters)
        fwd_dx_dw_ms = timing.kernel_ms(fwd_dx_dw, (x, w, gs, dy), iters) if with_dw else None
    except Exception as e:  # noqa: BLE001  (one tile Triton cannot compile must not lose the others' records)
        traceback.print_exc()
        return {
            "op": "grouped_matmul",
            "impl": impl,
            "shape": shape,
            **fields,
            "error": f"{type(e).__name__}: {e}",
        }, None
    flops = 2 * 2 * m * k * n  # forward and dx
    record = timing.kernel_record(
        "grouped_matmul",
        impl,
        shape,
        str(x.dtype),
        fwd_ms,
        fwd_dx_ms,
        iters,
        gbps_or_tflops=flops / fwd_dx_ms * 1e-9,
        unit="TFLOP/s fwd+dx",
        fwd_dx_dw_ms=fwd_dx_dw_ms,
        max_err=max_err,
        group_rows={"min": int(gs.min()), "max": int(gs.max()), "mean": float(gs.mean())},
        **fields,
    )
    return record, got if with_dw else None


def run(projections, tokens, experts, top_k, hidden, width, dtype, iters, blocks, ragged_dot_truth=False):
    """Records for each projection: the tiled loop, then pallas at each of ``blocks``; errors against the tiled
    loop's results, or (``ragged_dot_truth``, small shapes only) against ragged_dot for both."""
    sizes = group_sizes(tokens, experts, top_k)
    for proj in projections:
        k, n = PROJECTIONS[proj](hidden, width)
        args_ = operands(sizes, k, n, dtype)
        truth = _fns(grouped_matmul_reference)[2](*args_) if ragged_dot_truth else None
        record, tiled = measure(proj, "tiled", args_, truth, iters)
        yield record
        for i, block in enumerate(blocks):
            new_dw = i == 0 or any(getattr(block, f) != getattr(blocks[0], f) for f in DW_FIELDS)
            yield measure(proj, "pallas", args_, tiled if truth is None else truth, iters, block, new_dw)[0]


def main(argv: list[str] | None = None) -> None:
    parser = timing.kernel_bench_parser(__doc__, iters=10, sweep_help="also time pallas at the SWEEP tiles")
    parser.add_argument("--projections", nargs="+", default=list(PROJECTIONS), choices=list(PROJECTIONS))
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of the batch (2 x 2048)")
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--width", type=int, default=768, help="expert (moe_intermediate) width")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args(argv)

    if args.smoke:  # ragged tiny shapes against ragged_dot itself, in interpret mode
        small = GroupedMatmulBlock(block_m=16, block_n=16, block_k=16, dw_block_m=16, dw_block_n=16, dw_block_k=16)
        blocks = (small, dataclasses.replace(small, n_fastest=True))
        rows = run(args.projections, 13, 6, 3, 40, 12, "float32", 2, blocks, ragged_dot_truth=True)
    else:
        blocks = (GroupedMatmulBlock(), *SWEEP) if args.sweep else (GroupedMatmulBlock(),)
        rows = run(
            args.projections, args.tokens, args.experts, args.top_k, args.hidden, args.width, args.dtype, args.iters,
            blocks,
        )  # fmt: skip
    timing.emit_jsonl(rows, args.out)


if __name__ == "__main__":
    main()
