"""No surprises between runs: a run directory is continued only when asked (resume / --resume / TRL's
resume_from_checkpoint), from its latest checkpoint or from the one named; a run asked to resume where there is
nothing yet starts fresh, saying so."""

import logging
import signal
import types
import warnings

import numpy as np
import pytest

import jaxsloth
from jaxsloth import cli, demo
from jaxsloth.config import TrainConfig
from jaxsloth.train.checkpoint import Checkpointer
from jaxsloth.train.interrupts import TrainingInterrupted, interrupted_message
from jaxsloth.train.run_dir import check_output_dir


@pytest.fixture(scope="module")
def model_and_data():
    model, tokenizer = jaxsloth.load(demo.MODEL_DIR, profile="cpu", max_seq_length=32, dtype="float32")
    train, _ = demo.task_splits(num_train=8, num_heldout=1, seed=3)
    return jaxsloth.add_lora(model, r=2, lora_alpha=4), tokenizer, train


def _train(model_and_data, out, **settings):
    model, tokenizer, data = model_and_data
    settings = dict(per_device_train_batch_size=2, max_steps=2, save_steps=1, output_dir=out, **settings)
    return jaxsloth.train(model, tokenizer, data, progress=False, **settings)


def _checkpoints(out, steps):
    """A run directory holding whole checkpoints of ``steps`` (a stand-in state; no training)."""
    ckpt = Checkpointer(out / "checkpoints")
    for step in steps:
        ckpt.save(step, {"a": np.full(4, step, np.float32)}, {"step": step, "data": None}, {})
    ckpt.close()


def test_resume_where_nothing_is_yet_starts_fresh_and_a_rerun_is_refused(model_and_data, tmp_path, caplog):
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="jaxsloth"):
        first = _train(model_and_data, out, resume=True)
    assert [r["step"] for r in first.history] == [1, 2]
    assert any("no checkpoint" in r.getMessage() and "step 0" in r.getMessage() for r in caplog.records)
    # The same call again, resume not said: refused in one line naming the step held and both ways on.
    with pytest.raises(FileExistsError) as e:
        _train(model_and_data, out)
    message = str(e.value)
    assert "\n" not in message and "step 2" in message and "--resume" in message and "--overwrite" in message


def test_resume_from_a_named_checkpoint_sets_the_later_ones_aside(model_and_data, tmp_path, monkeypatch):
    from jaxsloth.train import loop

    out = tmp_path / "run"
    _checkpoints(out, (2, 4, 6))
    seen = []

    def fake_fit(*a, checkpoint_dir, resume, **kw):  # what the loop would resume from: the latest whole checkpoint
        seen.append((resume, Checkpointer(checkpoint_dir).latest_good()[0]))
        return loop.TrainResult(a[2], None, 0, [])

    monkeypatch.setattr(loop, "fit", fake_fit)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # TRL's spelling is no deprecated alias
        _train(model_and_data, out, resume_from_checkpoint=str(out / "checkpoints" / "2"))
    assert seen == [(True, 2)]
    assert sorted(p.name for p in (out / "checkpoints.superseded").iterdir()) == ["4", "6"]
    # A path that is not a whole checkpoint of this run: refused before training, listing the steps it holds.
    (out / "checkpoints" / "3").mkdir()
    for bad, needle in (
        (tmp_path / "elsewhere" / "2", "not a checkpoint of the run"),
        (out / "checkpoints" / "5", "not found"),
        (out / "checkpoints" / "3", "damaged"),
    ):
        with pytest.raises((ValueError, FileNotFoundError), match=needle) as e:
            _train(model_and_data, out, resume=str(bad))
        assert "2, 3" in str(e.value)
    assert len(seen) == 1


def test_resume_and_overwrite_are_exclusive_and_resume_needs_an_output_dir():
    with pytest.raises(ValueError, match="resume or overwrite, not both"):
        TrainConfig(output_dir="o", resume=True, overwrite=True)
    with pytest.raises(ValueError, match="resume needs output_dir"):
        TrainConfig(resume=True)
    assert TrainConfig().resume is False
    assert TrainConfig(output_dir="o", resume_from_checkpoint="o/checkpoints/2").resume == "o/checkpoints/2"


def test_cli_resume_flags(tmp_path):
    base = ["train", "--model", str(demo.MODEL_DIR), "--data", "d.jsonl", "--output-dir", str(tmp_path)]
    parse = cli.build_parser().parse_args
    assert cli.train_settings(parse(base))["resume"] is False
    assert cli.train_settings(parse([*base, "--resume"]))["resume"] is True
    path = str(tmp_path / "checkpoints" / "6")
    assert cli.train_settings(parse([*base, "--resume-from-checkpoint", path]))["resume"] == path


def test_refusal_and_interrupt_say_how_to_continue(tmp_path):
    (tmp_path / "checkpoints" / "12").mkdir(parents=True)
    with pytest.raises(
        FileExistsError, match=r"step 12\): pass --resume \(resume=True\) to continue it or --overwrite"
    ):
        check_output_dir(tmp_path, resume=False, overwrite=False)
    check_output_dir(tmp_path, resume=True, overwrite=False)
    check_output_dir(tmp_path, resume=False, overwrite=True)
    line, code = interrupted_message(TrainingInterrupted(signal.SIGINT, saved_step=12, kept_step=12), "o/checkpoints")
    assert code == 130 and line.endswith("run again with --resume (resume=True) to continue")


def test_trl_face_resume_from_checkpoint(model_and_data, tmp_path, monkeypatch):
    from jaxsloth import SFTConfig, SFTTrainer, api

    model, tokenizer, data = model_and_data
    out = tmp_path / "trl"
    _checkpoints(out, (5,))
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=data, args=SFTConfig(str(out)))
    seen = []
    monkeypatch.setattr(api, "train", lambda *a, **s: seen.append(s) or types.SimpleNamespace(history=[], step=5))
    # Not resuming over a run: refused in TRL's words, before training.
    with pytest.raises(FileExistsError, match=r"train\(resume_from_checkpoint=True\).*overwrite_output_dir=True"):
        trainer.train()
    assert seen == []
    for given in (True, str(out / "checkpoints" / "5")):
        assert trainer.train(resume_from_checkpoint=given).global_step == 5
        assert seen[-1]["resume"] == given and "overwrite" not in seen[-1]
