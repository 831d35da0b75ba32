"""Where a training step's device time goes, from a ``jax.profiler`` trace.

``python -m jaxsloth.bench.step ... --trace DIR`` records a few steps with ``create_perfetto_trace=True``; this module
reads the Chrome-trace JSON that JAX writes beside the XPlane (``DIR/**/perfetto_trace.json.gz``), keeps the device
tracks (the GPU's streams; on a CPU-only run, every track), and sums kernel time per kernel name and per category
(GEMMs, attention, our Pallas kernels, XLA fusions, copies). It needs no TensorBoard or xprof.

    python -m jaxsloth.bench.trace_summary DIR [--steps 2] [--top 30]
"""

from __future__ import annotations

import argparse
import bisect
import collections
import gzip
import json
import pathlib
import re

# First match wins; matched against the lower-cased kernel name.
CATEGORIES = (
    ("attention (cuDNN)", r"cudnn|fmha|flash_fprop|flash_bprop|sdpa"),
    ("attention (Pallas)", r"flash_attention|flash_(fwd|dkv|dq)_mgpu"),
    ("Pallas: grouped matmul (experts)", r"grouped_matmul"),
    ("GEMM (cuBLAS/cuBLASLt)", r"gemm|nvjet|cutlass|xmma|cublas|sm90_|sm80_"),
    ("Pallas: norm / rope / glu / loss / nf4", r"rms_norm|rope|swiglu|geglu|cross_entropy|nf4_matmul|lora_matmul"),
    ("copies / memset", r"memcpy|memset|copy"),
    ("XLA reductions / scatter / sort", r"reduce|scatter|sort|gather"),
    ("XLA fusions (elementwise, dequantize, optimizer)", r"fusion|loop_|input_|wrapped_|convert|transpose|broadcast"),
)


def _category(name: str) -> str:
    low = name.lower()
    for label, pattern in CATEGORIES:
        if re.search(pattern, low):
            return label
    return "other"


def find_trace(root: str | pathlib.Path) -> pathlib.Path:
    """The newest perfetto_trace.json.gz under ``root``."""
    found = sorted(pathlib.Path(root).rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {root} (record with create_perfetto_trace=True)")
    return found[-1]


def load_events(path: str | pathlib.Path) -> tuple[list[dict], dict[int, str]]:
    """(complete events, process names by pid) of a Chrome-trace JSON file, gzipped or not."""
    path = pathlib.Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    names = {
        e["pid"]: e.get("args", {}).get("name", "")
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    return [e for e in events if e.get("ph") == "X" and "dur" in e], names


def device_pids(process_names: dict[int, str]) -> set[int]:
    """The GPU's tracks (XPlane names them /device:GPU:n); empty when the trace has none."""
    return {pid for pid, name in process_names.items() if re.search(r"gpu|/device:", name, re.I)}


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sorted, disjoint (start, end) covering the same time as ``intervals``."""
    out: list[list[float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def _covered(start: float, end: float, union: list[tuple[float, float]]) -> float:
    """How much of [start, end) the disjoint sorted ``union`` covers."""
    i = max(bisect.bisect_right(union, (start, float("inf"))) - 1, 0)
    total = 0.0
    while i < len(union) and union[i][0] < end:
        total += max(0.0, min(end, union[i][1]) - max(start, union[i][0]))
        i += 1
    return total


def copy_overlap(events: list[dict]) -> dict:
    """Microseconds of host/device copies and how many of them ran while a kernel ran: whether offloaded
    activations travel behind compute or stall it. Also the busy time (any device work) against the span."""
    is_copy = [_category(e["name"]) == "copies / memset" for e in events]
    compute = _union([(e["ts"], e["ts"] + e["dur"]) for e, c in zip(events, is_copy) if not c])
    copies = [e for e, c in zip(events, is_copy) if c]
    return {
        "copy_us": sum(e["dur"] for e in copies),
        "copy_hidden_us": sum(_covered(e["ts"], e["ts"] + e["dur"], compute) for e in copies),
        "compute_busy_us": sum(b - a for a, b in compute),
        "busy_us": sum(b - a for a, b in _union([(e["ts"], e["ts"] + e["dur"]) for e in events])),
    }


def summarize(path: str | pathlib.Path, steps: int = 1, top: int = 30) -> dict:
    """Per-category and per-kernel device milliseconds per step (totals over the trace divided by ``steps``)."""
    events, names = load_events(path)
    pids = device_pids(names)
    if pids:
        events = [e for e in events if e["pid"] in pids]
    events = [e for e in events if not e["name"].startswith("$")]  # the Python tracer's frames, not device work
    by_name: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    for e in events:
        by_name[e["name"]] += e["dur"]
        calls[e["name"]] += 1
    by_category: collections.Counter = collections.Counter()
    for name, us in by_name.items():
        by_category[_category(name)] += us
    total = sum(by_name.values())
    span = (max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)) if events else 0.0
    per_step = lambda us: us / 1e3 / steps  # noqa: E731  (microseconds over the trace -> ms per step)
    overlap = copy_overlap(events)
    return {
        "trace": pathlib.Path(path).name,  # the file name only: a record names no machine directory
        "device_tracks": sorted(names[p] for p in pids) if pids else "none found: every track counted",
        "steps": steps,
        "kernel_ms_per_step": per_step(total),
        "span_ms_per_step": per_step(span),
        "by_category_ms": {k: round(per_step(v), 3) for k, v in by_category.most_common()},
        # Device busy time (any kernel or copy), compute alone, and copies: total and the part a kernel hid.
        "busy_ms_per_step": round(per_step(overlap["busy_us"]), 3),
        "compute_busy_ms_per_step": round(per_step(overlap["compute_busy_us"]), 3),
        "copy_ms_per_step": round(per_step(overlap["copy_us"]), 3),
        "copy_hidden_ms_per_step": round(per_step(overlap["copy_hidden_us"]), 3),
        "top_kernels": [
            {
                "name": n[:160],
                "ms": round(per_step(us), 3),
                "calls_per_step": calls[n] / steps,
                "category": _category(n),
            }
            for n, us in by_name.most_common(top)
        ],
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace_dir")
    p.add_argument("--steps", type=int, default=1, help="steps the trace holds (times are divided by it)")
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args(argv)
    print(json.dumps(summarize(find_trace(args.trace_dir), args.steps, args.top), indent=1))


if __name__ == "__main__":
    main()
