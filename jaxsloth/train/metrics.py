"""Training metrics sinks: a progress bar, a JSONL log, TensorBoard scalars and a loss-curve PNG.

Each sink is a callable taking the per-step record of ``jaxsloth.train.loop.fit`` (step, loss, grad_norm, tokens:
the tokens the loss counts, real_tokens: the batch's tokens without padding, seq_tokens: rows x row length,
step_time_s, tokens_per_s: real tokens per second, learning_rate, peak_gib or None, total_steps, maybe skipped) and
has ``close()``; the
file sinks also have ``resume(step)``, which fit calls with the step training starts from, so that logs of a run
that was stopped and resumed hold each step once, as the checkpoint it resumed from saw it.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

log = logging.getLogger("jaxsloth")

TENSORBOARD_SCALARS = ("loss", "grad_norm", "learning_rate", "tokens_per_s", "peak_gib")
# Preference methods' metrics (TRL's names, jaxsloth.methods.preference), written when a record has them.
METHOD_SCALARS = (
    "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
    "kl", "nll_loss", "log_odds_ratio", "log_odds_chosen",
)  # fmt: skip
_WRITER_IDS = itertools.count()


def _number(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}g}" if math.isfinite(x) else str(x)


class ProgressBar:
    """tqdm bar over total_steps with loss, tokens/s and peak device memory in the postfix; tqdm draws the ETA."""

    def __init__(self, total_steps: int, *, desc: str = "train"):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_steps, desc=desc, unit="step", dynamic_ncols=True)

    def __call__(self, record: dict) -> None:
        if "eval_loss" in record:  # an evaluation: one line above the bar
            self.bar.write(f"step {record['step']}: eval_loss {_number(record['eval_loss'])}")
            return
        post = {"loss": _number(record["loss"]), "tok/s": f"{record['tokens_per_s']:,.0f}"}
        if record.get("peak_gib") is not None:
            post["mem"] = f"{record['peak_gib']:.2f}GiB"
        if record.get("skipped"):
            post["skipped"] = "yes"
        self.bar.set_postfix(post, refresh=False)
        # Resumed runs start past 0: jump the bar to the record's step rather than counting calls.
        self.bar.update(record["step"] - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def read_records(path: str | Path, up_to_step: int | None = None) -> list[dict]:
    """The whole JSON records of a metrics.jsonl (a torn last line is skipped), those past ``up_to_step`` left out."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and (up_to_step is None or record.get("step", 0) <= up_to_step):
            records.append(record)
    return records


class JsonlWriter:
    """Appends one JSON line per step to ``path`` and flushes it, so a crash loses no finished step.

    A line torn by a killed write is cut off before appending; ``resume(step)`` drops the records past ``step``
    (written after the checkpoint a resumed run starts from), so no step appears twice."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair_torn_line()
        self.file = self.path.open("a", encoding="utf-8")

    def _repair_torn_line(self) -> None:
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with self.path.open("r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def resume(self, step: int) -> None:
        self.file.close()
        kept = read_records(self.path, up_to_step=step)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        tmp.replace(self.path)
        self.file = self.path.open("a", encoding="utf-8")

    def __call__(self, record: dict) -> None:
        # json writes NaN/Infinity for non-finite floats; Python's json reads them back.
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoardWriter:
    """Scalars ``train/<name>`` for loss, grad_norm, learning_rate, tokens_per_s and peak_gib (when known), at each
    step, and ``eval/<name>`` for each number of an evaluation record (``eval_<name>``).

    Events reach the file with the first step and then at least every ``flush_seconds``, so a killed run leaves
    its curve; ``resume(step)`` marks the steps after ``step`` as superseded (TensorBoard's purge_step)."""

    def __init__(self, log_dir: str | Path, flush_seconds: float = 10.0):
        self.log_dir = Path(log_dir)
        self.flush_seconds = flush_seconds
        self.writer = None
        self._flushed = 0.0

    def _open(self, purge_step: int | None = None):
        # Events are written here, in the caller's thread: tensorboardX's SummaryWriter hands them to a background
        # thread, so a flush right after add_scalar can still miss them and a killed run loses its last steps.
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        self.log_dir.mkdir(parents=True, exist_ok=True)
        suffix = f".{os.getpid()}.{next(_WRITER_IDS)}"  # two writers opened within a second get separate files
        self.writer = EventsWriter(str(self.log_dir / "events"), suffix)
        if purge_step is not None:
            self.writer.write_event(Event(step=purge_step, session_log=SessionLog(status=SessionLog.START)))
        self.writer.flush()

    def resume(self, step: int) -> None:
        if self.writer is None:
            self._open(purge_step=step + 1 if step else None)

    def __call__(self, record: dict) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        if self.writer is None:
            self._open()
        for name in TENSORBOARD_SCALARS + METHOD_SCALARS:
            if record.get(name) is not None:
                summary = scalar(f"train/{name}", float(record[name]))
                self.writer.write_event(Event(wall_time=time.time(), step=int(record["step"]), summary=summary))
        for name, value in record.items():  # an evaluation's numbers: eval_loss -> eval/loss, as the trackers name them
            if name.startswith("eval_") and isinstance(value, int | float) and not isinstance(value, bool):
                summary = scalar(f"eval/{name.removeprefix('eval_')}", float(value))
                self.writer.write_event(Event(wall_time=time.time(), step=int(record["step"]), summary=summary))
        if time.monotonic() - self._flushed >= self.flush_seconds or not self._flushed:
            self.writer.flush()
            self._flushed = time.monotonic()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class LossPlot:
    """Collects (step, loss) and draws the curve to ``path`` (PNG, matplotlib's headless Agg backend) at close().

    history: the run's metrics.jsonl; ``resume(step)`` reads the earlier steps back from it, so the plot of a
    resumed run covers the whole run."""

    def __init__(self, path: str | Path, history: str | Path | None = None):
        self.path = Path(path)
        self.history = history
        self.steps: list[int] = []
        self.losses: list[float] = []

    def resume(self, step: int) -> None:
        earlier = read_records(self.history, up_to_step=step) if self.history is not None else []
        self.steps, self.losses = [], []
        for record in earlier:
            self(record)

    def __call__(self, record: dict) -> None:
        if record.get("loss") is not None and math.isfinite(record["loss"]):
            self.steps.append(record["step"])
            self.losses.append(record["loss"])

    def close(self) -> None:
        if not self.steps:
            return
        save_loss_plot(self.steps, self.losses, self.path)


def save_loss_plot(steps: list[int], losses: list[float], path: str | Path) -> Path:
    """Writes the training-loss curve (raw and, for longer runs, a moving average) to ``path`` as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A Figure with its own Agg canvas: no pyplot global state, no GUI backend, safe in notebooks and threads.
    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(steps, losses, lw=1, alpha=0.5 if len(steps) >= 20 else 1.0, label="loss")
    if len(steps) >= 20:
        w = max(len(steps) // 20, 2)
        smooth = [
            sum(losses[max(0, i - w + 1) : i + 1]) / len(losses[max(0, i - w + 1) : i + 1]) for i in range(len(losses))
        ]
        ax.plot(steps, smooth, lw=2, label=f"moving average ({w} steps)")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def standard_callbacks(
    out_dir: Path | None,
    *,
    progress: bool,
    total_steps: int,
    report_to: str | Sequence[str] = ("tensorboard",),
    run_config: Mapping | None = None,
    project: str | None = None,
    run_name: str | None = None,
) -> list:
    """The sinks ``jaxsloth.train`` attaches: a progress bar (when ``progress``), with ``out_dir``
    out_dir/metrics.jsonl and out_dir/loss.png (written at close), and the trackers of ``report_to``
    (``jaxsloth.train.trackers``: TensorBoard events in out_dir/tensorboard by default; wandb, mlflow, trackio
    runs logging ``run_config``)."""
    from jaxsloth.train.trackers import make_trackers, resolve_report_to

    callbacks: list = []
    if progress:
        callbacks.append(ProgressBar(total_steps))
    if out_dir is not None:
        out_dir = Path(out_dir)
        callbacks.append(JsonlWriter(out_dir / "metrics.jsonl"))
    if out_dir is not None and "tensorboard" in resolve_report_to(report_to):
        callbacks.append(TensorBoardWriter(out_dir / "tensorboard"))
    callbacks += make_trackers(report_to, out_dir=out_dir, config=run_config, project=project, run_name=run_name)
    if out_dir is not None:
        callbacks.append(LossPlot(out_dir / "loss.png", history=out_dir / "metrics.jsonl"))
    return callbacks


def close_all(callbacks) -> list[BaseException]:
    """Closes every sink, even when one fails (each failure logged in one line); returns the failures."""
    errors = []
    for cb in callbacks:
        if not hasattr(cb, "close"):
            continue
        try:
            cb.close()
        except Exception as e:
            log.error("could not close %s: %s", type(cb).__name__, e)
            errors.append(e)
    return errors
