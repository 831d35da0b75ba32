"""The PyTorch baselines train as their users train them: train mode, gradient checkpointing where asked, and for
Unsloth ``FastLanguageModel.for_training`` before the timed steps (CPU: the tiny demo architecture; Unsloth, which
cannot import without a GPU, through a stand-in module that records the calls)."""

import argparse
import sys
import types
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from jaxsloth.bench import cli, torch_baseline, unsloth_baseline  # noqa: E402

DEMO_MODEL = Path(__file__).parents[1] / "jaxsloth" / "demo_assets" / "model"


def _args(**kw):
    base = dict(arch=None, model_path=str(DEMO_MODEL), attn="sdpa", batch=1, seq=16, steps=1, warmup=0)
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize(
    "system,variant,checkpointing",
    [
        ("hf-peft", "plain", True),
        ("hf-peft", "plain", False),
        ("hf-peft-bnb", "plain", True),
        ("hf-peft-bnb", "kbit", True),
    ],
)
def test_hf_runner_builds_its_model_in_train_mode(system, variant, checkpointing):
    if system == "hf-peft-bnb":
        pytest.importorskip("bitsandbytes")
    cfg, name = torch_baseline.hf_config(_args())
    model = torch_baseline.build_model(cfg, system, variant, "sdpa", checkpointing, device="cpu")
    assert name == "model" and model.training
    assert model.is_gradient_checkpointing == checkpointing
    assert torch_baseline.training_evidence(model) == {"train_mode": True, "gradient_checkpointing": checkpointing}
    if system == "hf-peft-bnb":
        assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
        norms = [p.dtype for n, p in model.named_parameters() if "norm" in n]
        # prepare_model_for_kbit_training upcasts the non-quantized weights to f32; the plain variant keeps bf16.
        assert set(norms) == ({torch.float32} if variant == "kbit" else {torch.bfloat16})
    label = torch_baseline.variant_label(variant, "sdpa", checkpointing)
    assert ("prepare_model_for_kbit_training" in label) == (variant == "kbit")
    torch_baseline.check_training(torch_baseline.training_evidence(model), checkpointing, system)
    with pytest.raises(RuntimeError, match="refusing to report"):
        torch_baseline.check_training(torch_baseline.training_evidence(model), not checkpointing, system)
    model.eval()
    with pytest.raises(RuntimeError, match="not in train mode"):
        torch_baseline.check_training(torch_baseline.training_evidence(model), checkpointing, system)


def test_hf_runner_rejects_a_variant_that_does_not_apply():
    cfg, _ = torch_baseline.hf_config(_args())
    with pytest.raises(ValueError, match="does not apply to hf-peft"):
        torch_baseline.build_model(cfg, "hf-peft", "kbit", "sdpa", True, device="cpu")


def _fake_unsloth(calls: list, *, train: bool = True):
    """A stand-in ``unsloth`` module: from_pretrained returns the tiny model in inference mode (as Unsloth's does),
    get_peft_model wraps it with PEFT, for_training switches train mode and the layers' checkpointing flag on (as
    Unsloth's does; ``train=False`` leaves the model as it is)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    class FastLanguageModel:
        @staticmethod
        def from_pretrained(model_name, max_seq_length, dtype, load_in_4bit):
            calls.append(("from_pretrained", load_in_4bit))
            return AutoModelForCausalLM.from_pretrained(model_name, dtype=torch.float32).eval(), None

        @staticmethod
        def get_peft_model(
            model, r, lora_alpha, lora_dropout, target_modules, bias, use_gradient_checkpointing, random_state
        ):
            calls.append(("get_peft_model", use_gradient_checkpointing))
            cfg = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules)
            return get_peft_model(model, cfg)

        @staticmethod
        def for_training(model):
            calls.append(("for_training",))
            if train:
                for m in model.modules():
                    if hasattr(m, "gradient_checkpointing"):
                        m.gradient_checkpointing = True
                model.train()

    return types.SimpleNamespace(FastLanguageModel=FastLanguageModel)


@pytest.mark.parametrize("train", [True, False])
def test_unsloth_runner_calls_for_training_before_timing(monkeypatch, tmp_path, train):
    calls = []
    monkeypatch.setitem(sys.modules, "unsloth", _fake_unsloth(calls, train=train))

    def fake_timing(model, vocab, batch, seq, steps, warmup):
        calls.append(("timed", model.training))
        return 10.0, 1.0

    monkeypatch.setattr(torch_baseline, "time_lora_training", fake_timing)
    args = _args(quant="nf4", batch=2, seq=16)
    if not train:
        with pytest.raises(RuntimeError, match="not in train mode"):
            unsloth_baseline.run(args, tmp_path)
        assert [c[0] for c in calls] == ["from_pretrained", "get_peft_model", "for_training"]
        return
    rec = unsloth_baseline.run(args, tmp_path)
    assert calls == [
        ("from_pretrained", True),
        ("get_peft_model", "unsloth"),
        ("for_training",),
        ("timed", True),
    ]
    assert rec["train_mode"] and rec["gradient_checkpointing"] and "for_training" in rec["variant"]
    assert rec["tokens_per_s"] == pytest.approx(2 * 16 / 0.01) and rec["workload"] == "model-qlora-b2-s16"


def test_bench_runs_both_bnb_variants_and_compares_with_the_faster(tmp_path):
    seen = []

    def runner(system, model, quant, batch, seq, steps, out):
        return [sys.executable, "-c", "pass"]

    bench = cli.Bench(tmp_path, runner=runner, log=lambda m: None)
    bench.measure = lambda system, model, quant, batch, seq, extra=(), **kw: seen.append((system, tuple(extra)))
    cli.run_all(bench, ["llama3.2-1b"], ["jaxsloth", "hf-peft-bnb"], ["nf4"], batch=1, seq=8)
    assert seen == [
        ("jaxsloth", ()),
        ("hf-peft-bnb", ("--variant", "plain")),
        ("hf-peft-bnb", ("--variant", "kbit")),
    ]
    from jaxsloth.bench import report

    rows = [
        {"system": "hf-peft-bnb", "tokens_per_s": 6000.0, "run": "a", "variant": "plain"},
        {"system": "hf-peft-bnb", "tokens_per_s": 3000.0, "run": "a", "variant": "kbit"},
        {"system": "jaxsloth", "tokens_per_s": 9000.0, "run": "a"},
    ]
    assert report._pick_baseline(rows, rows[2], "hf-peft-bnb")["variant"] == "plain"
