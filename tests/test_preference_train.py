"""Preference tuning end to end: TRL's data formats from every source into resumable packed batches, precomputed
reference log-probs equal to the in-step reference, the settings through the API / CLI / YAML, TRL's DPO example
with only the import changed, and a CPU demo on the embedded cipher model that learns to prefer correct answers."""

import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsloth import demo
from jaxsloth.methods.preference_data import tokenize_pair, tokenize_unpaired
from jaxsloth.methods.preference_loader import PreferenceLoader, pack_examples, tokenize_preferences
from tests.tolerances import tolerance


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(demo.MODEL_DIR))


def _corrupt(rng: random.Random, word: str) -> str:
    """One letter of ``word`` replaced by another."""
    i = rng.randrange(len(word))
    return word[:i] + rng.choice([c for c in demo.LETTERS if c != word[i]]) + word[i + 1 :]


def cipher_pairs(records: list[dict], seed: int) -> list[dict]:
    """The demo task as conversational preference pairs: the correct cipher chosen, a one-letter corruption
    rejected."""
    rng = random.Random(seed)
    out = []
    for r in records:
        right = demo.answer(r)
        out.append({
            "prompt": r["messages"][:1],
            "chosen": [{"role": "assistant", "content": right}],
            "rejected": [{"role": "assistant", "content": _corrupt(rng, right)}],
        })  # fmt: skip
    return out


def _word_pairs(n: int, seed: int = 0) -> list[dict]:
    train, _ = demo.task_splits(num_train=n, num_heldout=0, seed=seed)
    return cipher_pairs(train, seed)


def test_formats_and_sources_tokenize_once(tokenizer, tmp_path):
    from datasets import Dataset

    pairs = _word_pairs(6)
    strings = [{"prompt": demo.prompt(tokenizer, {"messages": p["prompt"]}), "chosen": p["chosen"][0]["content"],
                "rejected": p["rejected"][0]["content"]} for p in pairs]  # fmt: skip
    implicit = [{"chosen": p["prompt"] + p["chosen"], "rejected": p["prompt"] + p["rejected"]} for p in pairs]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    expected = [tokenize_pair(tokenizer, p) for p in pairs]
    from jaxsloth.data import load_records

    for source in (pairs, Dataset.from_list(pairs), path, implicit):
        ex = tokenize_preferences(load_records(source), tokenizer, method="dpo", max_length=64, pairs_per_micro=2)
        assert [(p, c, r) for p, (c, r) in zip(ex.prompts, ex.completions)] == [tuple(map(list, e)) for e in expected]
    # String prompts: the same completion tokens (EOS appended as TRL does).
    ex = tokenize_preferences(strings, tokenizer, method="dpo", max_length=64, pairs_per_micro=2)
    assert ex.completions == [(list(c), list(r)) for _, c, r in expected]
    # KTO: prompt/completion/label, and paired data unpaired (chosen True, rejected False).
    unpaired = [{"prompt": p["prompt"], "completion": p["chosen"], "label": True} for p in pairs]
    ex = tokenize_preferences(unpaired, tokenizer, method="kto", max_length=64, pairs_per_micro=3)
    assert ex.labels.tolist() == [True] * 6
    comps = [tokenize_unpaired(tokenizer, u)[1] for u in unpaired]
    # TRL's KTO KL completions: each block of per_device_train_batch_size shifted by one (dataset order).
    assert [kl for _, kl in ex.completions] == [comps[2], comps[0], comps[1], comps[5], comps[3], comps[4]]
    ex = tokenize_preferences(pairs, tokenizer, method="kto", max_length=64, pairs_per_micro=2)
    assert ex.labels.tolist() == [True, False] * 6
    with pytest.raises(ValueError, match="prompt/completion/label is KTO's"):
        tokenize_preferences(unpaired, tokenizer, method="dpo", max_length=64, pairs_per_micro=2)
    with pytest.raises(ValueError, match="the first row has \\['messages'\\]"):
        tokenize_preferences([demo.question("abc")], tokenizer, method="dpo", max_length=64, pairs_per_micro=2)


def test_truncation_keeps_the_start(tokenizer):
    pairs = _word_pairs(4)
    full = tokenize_preferences(pairs, tokenizer, method="dpo", max_length=None, pairs_per_micro=2)
    cut = tokenize_preferences(pairs, tokenizer, method="dpo", max_length=12, pairs_per_micro=2)
    for (p, (c, r)), (c2, r2) in zip(zip(full.prompts, full.completions), cut.completions):
        assert c2 == c[: 12 - len(p)] and r2 == r[: 12 - len(p)]


def test_loader_batches_and_resume(tokenizer):
    examples = tokenize_preferences(_word_pairs(10), tokenizer, method="dpo", max_length=64, pairs_per_micro=2)
    loader = PreferenceLoader(examples, pairs_per_micro=2, gradient_accumulation_steps=2, seed=3)
    assert loader.num_batches() == 2  # 10 pairs, 4 per step: the partial batch is dropped
    batches = [next(loader) for _ in range(3)]
    assert batches[0]["tokens"].shape == (4, loader.seq_len) and loader.seq_len % 8 == 0
    # Every micro-batch: 2 rows, 4 sequences numbered 0..3, each pair's chosen then rejected in one row.
    index = batches[0]["sequence_index"][:2]
    assert sorted(set(index[index >= 0].tolist())) == [0, 1, 2, 3]
    assert set(index[0][index[0] >= 0].tolist()) == {0, 1}
    assert not np.array_equal(batches[0]["tokens"], batches[1]["tokens"])
    state = loader.state_dict()  # after 3 batches: epoch 1, batch 1
    more = [next(loader) for _ in range(2)]
    resumed = PreferenceLoader(examples, pairs_per_micro=2, gradient_accumulation_steps=2, seed=3)
    resumed.load_state_dict(state)
    for a, b in zip(more, [next(resumed) for _ in range(2)]):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    other = PreferenceLoader(examples, pairs_per_micro=1, gradient_accumulation_steps=2, seed=3)
    with pytest.raises(ValueError, match="batch_size"):
        other.load_state_dict(state)
    other = PreferenceLoader(examples, pairs_per_micro=2, gradient_accumulation_steps=2, seed=3, method="orpo")
    with pytest.raises(ValueError, match="method='dpo' but this loader has method='orpo'"):
        other.load_state_dict(state)


@pytest.fixture(scope="module")
def demo_model():
    import jaxsloth

    model, tok = jaxsloth.load(demo.MODEL_DIR, profile="cpu", max_seq_length=64)
    model = jaxsloth.add_lora(model, r=8, lora_alpha=16)
    # A policy away from the reference: random B (PEFT starts it at zero).
    keys = iter(jax.random.split(jax.random.key(1), 1000))
    model.trainable = jax.tree.map(lambda x: 0.05 * jax.random.normal(next(keys), x.shape), model.trainable)
    return model, tok


def test_precomputed_reference_gives_the_same_loss(demo_model):
    """KTO, whose KL sequences make the stored order the hardest (pairs use the same code)."""
    method = "kto"
    from jaxsloth.config import TrainConfig
    from jaxsloth.methods.preference_step import make_preference_loss_fn
    from jaxsloth.methods.preference_train import precompute_reference, preference_config

    model, tok = demo_model
    examples = tokenize_preferences(_word_pairs(6), tok, method=method, max_length=64, pairs_per_micro=4)
    # Precomputed in dataset order, 4 per forward (the last block padded); the batch takes another order.
    ref = precompute_reference(model.config, model.params, model.profile, examples, 4, 48)
    ids = np.array([5, 2, 7, 0])
    batch = {k: jnp.asarray(v) for k, v in pack_examples(examples, ids, 48).items()}
    n = 2 * len(ids)
    pc = preference_config(TrainConfig(method=method, beta=0.3))
    loss_fn = jax.jit(make_preference_loss_fn(model.config, model.lora, pc), static_argnums=3)
    in_step = loss_fn(model.trainable, model.params, batch, n)
    from jaxsloth.methods.preference_loader import sequence_order

    stored = {**batch, "ref_logps": jnp.asarray(sequence_order(examples, ref[ids]))}
    precomputed = loss_fn(model.trainable, model.params, stored, n)
    np.testing.assert_allclose(precomputed[0], in_step[0], **tolerance("f32"))
    for key, value in in_step[1].items():
        np.testing.assert_allclose(precomputed[1][key], value, **tolerance("f32"), err_msg=key)
    assert abs(float(in_step[1]["rewards/margins"])) > 1e-3  # the policy is not the reference


def test_settings_reach_the_schema_cli_and_yaml(tmp_path):
    from jaxsloth import cli
    from jaxsloth.config import TrainConfig

    tc = TrainConfig(method="simpo", beta=2.0, simpo_gamma=0.3, cpo_alpha=0.5, label_smoothing=0.1)
    assert (tc.method, tc.beta, tc.simpo_gamma, tc.cpo_alpha, tc.label_smoothing) == ("simpo", 2.0, 0.3, 0.5, 0.1)
    assert TrainConfig().method == "sft"
    with pytest.raises(ValueError, match="method"):
        TrainConfig(method="ppo")
    with pytest.raises(ValueError, match="loss_type"):
        TrainConfig(method="dpo", loss_type="robust")
    parser = cli.build_parser()
    args = parser.parse_args(["train", "--model", "m", "--data", "d", "--method", "dpo", "--beta", "0.2",
                              "--loss-type", "ipo", "--precompute-ref-log-probs"])  # fmt: skip
    s = cli.train_settings(args)
    assert (s["method"], s["beta"], s["loss_type"], s["precompute_ref_log_probs"]) == ("dpo", 0.2, "ipo", True)
    yaml_path = tmp_path / "kto.yaml"
    yaml_path.write_text("model: m\ndata: d\nmethod: kto\nbeta: 0.05\ndesirable_weight: 1.33\n")
    s = cli.train_settings(parser.parse_args(["train", str(yaml_path)]))
    assert (s["method"], s["beta"], s["desirable_weight"]) == ("kto", 0.05, 1.33)


def test_config_faces_take_trls_defaults():
    import trl
    from trl.experimental.cpo import CPOConfig as TrlCPOConfig

    from jaxsloth import CPOConfig, DPOConfig, KTOConfig, ORPOConfig

    theirs = trl.DPOConfig(output_dir="x", use_cpu=True, bf16=False)
    ours, length, ignored = DPOConfig(output_dir="x").to_settings()
    assert (ours["method"], ours["learning_rate"], ours["beta"], ours["num_train_epochs"], ours["seed"]) == (
        "dpo", theirs.learning_rate, theirs.beta, theirs.num_train_epochs, theirs.seed,
    )  # fmt: skip
    assert [ours["loss_type"]] == list(theirs.loss_type) and length == theirs.max_length and ignored == []
    assert ours["precompute_ref_log_probs"] == theirs.precompute_ref_log_probs
    cpo = TrlCPOConfig(output_dir="x", use_cpu=True, bf16=False, loss_type="simpo")
    ours, _, _ = CPOConfig(output_dir="x", loss_type="simpo").to_settings()
    assert (ours["method"], ours["simpo_gamma"], ours["cpo_alpha"]) == ("simpo", cpo.simpo_gamma, cpo.cpo_alpha)
    with pytest.raises(NotImplementedError, match="simpo"):
        CPOConfig(output_dir="x").to_settings()
    ours, _, _ = KTOConfig(output_dir="x", undesirable_weight=1.5).to_settings()
    assert (ours["method"], ours["desirable_weight"], ours["undesirable_weight"]) == ("kto", 1.0, 1.5)
    assert ORPOConfig(output_dir="x").to_settings()[0]["method"] == "orpo"


def test_trl_dpo_example_runs_unchanged(tmp_path):
    # --- TRL's DPO example (model id and dataset swapped for tiny local ones) ---
    from datasets import Dataset
    from peft import LoraConfig

    from jaxsloth import DPOConfig, DPOTrainer  # was: from trl import DPOConfig, DPOTrainer

    # example: load_dataset("trl-lib/ultrafeedback_binarized", split="train")
    train_dataset = Dataset.from_list(_word_pairs(16))
    training_args = DPOConfig(
        output_dir=str(tmp_path / "Qwen2-0.5B-DPO"), max_steps=3, per_device_train_batch_size=4, learning_rate=5e-3
    )
    trainer = DPOTrainer(
        model=str(demo.MODEL_DIR),  # example: "Qwen/Qwen2-0.5B-Instruct"
        args=training_args,
        train_dataset=train_dataset,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
    )
    out = trainer.train()
    # --- checks ---
    assert out.global_step == 3
    records = [json.loads(x) for x in (tmp_path / "Qwen2-0.5B-DPO" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3
    assert records[0]["loss"] == pytest.approx(np.log(2), abs=1e-4)  # adapter B = 0: the policy is the reference
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen"):
        assert all(np.isfinite(r[key]) for r in records), key
    assert records[-1]["rewards/margins"] != 0  # trained away from the reference
    assert trainer.train_config.method == "dpo" and trainer.max_length == 1024


def test_cipher_preferences_learned_on_cpu():
    """DPO on correct vs one-letter-corrupted cipher answers: the step's rewards/accuracies go from chance (the
    policy starts as the reference: rewards tie) to near 1, and held-out pairs are ranked right far more often."""
    import jaxsloth
    from jaxsloth.data import load_records
    from jaxsloth.lora import with_trainable
    from jaxsloth.methods.logprobs import sequence_logps

    model, tok = jaxsloth.load(demo.MODEL_DIR, profile="cpu", max_seq_length=64)
    model = jaxsloth.add_lora(model, r=16, lora_alpha=32)
    train = cipher_pairs(load_records(demo.ASSETS / "train.jsonl"), 0)
    heldout = cipher_pairs(load_records(demo.ASSETS / "heldout.jsonl"), 1)
    examples = tokenize_preferences(heldout, tok, method="dpo", max_length=64, pairs_per_micro=len(heldout))
    batch = {k: jnp.asarray(v) for k, v in pack_examples(examples, np.arange(len(heldout)), 48).items()}

    def heldout_accuracy() -> float:
        p, lora_tree = with_trainable(model.params, model.trainable)
        sums, _ = sequence_logps(
            p, batch, 2 * len(heldout), config=model.config, lora=lora_tree, lora_rt=model.lora.runtime
        )
        return float(np.mean(np.asarray(sums[0::2] > sums[1::2])))

    before = heldout_accuracy()
    result = jaxsloth.train(
        model, tok, train, method="dpo", beta=0.5, max_steps=100, learning_rate=4e-3, warmup_steps=10,
        per_device_train_batch_size=16, progress=False,
    )  # fmt: skip
    after = heldout_accuracy()
    accuracies = [r["rewards/accuracies"] for r in result.history]
    assert np.mean(accuracies[:3]) < 0.7
    assert np.mean(accuracies[-10:]) >= 0.9
    assert np.mean([r["loss"] for r in result.history[-10:]]) < 0.5 * np.log(2)
    assert after >= before + 0.1 and after >= 0.75


def test_reference_free_method_trains_through_the_api():
    """ORPO (SimPO shares this path: no reference forward, rewards from the policy)."""
    method = "orpo"
    import jaxsloth

    model, tok = jaxsloth.load(demo.MODEL_DIR, profile="cpu", max_seq_length=64)
    model = jaxsloth.add_lora(model, r=8, lora_alpha=16)
    result = jaxsloth.train(
        model, tok, _word_pairs(8), method=method, max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
        progress=False,
    )  # fmt: skip
    first = result.history[0]
    # No reference: the rewards are beta times the length-averaged policy log-probs from the first step on.
    assert first["rewards/chosen"] == pytest.approx(0.1 * first["logps/chosen"], rel=1e-5)
    assert np.isfinite(first["nll_loss"]) and first["nll_loss"] > 0
    # The NLL of the chosen plus the odds-ratio term.
    assert first["loss"] == pytest.approx(first["nll_loss"] - 0.1 * first["log_odds_ratio"], rel=1e-5)
    assert result.step == 2 and all(r["tokens"] > 0 for r in result.history)


def test_kto_from_a_file_precomputed_accumulated_and_resumed(tmp_path):
    """KTO from a prompt/completion/label file, reference precomputed, two accumulated micro-batches; a checkpoint
    resumes at the next batch."""
    import jaxsloth

    rng = random.Random(0)
    rows = []
    for p in _word_pairs(8):
        good = rng.random() < 0.5
        rows.append({"prompt": p["prompt"], "completion": p["chosen" if good else "rejected"], "label": good})
    path = tmp_path / "kto.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model, tok = jaxsloth.load(demo.MODEL_DIR, profile="cpu", max_seq_length=64)
    model = jaxsloth.add_lora(model, r=8, lora_alpha=16)
    settings = dict(
        method="kto", precompute_ref_log_probs=True, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=1e-2, output_dir=str(tmp_path / "run"), save_steps=1, progress=False,
    )  # fmt: skip
    first = jaxsloth.train(model, tok, str(path), max_steps=2, **settings)
    assert [r["step"] for r in first.history] == [1, 2]
    assert first.history[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)  # B = 0: the policy is the reference
    assert all(np.isfinite(r["kl"]) and r["kl"] >= 0 for r in first.history)
    resumed = jaxsloth.train(model, tok, str(path), max_steps=3, resume=True, **settings)
    assert [r["step"] for r in resumed.history] == [3]
    # The method's metrics reach the trackers: metrics.jsonl and TensorBoard.
    from tests.test_metrics import _read_scalars

    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3] and all("rewards/margins" in r for r in logged)
    scalars = _read_scalars(tmp_path / "run" / "tensorboard")
    assert [step for step, _ in scalars["train/kl"]] == [1, 2, 3] and "train/rewards/chosen" in scalars
