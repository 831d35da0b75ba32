"""Benchmark records (JSONL, one measurement per line) -> markdown tables with MFU and ratios, PNG plots, and the
measured-results section of BENCHMARKS.md.

Model FLOPs per token (what MFU counts; recomputation by checkpointing is not counted, so every system is measured
against the same work): a LoRA step runs the frozen matmuls forward (2 N) and backward to the activations (2 N), with
no weight gradient for them, so ``4 N`` for N = the projection weights of every layer plus the LM head (the
embedding is a lookup); plus attention, ``3 x`` its forward ``4 * keys * head_dim * heads`` per token and layer
(QK^T and PV; ``keys`` = the mean number of keys a causal query sees, (T + 1) / 2 or fewer under a sliding window;
backward = 2 x forward). The LoRA adapters add under 0.3% and are left out: 31.6 GFLOP/token for
Llama-3.1-8B at 2048 tokens. MFU = tokens/s x FLOPs/token / the GPU's dense bf16 peak from its data sheet
(H100/H200 SXM: 989 TFLOP/s); the 793 TFLOP/s that XLA measured for an 8192^3 bf16 matmul on the H200 is the
practical ceiling (80% MFU).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from jaxsloth.models.config import ModelConfig

# Dense bf16 tensor-core peak (no sparsity) by a lowercase substring of the device name; first match wins.
PEAK_BF16_TFLOPS = (("h200", 989.4), ("h100", 989.4), ("h800", 989.4), ("a100", 312.0), ("l40", 181.0))
MEASURED_CEILING_TFLOPS = {"h200": 793.0}
BASELINES = ("hf-peft", "hf-peft-bnb", "unsloth")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
_WORKLOAD = re.compile(r"^(?P<model>.+)-(?P<kind>q?lora)-b(?P<batch>\d+)-(?:s(?P<seq>\d+)|maxctx)$")


def mean_keys_per_query(seq: int, window: int | None) -> float:
    """Mean over the positions t = 1..seq of the keys a causal query attends to: min(t, window)."""
    if window is None or window >= seq:
        return (seq + 1) / 2
    # Positions 1..window see t keys each; the rest see window keys.
    return (window * (window + 1) / 2 + (seq - window) * window) / seq


def flops_per_token(config: ModelConfig, seq: int) -> float:
    """Model FLOPs per trained token of one LoRA step at sequence length ``seq`` (formula in the module docstring)."""
    from jaxsloth.models.decoder import linear_shapes

    per_layer = sum(o * i for o, i in linear_shapes(config).values())
    if config.is_moe:  # the router and the k experts each token runs through
        from jaxsloth.models.moe import expert_shapes

        experts = sum(o * i for _, o, i in expert_shapes(config).values())
        per_layer += config.num_experts * config.hidden_size + config.num_experts_per_tok * experts
    matmul_params = per_layer * config.num_layers + config.vocab_size * config.hidden_size
    attention_fwd = sum(
        4 * mean_keys_per_query(seq, config.window_for(sliding)) * config.head_dim * config.num_heads
        for sliding in config.sliding_layers
    )
    return 4 * matmul_params + 3 * attention_fwd


def parse_workload(workload: str) -> dict | None:
    """``llama3.1-8b-qlora-b2-s2048`` -> {model, kind, batch, seq}; seq is None for ``...-b1-maxctx``."""
    m = _WORKLOAD.match(workload)
    if m is None:
        return None
    return {
        "model": m["model"],
        "kind": m["kind"],
        "batch": int(m["batch"]),
        "seq": None if m["seq"] is None else int(m["seq"]),
    }


def record_flops_per_token(rec: dict) -> float | None:
    """The record's own ``flops_per_token`` (the bench CLI stores it), else computed from a preset's architecture."""
    if rec.get("flops_per_token"):
        return float(rec["flops_per_token"])
    from jaxsloth.models.presets import PRESETS, preset

    w = parse_workload(rec.get("workload", ""))
    seq = rec.get("max_context") or (w and w["seq"])
    if w is None or seq is None or w["model"] not in PRESETS:
        return None
    return flops_per_token(preset(w["model"]), seq)


def peak_tflops(gpu: str | None) -> float | None:
    """Dense bf16 peak of a GPU by its device name (None when unknown, e.g. a CPU run)."""
    name = (gpu or "").lower()
    return next((tf for needle, tf in PEAK_BF16_TFLOPS if needle in name), None)


def mfu(rec: dict) -> float | None:
    """Model FLOP utilisation of one record (0..1), or None when the GPU's peak or the FLOPs are unknown."""
    peak, fpt, tps = peak_tflops(rec.get("gpu")), record_flops_per_token(rec), rec.get("tokens_per_s")
    if peak is None or fpt is None or not tps:
        return None
    return tps * fpt / (peak * 1e12 * (rec.get("devices") or 1))  # a mesh run's tokens/s is over all its GPUs


def load_records(paths: Iterable[str | os.PathLike]) -> list[dict]:
    """Every JSON object of the given JSONL files (directories: their ``*.jsonl``, sorted), in file order."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.glob("*.jsonl"))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"no benchmark results at {p}")
    records = []
    for f in files:
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{f}:{n}: not a JSON line ({e})") from None
    return records


def config_label(rec: dict) -> str:
    """What distinguishes this measurement from others of the same system: remat, kernels and tiling off the
    profile's defaults, mesh; for the other systems, their ``variant``."""
    if rec.get("system") != "jaxsloth":
        return rec.get("variant", "")
    from jaxsloth.models.decoder import REMAT_POLICIES
    from jaxsloth.profiles import PROFILES

    parts = [f"remat={rec['remat']}"] if rec.get("remat") else []
    default = PROFILES.get(rec.get("profile", ""))
    changed: dict[str, list[str]] = {}
    for op, impl in sorted((rec.get("kernels") or {}).items()):
        if default is None or getattr(default.kernels, op, impl) != impl:
            changed.setdefault(impl, []).append(op)
    parts += [f"{','.join(ops)}={impl}" for impl, ops in changed.items()]
    fields = ("mlp_chunk", "loss_chunk", "remat_group", "dots_layers", "optimizer_state", "embedding")
    for field in fields:  # tiling, budgets and placement off the profile's
        if rec.get(field) is not None and (default is None or getattr(default, field, None) != rec[field]):
            parts.append(f"{field}={rec[field]}")
    loop = rec.get("layer_loop", "scan")  # a record without the field ran the scan
    if default is not None and rec.get("remat") in REMAT_POLICIES and rec.get("mesh") is None:
        expected = "unrolled" if default.replace(remat=rec["remat"]).unrolled_layers else "scan"
        if loop != expected:
            parts.append(f"layers={loop}")
    if rec.get("attention_blocks"):
        parts.append("attention tiles " + ",".join(f"{k}={v}" for k, v in sorted(rec["attention_blocks"].items())))
    if rec.get("mesh"):
        parts.append(f"mesh={rec['mesh']}")
    if rec.get("xla_flags"):
        parts.append(f"XLA_FLAGS={rec['xla_flags']}")
    return "; ".join(parts)


def _fmt(x: float | None, spec: str, unit: str = "") -> str:
    return "–" if x is None else f"{x:{spec}}{unit}"


def _pick_baseline(rows: list[dict], rec: dict, system: str) -> dict | None:
    """The baseline record compared with ``rec``: the fastest configuration of ``system`` in the same bench run if it
    ran there, else the fastest of the latest date measured."""
    same = [r for r in rows if r.get("system") == system and r.get("tokens_per_s")]
    same_run = [r for r in same if rec.get("run") and r.get("run") == rec.get("run")]
    if not same_run and same:
        latest = max(r.get("date", "") for r in same)
        same_run = [r for r in same if r.get("date", "") == latest]
    return max(same_run, key=lambda r: r["tokens_per_s"], default=None)


def _group(records: Sequence[dict], max_context: bool) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        # Probes of a longest-sequence search are kept in the JSONL but summarised by its own record.
        if r.get("probe") or not r.get("workload") or ("max_context" in r) != max_context:
            continue
        groups.setdefault((r.get("gpu") or "unknown", r["workload"]), []).append(r)
    return groups


class _Commands:
    """Numbered footnotes for the commands (and versions) behind the rows of one table."""

    def __init__(self):
        self.lines: list[str] = []

    def ref(self, rec: dict) -> str:
        versions = ", ".join(f"{k} {rec[k]}" for k in ("jax", "torch", "unsloth", "python") if rec.get(k))
        cmd = rec.get("bench_command") or rec.get("command") or "?"
        line = f"`{cmd}`" + (f" ({versions})" if versions else "")
        if rec.get("note"):  # what a reader must know about this measurement (e.g. the code version it ran)
            line += f"; note: {rec['note']}"
        if line not in self.lines:
            self.lines.append(line)
        return f"[{self.lines.index(line) + 1}]"

    def markdown(self) -> list[str]:
        return [f"{i}. {line}" for i, line in enumerate(self.lines, 1)]


def throughput_table(gpu: str, workload: str, rows: list[dict]) -> str:
    """One markdown table: every measurement of ``workload`` on ``gpu``, with MFU and ratios to each baseline
    (speed = tokens/s ratio, higher is better; memory = peak ratio, lower is better)."""
    baselines = [b for b in BASELINES if any(r.get("system") == b and r.get("tokens_per_s") for r in rows)]
    head = ["system", "config", "tokens/s", "peak GiB", "MFU"]
    for b in baselines:
        head += [f"speed vs {b}", f"memory vs {b}"]
    head += ["date", "cmd"]
    cmds = _Commands()
    lines = [f"#### {workload} on {gpu}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        tps, peak = r.get("tokens_per_s"), r.get("peak_gib")
        if tps:
            cells = [r["system"], config_label(r), f"{tps:,.0f}", _fmt(peak, ".1f"), _fmt(mfu(r), ".1%")]
        else:
            cells = [r["system"], config_label(r), f"failed: {r.get('error', '?')}", "–", "–"]
        for b in baselines:
            base = None if r["system"] == b else _pick_baseline(rows, r, b)
            speed = tps / base["tokens_per_s"] if base and tps else None
            mem = peak / base["peak_gib"] if base and tps and peak and base.get("peak_gib") else None
            cells += [_fmt(speed, ".2f", "x"), _fmt(mem, ".2f", "x")]
        cells += [r.get("date", "?"), cmds.ref(r)]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines + [""] + cmds.markdown())


def max_context_table(gpu: str, workload: str, rows: list[dict]) -> str:
    """Longest trainable sequence at batch 1 per system, with the speed and peak of the longest passing probe."""
    baselines = [b for b in BASELINES if any(r.get("system") == b and r.get("max_context") for r in rows)]
    head = ["system", "config", "longest passing", "first failing", "tokens/s there", "peak GiB there"]
    head += [f"vs {b}" for b in baselines] + ["date", "cmd"]
    cmds = _Commands()
    lines = [f"#### {workload} on {gpu}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        n = r.get("max_context")
        fail = r.get("first_failing")
        cells = [
            r["system"],
            config_label(r),
            "none passed" if not n else f"{n:,}" + (" (search limit)" if r.get("limit_reached") else ""),
            "–" if fail is None else f"{fail:,}",
            _fmt(r.get("tokens_per_s"), ",.0f"),
            _fmt(r.get("peak_gib"), ".1f"),
        ]
        for b in baselines:
            base = next((x for x in reversed(rows) if x.get("system") == b and x.get("max_context")), None)
            cells.append(_fmt(n / base["max_context"] if n and base and r is not base else None, ".2f", "x"))
        cells += [r.get("date", "?"), cmds.ref(r)]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines + [""] + cmds.markdown())


MFU_NOTE = (
    "MFU: model FLOPs per token = 4 x (projection + LM-head weights) + 3 x causal attention forward "
    "(recomputation not counted), against the GPU's dense bf16 peak (H100/H200: 989 TFLOP/s; XLA's measured "
    "matmul ceiling on the H200 is 793, 80%). Speed ratio = tokens/s over the baseline's (higher is better); "
    "memory ratio = peak over the baseline's (lower is better); the baseline is the fastest configuration of that "
    "system in the same bench run when there is one, else the fastest of its latest date."
)


def markdown_report(records: Sequence[dict], *, intro: bool = True) -> str:
    """Every table: throughput per (GPU, workload), then longest sequence per (GPU, workload). ``intro``: the MFU
    note and a heading before each kind of table."""
    parts = [MFU_NOTE, ""] if intro else []
    throughput, longest = _group(records, False), _group(records, True)
    if throughput:
        parts += ["### Throughput and peak memory", ""] if intro else []
        for (gpu, workload), rows in sorted(throughput.items()):
            parts += [throughput_table(gpu, workload, rows), ""]
    if longest:
        parts += ["### Longest trainable sequence, batch 1", ""] if intro else []
        for (gpu, workload), rows in sorted(longest.items()):
            parts += [max_context_table(gpu, workload, rows), ""]
    if not throughput and not longest:
        parts.append("(no measurements yet)")
    return "\n".join(parts).rstrip() + "\n"


def _row_label(r: dict) -> str:
    label = config_label(r)
    return f"{r['system']} [{label}]" if label else r["system"]


def _barh_figure(groups: dict, value, xlabel: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = sorted({r["system"] for rows in groups.values() for r in rows})
    colors = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(systems)}
    heights = [max(1.2, 0.35 * len(rows) + 0.8) for rows in groups.values()]
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, sum(heights)), squeeze=False, height_ratios=heights)
    for ax, ((gpu, workload), rows) in zip(axes[:, 0], sorted(groups.items())):
        vals = [value(r) or 0.0 for r in rows]
        ax.barh(range(len(rows)), vals, color=[colors[r["system"]] for r in rows])
        ax.set_yticks(range(len(rows)), [_row_label(r) for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{workload} ({gpu})", fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:,.3g}", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_report(records: Sequence[dict], out_dir: str | os.PathLike) -> list[Path]:
    """PNG bar charts into ``out_dir``: throughput.png and memory.png (one panel per GPU and workload, one bar per
    measurement), and max_context.png when the records hold longest-sequence searches."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    throughput = {k: [r for r in v if r.get("tokens_per_s")] for k, v in _group(records, False).items()}
    throughput = {k: v for k, v in throughput.items() if v}
    if throughput:
        paths.append(_barh_figure(throughput, lambda r: r["tokens_per_s"], "tokens/s", out / "throughput.png"))
        paths.append(_barh_figure(throughput, lambda r: r.get("peak_gib"), "peak GiB", out / "memory.png"))
    longest = _group(records, True)
    if longest:
        paths.append(_barh_figure(longest, lambda r: r.get("max_context"), "tokens", out / "max_context.png"))
    return paths


def write_report(records: Sequence[dict], out_dir: str | os.PathLike) -> dict[str, Path]:
    """report.md plus the PNG plots into ``out_dir``; returns their paths by name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "report.md"
    md.write_text("# jaxsloth bench\n\n" + markdown_report(records))
    return {"report.md": md, **{p.name: p for p in plot_report(records, out)}}


# The results files BENCHMARKS.md tables, in its order, with their section titles (relative to the results
# folder, without .jsonl). Any other file follows under its own name.
TOPICS = {
    "step_h200": "Training step on one H200",
    "long_context_h200": "Long context on one H200, batch 1",
    "step_h200x2": "Training step on two H200s (device mesh; the one-GPU rows ran on GPU 0 of the same host)",
    "preference_h200": "DPO step on one H200 (`jaxsloth.bench.preference_baseline`)",
    "families_h200": "Newer families on one H200",
    "kernels/attention_h200": "Attention, forward and forward+backward (`jaxsloth.bench.kernel_attention`)",
    "kernels/attention_tiles_h200": "Attention kernels alone on their fastest tiles (`kernel_attention --tune`)",
    "kernels/nf4_matmul_h200": "NF4 projections with LoRA r=16 (`jaxsloth.bench.kernel_nf4_matmul`)",
    "kernels/grouped_matmul_h200": "Mixture-of-experts grouped matmul (`jaxsloth.bench.kernel_grouped_matmul`)",
    "kernels/cross_entropy_h200": "LM-head cross-entropy (`jaxsloth.bench.kernel_cross_entropy`)",
    "kernels/rms_norm_h200": "RMSNorm (`jaxsloth.bench.kernel_rms_norm`)",
    "kernels/glu_h200": "SwiGLU (`jaxsloth.bench.kernel_glu`)",
    "kernels/rope_h200": "RoPE (`jaxsloth.bench.kernel_rope`)",
}


def results_files(results_dir: str | os.PathLike) -> list[Path]:
    """The results files under ``results_dir`` (``*.jsonl`` and ``kernels/*.jsonl``), in TOPICS' order."""
    root = Path(results_dir)
    files = sorted(root.glob("*.jsonl")) + sorted(root.glob("kernels/*.jsonl"))
    order = list(TOPICS)
    return sorted(
        files,
        key=lambda f: (
            _topic(root, f) not in order,
            order.index(_topic(root, f)) if _topic(root, f) in order else 0,
            f,
        ),
    )


def _topic(root: Path, f: Path) -> str:
    return f.relative_to(root).with_suffix("").as_posix()


def _ms(x) -> str:
    """A time in ms, or a tuner's per-kernel times ({kernel: ms})."""
    if isinstance(x, dict):
        return ", ".join(f"{k} {v:.3f}" for k, v in x.items())
    return _fmt(x, ".3f")


def _impl_label(rec: dict) -> str:
    """The kernel's name; a tile sweep's rows (one kernel, several configurations) also name their tiles."""
    name = rec.get("kernel") or rec.get("impl", "?")
    block = rec.get("block")
    if "--sweep" not in (rec.get("command") or "") or not isinstance(block, dict):
        return name
    tiles = "x".join(str(block[k]) for k in ("block_m", "block_n", "block_k") if k in block)
    flags = ["LoRA A fused" if k == "fuse_lora_a" else k for k, v in block.items() if v is True]
    return f"{name} ({', '.join([tiles, *flags])})"


def kernel_table(gpu: str, op: str, rows: list[dict]) -> str:
    """One markdown table of kernel micro-benchmark rows (``timing.kernel_record``, or the tuner's rows): times,
    throughput, temporaries and error against the reference, with the date and command of each."""
    tune = any("kernel" in r for r in rows)
    head = ["shape", "kernel" if tune else "impl", "dtype"]
    head += ["ms alone", "tiles"] if tune else []
    head += ["fwd ms", "fwd+bwd ms", "throughput", "temporaries fwd+bwd", "max err", "date", "cmd"]
    cmds = _Commands()
    lines = [f"#### {op} on {gpu}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.get("shape", "?"), _impl_label(r), r.get("dtype", "bfloat16")]
        if tune:
            settings = r.get("settings") or {}
            cells += [_ms(r.get("ms")), ", ".join(f"{k}={v}" for k, v in settings.items())]
        temp = r.get("temp_bytes_fwd_bwd") or r.get("fwd_bwd_temp_bytes")
        unit = (r.get("unit") or "").split(" ")[0]
        if r.get("error"):
            cells += [f"error: {r['error'][:120]}", "–", "–"]
        else:
            cells += [_ms(r.get("fwd_ms")), _ms(r.get("fwd_bwd_ms")), _fmt(r.get("gbps_or_tflops"), ",.0f", f" {unit}")]
        cells += [
            _fmt(temp and temp / 2**20, ",.1f", " MiB"),
            _fmt(r.get("max_err"), ".3g"),
            r.get("date", "?"),
            cmds.ref(r),
        ]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(lines + [""] + cmds.markdown())


def kernel_report(records: Sequence[dict]) -> str:
    """Every kernel table of ``records``: one per (GPU, op)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r.get("device_kind") or r.get("gpu") or "unknown", r.get("op", "?")), []).append(r)
    return "\n\n".join(kernel_table(gpu, op, rows) for (gpu, op), rows in sorted(groups.items())) + "\n"


def benchmarks_section(results_dir: str | os.PathLike = "notebooks/results") -> str:
    """The generated part of BENCHMARKS.md: for each results file (TOPICS' order), its tables."""
    root = Path(results_dir)
    checkout = Path(__file__).resolve().parents[2]
    shown = root.resolve().relative_to(checkout).as_posix() if root.resolve().is_relative_to(checkout) else root.name
    parts = [
        f"<!-- generated by `jaxsloth bench benchmarks-md` from {shown}/; edits here are overwritten -->",
        "",
        MFU_NOTE,
        "",
    ]
    for f in results_files(root):
        topic = _topic(root, f)
        records = load_records([f])
        parts += [f"### {TOPICS.get(topic, topic)}", "", f"Records: `{shown}/{topic}.jsonl`.", ""]
        body = kernel_report(records) if topic.startswith("kernels/") else markdown_report(records, intro=False)
        parts += [body.rstrip(), ""]
    return "\n" + "\n".join(parts)


def update_benchmarks_md(
    path: str | os.PathLike = "BENCHMARKS.md", results_dir: str | os.PathLike = "notebooks/results"
) -> Path:
    """Regenerates the text between ``<!-- results:begin -->`` and ``<!-- results:end -->`` in ``path`` from the
    results files (``benchmarks_section``); creates ``path`` holding only the markers when it does not exist."""
    path = Path(path)
    if not path.exists():
        path.write_text(f"{BEGIN}\n{END}\n")
    text = path.read_text()
    head, body, rest = split_benchmarks_md(text, path)
    path.write_text(head + BEGIN + benchmarks_section(results_dir) + END + rest)
    return path


def split_benchmarks_md(text: str, name: str | os.PathLike = "BENCHMARKS.md") -> tuple[str, str, str]:
    """(text before the begin marker, the generated part, text after the end marker)."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"{name} must hold exactly one {BEGIN} followed by one {END}")
    head, rest = text.split(BEGIN)
    body, tail = rest.split(END)
    return head, body, tail


def plot_memory_vs_length(records: Sequence[dict], path: str | os.PathLike, device_gib: float = 139.0) -> Path:
    """Peak device memory against sequence length, 8B QLoRA at batch 1: jaxsloth's measured points, the memory
    model's device and host curves (jaxsloth.train.memory, long-context settings, remat_group 1 and 2), the
    baselines' longest-sequence records (``llama3.1-8b-qlora-b1-maxctx``), and the card's capacity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxsloth.models.presets import preset
    from jaxsloth.profiles import long_context, profile_for_device
    from jaxsloth.train.memory import estimate_step_memory

    config = preset("llama3.1-8b")
    base = long_context(profile_for_device(name="h200"))
    lengths = [2**k for k in range(14, 21)]
    fig, ax = plt.subplots(figsize=(8, 5))
    for group, style in ((1, "-"), (2, "--")):
        prof = base.replace(remat_group=group)
        est = [estimate_step_memory(config, prof, batch=1, seq_len=t, quantized=True) for t in lengths]
        ax.plot(
            lengths, [e.device_gib for e in est], "C0" + style, label=f"jaxsloth model, device (remat_group={group})"
        )
        ax.plot(
            lengths, [e.host_gib for e in est], "C1" + style, label=f"jaxsloth model, pinned host (remat_group={group})"
        )
    measured = [
        r
        for r in records
        if r.get("system") == "jaxsloth" and re.search(r"llama3\.1-8b-qlora-b1-s\d+$", r.get("workload", ""))
    ]
    measured = [r for r in measured if r.get("peak_gib")]
    if measured:
        ax.plot(
            [int(r["workload"].rsplit("-s", 1)[1]) for r in measured],
            [r["peak_gib"] for r in measured],
            "C0o",
            markersize=8,
            label="jaxsloth measured (H200)",
        )
    baselines = [
        r for r in records if r.get("system") != "jaxsloth" and r.get("workload") == "llama3.1-8b-qlora-b1-maxctx"
    ]
    for i, r in enumerate(baselines):
        color, name = f"C{i + 2}", r["system"]
        if r.get("max_context") and r.get("peak_gib"):
            ax.plot([r["max_context"]], [r["peak_gib"]], color + "s", markersize=8, label=f"{name}, measured")
        elif r.get("max_context"):
            ax.axvline(
                r["max_context"],
                color=color,
                linestyle=":",
                label=f"{name}: longest that trained ({r['max_context']:,})",
            )
        if r.get("first_failing"):
            ax.axvline(
                r["first_failing"], color=color, linestyle="-.", label=f"{name}: out of memory ({r['first_failing']:,})"
            )
    ax.axhline(device_gib, color="k", linewidth=0.8, label=f"H200 capacity ({device_gib:.0f} GiB)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (tokens, batch 1)")
    ax.set_ylabel("GiB")
    ax.set_title("Llama-3.1-8B QLoRA r=16: memory against sequence length")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
