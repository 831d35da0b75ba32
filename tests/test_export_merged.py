"""Merged export (jaxsloth.lora.merge + converters.hf.save_hf_model, what jaxsloth.save_merged does): transformers
loads the merged checkpoint and gives the logits of jaxsloth's unmerged LoRA / QLoRA forward."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from converters.hf import load_hf_model, save_hf_model
from jaxsloth.lora import LoraConfig, merge
from jaxsloth.quant import is_nf4
from tests.tiny_models import lora_logits, random_trainable, saved_model
from tests.tolerances import assert_close

R, ALPHA = 4, 8.0
CASES = {  # family -> (train embeddings, train lm_head)
    "llama": (True, True),
    "gemma2": (True, False),  # tied embeddings: the trained copy is the head too
    "qwen2": (False, False),  # q/k/v biases stay as they are
    "phi3": (False, False),  # fused qkv_proj / gate_up_proj re-fused on export
}


def _hf_logits(path, ids, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=dtype).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.float().numpy()


def _ids(config):
    return np.random.default_rng(0).integers(0, config.vocab_size, (2, 11))


@pytest.mark.parametrize("family", list(CASES))
def test_merged_checkpoint_matches_unmerged_lora(family, tmp_path):
    embed, head = CASES[family]
    config, params = load_hf_model(saved_model(family), dtype=jnp.float32)
    lora = LoraConfig(r=R, alpha=ALPHA, use_rslora=family == "qwen2", train_embeddings=embed, train_lm_head=head)
    trainable = random_trainable(config, params, lora)
    save_hf_model(merge(params, trainable, lora), config, tmp_path)
    ids = _ids(config)
    ours = lora_logits(params, trainable, lora, config, ids)
    assert_close(_hf_logits(tmp_path, ids), ours, "f32_logits")
    # The adapter changes the model: the test would see a merge that dropped it.
    assert np.abs(_hf_logits(saved_model(family), ids) - ours).max() > 1e-2


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_merged_qlora_matches_qlora_forward(family, tmp_path):
    """NF4 base dequantized in f32, plus the LoRA delta: the same weights the QLoRA forward multiplies by, so the
    f32 logits agree to the f32 tolerance."""
    config, params = load_hf_model(saved_model(family), dtype=jnp.float32, load_in_4bit=True)
    assert is_nf4(params["layers"]["q_proj"]["weight"])
    lora = LoraConfig(r=R, alpha=ALPHA)
    trainable = random_trainable(config, params, lora, seed=2)
    save_hf_model(merge(params, trainable, lora, dtype=jnp.float32), config, tmp_path, dtype=jnp.float32)
    ids = _ids(config)
    assert_close(_hf_logits(tmp_path, ids), lora_logits(params, trainable, lora, config, ids), "f32_logits")


def test_save_merged_api_bf16_from_qlora(tmp_path):
    """jaxsloth.save_merged's default: a bf16 checkpoint (weights rounded to 8-bit mantissas), run by transformers
    in f32, against the f32 QLoRA forward; compared relative to the logit scale at the bf16 tolerance."""
    import jaxsloth
    from converters.safetensors_io import SafetensorsFile
    from jaxsloth.profiles import profile_for_device

    config, params = load_hf_model(saved_model("llama"), dtype=jnp.float32, load_in_4bit=True)
    lora = LoraConfig(r=R, alpha=ALPHA)
    trainable = random_trainable(config, params, lora, seed=4)
    model = jaxsloth.Model(config, params, profile_for_device(name="cpu"), lora=lora, trainable=trainable)
    jaxsloth.save_merged(model, tmp_path)
    stored = SafetensorsFile(tmp_path / "model.safetensors")
    assert {stored[k].dtype.name for k in stored} == {"bfloat16"}
    ids = _ids(config)
    ref = lora_logits(params, trainable, lora, config, ids)
    scale = np.abs(ref).max()
    assert_close(_hf_logits(tmp_path, ids) / scale, ref / scale, "bf16")
