"""TRL's face: TRL's SFT quickstart runs with only the import changed, and each SFTConfig / peft_config argument
reaches jaxsloth's TrainConfig / LoraConfig (defaults checked against TRL's own SFTConfig)."""

import json

import pytest

from jaxsloth import demo
from jaxsloth.faces.trl import lora_settings

QA = [("hi", "hello"), ("2+2", "4"), ("sky", "blue"), ("cat", "meow")]


def messages_dataset():
    from datasets import Dataset

    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA * 4
    ]  # fmt: skip
    return Dataset.from_list(rows)


def test_trl_quickstart_runs_unchanged(tmp_path):
    # --- TRL's quickstart (model id and dataset swapped for tiny local ones) ---
    from peft import LoraConfig

    from jaxsloth import SFTConfig, SFTTrainer  # was: from trl import SFTConfig, SFTTrainer

    dataset = messages_dataset()  # quickstart: load_dataset("trl-lib/Capybara", split="train")
    trainer = SFTTrainer(
        model=str(demo.MODEL_DIR),  # quickstart: "Qwen/Qwen2.5-0.5B"
        train_dataset=dataset,
        args=SFTConfig(
            output_dir=str(tmp_path / "Qwen2.5-0.5B-SFT"),
            max_steps=8,
            per_device_train_batch_size=4,
            learning_rate=1e-2,
            max_length=64,
            logging_steps=1,
            report_to="none",
        ),
        peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
    )
    out = trainer.train()
    # --- checks ---
    assert out.global_step == 8
    records = [json.loads(line) for line in (tmp_path / "Qwen2.5-0.5B-SFT" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert out.training_loss == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    lora = trainer.model.lora
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.target_modules) == (8, 16, 0.0, ("q_proj", "v_proj"))
    tc = trainer.train_config
    assert (tc.max_steps, tc.per_device_train_batch_size, tc.learning_rate) == (8, 4, 1e-2)
    assert trainer.max_length == 64 and trainer.model.max_seq_length == 2048  # 64 for the run only
    saved = trainer.save_model()
    assert json.loads((saved / "adapter_config.json").read_text())["r"] == 8


def test_sft_config_defaults_are_trls():
    """Unset names take TRL's own SFTConfig defaults (checked against trl, installed for reference)."""
    import trl

    from jaxsloth import SFTConfig

    theirs = trl.SFTConfig(output_dir="x", use_cpu=True)  # (its bf16 default needs a GPU)
    ours, length, ignored = SFTConfig(output_dir="x").to_settings()
    assert (ours["learning_rate"], ours["num_train_epochs"], ours["seed"], ours["packing"]) == (
        theirs.learning_rate, theirs.num_train_epochs, theirs.seed, theirs.packing,
    )  # fmt: skip
    assert ours["per_device_train_batch_size"] == theirs.per_device_train_batch_size
    assert length is None and ignored == []


def test_each_sft_config_argument_reaches_train_config(tmp_path):
    from jaxsloth import SFTConfig, SFTTrainer, load

    model, tokenizer = load(demo.MODEL_DIR)
    args = SFTConfig(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, gradient_accumulation_steps=3,
        learning_rate=3e-4, lr_scheduler_type="constant_with_warmup", warmup_ratio=0.1, num_train_epochs=2,
        save_steps=7, packing=True, max_seq_length=48, completion_only_loss=False, seed=11,
        dataset_text_field="body", weight_decay=0.05, optim="sgd", eval_steps=5, bf16=True, push_to_hub=False,
    )  # fmt: skip
    with pytest.warns(UserWarning, match="optim='sgd'.*push_to_hub"):
        trainer = SFTTrainer(model, args=args, train_dataset=[{"body": "x"}], eval_dataset=[{"body": "y"}],
                             processing_class=tokenizer)  # fmt: skip
    tc = trainer.train_config
    assert (tc.per_device_train_batch_size, tc.gradient_accumulation_steps, tc.learning_rate) == (2, 3, 3e-4)
    assert (tc.lr_scheduler_type, tc.warmup_ratio, tc.num_train_epochs, tc.max_steps) == ("constant", 0.1, 2, None)
    assert (tc.save_steps, tc.packing, tc.seed, tc.dataset_text_field, tc.weight_decay) == (7, True, 11, "body", 0.05)
    assert tc.train_on_inputs and tc.output_dir == str(tmp_path / "run") and trainer.max_length == 48
    assert trainer.model.lora is not None  # jaxsloth's default adapter (warned: TRL would train every weight)
    # eval_dataset and eval_steps reach the run; TRL's default eval_strategy "no" evaluates only on evaluate().
    assert tc.eval_steps == 5 and tc.eval_dataset == [{"body": "y"}] and not tc.evaluates
    # assistant_only_loss=True masks prompts; max_steps wins over the epochs, as in transformers.
    ours, _, _ = SFTConfig(assistant_only_loss=True, max_steps=5, num_train_epochs=3).to_settings()
    assert ours["train_on_inputs"] is False and ours["max_steps"] == 5 and "num_train_epochs" not in ours


def test_formatting_func_and_peft_dict():
    from jaxsloth import SFTConfig, SFTTrainer, load

    model, tokenizer = load(demo.MODEL_DIR)
    trainer = SFTTrainer(
        model, args=SFTConfig(max_steps=1), train_dataset=[{"q": "a", "a": "b"}], processing_class=tokenizer,
        formatting_func=lambda e: f"Q: {e['q']} A: {e['a']}", peft_config={"r": 2, "lora_alpha": 4},
    )  # fmt: skip
    assert trainer.train_dataset == [{"text": "Q: a A: b"}] and trainer.settings["dataset_text_field"] == "text"
    assert (trainer.model.lora.r, trainer.model.lora.lora_alpha) == (2, 4)
    with pytest.raises(NotImplementedError, match="bias"):
        lora_settings({"r": 2, "bias": "all"})
    assert lora_settings({"target_modules": "all-linear", "modules_to_save": None}).get("target_modules") is None
