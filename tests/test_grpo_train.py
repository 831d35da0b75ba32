"""GRPO through ``jaxsloth train`` (YAML file and flags, reward functions by module path), its settings in the one
schema, the error for a bad reward path, and the rewards scored on the host while the device samples the next chunk
(same results as the sequential order). On the demo's shipped tiny model (CPU)."""

import json

import numpy as np
import pytest

import jaxsloth
from jaxsloth import cli, demo
from jaxsloth.config import TrainConfig
from jaxsloth.faces.grpo import GRPOConfig
from jaxsloth.methods import grpo_train
from jaxsloth.methods.rewards import resolve_reward_funcs

REWARD_MODULE = """
def starts_with_answer(prompts, completions, answer, **kwargs):
    return [1.0 if c[-1]["content"].strip().startswith(a) else 0.0 for c, a in zip(completions, answer)]
"""


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    rows = [{"prompt": [{"role": "user", "content": c}], "answer": demo.shift(c)} for c in demo.LETTERS[:8]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_grpo_from_yaml_with_a_reward_module_beside_it(tmp_path, prompts_file, capsys):
    (tmp_path / "my_rewards.py").write_text(REWARD_MODULE)
    config = tmp_path / "grpo.yaml"
    config.write_text(
        f"model: {demo.MODEL_DIR}\ndata: {prompts_file}\noutput_dir: {tmp_path / 'o'}\nprofile: cpu\n"
        "max_seq_length: 64\nmethod: grpo\nreward_funcs: [my_rewards:starts_with_answer, exact_answer]\n"
        "reward_weights: [1.0, 0.5]\nnum_generations: 4\nper_device_train_batch_size: 8\n"
        "max_completion_length: 4\ntemperature: 4.0\nlearning_rate: 1e-2\nr: 4\nlora_alpha: 8\nmax_steps: 5\n"
    )
    code = cli.main(["train", str(config), "--max-steps", "2", "--beta", "0.04", "--loss-type", "grpo"])
    assert code == 0, capsys.readouterr().err
    records = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]  # the flag overrode the file's max_steps
    assert {"rewards/starts_with_answer/mean", "rewards/accuracy/mean", "kl", "completions/mean_length"} <= set(
        records[0]
    )
    assert all(np.isfinite(r["loss"]) for r in records)
    assert records[1]["kl"] > 0  # beta from the flag: the reference term is computed
    assert (tmp_path / "o" / "adapter" / "adapter_model.safetensors").is_file()


def test_bad_reward_paths_are_one_line_errors(tmp_path, prompts_file, capsys):
    (tmp_path / "my_rewards.py").write_text(REWARD_MODULE)
    base = ["train", "--model", demo.MODEL_DIR, "--data", prompts_file, "--method", "grpo", "--profile", "cpu",
            "--output-dir", tmp_path / "o"]  # fmt: skip
    for spec, message in (
        ("no_such_module:f", "cannot import module 'no_such_module' of 'no_such_module:f'"),
        ("tests.tiny_models:no_such_function", "module 'tests.tiny_models' ("),
        ("exact", "'exact' is neither a built-in (exact_answer, format) nor module.path:function"),
    ):
        assert cli.main([str(a) for a in base] + ["--reward-funcs", spec]) != 0
        err = capsys.readouterr().err
        assert message in err, err
        assert len(err.strip().splitlines()) == 1, err
    with pytest.raises(ValueError, match="method='grpo' needs reward_funcs"):
        TrainConfig(method="grpo")
    with pytest.raises(ValueError, match="reward_weights has 1 values for 2 reward_funcs"):
        TrainConfig(method="grpo", reward_funcs="format,exact_answer", reward_weights=[1])
    # A module on PYTHONPATH (tests is importable here); the built-ins by name.
    funcs = resolve_reward_funcs(["tests.test_grpo:test_builtin_rewards", "format", "exact_answer"])
    assert [f.__name__ for f in funcs] == ["test_builtin_rewards", "format", "accuracy"]


def test_schema_defaults_are_trls_for_grpo():
    tc = TrainConfig(method="grpo", reward_funcs=["format"])
    assert (tc.beta, tc.loss_type, tc.num_generations, tc.max_completion_length, tc.epsilon) == (
        0.0, "dapo", 8, 512, 0.2,
    )  # fmt: skip
    assert (TrainConfig().beta, TrainConfig().loss_type) == (0.1, "sigmoid")  # the preference methods' defaults
    with pytest.raises(ValueError, match="loss_type='dapo' is not one of method='dpo'"):
        TrainConfig(method="dpo", loss_type="dapo")
    settings, _, _ = GRPOConfig(output_dir="x", max_steps=3, beta=0.04, scale_rewards=False).to_settings()
    assert settings["method"] == "grpo" and settings["learning_rate"] == 1e-6
    assert settings["beta"] == 0.04 and settings["scale_rewards"] == "none" and settings["max_steps"] == 3
    assert GRPOConfig().num_generations == 8 and GRPOConfig().loss_type == "dapo"


def test_rewards_score_while_the_next_chunk_samples(monkeypatch):
    """With sampling_chunks=2 a generation is sampled in two pieces: the second is dispatched before the first is
    scored; the sequential order gives the same samples, rewards and trained adapter."""
    events = []
    dispatch = grpo_train.start_sampling

    def recording_dispatch(*args, **kwargs):
        events.append(("dispatch", kwargs["seed"]))
        return dispatch(*args, **kwargs)

    def length_reward(prompts, completions, **kwargs):
        events.append(("reward", len(completions)))
        return [float(len(c[-1]["content"])) for c in completions]

    monkeypatch.setattr(grpo_train, "start_sampling", recording_dispatch)
    data = [{"prompt": [{"role": "user", "content": c}]} for c in demo.LETTERS[:8]]
    runs = {}
    for overlap in (True, False):
        events.clear()
        model, tok = jaxsloth.load(demo.MODEL_DIR, profile="cpu", max_seq_length=64)
        model = jaxsloth.add_lora(model, r=4, lora_alpha=8, seed=0)
        tc = TrainConfig(method="grpo", reward_funcs=[length_reward], num_generations=4, max_completion_length=4,
                         per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=1, sampling_chunks=2,
                         learning_rate=1e-2, seed=3, beta=0.1)  # fmt: skip
        result = grpo_train.grpo_train(model, tok, data, tc, progress=False, overlap=overlap)
        runs[overlap] = (list(events), result)
    # Chunk seeds: seed + 2 x generation + chunk: chunk 1 dispatched before chunk 0 is scored.
    assert runs[True][0] == [("dispatch", 3), ("dispatch", 4), ("reward", 4), ("reward", 4)]
    assert runs[False][0] == [("dispatch", 3), ("reward", 4), ("dispatch", 4), ("reward", 4)]
    overlapped, sequential = runs[True][1], runs[False][1]
    for a, b in zip(overlapped.history, sequential.history, strict=True):
        assert (
            a["reward"] == b["reward"]
            and a["loss"] == b["loss"]
            and a["completions/mean_length"] == b["completions/mean_length"]
        )
    for x, y in zip(jax_leaves(overlapped.trainable), jax_leaves(sequential.trainable), strict=True):
        np.testing.assert_array_equal(x, y)


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_grpo_refuses_the_embedding_on_the_host(tmp_path, prompts_file, capsys):
    # GRPO samples with the embedding on the device: embedding=host (an SFT setting) is a one-line error.
    args = ["train", "--model", demo.MODEL_DIR, "--data", prompts_file, "--method", "grpo", "--profile", "cpu",
            "--reward-funcs", "exact_answer", "--embedding", "host", "--output-dir", tmp_path / "o"]  # fmt: skip
    assert cli.main([str(a) for a in args]) != 0
    err = capsys.readouterr().err
    assert "embedding='host' is for supervised fine-tuning; method='grpo'" in err, err
    assert err.strip().splitlines()[-1].startswith("jaxsloth train: error: embedding='host'") and "Traceback" not in err


def test_grpo_keeps_adamws_moments_in_8_bits_when_the_profile_says_so():
    # optimizer_state="8bit" reaches GRPO's optimizer as it reaches the SFT and preference steps.
    import jax

    data = [{"prompt": [{"role": "user", "content": c}], "answer": demo.shift(c)} for c in demo.LETTERS[:4]]
    dtypes = {}
    for state in ("float32", "8bit"):
        model, tok = jaxsloth.load(demo.MODEL_DIR, profile="cpu", max_seq_length=64, optimizer_state=state)
        model = jaxsloth.add_lora(model, r=64, seed=0)  # adapters of >= 4096 values: smaller ones keep f32 moments
        tc = TrainConfig(method="grpo", reward_funcs=["exact_answer"], num_generations=2, max_completion_length=2,
                         per_device_train_batch_size=4, max_steps=1, learning_rate=1e-3)  # fmt: skip
        result = grpo_train.grpo_train(model, tok, data, tc, progress=False)
        dtypes[state] = {str(x.dtype) for x in jax.tree.leaves(result.opt_state)}
    assert "int8" in dtypes["8bit"] or "uint8" in dtypes["8bit"], dtypes
    assert not {"int8", "uint8"} & dtypes["float32"], dtypes
