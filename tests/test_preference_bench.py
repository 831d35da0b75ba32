"""The DPO bench's runners (jaxsloth/bench/preference_baseline.py, run by suites/preference_h200.sh) on CPU with the
demo architecture: jaxsloth's DPO step, TRL's DPOTrainer on the PEFT + bitsandbytes model, and the Unsloth runner
through a stand-in ``unsloth`` module (Unsloth cannot import without a GPU) around the real TRL trainer. Each
reads the same fixed-length pairs."""

import argparse
import math
import sys
import types

import pytest

from jaxsloth.bench import preference_baseline as bench
from tests.test_bench_baselines import DEMO_MODEL

torch = pytest.importorskip("torch")
pytest.importorskip("trl")
SEQ = 24


def _args(**kw):
    base = dict(arch=None, model_path=str(DEMO_MODEL), profile="cpu", pairs=2, seq=SEQ, steps=1, warmup=1,
                attn="sdpa")  # fmt: skip
    return argparse.Namespace(**{**base, **kw})


def _check(rec, system):
    assert rec["system"] == system and rec["workload"] == f"model-qlora-dpo-p2-s{SEQ}"
    assert rec["timed_steps"] == 1 and rec["tokens_per_s"] == pytest.approx(2 * 2 * SEQ / (rec["step_ms"] / 1e3))


def test_jaxsloth_runner_times_its_dpo_step():
    rec = bench.run_jaxsloth(_args())
    _check(rec, "jaxsloth")
    assert rec["first_loss"] == pytest.approx(math.log(2), abs=1e-5) and rec["finite"]  # B = 0: policy = reference


def test_trl_runner_trains_the_peft_bnb_model_in_train_mode(tmp_path):
    pytest.importorskip("bitsandbytes")
    rec = bench.run_trl(_args(), tmp_path)
    _check(rec, "trl-peft-bnb")
    assert rec["train_mode"] and rec["gradient_checkpointing"]
    assert rec["trl_lengths"] == {"prompt": SEQ // 2, "chosen": SEQ - SEQ // 2, "rejected": SEQ - SEQ // 2}
    assert rec["same_workload"]


def _fake_unsloth(calls: list):
    """Unsloth's calls as its DPO recipe makes them: from_pretrained (inference mode, as Unsloth returns it),
    get_peft_model (checkpointing on), for_training (train mode), PatchDPOTrainer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    class FastLanguageModel:
        @staticmethod
        def from_pretrained(model_name, max_seq_length, dtype, load_in_4bit):
            calls.append(("from_pretrained", load_in_4bit, max_seq_length))
            model = AutoModelForCausalLM.from_pretrained(model_name, dtype=torch.float32).eval()
            return model, AutoTokenizer.from_pretrained(model_name)

        @staticmethod
        def get_peft_model(
            model, r, lora_alpha, lora_dropout, target_modules, bias, use_gradient_checkpointing, random_state
        ):
            calls.append(("get_peft_model", use_gradient_checkpointing))
            cfg = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules)
            # Unsloth's model checkpoints its layers itself (here transformers' checkpointing stands in for it).
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            return get_peft_model(model, cfg)

        @staticmethod
        def for_training(model):
            calls.append(("for_training",))
            model.train()

    def PatchDPOTrainer():  # noqa: N802 (Unsloth's name)
        calls.append(("PatchDPOTrainer",))

    return types.SimpleNamespace(FastLanguageModel=FastLanguageModel, PatchDPOTrainer=PatchDPOTrainer)


def test_unsloth_runner_follows_unslothsdpo_recipe(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setitem(sys.modules, "unsloth", _fake_unsloth(calls))
    rec = bench.run_unsloth(_args(), tmp_path)
    assert calls == [("PatchDPOTrainer",), ("from_pretrained", True, SEQ), ("get_peft_model", "unsloth"),
                     ("for_training",)]  # fmt: skip
    _check(rec, "unsloth")
    assert rec["train_mode"] and rec["gradient_checkpointing"] and rec["patch_dpo_trainer"] and rec["same_workload"]


def test_table_compares_with_each_baseline(tmp_path, capsys):
    rows = [
        {"system": "jaxsloth", "tokens_per_s": 8000.0, "step_ms": 512.0, "peak_gib": 10.0},
        {"system": "trl-peft-bnb", "tokens_per_s": 2000.0, "step_ms": 2048.0, "peak_gib": 20.0},
    ]
    path = tmp_path / "dpo.jsonl"
    path.write_text("".join(f"{__import__('json').dumps(r)}\n" for r in rows))
    assert bench.main(["--table", str(path)]) == 0
    out = capsys.readouterr().out
    assert "| trl-peft-bnb | 2,000 | 2048 | 20.00 | 4.00x | 0.50 |" in out
    assert "| unsloth | (no record) |" in out
