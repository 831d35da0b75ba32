"""Micro-benchmark: Pallas flash attention against cuDNN, Google's tokamax and the jitted XLA reference.

Shapes (bf16): Llama-3.1-8B attention (32 q / 8 kv heads, d128, causal) and Gemma-2-9B attention (16 q / 8
kv heads, d256, causal, softcap 50, sliding window 4096) at T = 2048 (B=2), 8192 and 32768 (B=1). cuDNN runs
the 8B shape only (it has no softcap); the XLA reference is skipped where its [B, H, T, T] f32 scores would
not fit. tokamax's Mosaic GPU and Triton kernels run on GPU where tokamax is installed
(jaxsloth/bench/suites/install_tokamax_wheels.sh); a feature one lacks (its Triton backward has no softcap) gives an error row.
Per measurement: forward and forward+backward median time and TFLOP/s (forward 4*B*Hq*T*T*hd, halved for
causal, forward+backward 3.5x that: the usual convention, so windows are not discounted), the compiled
forward+backward's temporary bytes (memory as T grows), and the max abs error of out/dq/dk/dv against the
reference, checked before timing.

Rows are appended to ``--out`` (several ``--only`` runs can share one file).

    python -m jaxsloth.bench.kernel_attention --out attn.jsonl           # the table
    python -m jaxsloth.bench.kernel_attention --out sweep.jsonl --sweep  # block configurations (Pallas)
    python -m jaxsloth.bench.kernel_attention --out smoke.jsonl --smoke  # tiny, CPU
    python -m jaxsloth.bench.kernel_attention --out tune.jsonl --tune --only gemma2_9b:B=1,T=8192
        # each of the three kernels (forward, dK/dV, dQ) timed alone over its own launch settings
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys

import jax
import jax.numpy as jnp

from jaxsloth.bench import timing
from pallas_kernels import attention as attention_kernels
from pallas_kernels.attention import AttentionBlocks, attention, attention_reference

# Largest [B, Hq, T, T] f32 score tensor the XLA reference is allowed (it keeps several of them alive).
_XLA_SCORE_LIMIT_BYTES = 16 * 2**30
_CHECK_QUERIES = 1024
_EXPECTED: dict = {}


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    b: int
    t: int
    hq: int
    hk: int
    d: int
    softcap: float | None = None
    window: int | None = None

    def label(self) -> str:
        extra = "".join(
            [f",softcap={self.softcap:g}" if self.softcap else "", f",window={self.window}" if self.window else ""]
        )
        return f"{self.name}:B={self.b},T={self.t},Hq={self.hq},Hk={self.hk},hd={self.d},causal{extra}"

    def fwd_flops(self) -> float:
        return 4.0 * self.b * self.hq * self.t * self.t * self.d * 0.5


def llama8b(b: int, t: int) -> Shape:
    return Shape("llama3_8b", b, t, 32, 8, 128)


def gemma2_9b(b: int, t: int) -> Shape:
    return Shape("gemma2_9b", b, t, 16, 8, 256, softcap=50.0, window=4096)


SHAPES = tuple(f(b, t) for f in (llama8b, gemma2_9b) for b, t in ((2, 2048), (1, 8192), (1, 32768)))
SMOKE_SHAPES = (Shape("tiny", 1, 130, 4, 2, 64, softcap=5.0, window=16),)  # T: one Mosaic forward tile and a bit


def default_blocks(d: int, dtype=jnp.bfloat16) -> AttentionBlocks:
    """What a training step runs: this device's profile's tiles for head dim d, else the kernel's default."""
    from jaxsloth.profiles import profile_for_device

    picked = profile_for_device().kernels.block_for("attention", jnp.zeros((1, 1, 1, d), dtype))
    return picked or AttentionBlocks.for_head_dim(d, dtype)


def _sweep_configs(d: int) -> tuple[AttentionBlocks, ...]:
    base = AttentionBlocks.for_head_dim(d)  # the sweep varies the Triton kernels
    if d > 128:
        return (
            base,
            dataclasses.replace(base, block_q=128, block_k=32, num_warps=8),
            dataclasses.replace(base, block_q=64, block_k=32, num_warps=4, num_stages=3),
            dataclasses.replace(base, block_q=128, block_k=64, num_warps=8),
            dataclasses.replace(base, block_q_dkv=16, block_k_dkv=64, num_warps_dkv=4),
            dataclasses.replace(base, block_q_dkv=32, block_k_dkv=32, num_warps_dkv=4),
            dataclasses.replace(base, block_q_dq=32, block_k_dq=32, num_warps_dq=4),
            dataclasses.replace(base, block_q_dq=64, block_k_dq=32, num_warps_dq=8),
        )
    return (
        base,
        dataclasses.replace(base, num_warps=4),
        dataclasses.replace(base, block_k=128, num_stages=2),
        dataclasses.replace(base, block_q=64, block_k=64, num_warps=4, num_stages=4),
        dataclasses.replace(base, num_stages=4),
        dataclasses.replace(base, block_q_dkv=32, block_k_dkv=128, num_warps_dkv=8),
        dataclasses.replace(base, block_q_dkv=64, block_k_dkv=64, num_warps_dkv=4),
        dataclasses.replace(base, block_q_dq=64, block_k_dq=64, num_warps_dq=4),
        dataclasses.replace(base, num_stages_dkv=3, num_stages_dq=3),
    )


def _inputs(shape: Shape, dtype):
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (shape.b, shape.t, shape.hq, shape.d), jnp.float32).astype(dtype)
    k, v = (jax.random.normal(kk, (shape.b, shape.t, shape.hk, shape.d), jnp.float32).astype(dtype) for kk in keys[1:3])
    do = jax.random.normal(keys[3], q.shape, jnp.float32).astype(dtype)
    return q, k, v, do


def _attention_fn(shape: Shape, impl: str, blocks: AttentionBlocks | None):
    kw = dict(sliding_window=shape.window, softcap=shape.softcap)
    if impl == "pallas":
        return lambda q, k, v: attention(q, k, v, block=blocks or default_blocks(shape.d), **kw)
    if impl == "cudnn":
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    if impl.startswith("tokamax_"):
        import tokamax  # only where installed (the GPU machine), so imported here

        # Our window counts the keys visible including self (i - j < window); tokamax's (left, right) counts the
        # keys either side of the diagonal, as jax.nn's local_window_size does.
        window = None if shape.window is None else (shape.window - 1, 0)
        backend = impl.removeprefix("tokamax_")  # "mosaic", "triton" (or "xla", which runs on CPU)
        return lambda q, k, v: tokamax.dot_product_attention(
            q, k, v, is_causal=True, local_window_size=window, logits_soft_cap=shape.softcap, implementation=backend
        )
    return lambda q, k, v: attention_reference(q, k, v, **kw)


def _expected(shape: Shape, args) -> tuple[tuple, str]:
    """Reference results for ``args`` (cached per shape, so a sweep computes them once)."""
    if shape not in _EXPECTED:
        _EXPECTED.clear()
        if _xla_fits(shape):
            want = timing.jit_fwd_and_fwd_bwd(_attention_fn(shape, "xla_reference", None))[1](*args)
            _EXPECTED[shape] = (tuple(jax.tree.leaves(want)), "out, dq, dk, dv")
        else:
            # Too long for the reference's full score matrix: check the forward of the last queries, which
            # see the most keys (the reference treats a shorter q as the last T positions).
            q, k, v, _ = args
            want = jax.jit(_attention_fn(shape, "xla_reference", None))(q[:, -_CHECK_QUERIES:], k, v)
            _EXPECTED[shape] = ((want,), f"out, last {_CHECK_QUERIES} rows")
    return _EXPECTED[shape]


def _xla_fits(shape: Shape) -> bool:
    return shape.b * shape.hq * shape.t * shape.t * 4 <= _XLA_SCORE_LIMIT_BYTES


def measure(shape: Shape, impl: str, dtype, iters: int, blocks: AttentionBlocks | None = None) -> dict:
    args = _inputs(shape, dtype)
    fwd, fwd_bwd = timing.jit_fwd_and_fwd_bwd(_attention_fn(shape, impl, blocks))
    got = jax.block_until_ready(fwd_bwd(*args))
    max_err, err_scope = None, None
    if impl != "xla_reference":
        want, err_scope = _expected(shape, args)
        max_err = timing.max_abs_err(got if len(want) == 4 else got[0][:, -_CHECK_QUERIES:], want)
    del got
    fwd_ms = timing.kernel_ms(fwd, args[:3], iters)
    fwd_bwd_ms = timing.kernel_ms(fwd_bwd, args, iters)
    # XLA's plan for the step's temporaries (beyond inputs and outputs): flash attention's should grow linearly
    # with T (the log-sum-exp, delta, f32 dQ partials), the reference's quadratically (its [B, H, T, T] scores).
    temp = fwd_bwd.lower(*args).compile().memory_analysis().temp_size_in_bytes
    flops = shape.fwd_flops()
    return timing.kernel_record(
        "attention",
        impl,
        shape.label(),
        jnp.dtype(dtype).name,
        fwd_ms,
        fwd_bwd_ms,
        iters,
        gbps_or_tflops=3.5 * flops / fwd_bwd_ms * 1e-9,
        unit="TFLOP/s fwd+bwd (causal counted as half)",
        fwd_tflops=flops / fwd_ms * 1e-9,
        max_err=max_err,
        max_err_scope=err_scope,
        blocks=dataclasses.asdict(blocks or default_blocks(shape.d)) if impl == "pallas" else None,
        temp_bytes_fwd_bwd=temp,
    )


TUNE_KERNELS = ("fwd", "fwd_mosaic", "dkv", "dkv_mosaic", "dq", "dq_mosaic")
# Per-kernel launch settings the tuner tries: (block_q, block_k, num_warps, num_stages) in each kernel's own
# field names. Row bytes (head dim x 2 for bf16) bound what fits: 512-byte rows (d256) take the smaller tiles.
# fmt: off
_TUNE_TILES = {
    # The 12 fastest of each Triton kernel over two rounds of tuning at T=8192 (the first tried 16-48 tiles per
    # kernel, the second the neighbours of its winners; BENCHMARKS.md, attention tiles), fastest first: the short
    # list to re-tune at other lengths and batch sizes.
    "d256": {
        "fwd": [(128, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 3), (64, 64, 4, 1), (128, 128, 8, 1), (64, 64, 4, 3),
                (128, 32, 8, 2), (64, 64, 4, 2), (128, 64, 8, 1), (64, 32, 4, 3), (32, 64, 4, 2), (64, 64, 8, 3)],
        "dkv": [(64, 32, 4, 2), (128, 32, 8, 2), (128, 32, 4, 2), (32, 32, 4, 2), (64, 16, 4, 2), (64, 32, 8, 2),
                (32, 32, 4, 3), (32, 64, 8, 2), (64, 64, 8, 2), (32, 64, 8, 3), (64, 32, 4, 3), (128, 16, 4, 2)],
        "dq": [(128, 32, 8, 3), (128, 32, 8, 2), (64, 16, 4, 3), (64, 32, 4, 3), (128, 64, 8, 1), (128, 16, 8, 3),
                (128, 32, 8, 1), (64, 32, 4, 2), (64, 64, 4, 2), (128, 16, 8, 2), (32, 64, 4, 2), (64, 64, 8, 2)],
        # The Mosaic GPU kernel (see "d128"): query rows in 64s (its dots' contraction); at d256 K, V and two
        # 64-row Q + dO stages take 192 KiB, the only tile that fits.
        "dkv_mosaic": [(64, 64, 4, 2)],
        # The Mosaic forward: 128 query rows, 64 keys per step; two stages are all that fit at d256.
        "fwd_mosaic": [(128, 64, 4, 2)],
    },
    "d128": {
        # The Mosaic GPU kernel: three warpgroups (num_warps unused); 64 keys per CTA (roles split) or 128 (each
        # compute warpgroup both outputs of 64), query rows per step and the ring depth (shared memory: K, V +
        # stages x (Q, dO) tiles).
        "dkv_mosaic": [(64, 128, 4, 2), (64, 128, 4, 3), (128, 128, 4, 2), (64, 64, 4, 3), (128, 64, 4, 2)],
        # The Mosaic forward: 128 query rows per CTA (fixed), keys per step and ring depth.
        "fwd_mosaic": [(128, 64, 4, 2), (128, 64, 4, 3), (128, 128, 4, 2), (128, 128, 4, 3)],
        # The Mosaic dQ (the forward's layout; head dims up to 128): keys per step and ring depth.
        "dq_mosaic": [(128, 64, 4, 2), (128, 64, 4, 3), (128, 128, 4, 2)],
        "fwd": [(256, 64, 8, 4), (128, 128, 8, 3), (256, 64, 8, 3), (128, 64, 8, 4), (128, 64, 8, 3),
                (256, 128, 8, 2), (128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3),
                (128, 64, 8, 2), (128, 32, 4, 4)],
        "dkv": [(64, 128, 8, 3), (64, 128, 8, 4), (32, 64, 4, 3), (64, 128, 8, 2), (32, 64, 4, 4), (64, 64, 4, 2),
                (32, 128, 8, 3), (64, 64, 4, 3), (32, 128, 8, 2), (64, 128, 8, 1), (64, 64, 4, 4), (64, 64, 8, 3)],
        "dq": [(128, 64, 8, 4), (128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 2), (128, 32, 8, 2), (128, 32, 4, 3),
                (128, 32, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3), (64, 64, 4, 3), (64, 64, 4, 4), (256, 64, 8, 2)],
    },
}
# fmt: on
_TUNE_FIELDS = {  # per launch, shared by its variants
    "fwd": ("block_q", "block_k", "num_warps", "num_stages"),
    "dkv": ("block_q_dkv", "block_k_dkv", "num_warps_dkv", "num_stages_dkv"),
    "dq": ("block_q_dq", "block_k_dq", "num_warps_dq", "num_stages_dq"),
}


def tune(shape: Shape, iters: int, smoke: bool = False, kernels: tuple[str, ...] = TUNE_KERNELS):
    """Times each Pallas kernel alone over its candidate launch settings (bf16), checking every output
    against the default settings' output; yields one row per (kernel, settings), then the best settings
    of each kernel combined (kernels not tuned keep the defaults; the kernels are independent launches, so
    their best settings compose), and last ``attention`` forward+backward timed with those settings."""
    q, k, v, do = _inputs(shape, jnp.bfloat16)
    kw = dict(segment_ids=None, causal=True, sliding_window=shape.window, softcap=shape.softcap, scale=None)
    default = default_blocks(shape.d)
    (qp, kp, vp, segs), st = attention_kernels.prepare(q, k, v, interpret=None, block=default, **kw)
    dop = jnp.pad(do, [(0, 0), (0, qp.shape[1] - do.shape[1]), (0, 0), (0, qp.shape[3] - do.shape[3])])
    fwd0, dkv0, dq0 = (jax.jit(f) for f in attention_kernels.kernel_calls(st))
    out, lse = fwd0(qp, kp, vp, segs)
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), dop.astype(jnp.float32))
    args = {"fwd": (qp, kp, vp, segs), "dkv": (qp, kp, vp, dop, lse, delta, segs)}
    args["dq"] = args["dkv"]
    expected = {"fwd": (out, lse), "dkv": dkv0(*args["dkv"]), "dq": dq0(*args["dq"])}
    tiles = _TUNE_TILES["d256" if shape.d > 128 else "d128"]

    def real(outputs):
        """The real tokens' rows (padding rows hold whatever a kernel's tiling leaves there): [B, T, H, D]
        outputs on axis 1, the [B, H, T] log-sum-exp on its last axis."""
        return [x[:, : shape.t] if x.ndim == 4 else x[..., : shape.t] for x in jax.tree.leaves(outputs)]

    best = {}
    launches = ("fwd", "dkv", "dq")  # kernel_calls' order; each variant ("fwd_mosaic") replaces its base
    for kernel in TUNE_KERNELS:
        if kernel not in kernels:
            continue
        launch = kernel.split("_")[0]
        # Tiles longer than the padded sequence shrink to it, as ``attention`` shrinks them (duplicates dropped).
        clipped = ((min(bq, qp.shape[1]), min(bk, kp.shape[1]), *rest) for bq, bk, *rest in tiles.get(kernel, ()))
        fitting = list(dict.fromkeys(clipped))
        for tile in fitting[: 2 if smoke else None]:
            settings = dict(zip(_TUNE_FIELDS[launch], tile, strict=True))
            settings[f"{launch}_backend"] = "mosaic" if kernel.endswith("_mosaic") else "triton"
            row = {"op": "attention_tune", "kernel": kernel, "shape": shape.label(), "settings": settings}
            try:
                blocks = dataclasses.replace(default, **settings)
                if qp.shape[1] % tile[0] or kp.shape[1] % tile[1]:
                    raise ValueError(f"tile {tile[:2]} does not divide the padded lengths {qp.shape[1]}, {kp.shape[1]}")
                calls = attention_kernels.kernel_calls(dataclasses.replace(st, blocks=blocks))
                call = jax.jit(calls[launches.index(launch)])
                row["max_err"] = timing.max_abs_err(real(call(*args[launch])), real(expected[launch]))
                row["ms"] = timing.kernel_ms(call, args[launch], iters)
                if row["max_err"] <= 0.05 and row["ms"] < best.get(kernel, ({}, float("inf")))[1]:
                    best[kernel] = (settings, row["ms"])
            except Exception as e:  # out of shared memory or registers: skip this tile
                row["error"] = repr(e)[:300]
            yield {**row, **timing.device_fields()}
    # Per launch, the fastest of its variants (Triton or Mosaic GPU).
    chosen = [
        min((v for k, v in best.items() if k.split("_")[0] == launch), key=lambda v: v[1])
        for launch in launches
        if any(k.split("_")[0] == launch for k in best)
    ]
    combined = dataclasses.replace(
        default, **{name: value for settings, _ in chosen for name, value in settings.items()}
    )
    yield {
        "op": "attention_tune",
        "kernel": "best",
        "shape": shape.label(),
        "settings": dataclasses.asdict(combined),
        "ms": {kernel: ms for kernel, (_, ms) in best.items()},
        **timing.device_fields(),
    }
    # The combination through the public op (padding, the delta reduction and the launches together).
    yield {**_measure_or_error(shape, "pallas", iters, combined), "note": "tuned settings"}


def _plan(args) -> list[tuple[Shape, str, AttentionBlocks | None]]:
    on_gpu = jax.default_backend() == "gpu"
    # Installed but failing to import still plans the rows: their error rows say why.
    tokamax = on_gpu and importlib.util.find_spec("tokamax") is not None
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    if args.only:
        shapes = tuple(s for s in shapes if args.only in s.label())
    plan = []
    for shape in shapes:
        if args.sweep:
            plan += [(shape, "pallas", blocks) for blocks in _sweep_configs(shape.d)]
            continue
        plan.append((shape, "pallas", None))
        if on_gpu and shape.softcap is None and shape.window is None:
            plan.append((shape, "cudnn", None))
        if tokamax:
            plan += [(shape, "tokamax_mosaic", None), (shape, "tokamax_triton", None)]
        if _xla_fits(shape):
            plan.append((shape, "xla_reference", None))
    return plan


def _measure_or_error(shape: Shape, impl: str, iters: int, blocks: AttentionBlocks | None) -> dict:
    try:
        return measure(shape, impl, jnp.bfloat16, iters, blocks)
    except Exception as e:  # one failing config (e.g. out of registers) must not end a sweep
        row = {"op": "attention", "impl": impl, "shape": shape.label(), "error": repr(e)[:500]}
        if blocks is not None:
            row["blocks"] = dataclasses.asdict(blocks)
        return row


def main(argv=None) -> None:
    parser = timing.kernel_bench_parser(__doc__, iters=20, sweep_help="time several block configurations per shape")
    parser.add_argument("--only", default="", help="run only shapes whose label contains this text")
    parser.add_argument("--tune", action="store_true", help="time each kernel alone over its own launch settings")
    parser.add_argument(
        "--kernels", nargs="+", choices=TUNE_KERNELS, default=TUNE_KERNELS, help="with --tune: which kernels to tune"
    )
    args = parser.parse_args(argv)
    iters = 2 if args.smoke else max(args.iters, 20)
    if args.tune:
        shapes = [s for s in (SMOKE_SHAPES if args.smoke else SHAPES) if args.only in s.label()]
        rows = (row for shape in shapes for row in tune(shape, iters, smoke=args.smoke, kernels=tuple(args.kernels)))
        timing.emit_jsonl(rows, args.out, append=True)
        return
    rows = (_measure_or_error(shape, impl, iters, blocks) for shape, impl, blocks in _plan(args))
    timing.emit_jsonl(rows, args.out, append=True)


if __name__ == "__main__":
    main(sys.argv[1:])
