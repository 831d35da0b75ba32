"""Training metrics sinks: a progress bar, a JSONL log, TensorBoard scalars and a loss-curve PNG.

Each sink is a callable taking the per-step record of ``jaxsloth.train.loop.fit`` (step, loss, grad_norm, tokens,
seq_tokens, step_time_s, tokens_per_s, peak_gib or None, total_steps, maybe skipped) and has ``close()``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

TENSORBOARD_SCALARS = ("loss", "grad_norm", "tokens_per_s", "peak_gib")


def _number(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}g}" if math.isfinite(x) else str(x)


class ProgressBar:
    """tqdm bar over total_steps with loss, tokens/s and peak device memory in the postfix; tqdm draws the ETA."""

    def __init__(self, total_steps: int, *, desc: str = "train"):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_steps, desc=desc, unit="step", dynamic_ncols=True)

    def __call__(self, record: dict) -> None:
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


class JsonlWriter:
    """Appends one JSON line per step to ``path`` and flushes it, so a crash loses no finished step."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = self.path.open("a", encoding="utf-8")

    def __call__(self, record: dict) -> None:
        # json writes NaN/Infinity for non-finite floats; Python's json reads them back.
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoardWriter:
    """Scalars ``train/<name>`` for loss, grad_norm, tokens_per_s and peak_gib (when known), at each step."""

    def __init__(self, log_dir: str | Path):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))

    def __call__(self, record: dict) -> None:
        for name in TENSORBOARD_SCALARS:
            if record.get(name) is not None:
                self.writer.add_scalar(f"train/{name}", record[name], record["step"])

    def close(self) -> None:
        self.writer.close()


class LossPlot:
    """Collects (step, loss) and draws the curve to ``path`` (PNG, matplotlib's headless Agg backend) at close()."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.steps: list[int] = []
        self.losses: list[float] = []

    def __call__(self, record: dict) -> None:
        if math.isfinite(record["loss"]):
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


def standard_callbacks(out_dir: Path | None, *, progress: bool, total_steps: int) -> list:
    """The sinks ``jaxsloth.train`` attaches: a progress bar (when ``progress``) and, with ``out_dir``,
    out_dir/metrics.jsonl, TensorBoard events in out_dir/tensorboard and out_dir/loss.png (written at close)."""
    callbacks: list = []
    if progress:
        callbacks.append(ProgressBar(total_steps))
    if out_dir is not None:
        out_dir = Path(out_dir)
        callbacks += [
            JsonlWriter(out_dir / "metrics.jsonl"),
            TensorBoardWriter(out_dir / "tensorboard"),
            LossPlot(out_dir / "loss.png"),
        ]
    return callbacks
