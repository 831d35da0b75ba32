"""Shared measurement helpers: median wall time of a jitted call, and the environment record every result carries."""

from __future__ import annotations

import datetime
import platform
import statistics
import sys
import time

import jax


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


def environment() -> dict:
    """GPU, versions, date and command: what BENCHMARKS.md records beside every number."""
    dev = jax.devices()[0]
    return {
        "gpu": dev.device_kind,
        "platform": dev.platform,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python"] + sys.argv),
    }


def peak_gib() -> float | None:
    """The framework's own peak allocation counter (run with XLA_PYTHON_CLIENT_PREALLOCATE=false)."""
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30
