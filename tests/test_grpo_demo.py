"""GRPO through the TRL face teaches the embedded demo model (jaxsloth/demo.py) its cipher task from an exact-match
reward alone. The shipped model echoes deterministically (sampling at temperature 1 never leaves the echo, so every
reward would be 0), so a 12-step SFT warm start on the one-letter cipher first makes its answers vary, still almost
all wrong; then the mean reward rises clearly."""

import numpy as np

import jaxsloth
from jaxsloth import demo
from jaxsloth.faces.grpo import GRPOConfig, GRPOTrainer
from jaxsloth.methods.rewards import exact_answer_reward
from jaxsloth.train.metrics import read_records


def test_grpo_raises_exact_match_reward(tmp_path):
    model, tok = jaxsloth.load(demo.MODEL_DIR, profile="cpu", max_seq_length=64)
    model = jaxsloth.add_lora(model, r=16, lora_alpha=32, seed=0)
    warm_start = [demo.question(letter) for letter in demo.LETTERS]
    jaxsloth.train(model, tok, warm_start, per_device_train_batch_size=8, max_steps=12, learning_rate=2e-3,
                   output_dir=str(tmp_path / "sft"), progress=False)  # fmt: skip
    data = [{"prompt": [{"role": "user", "content": c}], "answer": demo.shift(c)} for c in demo.LETTERS]
    args = GRPOConfig(
        output_dir=str(tmp_path / "grpo"), per_device_train_batch_size=64, num_generations=8, max_completion_length=4,
        learning_rate=3e-3, lr_scheduler_type="constant", max_steps=60, seed=0,
    )  # fmt: skip
    trainer = GRPOTrainer(model, exact_answer_reward(extract=None), args=args, train_dataset=data, processing_class=tok)
    out = trainer.train()
    records = read_records(tmp_path / "grpo" / "metrics.jsonl")
    assert out.global_step == 60 and len(records) == 60
    assert all(r["finite"] for r in records)
    assert {"rewards/accuracy/mean", "completions/mean_length", "clip_ratio/region_mean", "entropy"} <= set(records[0])
    rewards = [r["reward"] for r in records]
    first, last = np.mean(rewards[:10]), np.mean(rewards[-10:])  # measured: 0.05 -> 0.22
    assert first < 0.1, rewards
    assert last > first + 0.1, rewards
