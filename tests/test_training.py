"""Training loop: loss falls, fixed-seed runs are reproducible, resume gives identical losses, non-finite stops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from converters.hf import load_hf_model
from jaxsloth.data import BatchLoader, Example, TokenizedDataset
from jaxsloth.lora import LoraConfig, init_lora
from jaxsloth.profiles import profile_for_device
from jaxsloth.train.loop import fit
from jaxsloth.train.step import NonFiniteLossError, TrainConfig
from tests.tiny_models import saved_model

LORA = LoraConfig(r=4, lora_alpha=8.0)
PROFILE = profile_for_device(name="cpu")


def _dataset(vocab, n=24, avoid=None, seed=0):
    """Copy-task-like examples: the second half repeats the first, so the loss can fall quickly."""
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(n):
        k = int(rng.integers(3, 7))
        half = rng.integers(3, vocab, k)
        if avoid is not None:
            half = np.where(half == avoid, avoid + 1, half)
        ids = np.concatenate([half, half]).astype(np.int32)
        trained = np.zeros(len(ids), bool)
        trained[k:] = True
        examples.append(Example(ids, trained))
    return TokenizedDataset(examples, "text", 32, 0, 0, 0, np.arange(n))


def _setup():
    config, params = load_hf_model(saved_model("llama"), dtype=jnp.float32)
    trainable = init_lora(config, LORA, jax.random.key(0))
    return config, params, trainable


def _run(config, params, trainable, steps, **kw):
    loader = BatchLoader(kw.pop("data", None) or _dataset(config.vocab_size), batch_size=4, seq_len=16, seed=1)
    tc = TrainConfig(
        learning_rate=kw.pop("lr", 3e-3), max_steps=steps, gradient_accumulation_steps=2, **kw.pop("tc", {})
    )
    return fit(config, params, trainable, loader, lora=LORA, train_config=tc, profile=kw.pop("profile", PROFILE), **kw)


def test_loss_falls_and_is_reproducible():
    config, params, trainable = _setup()
    a = _run(config, params, trainable, 25)
    losses = [r["loss"] for r in a.history]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    b = _run(config, params, init_lora(config, LORA, jax.random.key(0)), 25)
    assert losses == [r["loss"] for r in b.history]  # bit-identical with the same seed


def test_resume_gives_the_same_losses(tmp_path):
    config, params, trainable = _setup()
    full = _run(config, params, trainable, 6, tc={"lr_scheduler_type": "cosine", "warmup_steps": 2})
    # The same run with checkpoints every 3 steps gives the same losses; then drop its final checkpoint and resume
    # from step 3 in a fresh loop (fresh LoRA init, fresh loader): the last three losses must be identical.
    full6 = _run(
        config,
        params,
        init_lora(config, LORA, jax.random.key(0)),
        6,
        tc={"lr_scheduler_type": "cosine", "warmup_steps": 2},
        checkpoint_dir=str(tmp_path / "ckpt6"),
        save_every=3,
    )
    assert [r["loss"] for r in full6.history] == [r["loss"] for r in full.history]
    # Now keep only the step-3 checkpoint of that run and resume from it in a fresh loop.
    import shutil

    shutil.rmtree(tmp_path / "ckpt6" / "6")
    resumed = _run(
        config,
        params,
        init_lora(config, LORA, jax.random.key(123)),  # overwritten by the checkpoint
        6,
        tc={"lr_scheduler_type": "cosine", "warmup_steps": 2},
        checkpoint_dir=str(tmp_path / "ckpt6"),
        save_every=3,
        resume=True,
    )
    assert [r["step"] for r in resumed.history] == [4, 5, 6]
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history][3:]
    for x, y in zip(jax.tree.leaves(resumed.trainable), jax.tree.leaves(full.trainable), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_nonfinite_loss_stops_naming_the_step():
    config, params, trainable = _setup()
    poison = 7
    data = _dataset(config.vocab_size, avoid=poison)
    # Example 0 carries the poisoned token; make sure it is seen at some step > 1 by checking the error names it.
    data.examples[0] = Example(np.array([poison, 5, 6, poison, 5, 6], np.int32), np.array([0, 0, 0, 1, 1, 1], bool))
    params = {**params, "embed": params["embed"].at[poison].set(jnp.nan)}
    loader = BatchLoader(data, batch_size=4, seq_len=16, seed=1)
    # Which step sees example 0 first: replay the loader's plan.
    probe = BatchLoader(data, batch_size=4, seq_len=16, seed=1)
    first = next(i for i in range(1, 100) if (next(probe)["tokens"] == poison).any())
    tc = TrainConfig(learning_rate=1e-3, max_steps=first + 2, gradient_accumulation_steps=2)
    with pytest.raises(NonFiniteLossError, match=f"at step {first}\\b"):
        fit(config, params, trainable, loader, lora=LORA, train_config=tc, profile=PROFILE)
    skip = TrainConfig(learning_rate=1e-3, max_steps=first + 1, gradient_accumulation_steps=2, on_nonfinite="skip")
    result = fit(
        config,
        params,
        trainable,
        BatchLoader(data, batch_size=4, seq_len=16, seed=1),
        lora=LORA,
        train_config=skip,
        profile=PROFILE,
    )
    assert result.history[first - 1].get("skipped") and all(np.isfinite(jax.tree.leaves(result.trainable)[0]).ravel())


def test_out_of_vocab_tokens_rejected_before_training():
    config, params, trainable = _setup()
    bad = _dataset(config.vocab_size)
    bad.examples[0] = Example(np.array([config.vocab_size + 5, 3, 4], np.int32), np.array([0, 1, 1], bool))
    with pytest.raises(ValueError, match=f"token id {config.vocab_size + 5}"):
        _run(config, params, trainable, 50, data=bad)


def test_out_of_memory_is_explained():
    from jaxsloth.train.step import StepDoesNotFitError, explain_oom, is_oom

    xla = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 81.00GiB.")
    assert is_oom(xla) and not is_oom(RuntimeError("INVALID_ARGUMENT: shapes"))
    err = explain_oom(xla, batch=4, seq_len=8192, profile=PROFILE)
    assert isinstance(err, StepDoesNotFitError)
    msg = str(err)
    assert "batch=4" in msg and "seq_len=8192" in msg and "remat=" in msg and "81.00GiB" in msg


def test_fit_refuses_a_step_the_memory_model_says_cannot_fit(monkeypatch):
    """On a GPU the loop checks the memory model before compiling (CPU reports no device limit: simulate one)."""
    from jaxsloth.train import memory as train_memory

    config, params, trainable = _setup()
    monkeypatch.setattr(train_memory, "machine_memory_gib", lambda: (1e-6, 1e-6))
    with pytest.raises(MemoryError, match="longest that fits"):
        _run(config, params, trainable, 2)


def test_fit_checks_xla_compiled_plan_before_running(monkeypatch):
    """After compiling and before running, XLA's own memory plan is checked (here with the model check switched off
    and a simulated 1 KiB device, so only the compiled plan can refuse)."""
    from jaxsloth.train import memory as train_memory

    config, params, trainable = _setup()
    monkeypatch.setattr(train_memory, "check_fits", lambda *a, **k: None)
    monkeypatch.setattr(train_memory, "machine_memory_gib", lambda: (2**-20, 1.0))
    with pytest.raises(MemoryError, match=r"XLA's compiled step needs .* GiB of device memory .* temporaries"):
        _run(config, params, trainable, 2)


def test_compiled_plan_check_names_plan_and_longest():
    from types import SimpleNamespace

    from jaxsloth.train.memory import check_compiled_plan

    gib = 2**30
    stats = SimpleNamespace(
        argument_size_in_bytes=6 * gib, temp_size_in_bytes=96 * gib, host_temp_size_in_bytes=73 * gib
    )
    assert check_compiled_plan(stats, batch=1, seq_len=600_000, device_gib=132, host_gib=106) == (102, 73)
    with pytest.raises(MemoryError, match=r"600,000 tokens.*102.0 GiB.*73.0 GiB.*100.0 and 106.0.*about 327,680"):
        check_compiled_plan(stats, batch=1, seq_len=600_000, device_gib=100, host_gib=106, longest_tokens=327_680)
    with pytest.raises(MemoryError, match="pinned host"):
        check_compiled_plan(stats, batch=1, seq_len=600_000, device_gib=132, host_gib=64)
