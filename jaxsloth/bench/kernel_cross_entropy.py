"""Micro-benchmark: fused LM-head cross-entropy (Pallas kernel; token-chunked XLA with the gradient in the
forward pass) against the full-logits XLA reference.

Shapes: Llama-3.1-8B head (D=4096, V=128256), bf16, 4096 and 16384 tokens, with and without the head
gradient. Per measurement: forward and forward+backward median time, model TFLOP/s (2NDV forward, 2NDV
per gradient), compiled temporary memory (``memory_analysis().temp_size_in_bytes``) and, on GPU, the rise
of ``peak_bytes_in_use`` over the bytes in use before the first call (temporaries plus the gradient
outputs: ``output_bytes_fwd_bwd`` says how much of it is outputs). Each measurement runs in its own
process so the peak counter starts fresh (one run of the full table is ~8 processes, each compiling;
split it with ``--tokens 4096`` / ``--tokens 16384`` if a time limit is tight). Correctness (max abs error against the reference) is checked
after the peak is read and before timing.

    python -m jaxsloth.bench.kernel_cross_entropy --out ce.jsonl            # the full table
    python -m jaxsloth.bench.kernel_cross_entropy --out sweep.jsonl --sweep # block configurations, chunk sizes
    python -m jaxsloth.bench.kernel_cross_entropy --out smoke.jsonl --smoke # tiny, CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp

from jaxsloth.bench import timing
from pallas_kernels.cross_entropy import (
    CrossEntropyBlocks,
    cross_entropy,
    cross_entropy_chunked,
    cross_entropy_reference,
)

IMPLS = ("pallas", "chunked", "xla_reference")
CHUNK_SWEEP = (512, 1024, 2048, 4096)
SWEEP = (
    CrossEntropyBlocks(),
    CrossEntropyBlocks(block_n=128, block_v=128, block_d=64, num_warps=4, num_stages=4),
    CrossEntropyBlocks(block_n=128, block_v=128, block_d=64, num_warps=8, num_stages=4),
    CrossEntropyBlocks(block_n=128, block_v=256, block_d=32, num_warps=8, num_stages=4),
    CrossEntropyBlocks(block_n=256, block_v=128, block_d=64, num_warps=8, num_stages=3),
    CrossEntropyBlocks(block_n=64, block_v=256, block_d=64, num_warps=4, num_stages=3),
    CrossEntropyBlocks(block_n=128, block_v=256, block_d=128, num_warps=8, num_stages=2),
    CrossEntropyBlocks(group_n=8),
    CrossEntropyBlocks(chunk_v=4096),
    CrossEntropyBlocks(chunk_v=16384),
)


@dataclasses.dataclass(frozen=True)
class Case:
    impl: str
    n: int
    d: int
    v: int
    dtype: str
    head_grad: bool
    blocks: CrossEntropyBlocks
    chunk: int = 1024  # tokens per chunk of the chunked path

    @property
    def shape(self) -> str:
        return f"N={self.n},D={self.d},V={self.v}"


def _inputs(case: Case):
    kh, kw, kt, ki = jax.random.split(jax.random.key(0), 4)
    dtype = jnp.dtype(case.dtype)
    hidden = jax.random.normal(kh, (case.n, case.d), jnp.float32).astype(dtype)
    head = (jax.random.normal(kw, (case.v, case.d), jnp.float32) * case.d**-0.5).astype(dtype)
    targets = jax.random.randint(kt, (case.n,), 0, case.v, jnp.int32)
    # About 2% ignored (padding / prompt tokens), so the mask path is in the timed work.
    targets = jnp.where(jax.random.uniform(ki, (case.n,)) < 0.02, -100, targets)
    return hidden, head, targets


def _loss_fn(case: Case, impl: str):
    if impl == "pallas":
        return lambda h, w, t: cross_entropy(h, w, t, block=case.blocks, head_grad=case.head_grad)
    if impl == "chunked":
        return lambda h, w, t: cross_entropy_chunked(h, w, t, head_grad=case.head_grad, chunk=case.chunk)
    return cross_entropy_reference


def _grad_fn(case: Case, impl: str):
    loss = _loss_fn(case, impl)
    argnums = (0, 1) if case.head_grad else 0
    return jax.value_and_grad(lambda h, w, t: loss(h, w, t)[0], argnums=argnums)


def _memory_stats():
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_in_use"), stats.get("peak_bytes_in_use")


def _max_err(case: Case, args, value_grad) -> tuple[float, float]:
    """(max abs gradient error, abs error of the mean per-token loss) against the reference."""
    loss, grads = value_grad
    loss_ref, grads_ref = jax.jit(_grad_fn(case, "xla_reference"))(*args)
    grad_err = timing.max_abs_err(grads, grads_ref)
    count = max(int(jnp.sum(args[2] != -100)), 1)
    return grad_err, abs(float(loss) - float(loss_ref)) / count


def measure(case: Case, iters: int, check: bool = True) -> dict:
    args = _inputs(case)
    jax.block_until_ready(args)
    fwd = jax.jit(_loss_fn(case, case.impl)).lower(*args).compile()
    fwd_bwd = jax.jit(_grad_fn(case, case.impl)).lower(*args).compile()
    in_use, peak_before = _memory_stats()
    value_grad = jax.block_until_ready(fwd_bwd(*args))
    _, peak_after = _memory_stats()
    peak_delta = None
    if peak_after is not None and peak_after > peak_before:
        peak_delta = peak_after - in_use
    grad_err, loss_err = _max_err(case, args, value_grad) if check and case.impl != "xla_reference" else (0.0, 0.0)
    del value_grad
    fwd_ms = timing.kernel_ms(fwd, args, iters)
    fwd_bwd_ms = timing.kernel_ms(fwd_bwd, args, iters)
    flops = 2.0 * case.n * case.d * case.v
    temp_fwd_bwd = fwd_bwd.memory_analysis().temp_size_in_bytes
    return timing.kernel_record(
        "cross_entropy",
        case.impl,
        case.shape,
        case.dtype,
        fwd_ms,
        fwd_bwd_ms,
        iters,
        head_grad=case.head_grad,
        # Model FLOPs (what the full-logits path does), not the kernel's extra logits recompute.
        gbps_or_tflops=flops * (3 if case.head_grad else 2) / fwd_bwd_ms * 1e-9,
        unit="TFLOP/s fwd+bwd",
        fwd_tflops=flops / fwd_ms * 1e-9,
        max_err=grad_err,
        loss_err_per_token=loss_err,
        temp_bytes_fwd=fwd.memory_analysis().temp_size_in_bytes,
        temp_bytes_fwd_bwd=temp_fwd_bwd,
        temp_gib_fwd_bwd=temp_fwd_bwd / 2**30,
        output_bytes_fwd_bwd=fwd_bwd.memory_analysis().output_size_in_bytes,
        peak_delta_bytes_fwd_bwd=peak_delta,
        blocks=dataclasses.asdict(case.blocks) if case.impl == "pallas" else None,
        chunk=case.chunk if case.impl == "chunked" else None,
    )


def _blocks_from_args(args) -> CrossEntropyBlocks:
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(CrossEntropyBlocks)}
    return CrossEntropyBlocks(**{k: v for k, v in fields.items() if v is not None})


def _block_argv(blocks: CrossEntropyBlocks) -> list[str]:
    return [a for k, v in dataclasses.asdict(blocks).items() for a in (f"--{k.replace('_', '-')}", str(v))]


def _run_isolated(case: Case, argv_common: list[str]) -> list[dict]:
    """One measurement in a fresh process (fresh peak-memory counter); a crash becomes an error row."""
    only = f"{case.impl}:{case.n}:{int(case.head_grad)}"
    cmd = [
        sys.executable,
        "-m",
        "jaxsloth.bench.kernel_cross_entropy",
        "--only",
        only,
        *argv_common,
        *_block_argv(case.blocks),
        "--chunk",
        str(case.chunk),
    ]
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not rows:
        sys.stderr.write(proc.stderr[-4000:])
        return [{"op": "cross_entropy", "impl": case.impl, "shape": case.shape, "error": proc.stderr[-2000:]}]
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = timing.kernel_bench_parser(__doc__, iters=20, sweep_help="time a few block configurations at 4096 tokens")
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--no-isolate", action="store_true", help="all measurements in this process")
    parser.add_argument("--chunk", type=int, default=1024, help="tokens per chunk of the chunked path")
    parser.add_argument("--only", help=argparse.SUPPRESS)
    for field in dataclasses.fields(CrossEntropyBlocks):
        parser.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, type=int)
    args = parser.parse_args(argv)
    blocks = _blocks_from_args(args)
    common = ["--hidden", str(args.hidden), "--vocab", str(args.vocab), "--dtype", args.dtype]
    common += ["--iters", str(args.iters)]

    def case(impl, n, head_grad, blk=blocks, chunk=args.chunk):
        return Case(impl, n, args.hidden, args.vocab, args.dtype, head_grad, blk, chunk)

    if args.smoke:
        args.tokens, args.hidden, args.vocab, args.iters = [37], 72, 1003, 3
        small = CrossEntropyBlocks(block_n=16, block_v=256, block_d=64, chunk_v=512)
        rows = (measure(case(impl, 37, True, small, chunk=16), args.iters) for impl in IMPLS)
    elif args.only:
        impl, n, head_grad = args.only.split(":")
        rows = [measure(case(impl, int(n), bool(int(head_grad))), args.iters)]
    elif args.sweep:
        n = args.tokens[0]
        cases = [case("pallas", n, hg, blk) for blk in SWEEP for hg in (False, True)]
        cases += [case("chunked", n, False, chunk=c) for c in CHUNK_SWEEP]
        rows = (measure(c, args.iters, check=False) for c in cases)
    else:
        cases = [case(impl, n, hg) for n in args.tokens for impl in IMPLS for hg in (True, False)]
        run = (lambda c: [measure(c, args.iters)]) if args.no_isolate else (lambda c: _run_isolated(c, common))
        rows = (row for c in cases for row in run(c))
    timing.emit_jsonl(rows, args.out)


if __name__ == "__main__":
    main()
