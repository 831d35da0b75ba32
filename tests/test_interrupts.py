"""Ctrl-C and SIGTERM at every point of the training loop (before the fetch, between fetch and step, during the
step, during a save, twice in a row): the checkpoint left behind holds the last completed step, and a resumed run
reproduces an uninterrupted one exactly (every loss, the final LoRA weights)."""

import signal

import jax
import numpy as np
import pytest

from jaxsloth.data import BatchLoader
from jaxsloth.lora import init_lora
from jaxsloth.train import checkpoint as train_checkpoint
from jaxsloth.train import loop
from jaxsloth.train.identity import ResumeMismatchError
from jaxsloth.train.interrupts import TrainingInterrupted
from jaxsloth.train.step import TrainConfig
from tests.test_training import LORA, PROFILE, _dataset, _setup

STEPS = 9


class Loader:
    """BatchLoader with a hook before and after each fetch (the interrupt points around ``next``)."""

    def __init__(self, inner, before=None, after=None):
        self.inner, self.before, self.after, self.calls = inner, before, after, 0

    def __next__(self):
        self.calls += 1
        if self.before:
            self.before(self.calls)
        batch = next(self.inner)
        if self.after:
            self.after(self.calls)
        return batch

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def _fit(config, params, ckpt_dir=None, lora=LORA, **kw):
    data = BatchLoader(_dataset(config.vocab_size), batch_size=4, seq_len=16, seed=1)
    loader = Loader(data, kw.pop("before", None), kw.pop("after", None))
    tc = TrainConfig(
        learning_rate=3e-3, max_steps=STEPS, gradient_accumulation_steps=2, lr_scheduler_type="cosine", warmup_steps=2
    )
    trainable = init_lora(config, lora, jax.random.key(123))  # replaced by the checkpoint when resuming
    return loop.fit(
        config, params, trainable, loader, lora=lora, train_config=tc, profile=PROFILE,
        checkpoint_dir=ckpt_dir, resume=True, **kw,  # each run continues what the one before it saved
    )  # fmt: skip


def _on_call(n, action):
    def hook(call):
        if call == n:
            action()

    return hook


def _raise():
    raise KeyboardInterrupt


def _interrupted(config, params, ckpt_dir, losses, **kw):
    """Runs until interrupted; returns the exception after adding the losses of the steps it completed."""
    records = []
    with pytest.raises(TrainingInterrupted) as e:
        _fit(config, params, ckpt_dir, callbacks=[*kw.pop("callbacks", ()), records.append], **kw)
    losses.update({r["step"]: r["loss"] for r in records})
    assert e.value.saved_step == max(losses), (e.value.saved_step, sorted(losses))
    return e.value


def test_interrupt_anywhere_resumes_exactly(tmp_path, monkeypatch):
    config, params, _ = _setup()
    reference = _fit(config, params)
    ref_losses = {r["step"]: r["loss"] for r in reference.history}
    ckpt = str(tmp_path / "ckpt")
    losses: dict[int, float] = {}
    handlers = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))

    # 1. Before the fetch of the second step of the segment.
    _interrupted(config, params, ckpt, losses, before=_on_call(2, _raise))
    # 2. Between fetch and step: the loader has moved on, the step has not run (the batch must not be lost).
    _interrupted(config, params, ckpt, losses, after=_on_call(2, _raise))
    # 3. SIGTERM during the step: the step finishes, is recorded and saved, then the run stops.
    real_get = jax.device_get
    seen = []

    def device_get(x):
        if isinstance(x, dict) and "loss" in x:
            seen.append(1)
            if len(seen) == 2:
                signal.raise_signal(signal.SIGTERM)
        return real_get(x)

    monkeypatch.setattr(jax, "device_get", device_get)
    e = _interrupted(config, params, ckpt, losses)
    monkeypatch.setattr(jax, "device_get", real_get)
    assert e.signum == signal.SIGTERM and e.exit_code == 143

    # 3b. SIGTERM while a step's record is being handed to the logs: every logger still gets it (the checkpoint
    # and the logs name the same last step).
    handed = []

    def sigterm_on_first_record(record):
        handed.append(record)
        if len(handed) == 1:
            signal.raise_signal(signal.SIGTERM)

    _interrupted(config, params, ckpt, losses, callbacks=[sigterm_on_first_record])

    # 4. Ctrl-C twice, 50 ms apart, during a periodic save: the save completes, then the run stops.
    real_save = train_checkpoint.Checkpointer.save

    def save_interrupted_twice(self, *a, **k):
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
        return real_save(self, *a, **k)

    monkeypatch.setattr(train_checkpoint.Checkpointer, "save", save_interrupted_twice)
    _interrupted(config, params, ckpt, losses, save_every=1)
    monkeypatch.setattr(train_checkpoint.Checkpointer, "save", real_save)

    # 5. An interrupt inside a save, after orbax wrote and before the manifest: the save is redone on the way out.
    real_files = train_checkpoint._files
    listed = []

    def files_interrupted(step_dir):
        listed.append(step_dir)
        if len(listed) == 1:
            raise KeyboardInterrupt
        return real_files(step_dir)

    monkeypatch.setattr(train_checkpoint, "_files", files_interrupted)
    _interrupted(config, params, ckpt, losses, save_every=1)
    monkeypatch.setattr(train_checkpoint, "_files", real_files)

    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # restored
    assert max(losses) < STEPS
    final = _fit(config, params, ckpt)
    losses.update({r["step"]: r["loss"] for r in final.history})
    assert losses == ref_losses  # bit-identical, every step once
    for x, y in zip(jax.tree.leaves(final.trainable), jax.tree.leaves(reference.trainable), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    # The same checkpoints under another LoRA alpha: refused, naming it, before anything is compiled.
    other = type(LORA)(r=LORA.r, lora_alpha=LORA.lora_alpha * 2)
    with pytest.raises(ResumeMismatchError, match=r"LoRA alpha \(--lora-alpha\) = 8.0, this run has 16.0"):
        _fit(config, params, ckpt, lora=other)


def test_the_cli_says_saved_only_when_it_saved():
    from jaxsloth.train.interrupts import interrupted_message

    saved, code = interrupted_message(TrainingInterrupted(signal.SIGTERM, saved_step=7, kept_step=7), "o/checkpoints")
    assert code == 143 and "checkpoint of step 7 saved in o/checkpoints" in saved
    kept, code = interrupted_message(TrainingInterrupted(signal.SIGINT, saved_step=None, kept_step=5), "o/c")
    assert code == 130 and "saved" not in kept and "latest checkpoint is step 5" in kept
    none, _ = interrupted_message(KeyboardInterrupt(), "o/c")
    assert "no checkpoint was saved" in none
