"""GRPO's checkpoints, evaluation and device mesh, on the demo's shipped tiny model (CPU).

- SIGTERM after a step that falls inside a reused generation (num_iterations=2) and SIGTERM while the next
  generation is being scored, each followed by a resume through the TRL face: the metrics.jsonl rows and the adapter
  equal an uninterrupted run's.
- Evaluation on eval_dataset: the records carry TRL's eval_ names (the metric names read from TRL's own
  GRPOTrainer source), and eval_reward, eval_reward_std, eval_completions/mean_length and eval_loss equal what the
  completions the reward function saw give, computed here from TRL's formulas.
- A 2-device data mesh (virtual CPU devices, in a subprocess) trains with the losses and LoRA weights of one device;
  the axes GRPO cannot use are refused in one line.
"""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxsloth
from jaxsloth import demo
from jaxsloth.faces.grpo import GRPOConfig, GRPOTrainer
from jaxsloth.methods.grpo_eval import hold_out
from jaxsloth.train.checkpoint import Checkpointer
from jaxsloth.train.interrupts import TrainingInterrupted
from jaxsloth.train.metrics import read_records
from tests.tolerances import assert_close

ROOT = Path(__file__).resolve().parents[1]
TIMING = {"generate_s", "reward_s", "train_s", "step_time_s", "tokens_per_s", "peak_gib", "eval_runtime_s"}
PROMPTS = [{"prompt": [{"role": "user", "content": c}]} for c in demo.LETTERS[:8]]


def length_reward(prompts, completions, **kwargs):
    return [float(len(c[-1]["content"])) for c in completions]


def _model():
    model, tok = jaxsloth.load(demo.MODEL_DIR, profile="cpu", max_seq_length=64)
    return jaxsloth.add_lora(model, r=4, lora_alpha=8, seed=0), tok


TRAIN_ROWS = [{**r, "split": "train"} for r in PROMPTS]
EVAL_ROWS = [{"prompt": [{"role": "user", "content": c}], "split": "eval"} for c in demo.LETTERS[8:12]]


def _trainer(out, reward=length_reward, **args):
    model, tok = _model()
    config = GRPOConfig(
        output_dir=str(out), num_generations=4, per_device_train_batch_size=8, max_completion_length=4,
        temperature=4.0, learning_rate=1e-2, max_steps=6, num_iterations=2, beta=0.04, seed=5, eval_strategy="steps",
        eval_steps=2, per_device_eval_batch_size=8, **args,
    )  # fmt: skip
    return GRPOTrainer(model, reward, args=config, train_dataset=TRAIN_ROWS, eval_dataset=EVAL_ROWS,
                       processing_class=tok)  # fmt: skip


def _rows(out) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_records(Path(out) / "metrics.jsonl")]


def _trl_metric_names() -> set[str]:
    """The metric names TRL's GRPOTrainer logs (``self._metrics[mode]["name"]``), read from its source."""
    import trl.trainer.grpo_trainer as source

    text = Path(source.__file__).read_text()
    names = set(re.findall(r'_metrics\[mode\]\["([^"]+)"\]', text))
    return names | {f"rewards/length_reward/{s}" for s in ("mean", "std")}  # f"rewards/{reward_func_name}/mean"


def _check_evals(evals: list[dict], seen: list) -> None:
    """The eval records against TRL's names and, from the completions the reward function saw (``seen``: each eval
    batch's completion token counts and rewards), TRL's formulas."""
    ours = {k.removeprefix("eval_") for k in evals[0]} - {"step", "loss", "runtime_s"}
    assert ours <= _trl_metric_names(), ours - _trl_metric_names()
    assert {"reward", "reward_std", "rewards/length_reward/mean", "rewards/length_reward/std", "frac_reward_zero_std",
            "completions/mean_length", "completions/clipped_ratio", "entropy", "clip_ratio/region_mean", "kl"} <= ours  # fmt: skip
    assert len(seen) == 2 * len(evals)  # 4 prompts, 2 per batch (8 completions): 2 batches per evaluation
    for i, record in enumerate(evals):
        batches = seen[2 * i : 2 * i + 2]
        assert_close(record["eval_reward"], np.mean([np.mean(r) for _, r in batches]), "f32")
        assert_close(record["eval_rewards/length_reward/mean"], record["eval_reward"], "f32")
        assert_close(record["eval_reward_std"], np.mean([np.std(r, ddof=1) for _, r in batches]), "f32")
        assert_close(record["eval_completions/mean_length"], np.mean([np.mean(n) for n, _ in batches]), "f32")
        assert record["eval_entropy"] > 0 and record["eval_kl"] >= 0 and record["eval_runtime_s"] > 0
        # TRL's eval loss (ratio 1, dapo, beta * KL besides): -sum_i A_i n_i / sum_i n_i + beta * mean KL per batch,
        # A the group-normalised reward; transformers' evaluation loop weighs batches by their completions (equal here).
        policy = []
        for n, r in batches:
            groups = np.asarray(r).reshape(-1, 4)
            adv = (groups - groups.mean(1, keepdims=True)) / (groups.std(1, ddof=1, keepdims=True) + 1e-4)
            policy.append(-np.sum(adv.reshape(-1) * np.asarray(n)) / np.sum(n))
        assert_close(record["eval_loss"], np.mean(policy) + 0.04 * record["eval_kl"], "f32")


def test_sigterm_mid_generation_and_while_scoring_resume_exactly_with_trl_evals(tmp_path):
    seen = []  # each eval batch's (completion token counts, rewards) in the uninterrupted run

    def watched_reward(prompts, completions, completion_ids, split, **kwargs):
        rewards = length_reward(prompts, completions)
        if split[0] == "eval":
            seen.append(([len(c) for c in completion_ids], rewards))
        return rewards

    watched_reward.__name__ = "length_reward"
    reference = _trainer(tmp_path / "ref", reward=watched_reward)
    reference.train()
    evals = [r for r in read_records(tmp_path / "ref" / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    _check_evals(evals, seen)
    # trainer.evaluate() samples from the same seeds: the run's last evaluation, of the same adapter.
    once = reference.evaluate()
    assert {k: v for k, v in once.items() if k != "eval_runtime"} == {
        k: v for k, v in evals[-1].items() if k not in ("step", "eval_runtime_s")
    }
    out = tmp_path / "run"

    # 1. SIGTERM as step 3's record reaches the logs: step 3 trained on generation 2's samples, which step 4 reuses.
    def sigterm_at_step_3(record):
        if record.get("step") == 3:
            signal.raise_signal(signal.SIGTERM)

    first = _trainer(out)
    first.callbacks = [sigterm_at_step_3]
    with pytest.raises(TrainingInterrupted) as e:
        first.train()
    assert e.value.exit_code == 143 and e.value.saved_step == 3
    reader = Checkpointer(out / "checkpoints")
    assert reader.read_meta(3)["reuse"]["done"] == 1  # the reused generation's batch is kept, one step trained on it
    reader.close()
    assert [r["step"] for r in read_records(out / "metrics.jsonl")] == [1, 2, 2, 3]  # step 2's evaluation too

    # 2. SIGTERM while generation 3 (for step 5) is being scored: the checkpoint keeps step 4, before its sampling.
    def reward_then_sigterm(prompts, completions, trainer_state, split, **kwargs):
        if trainer_state.global_step == 4 and split[0] == "train":
            signal.raise_signal(signal.SIGTERM)
        return length_reward(prompts, completions)

    reward_then_sigterm.__name__ = "length_reward"  # the metric names of the reference run
    with pytest.raises(TrainingInterrupted) as e:
        _trainer(out, reward=reward_then_sigterm).train(resume_from_checkpoint=True)
    assert e.value.saved_step == 4
    assert [r["step"] for r in read_records(out / "metrics.jsonl")] == [1, 2, 2, 3, 4, 4]

    final = _trainer(out)
    final.train(resume_from_checkpoint=str(out / "checkpoints" / "4"))  # TRL's checkpoint path
    assert _rows(out) == _rows(tmp_path / "ref")  # every step and evaluation once: the same samples and losses
    assert len({r["loss"] for r in _rows(out) if "loss" in r}) > 1
    for x, y in zip(jax.tree.leaves(final.model.trainable), jax.tree.leaves(reference.model.trainable), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_val_set_size_holds_out_prompts():
    rows = [{"prompt": str(i)} for i in range(10)]
    kept, held = hold_out(rows, 0.25, seed=3)
    assert len(held) == 3 and len(kept) == 7
    assert sorted(r["prompt"] for r in kept + held) == sorted(r["prompt"] for r in rows)
    assert kept == sorted(kept, key=lambda r: int(r["prompt"]))  # in the data's order
    with pytest.raises(ValueError, match="val_set_size=10 holds out 10 of the 10 prompts"):
        hold_out(rows, 10, seed=3)


def _mesh_scenario(workdir: Path) -> None:
    """In a process with 2 CPU devices: one device (sampled in 2 chunks) against a data=2 mesh (1 chunk, split over
    the 2 devices: the same pieces and seeds), each 2 steps of 16 completions with accumulation and reuse."""
    from jaxsloth.config import TrainConfig
    from jaxsloth.methods.grpo_train import grpo_train
    from jaxsloth.sharding import make_mesh

    out = {}
    common = dict(method="grpo", reward_funcs=[length_reward], num_generations=4, max_completion_length=4,
                  gradient_accumulation_steps=2, max_steps=2, num_iterations=2, beta=0.04, temperature=4.0,
                  learning_rate=1e-2, seed=1)  # fmt: skip
    runs = {
        "single": dict(mesh=make_mesh("data=1", devices=jax.devices()[:1]), per_device_train_batch_size=8,
                       sampling_chunks=2),
        "data2": dict(mesh="data=2", per_device_train_batch_size=4, output_dir=str(workdir / "o"),
                      eval_dataset=EVAL_ROWS[:3], per_device_eval_batch_size=4),
    }  # fmt: skip
    for name, settings in runs.items():
        model, tok = _model()
        result = grpo_train(model, tok, PROMPTS, TrainConfig(**common, **settings), progress=False)
        out[f"{name}/loss"] = np.array([r["loss"] for r in result.history])
        out[f"{name}/reward"] = np.array([r["reward"] for r in result.history])
        for i, leaf in enumerate(jax.tree.leaves(result.trainable)):
            out[f"{name}/lora/{i}"] = np.asarray(leaf)
        if result.evals:
            out[f"{name}/eval_reward"] = np.array([result.evals[-1]["eval_reward"]])
    for spec in ("context=2", "fsdp=2"):
        model, tok = _model()
        try:
            grpo_train(model, tok, PROMPTS, TrainConfig(**common, mesh=spec), progress=False)
        except ValueError as e:
            out[f"error/{spec}"] = np.array(str(e))
    np.savez(workdir / "results.npz", **out)


def test_two_device_data_mesh_matches_one_device(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "tests.test_grpo_resume_eval", str(tmp_path)], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    with np.load(tmp_path / "results.npz") as z:
        r = dict(z)
    np.testing.assert_array_equal(r["data2/reward"], r["single/reward"])  # the same samples
    assert_close(r["data2/loss"], r["single/loss"], "f32")
    leaves = [k.split("/", 1)[1] for k in r if k.startswith("single/lora/")]
    assert leaves
    for k in leaves:
        # Per-device partial gradient sums, then an all-reduce: rounding differs from one device's sum.
        assert_close(r[f"data2/{k}"], r[f"single/{k}"], "f32_grad", err_msg=k)
    assert np.isfinite(r["data2/eval_reward"]).all()
    assert (tmp_path / "o" / "checkpoints" / "2" / "jaxsloth.json").is_file()
    for spec, axis in (("context=2", "context=2"), ("fsdp=2", "fsdp=2")):
        message = str(r[f"error/{spec}"])
        assert message.startswith("method='grpo' runs data-parallel only") and axis in message, message
        assert "\n" not in message


if __name__ == "__main__":
    _mesh_scenario(Path(sys.argv[1]))


def test_cli_and_yaml_take_grpo_eval_resume_and_checkpoint_settings(tmp_path):
    from jaxsloth import cli

    config = tmp_path / "grpo.yaml"
    config.write_text("method: grpo\nreward_funcs: [format]\neval_steps: 2\nnum_generations_eval: 2\n")
    argv = ["train", str(config), "--model", "m", "--data", "d.jsonl", "--eval-dataset", "e.jsonl",
            "--save-total-limit", "2", "--resume-from-checkpoint", "o/checkpoints/4", "--output-dir", "o"]  # fmt: skip
    s = cli.train_settings(cli.build_parser().parse_args(argv))
    assert (s["eval_dataset"], s["eval_steps"], s["num_generations_eval"]) == ("e.jsonl", 2, 2)
    assert (s["save_total_limit"], str(s["resume"])) == (2, "o/checkpoints/4")
