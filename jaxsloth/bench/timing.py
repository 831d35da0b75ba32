"""Shared measurement helpers: median wall time of a jitted call, the environment record every result carries,
and the pieces every kernel micro-benchmark (``kernel_<op>.py``) shares: error check, fwd/fwd+bwd functions,
command-line flags and JSON-lines output."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp


def median_ms(fn, args, iters: int, warmup: int = 1) -> float:
    """Median milliseconds of ``fn(*args)`` over ``iters`` calls after ``warmup`` calls (all blocked on)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def kernel_ms(fn, args, iters: int, repeats: int = 5) -> float:
    """Device milliseconds per call of ``fn(*args)``: ``iters`` calls dispatched back to back and blocked on
    once, so host dispatch (tens of microseconds per jitted call) overlaps the GPU work instead of adding to
    it; the median over ``repeats`` such batches. Sub-millisecond kernels (norms, activations) are otherwise
    timed partly as Python overhead."""
    jax.block_until_ready(fn(*args))
    batches = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = None
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        batches.append((time.perf_counter() - start) / iters)
    return 1e3 * statistics.median(batches)


ROOT = Path(__file__).resolve().parents[2]  # the checkout whose code runs


def portable_command(argv: Sequence[str] | None = None) -> str:
    """The command line of this process as anyone can rerun it from the checkout: ``python -m <module>`` for a
    module file of the checkout, paths inside the checkout relative to it, and any other absolute path (an output
    folder, a temporary checkpoint) reduced to its file name, so no record names a machine's directories."""
    argv = list(sys.argv if argv is None else argv)
    head = ["python"]
    if argv and argv[0].endswith(".py"):
        script = Path(argv[0]).resolve()
        if script.is_relative_to(ROOT):
            module = ".".join(script.relative_to(ROOT).with_suffix("").parts)
            head, argv = ["python", "-m", module], argv[1:]
    return shlex.join(head + [portable_path(a) for a in argv])


def portable_path(arg: str) -> str:
    if "=" in arg and arg.startswith("-"):  # --flag=/some/path
        flag, value = arg.split("=", 1)
        return f"{flag}={portable_path(value)}"
    if not os.path.isabs(arg):
        return arg
    path = Path(arg).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def environment() -> dict:
    """GPU, versions, date and command: what BENCHMARKS.md records beside every number. XLA_FLAGS, when set, change
    what XLA compiles, so they are part of the command and of the record."""
    dev = jax.devices()[0]
    xla_flags = os.environ.get("XLA_FLAGS", "").strip()
    command = portable_command()
    return {
        "gpu": dev.device_kind,
        "platform": dev.platform,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        "command": f"XLA_FLAGS='{xla_flags}' {command}" if xla_flags else command,
        **({"xla_flags": xla_flags} if xla_flags else {}),
    }


def peak_gib() -> float | None:
    """The framework's own peak allocation counter (run with XLA_PYTHON_CLIENT_PREALLOCATE=false)."""
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def device_fields() -> dict:
    """The environment keys every kernel micro-benchmark row carries: versions, device, date and command."""
    return {
        "jax": jax.__version__,
        "device_kind": jax.devices()[0].device_kind,
        "date": datetime.date.today().isoformat(),
        "command": portable_command(),
    }


def kernel_record(
    op: str, impl: str, shape: str, dtype: str, fwd_ms: float, fwd_bwd_ms: float, iters: int, **fields
) -> dict:
    """One JSON line of a kernel micro-benchmark: the keys every op reports, its own ``fields`` (metric,
    max_err, block config, ...) in the order given, then ``iters`` and the environment."""
    return {
        "op": op,
        "impl": impl,
        "shape": shape,
        "dtype": dtype,
        "fwd_ms": fwd_ms,
        "fwd_bwd_ms": fwd_bwd_ms,
        **fields,
        "iters": iters,
        "timing": "pipelined",  # kernel_ms: back-to-back launches, one block
        **device_fields(),
    }


# H200 device-to-device copy rate: the ceiling a memory-bound kernel's bandwidth is quoted against.
HBM_GBPS = 4300.0


def hbm_fields(fwd_bytes: float, fwd_ms: float, fwd_bwd_bytes: float, fwd_bwd_ms: float) -> dict:
    """Achieved bandwidth of a memory-bound op (bytes it must move / time) and its fraction of ``HBM_GBPS``."""
    fwd_gbps, fwd_bwd_gbps = fwd_bytes / fwd_ms * 1e-6, fwd_bwd_bytes / fwd_bwd_ms * 1e-6
    return {
        "gbps_or_tflops": fwd_bwd_gbps,
        "unit": "GB/s fwd+bwd",
        "fwd_gbps": fwd_gbps,
        "fwd_frac_hbm": fwd_gbps / HBM_GBPS,
        "fwd_bwd_frac_hbm": fwd_bwd_gbps / HBM_GBPS,
    }


def max_abs_err(got, want) -> float:
    """Largest absolute difference over the matching leaves of two pytrees of arrays, compared in f32."""
    return max(
        float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
    )


def jit_fwd_and_fwd_bwd(op: Callable, num_diff: int | None = None) -> tuple[Callable, Callable]:
    """Jitted ``fwd(*args) = op(*args)`` and ``fwd_bwd(*args, ct) = (op(*args), cotangents)``.

    The cotangents are those of the first ``num_diff`` arguments (all by default); the rest (integer
    positions, constant tables) are passed through as traced inputs, not baked into the program as constants.
    """

    return jax.jit(op), jax.jit(lambda *args_and_ct: _value_and_cotangents(op, num_diff, args_and_ct))


def _value_and_cotangents(op: Callable, num_diff: int | None, args_and_ct: tuple):
    """(op(*args), cotangents of the first ``num_diff`` args) for ``args_and_ct = (*args, ct)``."""
    *args, ct = args_and_ct
    split = len(args) if num_diff is None else num_diff
    rest = args[split:]
    out, vjp = jax.vjp(lambda *diff: op(*diff, *rest), *args[:split])
    return out, vjp(ct)


def jit_bwd(op: Callable, num_diff: int | None = None) -> Callable:
    """Jitted ``bwd(*args, ct)``: the cotangents alone, the primal output dropped. In a training step the
    forward runs at one point and the backward much later, so each is timed alone; ``fwd_bwd`` lets XLA fuse
    the two passes of an elementwise op into one, which a real step cannot do."""

    return jax.jit(lambda *args_and_ct: _value_and_cotangents(op, num_diff, args_and_ct)[1])


def kernel_bench_parser(description: str, iters: int, sweep_help: str) -> argparse.ArgumentParser:
    """The flags every kernel micro-benchmark shares: --out, --smoke, --sweep, --iters (default ``iters``)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="JSON lines file (default: stdout only)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, few iterations (CPU check)")
    parser.add_argument("--sweep", action="store_true", help=sweep_help)
    parser.add_argument("--iters", type=int, default=iters)
    return parser


def emit_jsonl(rows: Iterable[dict], path: str | None, append: bool = False) -> None:
    """Print each row as one JSON line and write it to ``path`` as soon as it exists (a run cut short keeps
    what it measured); ``append`` adds to an existing file instead of replacing it."""
    out = open(path, "a" if append else "w") if path else None
    try:
        for row in rows:
            line = json.dumps(row)
            print(line, flush=True)
            if out:
                out.write(line + "\n")
                out.flush()
    finally:
        if out:
            out.close()
