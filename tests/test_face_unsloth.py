"""Unsloth's face: the cells of Unsloth's Llama-3 Alpaca notebook run with only the import changed (and a tiny local
model, a small in-memory dataset, a few steps at 64 tokens)."""

import json

import jax
import numpy as np
import pytest

import jaxsloth
from jaxsloth import FastLanguageModel, demo


def test_unsloth_alpaca_notebook_runs_unchanged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # --- the notebook (model name, dataset and step count swapped for tiny local ones) ---
    from datasets import Dataset

    from jaxsloth import FastLanguageModel  # was: from unsloth import FastLanguageModel

    max_seq_length = 64  # notebook: 2048
    dtype = None
    load_in_4bit = True

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(demo.MODEL_DIR),  # notebook: "unsloth/llama-3-8b-bnb-4bit"
        max_seq_length=max_seq_length,
        dtype=dtype,
        load_in_4bit=load_in_4bit,
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lora_alpha=16,
        lora_dropout=0,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=3407,
        use_rslora=False,
        loftq_config=None,
    )
    # The notebook's template, shortened to fit the tiny model's 128 positions (its tokenizer is per character).
    alpaca_prompt = """### Instruction:
{}
### Input:
{}
### Response:
{}"""
    EOS_TOKEN = tokenizer.eos_token

    def formatting_prompts_func(examples):
        instructions = examples["instruction"]
        inputs = examples["input"]
        outputs = examples["output"]
        texts = []
        for instruction, input, output in zip(instructions, inputs, outputs):
            text = alpaca_prompt.format(instruction, input, output) + EOS_TOKEN
            texts.append(text)
        return {"text": texts}

    rows = [
        {"instruction": "Add the numbers.", "input": f"{a} {b}", "output": str(a + b)}
        for a in range(4)
        for b in range(4)
    ]
    dataset = Dataset.from_list(rows)  # notebook: load_dataset("yahma/alpaca-cleaned", split="train")
    dataset = dataset.map(formatting_prompts_func, batched=True)

    from jaxsloth import SFTConfig, SFTTrainer  # was: from trl import SFTConfig, SFTTrainer

    trainer = SFTTrainer(
        model=model,
        tokenizer=tokenizer,
        train_dataset=dataset,
        dataset_text_field="text",
        max_seq_length=max_seq_length,
        dataset_num_proc=1,  # notebook: 2
        packing=False,
        args=SFTConfig(
            per_device_train_batch_size=2,
            gradient_accumulation_steps=4,
            warmup_steps=5,
            max_steps=6,  # notebook: 60
            learning_rate=2e-4,
            logging_steps=1,
            optim="adamw_8bit",
            weight_decay=0.01,
            lr_scheduler_type="linear",
            seed=3407,
            output_dir="outputs",
            report_to="none",
        ),
    )
    trainer_stats = trainer.train()
    print(f"{trainer_stats.metrics['train_runtime']} seconds used for training.")

    FastLanguageModel.for_inference(model)
    inputs = tokenizer([alpaca_prompt.format("Add the numbers.", "1 2", "")], return_tensors="pt")  # .to("cuda")
    outputs = model.generate(**inputs, max_new_tokens=64, use_cache=True)
    decoded = tokenizer.batch_decode(outputs)

    model.save_pretrained("lora_model")
    tokenizer.save_pretrained("lora_model")
    model.save_pretrained_merged("model", tokenizer, save_method="merged_16bit")
    # --- checks ---
    assert trainer_stats.global_step == 6 and np.isfinite(trainer_stats.training_loss)
    tc, lora = trainer.train_config, model.lora
    assert (tc.per_device_train_batch_size, tc.gradient_accumulation_steps, tc.warmup_steps, tc.max_steps) == (
        2,
        4,
        5,
        6,
    )
    assert (tc.learning_rate, tc.weight_decay, tc.lr_scheduler_type, tc.seed) == (2e-4, 0.01, "linear", 3407)
    assert (tc.packing, tc.dataset_text_field) == (False, "text")
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.use_rslora) == (16, 16, 0, False)
    assert model.profile.remat == "offload" and model.max_seq_length == 64 and model.for_inference_mode
    assert (tmp_path / "outputs" / "metrics.jsonl").exists()
    # transformers-style generate: the prompt's ids, then the same answer jaxsloth's text generate gives.
    prompt_ids = inputs["input_ids"][0].tolist()
    assert outputs.shape[0] == 1 and outputs[0, : len(prompt_ids)].tolist() == prompt_ids
    text = model.generate(tokenizer, alpaca_prompt.format("Add the numbers.", "1 2", ""), max_new_tokens=64)[0]
    assert tokenizer.decode(outputs[0, len(prompt_ids) :], skip_special_tokens=True) == text
    assert decoded[0].startswith(tokenizer.decode(prompt_ids))
    config = json.loads((tmp_path / "lora_model" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (
        16, 16, sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    )  # fmt: skip
    reloaded = jaxsloth.load_adapter(model, tmp_path / "lora_model")
    for a, b in zip(jax.tree.leaves(reloaded.trainable), jax.tree.leaves(model.trainable), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (tmp_path / "lora_model" / "tokenizer.json").exists()
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model")  # a 16-bit transformers checkpoint
    assert merged.config.vocab_size == model.config.vocab_size


@pytest.fixture(scope="module")
def loaded():
    return FastLanguageModel.from_pretrained(str(demo.MODEL_DIR), max_seq_length=64, load_in_4bit=False)


def test_from_pretrained_maps_unsloth_defaults():
    model, tokenizer = FastLanguageModel.from_pretrained(str(demo.MODEL_DIR), max_seq_length=32, dtype="float32")
    assert model.params is not None and tokenizer is not None
    assert model.max_seq_length == 32 and model.profile.dtype.name == "float32"
    assert not isinstance(model.params["layers"]["q_proj"]["weight"], jax.Array)  # Unsloth's default: 4-bit


def test_from_pretrained_names_ignored_arguments():
    with pytest.warns(UserWarning, match="device_map"):
        FastLanguageModel.from_pretrained(str(demo.MODEL_DIR), load_in_4bit=False, device_map="auto")
    with pytest.raises(TypeError, match="not_a_setting"):
        FastLanguageModel.from_pretrained(str(demo.MODEL_DIR), not_a_setting=1)


@pytest.mark.parametrize(
    "arg", [{"bias": "all"}, {"loftq_config": {"loftq_bits": 4}}, {"init_lora_weights": "gaussian"}]
)
def test_get_peft_model_refuses_what_would_change_the_adapter(loaded, arg):
    with pytest.raises(NotImplementedError, match=next(iter(arg))):
        FastLanguageModel.get_peft_model(loaded[0], **arg)


@pytest.mark.parametrize("checkpointing, remat", [("unsloth", "offload"), (True, "full"), (False, "none")])
def test_get_peft_model_maps_arguments(loaded, checkpointing, remat):
    model = FastLanguageModel.get_peft_model(
        loaded[0], r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "embed_tokens"],
        modules_to_save=["lm_head"], use_gradient_checkpointing=checkpointing, random_state=7, use_rslora=True,
    )  # fmt: skip
    lora = model.lora
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.use_rslora) == (4, 8, 0.1, True)
    assert lora.target_modules == ("q_proj", "v_proj") and lora.train_embeddings and lora.train_lm_head
    assert model.profile.remat == remat
    same_seed = jaxsloth.add_lora(
        loaded[0], seed=7, r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
        train_embeddings=True, train_lm_head=True, use_rslora=True,
    )  # fmt: skip
    a = np.asarray(model.trainable["layers"]["q_proj"]["a"])
    np.testing.assert_array_equal(a, np.asarray(same_seed.trainable["layers"]["q_proj"]["a"]))


@pytest.mark.parametrize("method, quantization", [("q8_0", "q8_0"), ("f16", "f16"), ("fast_quantized", "q8_0")])
def test_save_pretrained_gguf_calls_save_gguf(loaded, tmp_path, monkeypatch, method, quantization):
    """The GGUF writer itself is checked against llama.cpp (test_export_gguf); here: the arguments it gets."""
    calls = []
    monkeypatch.setattr(jaxsloth.api, "save_gguf", lambda *a, **k: calls.append((a, k)))
    model, tokenizer = loaded
    model.save_pretrained_gguf(tmp_path / "gguf", tokenizer, quantization_method=method)
    ((args, kwargs),) = calls
    assert args == (model, tokenizer, tmp_path / "gguf" / f"model-{quantization}.gguf")
    assert kwargs == {"quantization": quantization}
    with pytest.raises(ValueError, match="q4_k_m"):
        model.save_pretrained_gguf(tmp_path / "gguf", tokenizer, quantization_method="q4_k_m")
