"""PEFT adapter export and import, against PEFT in PyTorch on the same base model."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from converters.hf import load_hf_model
from converters.peft import load_peft_adapter, save_peft_adapter
from converters.safetensors_io import SafetensorsFile
from jaxsloth.lora import LoraConfig
from tests.tiny_models import hf_model, lora_logits, random_trainable, saved_model
from tests.tolerances import assert_close

R, ALPHA = 4, 8.0
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _ids(config):
    return np.random.default_rng(0).integers(0, config.vocab_size, (2, 11))


def _peft_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.float().numpy()


def _peft_load(base_path, adapter_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(hf_model(base_path), str(adapter_dir)).eval()


CASES = {  # family -> (target modules, train embeddings, train lm_head)
    "llama": (ALL, True, True),
    "gemma2": (ALL, True, False),  # tied: the trained embedding is the LM head too
    "qwen2": (ALL, False, False),
    "phi3": (ALL, False, False),  # fused qkv_proj / gate_up_proj, rank 3r and 2r
    "qwen3": (ALL, False, False),  # q/k norms stay frozen
    "qwen2.5": (ALL, True, False),  # tied
    "gemma3": (ALL, True, False),  # tied, q/k norms and per-layer-kind RoPE
    "mistral_nemo": (ALL, False, True),  # q_proj / o_proj not square: heads x head_dim != hidden
    "phi4": (ALL, False, False),  # Phi-3's fused tensors with grouped kv heads: unequal q, k, v row blocks
    "llama3.3": (ALL, False, False),
    "smollm2": (ALL, True, False),  # tied
}
# rsLoRA changes only the scale, family-independently: the first families run both, the rest plain LoRA.
RSLORA_CASES = [(f, r) for f in CASES for r in (False, True) if not r or f in ("llama", "gemma2", "qwen2", "phi3")]


@pytest.mark.parametrize("family,use_rslora", RSLORA_CASES)
def test_exported_adapter_gives_our_logits_in_peft(family, use_rslora, tmp_path):
    targets, embed, head = CASES[family]
    path = saved_model(family)
    config, params = load_hf_model(path, dtype=jnp.float32)
    lora = LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=targets, use_rslora=use_rslora, train_embeddings=embed, train_lm_head=head
    )
    trainable = random_trainable(config, params, lora)
    save_peft_adapter(trainable, lora, config, tmp_path, base_model_name_or_path=str(path))
    ids = _ids(config)
    assert_close(
        lora_logits(params, trainable, lora, config, ids), _peft_logits(_peft_load(path, tmp_path), ids), "f32_logits"
    )


def test_fused_phi3_partial_targets(tmp_path):
    """q and v without k, up without gate: the fused modules get zero blocks of B where a part is not adapted."""
    path = saved_model("phi3")
    config, params = load_hf_model(path, dtype=jnp.float32)
    lora = LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=("q_proj", "v_proj", "up_proj", "down_proj"), use_rslora=True
    )
    trainable = random_trainable(config, params, lora, seed=3)
    save_peft_adapter(trainable, lora, config, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["down_proj", "gate_up_proj", "qkv_proj"]
    assert cfg["rank_pattern"] == {"qkv_proj": 2 * R}
    ids = _ids(config)
    ours = lora_logits(params, trainable, lora, config, ids)
    assert_close(ours, _peft_logits(_peft_load(path, tmp_path), ids), "f32_logits")
    back, lora_back = load_peft_adapter(tmp_path, config)  # round trip through the fused form
    assert_close(lora_logits(params, back, lora_back, config, ids), ours, "f32_logits")


def test_names_and_config_match_peft_save_pretrained(tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    path = saved_model("llama")
    config, params = load_hf_model(path, dtype=jnp.float32)
    lora = LoraConfig(r=R, lora_alpha=ALPHA, train_embeddings=True, train_lm_head=True)
    save_peft_adapter(random_trainable(config, params, lora), lora, config, tmp_path / "ours")
    peft_cfg = PeftLoraConfig(
        r=R,
        lora_alpha=ALPHA,
        target_modules=list(ALL),
        modules_to_save=["embed_tokens", "lm_head"],
        task_type="CAUSAL_LM",
    )
    get_peft_model(hf_model(path), peft_cfg).save_pretrained(tmp_path / "peft")
    ours, theirs = (SafetensorsFile(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "peft"))
    assert set(ours) == set(theirs)
    for k in theirs:
        assert ours.shape(k) == theirs.shape(k), k
    a, b = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "peft"))
    for field in ("peft_type", "task_type", "r", "lora_alpha", "use_rslora", "bias", "use_dora", "fan_in_fan_out"):
        assert a[field] == b[field], field
    assert sorted(a["target_modules"]) == sorted(b["target_modules"])
    assert sorted(a["modules_to_save"]) == sorted(b["modules_to_save"])


def _peft_made_adapter(family, tmp_path, **cfg):
    """An adapter trained-looking in PyTorch: random B, perturbed saved modules; returns (dir, PEFT model)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(hf_model(saved_model(family)), PeftLoraConfig(task_type="CAUSAL_LM", **cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path)
    return tmp_path, model


@pytest.mark.parametrize(
    "family,cfg",
    [
        (
            "llama",
            dict(
                r=R,
                lora_alpha=ALPHA,
                target_modules=list(ALL),
                rank_pattern={"q_proj": 6},
                alpha_pattern={"down_proj": 3.0},
                modules_to_save=["embed_tokens", "lm_head"],
            ),
        ),
        ("phi3", dict(r=R, lora_alpha=ALPHA, use_rslora=True, target_modules=["qkv_proj", "o_proj", "gate_up_proj"])),
        (
            "gemma2",
            dict(
                r=R,
                lora_alpha=ALPHA,
                target_modules=["q_proj", "v_proj"],
                modules_to_save=["embed_tokens"],
                ensure_weight_tying=True,
            ),
        ),
    ],
)
def test_import_peft_made_adapter(family, cfg, tmp_path):
    adapter_dir, peft_model = _peft_made_adapter(family, tmp_path, **cfg)
    config, params = load_hf_model(saved_model(family), dtype=jnp.float32)
    trainable, lora = load_peft_adapter(adapter_dir, config)
    ids = _ids(config)
    assert_close(lora_logits(params, trainable, lora, config, ids), _peft_logits(peft_model, ids), "f32_logits")


@pytest.mark.parametrize(
    "field,value",
    [
        ("use_dora", True),
        ("bias", "all"),
        ("layers_to_transform", [0]),
        ("peft_type", "IA3"),
        ("init_lora_weights", "pissa"),
    ],
)
def test_unsupported_adapter_config_names_the_field(field, value, tmp_path):
    path = saved_model("qwen2")
    config, params = load_hf_model(path, dtype=jnp.float32)
    lora = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=("q_proj",))
    save_peft_adapter(random_trainable(config, params, lora), lora, config, tmp_path)
    cfg_path = tmp_path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg[field] = value
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=field):
        load_peft_adapter(tmp_path, config)


def test_save_adapter_and_load_adapter_round_trip(tmp_path):
    """jaxsloth.save_adapter (tokenizer beside it, the base model's path recorded) -> PEFT and
    jaxsloth.load_adapter give the adapter's logits; load_adapter reads a PEFT-made adapter as PEFT runs it."""
    from transformers import AutoTokenizer

    import jaxsloth
    from jaxsloth.profiles import profile_for_device
    from tests.tiny_tokenizers import CHAT_FAMILIES, tiny_tokenizer

    path = saved_model("qwen2")
    model, _ = jaxsloth.load(path, dtype="float32", profile="cpu")
    model = jaxsloth.add_lora(model, r=R, lora_alpha=ALPHA)
    model.trainable = random_trainable(model.config, model.params, model.lora, seed=6)
    tok = tiny_tokenizer(CHAT_FAMILIES["qwen2"], model.config.vocab_size)
    out = jaxsloth.save_adapter(model, tmp_path / "ours", tokenizer=tok)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(path)
    assert AutoTokenizer.from_pretrained(out).chat_template == tok.chat_template
    ids = _ids(model.config)
    ours = lora_logits(model.params, model.trainable, model.lora, model.config, ids)
    assert_close(_peft_logits(_peft_load(path, out), ids), ours, "f32_logits")
    back = jaxsloth.load_adapter(jaxsloth.Model(model.config, model.params, profile_for_device(name="cpu")), out)
    assert_close(lora_logits(back.params, back.trainable, back.lora, back.config, ids), ours, "f32_logits")

    adapter_dir, peft_model = _peft_made_adapter("qwen2", tmp_path / "peft", r=R, lora_alpha=ALPHA)
    theirs = jaxsloth.load_adapter(model, adapter_dir)
    assert theirs.lora.target_modules == ("q_proj", "v_proj")  # PEFT's default targets for Qwen2
    assert_close(
        lora_logits(model.params, theirs.trainable, theirs.lora, model.config, ids),
        _peft_logits(peft_model, ids),
        "f32_logits",
    )
