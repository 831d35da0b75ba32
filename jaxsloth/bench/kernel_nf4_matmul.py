"""Micro-benchmark: the fused NF4 dequant-matmul + LoRA kernel against XLA's jitted dequantize-then-matmul
(``nf4_matmul_reference``), against the profiles' XLA path (``nf4_matmul_xla16``: PEFT's 16-bit order, no f32
[M, N] arrays) and against the plain 16-bit LoRA linear of the same shape (x @ W^T with W already dequantized to
bf16, plus the LoRA term, in XLA): Llama-3.1-8B projections, r=16, bf16.

Per measurement: forward and forward+backward (dx, dA, dB) median time, TFLOP/s (2MNK + LoRA forward;
twice the base for forward+backward), XLA's peak temporary memory of the jitted forward and
forward+backward (``compile().memory_analysis().temp_size_in_bytes``) and the max abs error of output and
gradients against the reference, checked before timing. The NF4 arrays are random bytes (speed does not
depend on their values) in double-quant layout.

    python -m jaxsloth.bench.kernel_nf4_matmul --out nf4.jsonl            # the table
    python -m jaxsloth.bench.kernel_nf4_matmul --out sweep.jsonl --sweep  # launch configurations, Pallas only
    python -m jaxsloth.bench.kernel_nf4_matmul --out smoke.jsonl --smoke  # tiny, CPU (interpret mode)
    python -m jaxsloth.bench.kernel_nf4_matmul --check --impls mosaic     # kernel vs reference; exit 1 if off

``mosaic`` is the Mosaic GPU kernel (Hopper): ``--sweep --impls mosaic`` times its MOSAIC_SWEEP tiles.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxsloth.bench import timing
from pallas_kernels.nf4_matmul import (
    NF4MatmulBlock,
    NF4Weight,
    nf4_dequantize_reference,
    nf4_matmul,
    nf4_matmul_reference,
    nf4_matmul_xla16,
)
from pallas_kernels.nf4_matmul_mosaic import MosaicNF4Block, nf4_matmul_mosaic

# (name, in K, out N) of the Llama-3.1-8B projections.
SHAPES_8B = (
    ("q", 4096, 4096),
    ("k_v", 4096, 1024),
    ("o", 4096, 4096),
    ("gate_up", 4096, 14336),
    ("down", 14336, 4096),
)
SWEEP = (
    NF4MatmulBlock(),
    NF4MatmulBlock(block_n=256, num_warps=8),
    NF4MatmulBlock(block_m=64, block_n=128, num_warps=4),
    NF4MatmulBlock(block_m=256, block_n=128, num_warps=8),
    NF4MatmulBlock(block_k=256, num_stages=4),
    NF4MatmulBlock(lookup="gather"),
    NF4MatmulBlock(fuse_lora_a=False),
    NF4MatmulBlock(bwd_block_n=32, bwd_block_k=256),
    NF4MatmulBlock(bwd_block_m=64, bwd_block_n=64, bwd_block_k=128, bwd_num_warps=4),
)
# The Mosaic kernel beside its default (256 rows per decoded W tile, 128 accumulator registers per thread): the LoRA A
# product fused into the forward, and 128-row tiles (half the accumulator, in case the default's decode spills
# registers, for twice the decode work per row).
MOSAIC_SWEEP = (
    MosaicNF4Block(fuse_lora_a=True),
    MosaicNF4Block(block_m=128, bwd_block_m=128),
)
# --smoke runs the interpreter on CPU: the least tiles the kernels take.
MOSAIC_SMOKE = MosaicNF4Block(
    block_m=64, block_n=128, num_stages=2, bwd_block_m=64, bwd_block_n=64, bwd_block_k=128, bwd_num_stages=2
)
# The --check shapes (M, K, N): ragged M and N against every tile, then an 8B projection.
CHECK_SHAPES = ((300, 1024, 520), (4096, 4096, 1024))


def _inputs(m: int, k: int, n: int, r: int, dtype):
    rng = np.random.default_rng(0)
    nblocks = n * k // 64
    nf4 = NF4Weight(
        packed=jnp.asarray(rng.integers(0, 256, n * k // 2, dtype=np.uint8)),
        absmax=jnp.asarray(rng.integers(0, 256, nblocks, dtype=np.uint8)),
        nested_absmax=jnp.asarray(rng.uniform(0.01, 0.02, -(-nblocks // 256)).astype(np.float32)),
        offset=jnp.asarray(np.float32(0.03)),
        shape=(n, k),
        double_quant=True,
    )
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (m, k), jnp.float32).astype(dtype)
    a = (0.02 * jax.random.normal(keys[1], (r, k), jnp.float32)).astype(dtype)
    b = (0.02 * jax.random.normal(keys[2], (n, r), jnp.float32)).astype(dtype)
    dy = jax.random.normal(keys[3], (m, n), jnp.float32).astype(dtype)
    return nf4, x, a, b, dy


def _op(impl: str, nf4: NF4Weight, dtype, block: NF4MatmulBlock, interpret):
    """(fn(x, a, b, weight), (weight,)): the weight is a jit argument, never a closed-over constant, which XLA
    would try to constant-fold (the dequantization at compile time) and so time something else."""
    if impl == "pallas":
        return lambda x, a, b, w: nf4_matmul(x, w, a, b, 2.0, interpret=interpret, block=block), (nf4,)
    if impl == "mosaic":  # the Mosaic GPU kernels, PEFT's 16-bit order as xla16
        return lambda x, a, b, w: nf4_matmul_mosaic(x, w, a, b, 2.0, interpret=interpret, block=block), (nf4,)
    if impl == "xla_dequant_matmul":
        return lambda x, a, b, w: nf4_matmul_reference(x, w, a, b, 2.0), (nf4,)
    if impl == "xla16":  # the profiles' XLA path: table-gather dequant, PEFT's 16-bit order, custom VJP
        return lambda x, a, b, w: nf4_matmul_xla16(x, w, a, b, 2.0), (nf4,)
    w16 = jax.jit(lambda w: nf4_dequantize_reference(w, dtype))(nf4)

    def lora_linear(x, a, b, w16):
        # As the decoder's 16-bit linear: the base product in x.dtype, so its backward GEMM is 16-bit too.
        y = jnp.dot(x, w16.T)
        u = jnp.dot(x, a.T, preferred_element_type=jnp.float32).astype(x.dtype)
        return y + (2.0 * jnp.dot(u, b.T, preferred_element_type=jnp.float32)).astype(x.dtype)

    return lora_linear, (w16,)


def _temp_bytes(fn, args) -> int | None:
    stats = fn.lower(*args).compile().memory_analysis()
    return None if stats is None else int(stats.temp_size_in_bytes)


def measure(impl, name, m, k, n, r, dtype, iters, block=None, interpret=None) -> dict:
    dtype = jnp.dtype(dtype)
    block = block or (MosaicNF4Block() if impl == "mosaic" else NF4MatmulBlock())
    nf4, x, a, b, dy = _inputs(m, k, n, r, dtype)
    op, weights = _op(impl, nf4, dtype, block, interpret)
    args = (x, a, b, *weights)
    args_ct = (*args, dy)
    fwd, fwd_bwd = timing.jit_fwd_and_fwd_bwd(op, num_diff=3)
    got = jax.block_until_ready(fwd_bwd(*args_ct))
    ref, ref_weights = _op("xla_dequant_matmul", nf4, dtype, block, interpret)
    want = timing.jit_fwd_and_fwd_bwd(ref, num_diff=3)[1](x, a, b, *ref_weights, dy)
    max_err = timing.max_abs_err(got, want)
    fwd_ms = timing.kernel_ms(fwd, args, iters)
    fwd_bwd_ms = timing.kernel_ms(fwd_bwd, args_ct, iters)
    lora_flops = 2 * m * r * (k + n)
    fwd_flops = 2 * m * n * k + lora_flops
    # Backward: dx (2MNK + LoRA) and dA, dB (2 M r (K + N)).
    fwd_bwd_flops = fwd_flops + 2 * m * n * k + 2 * lora_flops
    return timing.kernel_record(
        "nf4_matmul",
        impl,
        f"M{m}xK{k}xN{n}xr{r}",
        dtype.name,
        fwd_ms,
        fwd_bwd_ms,
        iters,
        proj=name,
        gbps_or_tflops=fwd_bwd_flops / fwd_bwd_ms * 1e-9,
        unit="TFLOP/s fwd+bwd",
        fwd_tflops=fwd_flops / fwd_ms * 1e-9,
        fwd_temp_bytes=_temp_bytes(fwd, args),
        fwd_bwd_temp_bytes=_temp_bytes(fwd_bwd, args_ct),
        max_err=max_err,
        block=dataclasses.asdict(block) if impl in ("pallas", "mosaic") else None,
    )


def check(impl: str, shapes, dtype="bfloat16", block=None) -> bool:
    """``impl``'s output and gradients (dx, dA, dB) against the reference at each (M, K, N), r = 16: prints one
    line per shape; True when every relative error (max abs error / max abs reference) is within a few bf16
    steps. A kernel that decodes or tiles wrongly is off by O(1)."""
    ok = True
    dtype = jnp.dtype(dtype)
    for m, k, n in shapes:
        nf4, x, a, b, dy = _inputs(m, k, n, 16, dtype)
        got_op, got_w = _op(impl, nf4, dtype, block, None)
        ref_op, ref_w = _op("xla_dequant_matmul", nf4, dtype, None, None)
        got = timing.jit_fwd_and_fwd_bwd(got_op, num_diff=3)[1](x, a, b, *got_w, dy)
        want = timing.jit_fwd_and_fwd_bwd(ref_op, num_diff=3)[1](x, a, b, *ref_w, dy)
        rel = [
            float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32))) / jnp.max(jnp.abs(w)))
            for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
        ]
        passed = max(rel) <= 2**-5
        ok &= passed
        names = ("y", "dx", "dA", "dB")
        detail = " ".join(f"{name}={e:.2e}" for name, e in zip(names, rel, strict=True))
        print(f"check {impl} M{m}xK{k}xN{n}: relative error {detail}: {'PASS' if passed else 'FAIL'}", flush=True)
    return ok


def main(argv: list[str] | None = None) -> None:
    parser = timing.kernel_bench_parser(__doc__, iters=20, sweep_help="time the SWEEP launch configurations")
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--proj", nargs="+", default=[s[0] for s in SHAPES_8B])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--impls",
        nargs="+",
        default=["pallas", "xla_dequant_matmul", "xla16", "bf16_lora_xla"],
    )
    parser.add_argument("--check", action="store_true", help="only check each impl against the reference")
    args = parser.parse_args(argv)

    impls = tuple(args.impls)
    if args.check:
        shapes, block = ([(37, 192, 200)], MOSAIC_SMOKE) if args.smoke else (CHECK_SHAPES, None)
        if not all([check(impl, shapes, args.dtype, block if impl == "mosaic" else None) for impl in impls]):
            raise SystemExit(1)
        return
    shapes = [s for s in SHAPES_8B if s[0] in args.proj]
    if args.smoke:
        jobs = [
            (impl, "smoke", 37, 192, 200, 8, "bfloat16", 2, MOSAIC_SMOKE if impl == "mosaic" else None)
            for impl in impls
        ]
    elif args.sweep:
        sweeps = {"pallas": SWEEP, "mosaic": MOSAIC_SWEEP}
        jobs = [
            (impl, name, m, k, n, args.rank, args.dtype, args.iters, block)
            for impl in (impls if set(impls) <= set(sweeps) else ("pallas",))
            for m in args.tokens
            for name, k, n in shapes
            for block in sweeps[impl]
        ]
    else:
        jobs = [
            (impl, name, m, k, n, args.rank, args.dtype, args.iters)
            for m in args.tokens
            for name, k, n in shapes
            for impl in impls
        ]
    timing.emit_jsonl((measure(*job) for job in jobs), args.out)


if __name__ == "__main__":
    main()
