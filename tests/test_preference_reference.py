"""An explicit reference model (TRL's ``ref_model``) and full fine-tuning with preference methods, and evaluation of
preference runs.

The full fine-tuning DPO loss, metrics and gradient of every weight equal TRL's ``DPOTrainer._compute_loss`` with a
separate reference model (a stub trainer running TRL's own code on the tiny model, the policy's weights perturbed
away from the reference's). Through the API: a full fine-tuning DPO run against a reference loaded from a path
starts at loss log 2 (the policy is its reference) and evaluates with TRL's metric names; mismatched vocabularies
or tokenizers are one-line errors.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxsloth
from converters.hf import load_hf_model, to_hf_state_dict
from jaxsloth import demo
from jaxsloth.methods.preference_data import pack_pairs
from jaxsloth.methods.preference_step import PreferenceConfig, make_preference_loss_fn
from tests.test_preference_train import _word_pairs
from tests.test_preference_vs_trl import BETA, CHUNK, SEQ_LEN, _pairs, _stub_trainer
from tests.tiny_models import hf_model, saved_model
from tests.tolerances import assert_close

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")  # fmt: skip


def test_full_finetuning_dpo_with_a_reference_model_matches_trl(tmp_path):
    from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    path = saved_model("llama")
    policy = hf_model(path)
    torch.manual_seed(2)
    with torch.no_grad():  # the policy away from the reference: every reward non-zero
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    policy.save_pretrained(tmp_path / "policy")
    ref = hf_model(path)
    for m in (policy, ref):
        add_fused_lm_head(m, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    config, policy_params = load_hf_model(tmp_path / "policy", dtype=jnp.float32)
    _, ref_params = load_hf_model(path, dtype=jnp.float32)

    pairs = _pairs(config.vocab_size)
    stub = _stub_trainer(
        policy, ref_model=ref, f_divergence_type="reverse_kl", loss_types=["sigmoid"], loss_weights=[1.0],
        ld_alpha=None, use_weighting=False,
    )  # fmt: skip
    inputs = DataCollatorForPreference(pad_token_id=0)(
        [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in pairs]
    )
    loss_ref = DPOTrainer._compute_loss(stub, policy, inputs, return_outputs=False)
    loss_ref.backward()
    metrics_ref = {k: v[-1] for k, v in stub._metrics["train"].items()}
    grads_ref = {k: p.grad.numpy() for k, p in policy.named_parameters()}

    pc = PreferenceConfig(method="dpo", beta=BETA)
    loss_fn = make_preference_loss_fn(config, None, pc, ref_config=config, chunk=CHUNK)
    batch = {k: jnp.asarray(v) for k, v in pack_pairs(pairs, SEQ_LEN).items()}
    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), static_argnums=3)
    (loss, metrics), g = grad_fn(policy_params, {}, batch, 2 * len(pairs), None, ref_params)
    assert_close(float(loss), loss_ref.item(), "f32", err_msg="loss")
    assert abs(metrics_ref["rewards/margins"]) > 1e-3
    for key in METRICS:
        assert_close(float(metrics[key]), metrics_ref[key], "f32", err_msg=key)
    ours = to_hf_state_dict(g, config)
    assert set(ours) == set(grads_ref)  # a gradient for every weight
    for name, grad in ours.items():
        assert_close(grad, grads_ref[name], "f32_grad", err_msg=name)
    with pytest.raises(ValueError, match="needs a reference model"):  # full fine-tuning: no adapter to switch off
        loss_fn(policy_params, {}, batch, 2 * len(pairs))


def test_lora_dpo_with_a_separate_reference_model_matches_trl(tmp_path):
    """TRL with a PEFT model and a ref_model uses the ref_model, not the adapter-off policy; so does jaxsloth."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    from tests.test_lora_step_vs_peft import _trainable_from_peft
    from tests.test_preference_vs_trl import ALPHA, R, _check_grads, _lora_grads, _setup

    config, params, peft = _setup("llama")
    ref = hf_model(saved_model("llama"))
    torch.manual_seed(3)
    with torch.no_grad():  # a reference that is not the policy's base weights
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ref.save_pretrained(tmp_path / "ref")
    add_fused_lm_head(ref, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    _, ref_params = load_hf_model(tmp_path / "ref", dtype=jnp.float32)
    pairs = _pairs(config.vocab_size)
    peft.zero_grad()
    stub = _stub_trainer(
        peft, ref_model=ref, f_divergence_type="reverse_kl", loss_types=["sigmoid"], loss_weights=[1.0],
        ld_alpha=None, use_weighting=False,
    )  # fmt: skip
    inputs = DataCollatorForPreference(pad_token_id=0)(
        [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in pairs]
    )
    loss_ref = DPOTrainer._compute_loss(stub, peft, inputs, return_outputs=False)
    loss_ref.backward()
    metrics_ref = {k: v[-1] for k, v in stub._metrics["train"].items()}

    from jaxsloth.lora import LoraConfig

    pc = PreferenceConfig(method="dpo", beta=BETA)
    loss_fn = make_preference_loss_fn(config, LoraConfig(r=R, lora_alpha=ALPHA), pc, ref_config=config, chunk=CHUNK)
    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), static_argnums=3)
    batch = {k: jnp.asarray(v) for k, v in pack_pairs(pairs, SEQ_LEN).items()}
    trainable = _trainable_from_peft(peft, config.num_layers)
    (loss, metrics), g = grad_fn(trainable, params, batch, 2 * len(pairs), None, ref_params)
    assert_close(float(loss), loss_ref.item(), "f32", err_msg="loss")
    for key in METRICS:
        assert_close(float(metrics[key]), metrics_ref[key], "f32", err_msg=key)
    _check_grads(g, _lora_grads(peft), config.num_layers)


def test_full_finetuning_dpo_trainer_with_a_ref_model_and_evaluation(tmp_path):
    """TRL's DPOTrainer(model, ref_model=..., eval_dataset=...) on a model loaded for full fine-tuning."""
    from datasets import Dataset

    from jaxsloth import DPOConfig, DPOTrainer
    from tests.test_metrics import _read_scalars

    pairs, held = Dataset.from_list(_word_pairs(8, seed=1)), Dataset.from_list(_word_pairs(3, seed=2))
    model, tok = jaxsloth.load(demo.MODEL_DIR, profile="cpu", max_seq_length=64, full_finetuning=True)
    records = []
    args = DPOConfig(
        output_dir=str(tmp_path / "run"), beta=0.5, max_steps=2, learning_rate=1e-3, per_device_train_batch_size=4,
        eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=3, report_to="tensorboard", max_length=64,
    )  # fmt: skip
    trainer = DPOTrainer(model, ref_model=str(demo.MODEL_DIR), args=args, train_dataset=pairs, eval_dataset=held,
                         processing_class=tok, callbacks=[records.append])  # fmt: skip
    trainer.train()
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    # The policy starts as its reference (the same checkpoint, loaded apart): every reward 0, the loss log 2.
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert steps[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert [r["step"] for r in evals] == [1, 2]
    for key in ("eval_loss", *(f"eval_{k}" for k in METRICS), "eval_tokens"):
        assert all(math.isfinite(r[key]) for r in evals), key
    assert evals[0]["eval_rewards/margins"] != 0.0  # the trained weights differ from the reference's
    assert model.trainable is None and not any(map(_deleted, jax.tree.leaves(model.params)))
    scalars = _read_scalars(tmp_path / "run" / "tensorboard")  # the trackers' names: eval/rewards/accuracies, ...
    assert [step for step, _ in scalars["eval/rewards/accuracies"]] == [1, 2]
    assert [value for _, value in scalars["eval/loss"]] == pytest.approx([r["eval_loss"] for r in evals])
    again = trainer.evaluate()  # the trained model, as the last evaluation saw it
    for key in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"):
        assert again[key] == pytest.approx(evals[-1][key], rel=1e-5, abs=1e-6), key


def _deleted(x) -> bool:
    return x.is_deleted()


def test_reference_with_another_vocabulary_or_tokenizer_is_refused():
    from jaxsloth.config import TrainConfig
    from jaxsloth.methods.preference_reference import resolve_reference
    from tests.tiny_tokenizers import CHAT_FAMILIES, tiny_tokenizer

    model, tok = jaxsloth.load(demo.MODEL_DIR, profile="cpu", max_seq_length=64)
    other = saved_model("llama")  # vocabulary of 131 tokens
    with pytest.raises(ValueError, match=r"ref_model .*vocab_size 131 differs from the policy's"):
        resolve_reference(model, tok, TrainConfig(method="dpo", ref_model=str(other)), True)
    stranger = tiny_tokenizer(CHAT_FAMILIES["qwen2"], model.config.vocab_size)
    assert stranger.get_vocab() != tok.get_vocab()
    with pytest.raises(ValueError, match="its tokenizer differs from the policy's"):
        resolve_reference(model, stranger, TrainConfig(method="dpo", ref_model=demo.MODEL_DIR), True)
    # A jaxsloth Model as the reference: its own arrays, never the policy's.
    ref = resolve_reference(model, tok, TrainConfig(method="dpo", ref_model=model), True)
    assert all(a is not b for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(model.params), strict=True))
    np.testing.assert_array_equal(ref.params["embed"], model.params["embed"])


def test_which_reference_each_run_holds(caplog):
    from jaxsloth.config import TrainConfig
    from jaxsloth.methods.preference_reference import resolve_reference

    lora_model, tok = jaxsloth.load(demo.MODEL_DIR, profile="cpu", max_seq_length=64)
    lora_model = jaxsloth.add_lora(lora_model, r=4)
    assert resolve_reference(lora_model, tok, TrainConfig(method="dpo"), True) is None  # the adapter off
    with caplog.at_level("WARNING", logger="jaxsloth"):
        assert resolve_reference(lora_model, tok, TrainConfig(method="orpo", ref_model="x"), False) is None
    assert "ref_model ignored" in caplog.text
    full, _ = jaxsloth.load(demo.MODEL_DIR, profile="cpu", max_seq_length=64, full_finetuning=True)
    copy = resolve_reference(full, tok, TrainConfig(method="dpo"), True)  # TRL's create_reference_model
    assert all(a is not b for a, b in zip(jax.tree.leaves(copy.params), jax.tree.leaves(full.params), strict=True))
    np.testing.assert_array_equal(copy.params["embed"], full.params["embed"])
    # Precomputed: scored once before the first step changes the weights, so no copy is made.
    scored = resolve_reference(full, tok, TrainConfig(method="kto", precompute_ref_log_probs=True), True)
    assert scored.params is full.params
    with pytest.raises(TypeError, match="ref_model must be a model directory"):
        resolve_reference(full, tok, TrainConfig(method="dpo", ref_model=3), True)


def test_held_out_preference_examples_and_their_eval_batches():
    from transformers import AutoTokenizer

    from jaxsloth.methods.preference_eval import eval_batches, split_examples
    from jaxsloth.methods.preference_loader import sequence_order, tokenize_preferences

    tok = AutoTokenizer.from_pretrained(str(demo.MODEL_DIR))
    examples = tokenize_preferences(_word_pairs(10), tok, method="dpo", max_length=64, pairs_per_micro=2)
    train, held = split_examples(examples, 0.25, seed=0)  # 3 of 10, rounded up as datasets' train_test_split
    assert (len(train), len(held)) == (7, 3)
    pairs = lambda e: [(tuple(p), tuple(map(tuple, c))) for p, c in zip(e.prompts, e.completions, strict=True)]  # noqa: E731
    assert sorted(pairs(train) + pairs(held)) == sorted(pairs(examples))  # disjoint, nothing lost
    with pytest.raises(ValueError, match="val_set_size=10"):
        split_examples(examples, 10, seed=0)
    ref = np.arange(2 * len(held), dtype=np.float32).reshape(-1, 2)
    batches = eval_batches(held, 2, ref)  # every example once: a batch of 2, then one of 1
    assert [b["tokens"].shape[0] for b in batches] == [2, 1]
    np.testing.assert_array_equal(np.concatenate([b["ref_logps"] for b in batches]), sequence_order(held, ref))
