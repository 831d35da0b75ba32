"""Merged export (jaxsloth.lora.merge + converters.hf.save_hf_model, what jaxsloth.save_merged does): transformers
loads the merged checkpoint and gives the logits of jaxsloth's unmerged LoRA / QLoRA forward."""

import json

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
    "qwen3": (False, True),  # q/k norm weights written back beside the merged projections
    "qwen2.5": (True, False),
    "gemma3": (True, False),
    "mistral_nemo": (False, False),
    "phi4": (False, False),
    "llama3.3": (False, False),
    "smollm2": (True, False),
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
    lora = LoraConfig(r=R, lora_alpha=ALPHA, use_rslora=family == "qwen2", train_embeddings=embed, train_lm_head=head)
    trainable = random_trainable(config, params, lora)
    save_hf_model(merge(params, trainable, lora), config, tmp_path)
    ids = _ids(config)
    ours = lora_logits(params, trainable, lora, config, ids)
    assert_close(_hf_logits(tmp_path, ids), ours, "f32_logits")
    # The adapter changes the model: the test would see a merge that dropped it.
    assert np.abs(_hf_logits(saved_model(family), ids) - ours).max() > 1e-2


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma3"])
def test_merged_qlora_matches_qlora_forward(family, tmp_path):
    """NF4 base dequantized in f32, plus the LoRA delta: the same weights the QLoRA forward multiplies by, so the
    f32 logits agree to the f32 tolerance."""
    config, params = load_hf_model(saved_model(family), dtype=jnp.float32, load_in_4bit=True)
    assert is_nf4(params["layers"]["q_proj"]["weight"])
    lora = LoraConfig(r=R, lora_alpha=ALPHA)
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
    lora = LoraConfig(r=R, lora_alpha=ALPHA)
    trainable = random_trainable(config, params, lora, seed=4)
    model = jaxsloth.Model(config, params, profile_for_device(name="cpu"), lora=lora, trainable=trainable)
    jaxsloth.save_merged(model, tmp_path)
    stored = SafetensorsFile(tmp_path / "model.safetensors")
    assert {stored[k].dtype.name for k in stored} == {"bfloat16"}
    ids = _ids(config)
    ref = lora_logits(params, trainable, lora, config, ids)
    scale = np.abs(ref).max()
    assert_close(_hf_logits(tmp_path, ids) / scale, ref / scale, "bf16")


def test_save_merged_folder_works_alone(tmp_path):
    """save_merged's folder, sharded, with the tokenizer files and generation_config.json copied from the source
    model: AutoTokenizer, GenerationConfig and AutoModelForCausalLM load it, and transformers' generate from the
    folder alone gives jaxsloth's greedy chat answer (stopping at the source's stop tokens)."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    import jaxsloth
    from converters.safetensors_io import SafetensorsFile
    from tests.tiny_tokenizers import CHAT_FAMILIES, tiny_tokenizer, write_special_ids

    case = CHAT_FAMILIES["llama-3.2"]
    source = tmp_path / "source"
    shutil.copytree(saved_model("llama"), source)
    tok = tiny_tokenizer(case, 131)
    tok.save_pretrained(source)
    write_special_ids(source, case, tok)
    model, tokenizer = jaxsloth.load(source, dtype="float32", profile="cpu")
    lora = LoraConfig(r=R, lora_alpha=ALPHA)
    model = jaxsloth.add_lora(model, r=R, lora_alpha=ALPHA)
    model.trainable = random_trainable(model.config, model.params, lora, seed=5)

    out = jaxsloth.save_merged(model, tmp_path / "merged", dtype="float32", max_shard_size="200KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    for shard in shards:  # each shard within the limit, unless one tensor alone exceeds it
        f = SafetensorsFile(out / shard)
        assert len(f) == 1 or sum(f[k].nbytes for k in f) <= 200_000

    loaded_tok = AutoTokenizer.from_pretrained(out)
    assert loaded_tok.chat_template == tok.chat_template
    messages = [{"role": "user", "content": "Hi there"}]
    ids = loaded_tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert ids == tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    stops = tok.convert_tokens_to_ids(case["generation_eos"])
    assert GenerationConfig.from_pretrained(out).eos_token_id == stops
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        new = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids) :].tolist()
    assert model.generate(tokenizer, [messages], max_new_tokens=8) == [loaded_tok.decode(new, skip_special_tokens=True)]


def test_save_merged_writes_the_tokenizer_passed_and_config_ids(tmp_path):
    """A tokenizer passed explicitly is saved; with no source generation config one is written from config.json."""
    from transformers import AutoTokenizer, GenerationConfig

    import jaxsloth
    from jaxsloth.profiles import profile_for_device
    from tests.tiny_tokenizers import CHAT_FAMILIES, tiny_tokenizer

    config, params = load_hf_model(saved_model("qwen2"), dtype=jnp.float32)
    model = jaxsloth.Model(config, params, profile_for_device(name="cpu"))
    tok = tiny_tokenizer(CHAT_FAMILIES["qwen2"], config.vocab_size)
    out = jaxsloth.save_merged(model, tmp_path, tokenizer=tok)
    assert AutoTokenizer.from_pretrained(out).chat_template == tok.chat_template
    gc = GenerationConfig.from_pretrained(out)
    assert (gc.bos_token_id, gc.eos_token_id, gc.pad_token_id) == (1, 2, 0)  # tests/tiny_models.py's ids


def test_save_merged_copies_files_of_a_hub_model_from_the_cache(tmp_path, monkeypatch):
    """A model loaded by Hub id: its tokenizer and generation config come from the local Hugging Face cache."""
    import huggingface_hub.constants
    from transformers import AutoTokenizer, GenerationConfig

    import jaxsloth
    from jaxsloth.profiles import profile_for_device
    from tests.tiny_tokenizers import CHAT_FAMILIES, tiny_tokenizer

    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "0123abcd"
    tok = tiny_tokenizer(CHAT_FAMILIES["gemma"], 131)
    tok.save_pretrained(snapshot)
    (snapshot / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 5]}))
    (tmp_path / "hub" / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    config, params = load_hf_model(saved_model("qwen2"), dtype=jnp.float32)
    model = jaxsloth.Model(config, params, profile_for_device(name="cpu"), path="org/tiny")
    out = jaxsloth.save_merged(model, tmp_path / "merged")
    assert AutoTokenizer.from_pretrained(out).chat_template == tok.chat_template
    assert GenerationConfig.from_pretrained(out).eos_token_id == [1, 5]
