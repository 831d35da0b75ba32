"""A checkpoint knows what it belongs to and whether it is whole: damaged ones are set aside, saying so, and a
checkpoint of another model, LoRA or optimizer setting is refused naming the setting."""

import json
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from converters.hf import load_hf_model
from jaxsloth.lora import LoraConfig
from jaxsloth.models.decoder import unstack_layers
from jaxsloth.train.checkpoint import Checkpointer
from jaxsloth.train.identity import ResumeMismatchError, check_identity, run_identity, weights_fingerprint
from jaxsloth.train.step import TrainConfig
from tests.tiny_models import saved_model

IDENTITY = {"lora": {"r": 2}}


def _state(seed):
    rng = np.random.default_rng(seed)
    return {"trainable": {"a": rng.standard_normal(4096).astype(np.float32)}, "key": np.arange(2, dtype=np.uint32)}


def _two_checkpoints(directory):
    ckpt = Checkpointer(directory)
    for step in (1, 2):
        ckpt.save(step, _state(step), {"step": step, "data": None}, IDENTITY)
    ckpt.close()


def _largest_state_file(step_dir):
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(d):
    f = _largest_state_file(d / "2")
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _zero(d):
    f = _largest_state_file(d / "2")
    f.write_bytes(bytes(f.stat().st_size))


def _flip_byte(d):
    f = _largest_state_file(d / "2")
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))


def _no_state(d):
    shutil.rmtree(d / "2" / "state")


def _empty_step_dir(d):
    shutil.rmtree(d / "2")
    (d / "2").mkdir()


def _stray_dir(d):
    (d / "7").mkdir()
    (d / "7" / "notes.txt").write_text("not a checkpoint")


DAMAGE = {
    "truncated": (_truncate, "2", "bytes"),
    "zeroed": (_zero, "2", "checksum"),
    "flipped byte": (_flip_byte, "2", "checksum"),
    "no state/": (_no_state, "2", "missing"),
    "empty step dir": (_empty_step_dir, "2", "no manifest"),
    "stray dir": (_stray_dir, "7", "no manifest"),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_latest_is_reported_and_the_previous_whole_one_used(kind, tmp_path, caplog):
    damage, bad, reason = DAMAGE[kind]
    directory = tmp_path / "checkpoints"
    _two_checkpoints(directory)
    damage(directory)
    ckpt = Checkpointer(directory)
    with caplog.at_level(logging.WARNING, logger="jaxsloth"):
        step, manifest = ckpt.latest_good()
    expected = 2 if bad == "7" else 1
    assert step == expected and manifest["identity"] == IDENTITY
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1, lines
    assert f"{directory / bad} is damaged" in lines[0] and reason in lines[0]
    assert f"resuming from step {expected}" in lines[0]
    assert not (directory / bad).exists() and (tmp_path / "checkpoints.damaged" / bad).is_dir()
    state, meta = ckpt.restore(step, _state(0))
    np.testing.assert_array_equal(state["trainable"]["a"], _state(step)["trainable"]["a"])
    assert meta["step"] == step
    # The step set aside can be written again (the resumed run reaches it).
    ckpt.save(step + 1, _state(9), {"step": step + 1, "data": None}, IDENTITY)
    ckpt.close()
    assert Checkpointer(directory).latest_good()[0] == step + 1


def test_a_flipped_byte_anywhere_is_caught(tmp_path):
    """Every file of the checkpoint is covered, metadata included, not only the array data."""
    directory = tmp_path / "c"
    _two_checkpoints(directory)
    files = json.loads((directory / "2" / "jaxsloth.json").read_text())["files"]
    assert any(n.startswith("state/") for n in files) and any(n.startswith("meta/") for n in files)
    for name in files:
        fresh = tmp_path / name.replace("/", "_")
        shutil.copytree(directory, fresh)
        f = fresh / "2" / name
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x80
        f.write_bytes(bytes(data))
        assert Checkpointer(fresh).latest_good()[0] == 1, name


@pytest.fixture(scope="module")
def model():
    return load_hf_model(saved_model("llama"), dtype=jnp.float32)


def test_identity_names_the_setting_that_differs(model):
    config, params = model
    tc = TrainConfig(learning_rate=1e-3)
    base = run_identity(config, params, LoraConfig(r=4, lora_alpha=8.0), tc, None)
    changed = {
        "LoRA alpha": (LoraConfig(r=4, lora_alpha=16.0), tc, params),
        "LoRA rank": (LoraConfig(r=8, lora_alpha=8.0), tc, params),
        "LoRA target modules": (LoraConfig(r=4, lora_alpha=8.0, target_modules=("q_proj",)), tc, params),
        "rsLoRA": (LoraConfig(r=4, lora_alpha=8.0, use_rslora=True), tc, params),
        "learning rate": (LoraConfig(r=4, lora_alpha=8.0), TrainConfig(learning_rate=2e-3), params),
        # The same shapes, other values: another fine-tune of the same architecture.
        "base model weights": (
            LoraConfig(r=4, lora_alpha=8.0),
            tc,
            jax.tree.map(lambda x: x * 1.01, params),
        ),
    }
    for label, (lora, t, p) in changed.items():
        with pytest.raises(ResumeMismatchError, match=label) as e:
            check_identity(base, run_identity(config, p, lora, t, None), "ckpt/3")
        assert "--overwrite" in str(e.value) and "ckpt/3" in str(e.value)
    # Neither the layer layout nor the total step count makes it another run.
    check_identity(base, run_identity(config, params, LoraConfig(r=4, lora_alpha=8.0), tc, None), "x")
    longer = TrainConfig(learning_rate=1e-3, max_steps=1000)
    check_identity(base, run_identity(config, params, LoraConfig(r=4, lora_alpha=8.0), longer, None), "x")
    assert weights_fingerprint(unstack_layers(params)) == weights_fingerprint(params)
