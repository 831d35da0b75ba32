"""report_to: each tracker (wandb offline, MLflow's local file store, Trackio's local database) logs the run's
settings and every step's metrics, read back with the tracker's own reader; the faces map their tracker keys."""

import json
import os
import struct
import sys

import numpy as np
import pytest

import jaxsloth
from jaxsloth import cli, demo
from jaxsloth.config import TrainConfig
from jaxsloth.train import trackers

TRACKED = ("wandb", "mlflow", "trackio")
PROJECT = "jaxsloth-tests"
ROWS = 4  # per_device_train_batch_size: 12 examples, unpacked, make one epoch of 3 steps


@pytest.fixture(scope="module")
def tracker_dirs(tmp_path_factory):
    """Every tracker offline and inside a temporary directory, for this module only."""
    root = tmp_path_factory.mktemp("trackers")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_DIR", str(root))
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("MLFLOW_TRACKING_URI", (root / "mlruns").as_uri())
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's local store without a database
        mp.setenv("TRACKIO_DIR", str(root / "trackio"))  # read when trackio is imported
        # Another test in this process may have imported trackio already: point its modules' copies here too.
        for name in ("trackio.utils", "trackio.sqlite_storage", "trackio"):
            if name in sys.modules and hasattr(sys.modules[name], "TRACKIO_DIR"):
                mp.setattr(sys.modules[name], "TRACKIO_DIR", root / "trackio")
        for variable in ("WANDB_PROJECT", "MLFLOW_EXPERIMENT_NAME", "TRACKIO_PROJECT"):
            mp.delenv(variable, raising=False)
        yield root


@pytest.fixture(scope="module")
def trained(tracker_dirs):
    """One 3-step training reporting to every tracker: (result, examples, tokenizer, output_dir)."""
    examples, _ = demo.task_splits(num_train=12, num_heldout=1, seed=3)
    model, tokenizer = jaxsloth.load(demo.MODEL_DIR, profile="cpu", max_seq_length=64)
    model = jaxsloth.add_lora(model, r=2)
    out = tracker_dirs / "run"
    result = jaxsloth.train(
        model, tokenizer, examples, max_steps=3, per_device_train_batch_size=ROWS, packing=False, learning_rate=1e-3,
        warmup_steps=1, output_dir=out, report_to="tensorboard,wandb,mlflow,trackio", project=PROJECT,
        run_name="tiny-run", progress=False,
    )  # fmt: skip
    return result, examples, tokenizer, out


# --- the trackers' own readers ----------------------------------------------------------------------------------


def _wandb_records(run_file):
    """The records of an offline run's .wandb file: wandb's LevelDB-style log of protobuf Records (a 7-byte file
    header, then 32 KiB blocks of chunks: crc32 (4), length (2), type (1: whole, 2-4: first/middle/last))."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunks, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(pb.Record.FromString(chunks))
            chunks = b""
    return records


def read_wandb(root, run_name):
    """-> (config, {step: metrics}) of the offline wandb run named ``run_name`` under ``root``."""
    for run_file in sorted(root.glob("wandb/offline-run-*/run-*.wandb")):
        records = _wandb_records(run_file)
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        if run.display_name != run_name:
            continue
        assert run.project == PROJECT
        config = {i.key: json.loads(i.value_json) for i in run.config.update if i.key != "_wandb"}
        for r in records:
            if r.WhichOneof("record_type") == "config":
                config.update({i.key: json.loads(i.value_json) for i in r.config.update if i.key != "_wandb"})
        steps: dict[int, dict] = {}
        for r in records:
            if r.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                row = {k: v for k, v in items.items() if not k.startswith("_")}
                steps.setdefault(r.history.step.num, {}).update(row)
        return config, steps
    raise AssertionError(f"no offline wandb run {run_name!r} under {root}")


def read_mlflow(run_name):
    """-> (params, {step: metrics}) of the MLflow run named ``run_name`` (MLFLOW_TRACKING_URI)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name(PROJECT)
    (run,) = client.search_runs([experiment.experiment_id], filter_string=f"tags.mlflow.runName = '{run_name}'")
    steps: dict[int, dict] = {}
    for key in run.data.metrics:
        for m in client.get_metric_history(run.info.run_id, key):
            steps.setdefault(m.step, {})[key] = m.value
    assert run.info.status == "FINISHED"
    return run.data.params, steps


def read_trackio(root, run_name):
    """-> (config, {step: metrics}) of the Trackio run ``run_name`` in the local database under TRACKIO_DIR."""
    from trackio.sqlite_storage import SQLiteStorage

    assert SQLiteStorage.get_project_db_path(PROJECT).parent == root / "trackio"
    steps: dict[int, dict] = {}
    for row in SQLiteStorage.get_logs(PROJECT, run_name):
        steps.setdefault(row["step"], {}).update({k: v for k, v in row.items() if k not in ("step", "timestamp")})
    return SQLiteStorage.get_run_config(PROJECT, run_name), steps


def read(tracker, root, run_name):
    if tracker == "wandb":
        return read_wandb(root, run_name)
    if tracker == "mlflow":
        return read_mlflow(run_name)
    return read_trackio(root, run_name)


# --- a real training ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tracker", TRACKED)
def test_training_run_logs_config_losses_throughput(tracker, trained, tracker_dirs):
    result, examples, tokenizer, _ = trained
    config, steps = read(tracker, tracker_dirs, "tiny-run")
    # The settings: every TrainConfig and LoraConfig field (MLflow keeps parameters as text).
    as_logged = (lambda v: str(v)) if tracker == "mlflow" else (lambda v: v)
    assert config["learning_rate"] == as_logged(1e-3) and config["max_steps"] == as_logged(3)
    assert config["r"] == as_logged(2) and config["model"] == as_logged(str(demo.MODEL_DIR))
    assert config["report_to"] == as_logged(["tensorboard", "wandb", "mlflow", "trackio"])
    assert config["profile.name"] == "cpu" and "model_config.hidden_size" in config and config["data"] == "list"
    assert sorted(steps) == [1, 2, 3]
    for record in result.history:
        logged = steps[record["step"]]
        assert logged["train/loss"] == pytest.approx(record["loss"], rel=1e-6)
        assert logged["train/grad_norm"] == pytest.approx(record["grad_norm"], rel=1e-6)
        assert logged["train/tokens_per_s"] == pytest.approx(record["tokens_per_s"], rel=1e-6)
        assert logged["train/learning_rate"] == pytest.approx(record["learning_rate"], rel=1e-6)
        assert logged["train/real_tokens"] == record["real_tokens"]
        # Peak device memory where the device reports it (CPU does not: then nothing is logged for it).
        assert ("train/peak_gib" in logged) == (record["peak_gib"] is not None)
        assert "train/step" not in logged and "train/total_steps" not in logged


def test_throughput_counts_real_tokens_and_learning_rate_follows_transformers(trained):
    """tokens_per_s: the non-padding tokens, counted independently with the tokenizer's chat template; the
    learning rate of each step: transformers' linear schedule with warmup (its LambdaLR factor times the peak)."""
    from transformers import get_linear_schedule_with_warmup

    result, examples, tokenizer, _ = trained
    history = result.history
    lengths = [len(tokenizer.apply_chat_template(e["messages"], return_dict=True)["input_ids"]) for e in examples]
    assert sum(r["real_tokens"] for r in history) == sum(lengths)  # one epoch: every example once
    for r in history:
        assert r["real_tokens"] < r["seq_tokens"] == ROWS * 64  # the rows are padded to 64 tokens
        assert r["tokens_per_s"] == pytest.approx(r["real_tokens"] / r["step_time_s"])
    torch = pytest.importorskip("torch")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=1, num_training_steps=3)
    expected = []
    for _ in history:  # the rate each optimizer step uses, then the schedule advances
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose([r["learning_rate"] for r in history], expected, rtol=1e-6)


def test_tensorboard_beside_the_trackers(trained):
    from tests.test_metrics import _read_scalars

    result, _, _, out = trained
    scalars = _read_scalars(out / "tensorboard")
    assert [s for s, _ in scalars["train/learning_rate"]] == [1, 2, 3]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([r["loss"] for r in result.history], rel=1e-6)


# --- records fed directly: evaluation records and peak memory ----------------------------------------------------


def test_eval_records_and_peak_memory_reach_every_tracker(tracker_dirs):
    records = [
        {"step": 1, "loss": 2.5, "grad_norm": 1.25, "learning_rate": 1e-4, "tokens_per_s": 900.0, "peak_gib": 3.5,
         "total_steps": 2, "skipped": False},
        {"step": 2, "loss": 2.0, "grad_norm": 1.0, "learning_rate": 5e-5, "tokens_per_s": 950.0, "peak_gib": 3.75,
         "total_steps": 2},
        {"step": 2, "eval_loss": 1.75, "eval_runtime": 0.5, "eval_samples": 8, "eval_split": "validation"},
    ]  # fmt: skip
    sinks = trackers.make_trackers(
        TRACKED, config={"learning_rate": 1e-4, "target_modules": ["q_proj"]}, project=PROJECT, run_name="fed"
    )
    try:
        for r in records:
            for sink in sinks:
                sink(r)
    finally:
        for sink in sinks:
            sink.close()
    for tracker in TRACKED:
        config, steps = read(tracker, tracker_dirs, "fed")
        assert sorted(steps) == [1, 2], tracker
        assert steps[1]["train/peak_gib"] == 3.5 and steps[2]["train/peak_gib"] == 3.75, tracker
        assert steps[2]["train/loss"] == 2.0 and steps[1]["train/learning_rate"] == pytest.approx(1e-4), tracker
        assert steps[2]["eval/loss"] == 1.75 and steps[2]["eval/runtime"] == 0.5, tracker
        assert steps[2]["eval/samples"] == 8, tracker
        assert not any(k.endswith(("skipped", "split", "total_steps")) for k in steps[1] | steps[2]), tracker
        assert str(config["learning_rate"]) == "0.0001", tracker


def test_mlflow_without_a_tracking_uri_logs_to_output_dir(tmp_path, monkeypatch, tracker_dirs):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)  # mlflow-skinny: no driver for MLflow's default sqlite store
    (sink,) = trackers.make_trackers("mlflow", out_dir=tmp_path, project=PROJECT, run_name="local")
    sink({"step": 1, "loss": 0.5})
    sink.close()
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name(PROJECT).experiment_id])
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")] == [(1, 0.5)]


# --- settings, errors and the faces ---------------------------------------------------------------------------------


def test_report_to_values():
    assert TrainConfig().report_to == ("tensorboard",)  # jaxsloth's default: TensorBoard events
    assert TrainConfig(report_to="wandb, mlflow").report_to == ("wandb", "mlflow")
    assert trackers.resolve_report_to(("none",)) == []
    assert trackers.resolve_report_to("all") == list(trackers.TRACKERS)  # every one is installed here
    with pytest.raises(ValueError, match="unknown report_to 'comet_ml'"):
        TrainConfig(report_to=["wandb", "comet_ml"])
    with pytest.raises(ValueError, match="'all' and 'none' stand alone"):
        TrainConfig(report_to="none,wandb")
    s = cli.train_settings(
        cli.build_parser().parse_args(
            ["train", "--model", "m", "--data", "d", "--report-to", "mlflow,trackio", "--project", "p"]
        )
    )
    assert s["report_to"] == ("mlflow", "trackio") and s["project"] == "p"


def test_missing_tracker_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'jaxsloth\[wandb\]'"):
        trackers.make_trackers("wandb")
    model = jaxsloth.Model(config=None, params={}, profile=None, trainable={})
    with pytest.raises(ImportError, match=r"jaxsloth\[wandb\]"):  # before any data is read
        jaxsloth.train(model, object(), "no-such-file.jsonl", report_to=["tensorboard", "wandb"], progress=False)


def test_faces_map_their_tracker_keys(tmp_path, monkeypatch):
    from jaxsloth import SFTConfig
    from jaxsloth.faces.axolotl import translate_config

    ours, _, ignored = SFTConfig(report_to=["wandb", "comet_ml"], run_name="r", project="p").to_settings()
    assert (ours["report_to"], ours["run_name"], ours["project"]) == (("wandb",), "r", "p")
    assert ignored == ["report_to=['comet_ml'] (jaxsloth reports to tensorboard, wandb, mlflow, trackio)"]
    assert SFTConfig(report_to="none").to_settings()[0]["report_to"] == ("none",)

    monkeypatch.setenv("WANDB_MODE", "online")  # restored after the test; the config's wandb_mode replaces it
    axolotl = {"base_model": "m", "adapter": "lora", "datasets": [{"path": "d.jsonl", "type": "alpaca"}]}
    out = translate_config(
        {**axolotl, "wandb_project": "proj", "wandb_name": "run-1", "wandb_mode": "offline"}, tmp_path
    )
    assert (out["report_to"], out["project"], out["run_name"]) == (("tensorboard", "wandb"), "proj", "run-1")
    assert os.environ["WANDB_MODE"] == "offline"
    out = translate_config({**axolotl, "wandb_project": "proj", "wandb_mode": "disabled", "use_tensorboard": False},
                           tmp_path)  # fmt: skip
    assert out["report_to"] == ("none",) and "project" not in out
    assert translate_config({**axolotl, "wandb_project": None}, tmp_path)["report_to"] == ("tensorboard",)

    (tmp_path / "d.jsonl").write_text("{}\n")
    factory = {
        "model_name_or_path": "m",
        "finetuning_type": "lora",
        "dataset": str(tmp_path / "d.jsonl"),
        "run_name": "f",
    }
    out = translate_config({**factory, "report_to": ["mlflow", "swanlab"]}, tmp_path)
    assert (out["report_to"], out["run_name"]) == (("mlflow",), "f")
    assert translate_config({**factory, "report_to": "none"}, tmp_path)["report_to"] == ("none",)
