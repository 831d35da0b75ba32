"""The entry points of jaxsloth/bench/suites/families_h200.sh's mixture-of-experts workload, on CPU with a tiny
Qwen 3 MoE (the suite runs the same code on Qwen3-30B-A3B): jaxsloth's QLoRA training step through
``jaxsloth.bench.step`` and the transformers + PEFT + bitsandbytes runner's model."""

import json

import numpy as np
import pytest
import torch

from tests.moe_models import saved_moe_model


def test_bench_step_runs_moe_qlora(tmp_path):
    """The tiny model's config sets output_router_logits: the step adds the load-balancing loss and its metric."""
    from jaxsloth.bench import step

    out = tmp_path / "step.jsonl"
    path = saved_moe_model("qwen3_moe")
    step.main(["--model-path", str(path), "--quant", "nf4", "--batch", "1", "--seq", "16", "--steps", "1", "--warmup", "0"] + [
        "--out", str(out)
    ])  # fmt: skip
    rec = json.loads(out.read_text().splitlines()[-1])
    assert rec["tokens_per_s"] > 0 and np.isfinite(rec["first_loss"])
    assert rec["workload"] == "model-qlora-b1-s16"


def test_hf_runner_adapts_every_expert_of_a_moe_model():
    pytest.importorskip("bitsandbytes")
    from transformers import AutoConfig

    from jaxsloth.bench import torch_baseline

    cfg = AutoConfig.from_pretrained(saved_moe_model("qwen3_moe"))
    model = torch_baseline.build_model(cfg, "hf-peft-bnb", "plain", "sdpa", True, device="cpu")
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    wrapped = {m.parameter_name for m in model.modules() if type(m).__name__ == "ParamWrapper"}
    assert wrapped == {"gate_up_proj", "down_proj"}
    ids = torch.randint(0, cfg.vocab_size, (1, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "experts" in n and "lora_" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
