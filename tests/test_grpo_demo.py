"""GRPO through the TRL face teaches the embedded demo model (jaxsloth/demo.py) its cipher task from an exact-match
reward alone: after a short SFT warm start that leaves most answers wrong, the mean reward rises clearly."""

import numpy as np

import jaxsloth
from jaxsloth import demo
from jaxsloth.faces.grpo import GRPOConfig, GRPOTrainer
from jaxsloth.methods.rewards import exact_answer_reward
from jaxsloth.train.metrics import read_records


def test_grpo_raises_exact_match_reward(tmp_path):
    model, tok = jaxsloth.load(demo.MODEL_DIR, profile="cpu", max_seq_length=64)
    train, _ = demo.task_splits(num_train=200, num_heldout=0, seed=1)
    model = jaxsloth.add_lora(model, r=16, lora_alpha=32, seed=0)
    jaxsloth.train(model, tok, train, per_device_train_batch_size=8, max_steps=20, learning_rate=2e-3,
                   output_dir=str(tmp_path / "sft"), save_steps=1000)  # fmt: skip
    data = [{"prompt": r["messages"][:1], "answer": r["messages"][1]["content"]} for r in train]
    args = GRPOConfig(
        output_dir=str(tmp_path / "grpo"), per_device_train_batch_size=32, num_generations=8, max_completion_length=10,
        learning_rate=3e-3, lr_scheduler_type="constant", max_steps=16, beta=0.0, seed=0,
    )  # fmt: skip
    trainer = GRPOTrainer(model, exact_answer_reward(extract=None), args=args, train_dataset=data, processing_class=tok)
    out = trainer.train()
    records = read_records(tmp_path / "grpo" / "metrics.jsonl")
    assert out.global_step == 16 and len(records) == 16
    rewards = [r["reward"] for r in records]
    print(rewards)
    first, last = np.mean(rewards[:4]), np.mean(rewards[-4:])
    assert first < 0.6
    assert last > first + 0.2
    assert all(r["finite"] for r in records)
    assert {"rewards/accuracy/mean", "completions/mean_length", "clip_ratio/region_mean", "entropy"} <= set(records[0])
