"""Nothing overwritten without a word: output-directory locks, starting fresh over another run, exports into
non-empty directories, add_lora over an existing adapter."""

import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

import jaxsloth
from converters.hf import load_hf_model
from jaxsloth.profiles import profile_for_device
from jaxsloth.train.run_dir import OutputDirInUseError, check_output_dir, clear_run_outputs, run_lock
from tests.tiny_models import saved_model


def test_second_run_on_one_output_dir_is_refused_with_the_first_pid(tmp_path):
    with run_lock(tmp_path):
        with pytest.raises(OutputDirInUseError, match=f"pid {os.getpid()}"):
            with run_lock(tmp_path):
                pass
    assert not (tmp_path / ".jaxsloth.lock").exists()
    with run_lock(tmp_path):  # released: free again
        pass


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    (tmp_path / ".jaxsloth.lock").write_text(f"{int(dead.stdout)} {socket.gethostname()}\n")
    with run_lock(tmp_path):
        assert (tmp_path / ".jaxsloth.lock").read_text().startswith(f"{os.getpid()} ")


def test_fresh_start_over_another_runs_checkpoints_needs_overwrite(tmp_path):
    (tmp_path / "checkpoints" / "40").mkdir(parents=True)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "mine.txt").write_text("user file")
    check_output_dir(tmp_path, resume=True, overwrite=False)  # resuming it is fine
    with pytest.raises(FileExistsError, match="step 40.*--overwrite"):
        check_output_dir(tmp_path, resume=False, overwrite=False)
    check_output_dir(tmp_path, resume=False, overwrite=True)
    clear_run_outputs(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]  # only our own outputs removed


@pytest.fixture(scope="module")
def model():
    config, params = load_hf_model(saved_model("llama"), dtype=jnp.float32)
    m = jaxsloth.Model(config, params, profile_for_device(name="cpu"), max_seq_length=32)
    return jaxsloth.add_lora(m, r=2, lora_alpha=4)


def test_add_lora_over_an_adapter_needs_overwrite(model):
    with pytest.raises(ValueError, match="already has a LoRA adapter.*overwrite=True"):
        jaxsloth.add_lora(model, r=4)
    fresh = jaxsloth.add_lora(model, r=4, overwrite=True)
    assert fresh.lora.r == 4 and model.lora.r == 2


def test_exports_refuse_non_empty_dirs_and_replace_only_their_files(model, tmp_path):
    adapter = jaxsloth.save_adapter(model, tmp_path / "a")
    # A merged model into the adapter folder: refused, naming what is there.
    with pytest.raises(FileExistsError, match="adapter_config.json.*overwrite=True"):
        jaxsloth.save_merged(model, adapter, dtype="float32")
    (adapter / "notes.txt").write_text("mine")
    jaxsloth.save_merged(model, adapter, dtype="float32", overwrite=True)
    names = sorted(p.name for p in adapter.iterdir())
    assert names == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "notes.txt",
    ]  # no stale adapter files


def test_disk_full_during_export_leaves_no_partial_file(model, tmp_path, monkeypatch):
    import errno

    from converters import safetensors_io

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors_io.os, "fsync", full)
    with pytest.raises(OSError, match="No space left on device") as e:
        jaxsloth.save_adapter(model, tmp_path / "a")
    assert e.value.filename == str(tmp_path / "a")
    assert list((tmp_path / "a").iterdir()) == []


def test_missing_tokenizer_says_how_to_pass_one(model):
    with pytest.raises(ValueError, match="--tokenizer"):
        jaxsloth.train(model, None, [{"text": "x"}], max_steps=1)
