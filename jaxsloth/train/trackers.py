"""Experiment trackers: Weights & Biases, MLflow and Trackio sinks, and TensorBoard, chosen by ``report_to``.

``report_to`` takes transformers' names: "tensorboard" (the default: events in output_dir/tensorboard), "wandb",
"mlflow", "trackio", "all" (every one installed) or "none". Each tracker is a sink of ``jaxsloth.train.loop.fit``
(a callable taking the per-step record, with ``close()``): it starts its run with the run's settings as config
(``run_config``), then logs every numeric key of each record under transformers' names: ``train/<key>`` for the
training records (loss, grad_norm, learning_rate, tokens_per_s: real tokens, padding left out, peak_gib, ...) and
``eval/<name>`` for the ``eval_<name>`` keys of evaluation records.

The packages are optional extras: ``pip install 'jaxsloth[wandb]'`` (or ``[mlflow]``, ``[trackio]``). Where they
log follows each library's own settings (WANDB_MODE / WANDB_DIR / WANDB_PROJECT, MLFLOW_TRACKING_URI /
MLFLOW_EXPERIMENT_NAME, TRACKIO_DIR / TRACKIO_PROJECT); ``project`` and ``run_name`` name the project (MLflow:
the experiment) and the run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from jaxsloth.config import REPORT_TO_CHOICES, TRACKERS, TrainConfig

DEFAULT_PROJECT = "jaxsloth"
# The package each tracker imports, and the jaxsloth extra that installs it (tensorboardX is a dependency).
_PACKAGES = {"tensorboard": ("tensorboardX", None), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow"),
             "trackio": ("trackio", "trackio")}  # fmt: skip
# Record keys that are the step's coordinates, not metrics.
_NOT_METRICS = {"step", "total_steps"}


def resolve_report_to(report_to: str | Iterable[str]) -> list[str]:
    """The trackers ``report_to`` names, in order: "none" -> [], "all" -> every installed one (as transformers);
    a comma-separated string or a list of names. Raises ValueError on an unknown name."""
    names = [n.strip() for n in report_to.split(",")] if isinstance(report_to, str) else list(report_to)
    names = [n for n in names if n]
    unknown = [n for n in names if n not in REPORT_TO_CHOICES]
    if unknown:
        raise ValueError(f"unknown report_to {unknown[0]!r}; choose from: {', '.join(REPORT_TO_CHOICES)}")
    if ("all" in names or "none" in names) and len(names) > 1:
        raise ValueError(f"report_to {','.join(names)}: 'all' and 'none' stand alone")
    if names in ([], ["none"]):
        return []
    if names == ["all"]:
        return [t for t in TRACKERS if importlib.util.find_spec(_PACKAGES[t][0]) is not None]
    return list(dict.fromkeys(names))


def split_foreign_report_to(report_to: str | Iterable[str]) -> tuple[tuple[str, ...], list[str]]:
    """Another trainer's report_to (transformers, TRL, LLaMA-Factory) -> (the names jaxsloth reports to, the
    others, e.g. comet_ml or swanlab). Reporting to none of the known ones is ("none",)."""
    names = [n.strip() for n in report_to.split(",")] if isinstance(report_to, str) else [str(n) for n in report_to]
    known = tuple(n for n in names if n in REPORT_TO_CHOICES)
    return known or ("none",), [n for n in names if n and n not in REPORT_TO_CHOICES]


def check_installed(report_to: str | Iterable[str]) -> None:
    """Raises ImportError naming the extra to install for the first tracker of ``report_to`` that is missing."""
    for name in resolve_report_to(report_to):
        package, extra = _PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            install = f"pip install 'jaxsloth[{extra}]'" if extra else f"pip install {package}"
            raise ImportError(f"report_to={name!r} needs the {package} package: {install}")


def metric_name(key: str) -> str:
    """transformers' tracker names: eval_loss -> eval/loss, loss -> train/loss."""
    return f"eval/{key.removeprefix('eval_')}" if key.startswith("eval_") else f"train/{key}"


def tracked_metrics(record: Mapping) -> dict[str, float]:
    """The numeric values of ``record`` (bools, None and the step's coordinates left out) under tracker names."""
    return {
        metric_name(k): float(v)
        for k, v in record.items()
        if k not in _NOT_METRICS and isinstance(v, int | float) and not isinstance(v, bool)
    }


def _flat(value, prefix: str, out: dict) -> None:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            _flat(getattr(value, f.name), f"{prefix}{f.name}" if not prefix else f"{prefix}.{f.name}", out)
    elif value is None or isinstance(value, bool | int | float | str):
        out[prefix] = value
    elif isinstance(value, os.PathLike):
        out[prefix] = os.fspath(value)
    elif isinstance(value, list | tuple) and all(isinstance(v, bool | int | float | str) for v in value):
        out[prefix] = list(value)
    else:  # dtypes, meshes, kernel block tables: their text
        out[prefix] = str(value)


def run_config(model, train_config: TrainConfig, data=None) -> dict:
    """Every setting of the run (model: a ``jaxsloth.api.Model``), flattened for a tracker's config: the TrainConfig and LoraConfig fields by their
    own names, ``model`` (its path), ``max_seq_length`` and ``data`` (a path or Hub id; else the kind of object
    given), the GPU profile as ``profile.<field>`` and the architecture as ``model_config.<field>`` (the HF config
    text left out)."""
    out: dict = {"model": model.path, "max_seq_length": model.max_seq_length}
    arch = dataclasses.replace(model.config, hf_config="")
    for group, value in (("model_config", arch), ("profile", model.profile)):
        _flat(value, group, out)
    for settings in (model.lora, train_config):
        if settings is not None:
            _flat(settings, "", out)
    if data is not None:  # the data argument of jaxsloth.train, where TrainConfig.data is unset
        out["data"] = os.fspath(data) if isinstance(data, str | os.PathLike) else type(data).__name__
    return out


class Tracker:
    """A tracker sink: ``start(config)`` opens the run at the first record; each record's metrics are logged at
    its step (a record without one at the last step seen)."""

    def __init__(self, config: Mapping, *, project: str | None, run_name: str | None, out_dir: Path | None):
        self.config, self.project, self.run_name, self.out_dir = dict(config), project, run_name, out_dir
        self.started = False
        self.step = 0

    def __call__(self, record: dict) -> None:
        if not self.started:
            self.start()
            self.started = True
        self.step = int(record.get("step", self.step))
        metrics = tracked_metrics(record)
        if metrics:
            self.log(metrics, self.step)

    def close(self) -> None:
        if self.started:
            self.finish()
            self.started = False

    def start(self) -> None:
        raise NotImplementedError

    def log(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        raise NotImplementedError


class WandbTracker(Tracker):
    """A Weights & Biases run (project: ``project``, else WANDB_PROJECT, else "jaxsloth"); its local files go to
    WANDB_DIR, else output_dir/wandb. WANDB_MODE=offline logs without an account (``wandb sync`` uploads later)."""

    def start(self) -> None:
        import wandb

        where = {}
        if not os.environ.get("WANDB_DIR") and self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            where["dir"] = str(self.out_dir)
        project = self.project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
        self.run = wandb.init(project=project, name=self.run_name, config=self.config, reinit="create_new", **where)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self) -> None:
        self.run.finish()


class MlflowTracker(Tracker):
    """An MLflow run in experiment ``project`` (else MLFLOW_EXPERIMENT_NAME, else "jaxsloth"), at MLflow's
    tracking URI (MLFLOW_TRACKING_URI or ``mlflow.set_tracking_uri``). With none set and no database driver
    (mlflow-skinny has none for MLflow's default sqlite store), a local file store in output_dir/mlruns (else
    ./mlruns): ``mlflow ui --backend-store-uri <it>`` shows it. The config goes in as parameters (text)."""

    def start(self) -> None:
        import mlflow

        self.client = mlflow.MlflowClient(tracking_uri=self._local_store_uri())
        name = self.project or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=self.run_name).info.run_id
        params = [mlflow.entities.Param(k, str(v)) for k, v in self.config.items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def _local_store_uri(self) -> str | None:
        from mlflow.tracking._tracking_service.utils import is_tracking_uri_set

        if is_tracking_uri_set() or importlib.util.find_spec("sqlalchemy") is not None:
            return None
        # MLflow keeps its file store for existing users only, behind this switch; it is the store that needs no
        # database and no server.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        return ((self.out_dir or Path.cwd()) / "mlruns").resolve().as_uri()

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # MLflow stores NaN but not +-inf; a diverged step's inf is recorded as NaN rather than dropped.
        batch = [Metric(k, v if math.isfinite(v) else math.nan, now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def finish(self) -> None:
        self.client.set_terminated(self.run_id)


class TrackioTracker(Tracker):
    """A Trackio run in project ``project`` (else TRACKIO_PROJECT, else "jaxsloth"), in Trackio's local
    database (TRACKIO_DIR; ``trackio show`` opens its dashboard)."""

    def start(self) -> None:
        import trackio

        project = self.project or os.environ.get("TRACKIO_PROJECT") or DEFAULT_PROJECT
        self.run = trackio.init(project=project, name=self.run_name, config=self.config, embed=False)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self) -> None:
        from trackio import context_vars

        self.run.finish()
        if context_vars.current_run.get() is self.run:  # as trackio.finish(): no current run left behind
            context_vars.current_run.set(None)


_TRACKER_CLASSES = {"wandb": WandbTracker, "mlflow": MlflowTracker, "trackio": TrackioTracker}


def make_trackers(
    report_to: str | Iterable[str],
    *,
    out_dir: str | os.PathLike | None = None,
    config: Mapping | None = None,
    project: str | None = None,
    run_name: str | None = None,
) -> list:
    """The sinks of ``report_to``'s services: a Weights & Biases, MLflow or Trackio run logging ``config`` and every
    record (TensorBoard is a file sink of ``jaxsloth.train.metrics.standard_callbacks``). Raises ImportError naming
    the extra to install when a tracker's package is missing."""
    check_installed(report_to)
    out = None if out_dir is None else Path(out_dir)
    sinks: list = []
    for name in resolve_report_to(report_to):
        if name != "tensorboard":
            sinks.append(_TRACKER_CLASSES[name](config or {}, project=project, run_name=run_name, out_dir=out))
    return sinks
