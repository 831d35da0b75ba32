"""``jaxsloth bench``: jaxsloth against the PyTorch baselines, in one invocation on one GPU.

    jaxsloth bench --arch llama3.1-8b --quant nf4,bf16 --out-dir bench-out      # + hf-peft / hf-peft-bnb
    jaxsloth bench --arch llama3.2-1b,mistral-7b --baseline unsloth --out-dir bench-out
    jaxsloth bench --arch llama3.1-8b --quant nf4 --max-context --jaxsloth-args "--remat offload" --out-dir ctx
    jaxsloth bench report bench-out/results.jsonl --out-dir bench-out            # tables + plots from JSONL
    jaxsloth bench benchmarks-md                                                 # BENCHMARKS.md from notebooks/results

Every (system, workload) runs in its own subprocess (so each peak is its own) under a time limit; each result is
appended to ``<out-dir>/results.jsonl`` as it arrives, then report.md, throughput.png and memory.png (and
max_context.png) are written. Systems: jaxsloth (``jaxsloth.bench.step``), hf-peft (transformers + PEFT LoRA,
bf16 workloads only) and hf-peft-bnb (+ bitsandbytes QLoRA, nf4 workloads only), both in train mode with gradient
checkpointing (``jaxsloth.bench.torch_baseline``; hf-peft-bnb runs with and without PEFT's
``prepare_model_for_kbit_training``, both recorded, and the faster is the baseline), and unsloth (``jaxsloth.bench.unsloth_baseline``; skipped with a message
when unsloth is not importable). ``--max-context`` searches, per system at batch 1, the longest sequence whose
training step runs: doubling from ``--start-seq`` until a probe fails (out of memory, an error or the time limit),
then bisection down to ``--resolution`` tokens.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from jaxsloth.bench import report
from jaxsloth.bench.timing import portable_command, portable_path
from jaxsloth.config import PROFILE_OVERRIDES

SYSTEMS = ("jaxsloth", "hf-peft", "hf-peft-bnb", "unsloth")
DEFAULT_SYSTEMS = ("jaxsloth", "hf-peft", "hf-peft-bnb")
# Which workloads each system runs: hf-peft is the LoRA (bf16) baseline, hf-peft-bnb the QLoRA (nf4) one.
QUANTS = {"jaxsloth": ("nf4", "bf16"), "hf-peft": ("bf16",), "hf-peft-bnb": ("nf4",), "unsloth": ("nf4", "bf16")}
# Configurations of one system that the bench runs each time (extra runner flags); tables compare with the faster.
RUNNER_VARIANTS = {"hf-peft-bnb": (("--variant", "plain"), ("--variant", "kbit"))}
EXIT_UNAVAILABLE = 3  # a runner's "this system cannot run here" (unsloth not importable)
# What a summary record copies from its longest passing probe: the configuration and versions behind it.
_CONFIG_KEYS = ("profile", "kernels", *PROFILE_OVERRIDES, "mesh", "variant")
_CONFIG_KEYS += ("jax", "torch", "unsloth", "python")
_OOM_MARKERS = ("RESOURCE_EXHAUSTED", "out of memory", "OutOfMemoryError", "Out of memory")


def runner_argv(system: str, model: str, quant: str, batch: int, seq: int, steps: int, out: str) -> list[str]:
    """The command that measures one (system, model, quant, batch, seq) and appends its JSON record to ``out``.
    ``model``: a preset architecture name or a local checkpoint directory. ``steps`` 0: one step and no warm-up
    (a longest-sequence probe: whether the step runs, and its time)."""
    if system not in SYSTEMS:
        raise ValueError(f"unknown system {system!r}; known: {', '.join(SYSTEMS)}")
    if quant not in QUANTS[system]:
        raise ValueError(f"system {system!r} does not run quant {quant!r} (it runs {', '.join(QUANTS[system])})")
    where = ["--model-path", model] if is_path(model) else ["--arch", model]
    sizes = ["--batch", str(batch), "--seq", str(seq), "--out", out]
    if system == "jaxsloth":  # --steps 0: the first step after an ahead-of-time compile is the measurement
        sizes += ["--steps", str(steps)] + (["--warmup", "0"] if steps == 0 else [])
        return [sys.executable, "-m", "jaxsloth.bench.step", *where, "--quant", quant, *sizes]
    sizes += ["--steps", str(max(steps, 1))] + (["--warmup", "0"] if steps == 0 else [])
    if system == "unsloth":
        return [sys.executable, "-m", "jaxsloth.bench.unsloth_baseline", *where, "--quant", quant, *sizes]
    return [sys.executable, "-m", "jaxsloth.bench.torch_baseline", *where, "--system", system, *sizes]


def is_path(model: str) -> bool:
    return os.sep in model or model.startswith(".") or Path(model).is_dir()


def model_name(model: str) -> str:
    """The model part of a workload name: the preset name, or a checkpoint directory's name."""
    return os.path.basename(os.path.normpath(model)) if is_path(model) else model


def workload_name(model: str, quant: str, batch: int, seq: int | None) -> str:
    """As the runners name it: ``llama3.1-8b-qlora-b2-s2048``; ``seq=None``: a longest-sequence search."""
    kind = "qlora" if quant == "nf4" else "lora"
    return f"{model_name(model)}-{kind}-b{batch}-" + ("maxctx" if seq is None else f"s{seq}")


def model_flops_per_token(model: str, seq: int) -> float | None:
    """Model FLOPs per token (report.flops_per_token) of a preset or a checkpoint's config.json."""
    from jaxsloth.models.presets import PRESETS, preset

    if is_path(model):
        from converters.hf import load_config

        return report.flops_per_token(load_config(model), seq)
    return report.flops_per_token(preset(model), seq) if model in PRESETS else None


def _kill_group(proc: subprocess.Popen) -> None:
    # The runner was started in its own session, so its group id is its pid: this ends it and its children only.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_subprocess(argv: list[str], timeout_s: float, out: Path) -> tuple[dict | None, dict]:
    """Runs one measurement. Returns (its record or None, outcome: returncode, timed_out, oom, error)."""
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        stdout, stderr = proc.communicate()
        timed_out = True
    records = [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.exists() else []
    oom = any(m in stderr for m in _OOM_MARKERS)
    error = None
    if timed_out:
        error = f"timed out after {timeout_s:g} s"
    elif proc.returncode != 0 or not records:
        last = [line for line in stderr.splitlines() if line.strip()][-1:] or [f"exit status {proc.returncode}"]
        error = ("out of memory: " if oom else "") + last[0].strip()[:300]
    outcome = {"returncode": proc.returncode, "timed_out": timed_out, "oom": oom, "error": error}
    if error is None:
        return records[-1], outcome
    return None, {**outcome, "stdout_tail": stdout[-2000:], "stderr_tail": stderr[-4000:]}


class Bench:
    """Runs measurements in subprocesses and appends every record to ``<out_dir>/results.jsonl`` as it arrives.

    runner: (system, model, quant, batch, seq, steps, out) -> argv; the default is ``runner_argv``.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        steps: int = 10,
        timeout_s: float = 1800.0,
        extra_args: dict[str, Sequence[str]] | None = None,
        runner: Callable[..., list[str]] = runner_argv,
        bench_command: str | None = None,
        log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True),
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.results = self.out_dir / "results.jsonl"
        self.steps, self.timeout_s = steps, timeout_s
        self.extra_args = {k: list(v) for k, v in (extra_args or {}).items()}
        self.runner, self.log = runner, log
        self.run_id = datetime.datetime.now().isoformat(timespec="seconds")
        self.bench_command = bench_command or shlex.join(["jaxsloth", "bench", *map(portable_path, sys.argv[1:])])
        self.unavailable: dict[str, str] = {}
        self.records: list[dict] = []

    def _append(self, rec: dict) -> dict:
        rec = {**rec, "run": self.run_id, "bench_command": self.bench_command}
        with self.results.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        self.records.append(rec)
        return rec

    def _gpu(self) -> str | None:
        """The device name for a failure record (so it is tabled with the others of this run): the last success's,
        else nvidia-smi's first GPU."""
        known = [r["gpu"] for r in self.records if r.get("gpu")]
        if known:
            return known[-1]
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return (out.stdout.strip().splitlines() or [None])[0]

    def measure(
        self,
        system: str,
        model: str,
        quant: str,
        batch: int,
        seq: int,
        *,
        probe: bool = False,
        extra: Sequence[str] = (),
    ) -> dict:
        """One measurement in its own subprocess -> its record (with flops_per_token), or a failure record
        (tokens_per_s None, error, oom, timed_out); also appended to results.jsonl. An unavailable system
        (runner exit status 3) gives a record with ``skipped`` and is not appended. ``extra``: runner flags of
        one of its configurations (RUNNER_VARIANTS)."""
        workload = workload_name(model, quant, batch, seq)
        if system in self.unavailable:
            return {"system": system, "workload": workload, "skipped": self.unavailable[system]}
        with tempfile.TemporaryDirectory(prefix="jaxsloth-bench-") as tmp:
            out = Path(tmp) / "record.jsonl"
            argv = self.runner(system, model, quant, batch, seq, self.steps, str(out))
            argv += list(extra) + self.extra_args.get(system, [])
            self.log(f"[bench] {system} {workload}: {shlex.join(argv[1:])}")
            rec, outcome = run_subprocess(argv, self.timeout_s, out)
        if outcome["returncode"] == EXIT_UNAVAILABLE and rec is None:
            reason = (outcome.get("stderr_tail") or "").strip().splitlines()[-1:] or ["not available"]
            self.unavailable[system] = reason[0]
            self.log(f"[bench] {system}: skipped: {reason[0]}")
            return {"system": system, "workload": workload, "skipped": reason[0]}
        if rec is None:
            self.log(f"[bench] {system} {workload}: FAILED: {outcome['error']}")
            if outcome.get("stderr_tail") and not outcome["oom"]:
                self.log(outcome["stderr_tail"][-1500:])
            rec = {
                "system": system,
                "workload": workload,
                "tokens_per_s": None,
                "peak_gib": None,
                **{k: outcome[k] for k in ("error", "oom", "timed_out", "returncode")},
                "gpu": self._gpu(),
                "date": datetime.date.today().isoformat(),
                "command": portable_command(argv[1:]),
            }
        else:
            self.log(f"[bench] {system} {workload}: {rec['tokens_per_s']:,.0f} tokens/s, peak {rec.get('peak_gib')}")
        rec["flops_per_token"] = model_flops_per_token(model, seq)
        if probe:
            rec["probe"] = True
        return self._append(rec)

    def max_context(
        self, system: str, model: str, quant: str, *, start: int, limit: int, resolution: int
    ) -> dict | None:
        """Longest passing sequence at batch 1 (each probe its own subprocess) -> the summary record (also appended
        to results.jsonl): max_context, first_failing, limit_reached, probes, and the longest probe's tokens/s and
        peak. None when the system is unavailable."""
        probes: list[dict] = []

        def passes(seq: int) -> bool:
            rec = self.measure(system, model, quant, 1, seq, probe=True)
            probes.append(rec)
            return bool(rec.get("tokens_per_s"))

        best, fail = search_max_context(passes, start=start, limit=limit, resolution=resolution)
        if any("skipped" in p for p in probes):
            return None
        at_best = next((p for p in probes if p.get("tokens_per_s") and p["workload"].endswith(f"-s{best}")), {})
        summary = {
            "system": system,
            "workload": workload_name(model, quant, 1, None),
            "max_context": best,
            "first_failing": fail,
            "limit_reached": fail is None,
            "tokens_per_s": at_best.get("tokens_per_s"),
            "peak_gib": at_best.get("peak_gib"),
            "flops_per_token": at_best.get("flops_per_token"),
            "probes": [{"seq": _seq_of(p), "ok": bool(p.get("tokens_per_s")), "error": p.get("error")} for p in probes],
            **{k: at_best[k] for k in _CONFIG_KEYS if k in at_best},
            "gpu": next((p["gpu"] for p in probes if p.get("gpu")), None),
            "date": datetime.date.today().isoformat(),
            "command": at_best.get("command"),
        }
        self.log(f"[bench] {system} {summary['workload']}: longest passing {best}, first failing {fail}")
        return self._append(summary)


def _seq_of(rec: dict) -> int | None:
    w = report.parse_workload(rec.get("workload", ""))
    return w and w["seq"]


def search_max_context(
    passes: Callable[[int], bool], *, start: int, limit: int, resolution: int
) -> tuple[int | None, int | None]:
    """Largest passing length (a multiple of ``resolution``) -> (longest passing or None, shortest failing or None
    when ``limit`` passed). Doubles from ``start`` while probes pass, then bisects between the last pass and the
    first failure until they are ``resolution`` apart. Assumes a length passes whenever a longer one does."""
    if resolution < 1 or start < resolution or start % resolution or limit < start:
        raise ValueError(
            f"need 1 <= resolution <= start <= limit with start a multiple of resolution; got start={start}, "
            f"limit={limit}, resolution={resolution}"
        )
    lo, hi, seq = None, None, start
    while seq <= limit:
        if not passes(seq):
            hi = seq
            break
        lo, seq = seq, seq * 2
    if hi is None:
        return lo, None
    floor = lo or 0
    while hi - floor > resolution:
        mid = (floor + hi) // 2 // resolution * resolution
        if mid <= floor:
            break
        if passes(mid):
            lo = floor = mid
        else:
            hi = mid
    return lo, hi


def run_benchmarks(
    models: Sequence[str] = ("llama3.1-8b",),
    *,
    systems: Sequence[str] = DEFAULT_SYSTEMS,
    quants: Sequence[str] = ("nf4", "bf16"),
    batch: int = 2,
    seq: int = 2048,
    steps: int | None = None,
    timeout_s: float = 1800.0,
    out_dir: str | os.PathLike = "jaxsloth-bench",
    extra_args: dict[str, Sequence[str]] | None = None,
    max_context: bool = False,
    start_seq: int = 4096,
    max_seq: int = 1 << 20,
    resolution: int = 4096,
    bench_command: str | None = None,
) -> list[dict]:
    """Measures every applicable (system, model, quant), each in its own subprocess, and writes
    ``out_dir``/results.jsonl, report.md and the PNG plots. ``models``: preset names (jaxsloth.models.presets) or
    local checkpoint directories. ``max_context``: the longest-sequence search at batch 1 instead of the
    (batch, seq) throughput runs. ``steps``: timed steps per measurement after the runners' warm-up (default 10;
    0 for the longest-sequence probes: one step, no warm-up, since their steps are long). Returns the records of this run (failures have
    tokens_per_s None)."""
    for s in systems:
        if s not in SYSTEMS:
            raise ValueError(f"unknown system {s!r}; known: {', '.join(SYSTEMS)}")
    for q in quants:
        if q not in ("nf4", "bf16"):
            raise ValueError(f"unknown quant {q!r}; choose nf4 or bf16")
    from jaxsloth.models.presets import PRESETS

    for m in models:
        if not is_path(m) and m not in PRESETS:
            raise ValueError(f"unknown architecture {m!r}; known: {', '.join(sorted(PRESETS))}, or a checkpoint dir")
        if is_path(m) and not (Path(m) / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in checkpoint directory {m}")
    steps = steps if steps is not None else (0 if max_context else 10)
    bench = Bench(out_dir, steps=steps, timeout_s=timeout_s, extra_args=extra_args, bench_command=bench_command)
    if max_context:
        for model in models:
            for quant in quants:
                for system in (s for s in systems if quant in QUANTS[s]):
                    bench.max_context(system, model, quant, start=start_seq, limit=max_seq, resolution=resolution)
    else:
        run_all(bench, models, systems, quants, batch=batch, seq=seq)
    report.write_report(report.load_records([bench.results]), bench.out_dir)
    return bench.records


def run_all(
    bench: Bench, models: Sequence[str], systems: Sequence[str], quants: Sequence[str], *, batch: int, seq: int
):
    """Every applicable (model, quant, system) at (batch, seq), each configuration of RUNNER_VARIANTS in turn."""
    for model in models:
        for quant in quants:
            for system in (s for s in systems if quant in QUANTS[s]):
                for extra in RUNNER_VARIANTS.get(system, ((),)):
                    bench.measure(system, model, quant, batch, seq, extra=extra)


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxsloth bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--arch", type=_csv, default=None, help="comma-separated preset architectures (default llama3.1-8b)")
    p.add_argument("--model-path", action="append", default=[], help="a local checkpoint directory (repeatable)")
    p.add_argument("--systems", type=_csv, default=list(DEFAULT_SYSTEMS), help=f"of {', '.join(SYSTEMS)}")
    p.add_argument("--baseline", action="append", default=[], help="add a system, e.g. --baseline unsloth")
    p.add_argument("--quant", type=_csv, default=["nf4", "bf16"], help="nf4 (QLoRA) and/or bf16 (LoRA)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps after warm-up (10; --max-context: 0 = one step, no warm-up)",
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per subprocess")
    p.add_argument("--out-dir", default="jaxsloth-bench", help="results.jsonl, report.md and PNGs go here")
    for s in SYSTEMS:
        p.add_argument(f"--{s}-args", default="", help=f"extra flags for the {s} runner, one quoted string")
    p.add_argument("--max-context", action="store_true", help="longest trainable sequence at batch 1 per system")
    p.add_argument("--start-seq", type=int, default=4096, help="first length of the --max-context search")
    p.add_argument("--max-seq", type=int, default=1 << 20, help="longest length the search tries")
    p.add_argument("--resolution", type=int, default=4096, help="the search stops this many tokens apart")
    return p


def _cmd_run(argv: list[str]) -> int:
    args = _run_parser().parse_args(argv)
    systems = list(dict.fromkeys(args.systems + args.baseline))
    models = (args.arch or ([] if args.model_path else ["llama3.1-8b"])) + args.model_path
    extra = {s: shlex.split(getattr(args, f"{s.replace('-', '_')}_args")) for s in SYSTEMS}
    records = run_benchmarks(
        models,
        systems=systems,
        quants=args.quant,
        batch=args.batch,
        seq=args.seq,
        steps=args.steps,
        timeout_s=args.timeout,
        out_dir=args.out_dir,
        extra_args=extra,
        max_context=args.max_context,
        start_seq=args.start_seq,
        max_seq=args.max_seq,
        resolution=args.resolution,
        bench_command=shlex.join(["jaxsloth", "bench", *map(portable_path, argv)]),
    )
    print(report.markdown_report([r for r in records if "skipped" not in r]))
    print(f"results: {Path(args.out_dir) / 'results.jsonl'}; report.md and plots in {args.out_dir}")
    return 0 if records else 1


def _cmd_report(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="jaxsloth bench report", description="tables and plots from JSONL records")
    p.add_argument("inputs", nargs="+", help="JSONL files or directories of them")
    p.add_argument("--out-dir", default=None, help="write report.md and PNGs here (default: print the tables)")
    args = p.parse_args(argv)
    records = report.load_records(args.inputs)
    if args.out_dir:
        paths = report.write_report(records, args.out_dir)
        print("\n".join(str(v) for v in paths.values()))
    else:
        print(report.markdown_report(records))
    return 0


def _cmd_benchmarks_md(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="jaxsloth bench benchmarks-md", description="regenerate the measured-results section of BENCHMARKS.md"
    )
    p.add_argument("--file", default="BENCHMARKS.md")
    p.add_argument("--results", default="notebooks/results", help="directory of *.jsonl records")
    args = p.parse_args(argv)
    print(report.update_benchmarks_md(args.file, args.results))
    return 0


SUBCOMMANDS = {"report": _cmd_report, "benchmarks-md": _cmd_benchmarks_md}


def main(argv: list[str] | None = None) -> int:
    """``jaxsloth bench [report|benchmarks-md] ...``; without a subcommand, runs the benchmarks."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = SUBCOMMANDS.get(argv[0]) if argv else None
    try:
        return command(argv[1:]) if command else _cmd_run(argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"jaxsloth bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
