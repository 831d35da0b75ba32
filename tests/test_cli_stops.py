"""How `jaxsloth train` stops and restarts: SIGTERM from a scheduler, a full disk, a finished run rerun, a changed
setting on resume, bad data found before the model loads, a model directory without a tokenizer."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxsloth import cli, demo

ROOT = Path(__file__).parents[1]
SMALL = [
    "--r",
    2,
    "--max-seq-length",
    64,
    "--per-device-train-batch-size",
    2,
    "--profile",
    "cpu",
    "--format",
    "messages",
]


def _run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _error_lines(err):
    return [x for x in err.splitlines() if x.startswith("jaxsloth")]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    train, _ = demo.task_splits(num_train=24, num_heldout=1, seed=7)
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in train))
    return path


def test_sigterm_saves_the_last_step_and_exits_143(tmp_path, data_file):
    out = tmp_path / "run"
    argv = ["train", "--model", demo.MODEL_DIR, "--data", data_file, "--output-dir", out, "--max-steps", 100000, *SMALL]
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxsloth", *map(str, argv)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)},
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 500
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    last = json.loads(metrics.read_text().splitlines()[-1])["step"]
    line = err.strip().splitlines()[-1]
    assert line == (
        f"interrupted (SIGTERM): checkpoint of step {last} saved in {out / 'checkpoints'}; run again with --resume "
        "(resume=True) to continue"
    )
    assert (out / "checkpoints" / str(last) / "jaxsloth.json").is_file()
    assert not (out / ".jaxsloth.lock").exists()


def test_disk_full_during_a_checkpoint_is_one_line_and_exit_1(tmp_path, data_file, capsys, monkeypatch):
    """The disk fills while the checkpoint of step 1 is written, and the TensorBoard writer then fails to close
    too: one line names the checkpoint path and the cause, the partial files are gone, the exit code is 1."""
    from jaxsloth.train import checkpoint as train_checkpoint
    from jaxsloth.train import metrics as train_metrics

    def full(self, step, *a, **k):
        partial = Path(self.directory) / f"{step}.orbax-checkpoint-tmp-1" / "state"
        partial.mkdir(parents=True)
        (partial / "d").write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    def close_fails(self):
        raise OSError(errno.ENOSPC, "No space left on device: tensorboard")

    monkeypatch.setattr(train_checkpoint.ocp.CheckpointManager, "save", full)
    monkeypatch.setattr(train_metrics.TensorBoardWriter, "close", close_fails)
    out = tmp_path / "run"
    code, _, err = _run(
        ["train", "--model", demo.MODEL_DIR, "--data", data_file, "--output-dir", out, "--max-steps", 2,
         "--save-steps", 1, *SMALL],
        capsys,
    )  # fmt: skip
    assert code == 1, err
    lines = _error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "No space left on device" in lines[0] and str(out / "checkpoints" / "1") in lines[0]
    assert list((out / "checkpoints").iterdir()) == []


def test_finished_run_rerun_says_complete_and_changed_settings_are_named(tmp_path, data_file, capsys):
    out = tmp_path / "run"
    argv = ["train", "--model", demo.MODEL_DIR, "--data", data_file, "--output-dir", out, "--max-steps", 2, *SMALL]
    code, first, _ = _run(argv, capsys)
    assert code == 0 and "trained 2 steps" in first
    code, again, _ = _run([*argv, "--resume"], capsys)
    assert code == 0 and "already complete (step 2 of 2)" in again and "nan" not in again
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    code, _, err = _run([*argv, "--resume", "--lora-alpha", 64], capsys)
    lines = _error_lines(err)
    assert code == 2 and len(lines) == 1 and "LoRA alpha (--lora-alpha) = 16.0, this run has 64.0" in lines[0]
    assert "--overwrite" in lines[0]
    fewer = data_file.parent / "fewer.jsonl"
    fewer.write_text("".join(data_file.read_text().splitlines(keepends=True)[:20]))
    code, _, err = _run([*argv[:4], fewer, *argv[5:], "--resume"], capsys)
    lines = _error_lines(err)
    assert code == 2 and len(lines) == 1 and "num_examples" in lines[0] and "--overwrite" in lines[0], err


def test_data_and_output_dir_checked_before_the_model_loads(tmp_path, data_file, capsys, monkeypatch):
    import jaxsloth

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(jaxsloth, "load", no_load)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n{"messages": [\n')
    code, _, err = _run(["train", "--model", demo.MODEL_DIR, "--data", bad, *SMALL], capsys)
    assert code == 2 and "bad.jsonl" in _error_lines(err)[0] and "line 2" in _error_lines(err)[0], err
    (tmp_path / "o" / "checkpoints" / "30").mkdir(parents=True)
    argv = ["train", "--model", demo.MODEL_DIR, "--data", data_file, "--output-dir", tmp_path / "o", "--no-resume"]
    code, _, err = _run(argv, capsys)
    assert code == 2 and "step 30" in _error_lines(err)[0] and "--overwrite" in _error_lines(err)[0], err


def test_tokenizer_flag(tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(demo.MODEL_DIR / name, bare / name)
    code, _, err = _run(["generate", "--model", bare, "abc", "--max-new-tokens", 2], capsys)
    assert code == 2 and "--tokenizer" in _error_lines(err)[0]
    code, out, err = _run(
        ["generate", "--model", bare, "--tokenizer", demo.MODEL_DIR, "abc", "--max-new-tokens", 2], capsys
    )
    assert code == 0, err
