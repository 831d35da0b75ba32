"""Micro-benchmark: Pallas flash attention against cuDNN and the jitted XLA reference.

Shapes (bf16): Llama-3.1-8B attention (32 q / 8 kv heads, d128, causal) and Gemma-2-9B attention (16 q / 8
kv heads, d256, causal, softcap 50, sliding window 4096) at T = 2048 (B=2), 8192 and 32768 (B=1). cuDNN runs
the 8B shape only (it has no softcap); the XLA reference is skipped where its [B, H, T, T] f32 scores would
not fit. Per measurement: forward and forward+backward median time and TFLOP/s (forward 4*B*Hq*T*T*hd,
halved for causal, forward+backward 3.5x that: the usual convention, so windows are not discounted), and
the max abs error of out/dq/dk/dv against the reference, checked before timing.

Rows are appended to ``--out`` (several ``--only`` runs can share one file).

    python -m jaxsloth.bench.kernel_attention --out attn.jsonl           # the table
    python -m jaxsloth.bench.kernel_attention --out sweep.jsonl --sweep  # block configurations (Pallas)
    python -m jaxsloth.bench.kernel_attention --out smoke.jsonl --smoke  # tiny, CPU
"""

from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp

from jaxsloth.bench import timing
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
SMOKE_SHAPES = (Shape("tiny", 1, 40, 4, 2, 64, softcap=5.0, window=16),)


def _sweep_configs(d: int) -> tuple[AttentionBlocks, ...]:
    base = AttentionBlocks.for_head_dim(d)
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
        dataclasses.replace(base, num_stages_bwd=3),
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
        return lambda q, k, v: attention(q, k, v, block=blocks, **kw)
    if impl == "cudnn":
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
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
    fwd_ms = timing.median_ms(fwd, args[:3], iters)
    fwd_bwd_ms = timing.median_ms(fwd_bwd, args, iters)
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
        blocks=dataclasses.asdict(blocks or AttentionBlocks.for_head_dim(shape.d)) if impl == "pallas" else None,
    )


def _plan(args) -> list[tuple[Shape, str, AttentionBlocks | None]]:
    on_gpu = jax.default_backend() == "gpu"
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
    args = parser.parse_args(argv)
    iters = 2 if args.smoke else max(args.iters, 20)
    rows = (_measure_or_error(shape, impl, iters, blocks) for shape, impl, blocks in _plan(args))
    timing.emit_jsonl(rows, args.out, append=True)


if __name__ == "__main__":
    main(sys.argv[1:])
