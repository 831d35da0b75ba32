"""Preference losses, metrics and LoRA gradients equal TRL's on the same tiny model, adapter and batch.

TRL's side runs its own code: the loss of ``DPOTrainer._compute_loss`` / ``KTOTrainer._compute_loss`` (on a stub
trainer, with TRL's fused LM head on the PEFT model and the reference from PEFT's adapter-off forward), and
``ORPOTrainer.odds_ratio_loss`` / ``CPOTrainer.cpo_loss`` on log-probs TRL's fused head computes. jaxsloth's side:
the pairs packed into rows (several sequences per row), log-probs summed per segment by chunks.
"""

import functools
import types
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from converters.hf import load_hf_model
from jaxsloth.lora import LoraConfig
from jaxsloth.methods.preference_data import pack_pairs, pack_unpaired
from jaxsloth.methods.preference_step import PreferenceConfig, make_preference_loss_fn
from tests.test_lora_step_vs_peft import _trainable_from_peft
from tests.tiny_models import hf_model, saved_model
from tests.tolerances import assert_close

R, ALPHA = 4, 8.0
BETA = 0.7  # larger than TRL's 0.1 so the loss's gradient is far from the rounding floor
SEQ_LEN = 40
CHUNK = 16  # several log-prob chunks, the last one padded


def _pairs(vocab: int):
    rng = np.random.default_rng(3)
    out = []
    for p_len, c_len, r_len in ((4, 5, 3), (6, 2, 7), (3, 6, 4)):
        ids = lambda n: [int(x) for x in rng.integers(3, vocab, n)]  # noqa: E731
        out.append((ids(p_len), ids(c_len), ids(r_len)))
    return out


@functools.cache
def _setup(family: str = "llama"):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    path = saved_model(family)
    config, params = load_hf_model(path, dtype=jnp.float32)
    model = hf_model(path)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    cfg = PeftLoraConfig(
        r=R,
        lora_alpha=ALPHA,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    torch.manual_seed(
        0
    )  # PEFT draws A from the global generator: seed it, so the adapter is the same in any test order
    peft = get_peft_model(model, cfg)
    torch.manual_seed(1)
    with torch.no_grad():  # non-zero B: the policy differs from the reference and A has a gradient
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    return config, params, peft


def _stub_trainer(peft, **fields):
    accelerator = types.SimpleNamespace(
        device=torch.device("cpu"),
        unwrap_model=lambda m: m,
        gather=lambda x: x,
        gather_for_metrics=lambda x: x,
    )
    peft.train()
    base = dict(
        model=peft,
        ref_model=None,
        accelerator=accelerator,
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None),
        aux_loss_enabled=False,
        precompute_ref_logps=False,
        beta=BETA,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    return types.SimpleNamespace(**{**base, **fields})


def _lora_grads(peft):
    return {k: p.grad.numpy().copy() for k, p in peft.named_parameters() if p.requires_grad}


def _check_grads(g, grads_ref, n_layers):
    for name in g["layers"]:
        block = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        for i in range(n_layers):
            for ab, AB in (("a", "A"), ("b", "B")):
                ref = grads_ref[f"base_model.model.model.layers.{i}.{block}.{name}.lora_{AB}.default.weight"]
                assert_close(g["layers"][name][ab][i], ref, "f32_grad", err_msg=f"{name}.{ab}[{i}]")


def _jax_loss(config, params, peft, pc, batch, n):
    trainable = _trainable_from_peft(peft, config.num_layers)
    loss_fn = make_preference_loss_fn(config, LoraConfig(r=R, lora_alpha=ALPHA), pc, chunk=CHUNK)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    (loss, metrics), g = jax.value_and_grad(loss_fn, has_aux=True)(trainable, params, batch, n)
    return float(loss), {k: float(v) for k, v in metrics.items()}, g


def _peft_logps(peft, pairs):
    """TRL's fused-head log-probs of [chosen..., rejected...] (its collator's layout), summed per sequence."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    batch = DataCollatorForPreference(pad_token_id=0)(
        [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in pairs]
    )
    mask = batch["completion_mask"]
    labels = batch["input_ids"].masked_fill(mask == 0, -100)
    out = peft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels, fused_lm_head=True)
    logps = out.log_probs.sum(1)
    counts = mask.sum(1).to(logps.dtype)
    n = len(pairs)
    return logps[:n], logps[n:], counts[:n], counts[n:]


# gemma2: the final logit softcap inside the chunked log-probs, and sliding-window layers on packed segments.
@pytest.mark.parametrize("loss_type,family", [("sigmoid", "llama"), ("ipo", "llama"), ("hinge", "llama"),
                                              ("sigmoid", "gemma2")])  # fmt: skip
def test_dpo_matches_trl(loss_type, family):
    from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer

    config, params, peft = _setup(family)
    pairs = _pairs(config.vocab_size)
    peft.zero_grad()
    stub = _stub_trainer(
        peft, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], ld_alpha=None,
        use_weighting=False,
    )  # fmt: skip
    inputs = DataCollatorForPreference(pad_token_id=0)(
        [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in pairs]
    )
    loss_ref = DPOTrainer._compute_loss(stub, peft, inputs, return_outputs=False)
    loss_ref.backward()
    metrics_ref = {k: v[-1] for k, v in stub._metrics["train"].items()}

    batch = pack_pairs(pairs, SEQ_LEN)
    assert batch["tokens"].shape[0] < 2 * len(pairs)  # packed: several sequences per row
    pc = PreferenceConfig(method="dpo", beta=BETA, loss_type=loss_type)
    loss, metrics, g = _jax_loss(config, params, peft, pc, batch, 2 * len(pairs))
    assert_close(loss, loss_ref.item(), "f32", err_msg="loss")
    assert abs(metrics_ref["rewards/margins"]) > 1e-3  # the adapter moves the policy away from the reference
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"):  # fmt: skip
        assert_close(metrics[key], metrics_ref[key], "f32", err_msg=key)
    _check_grads(g, _lora_grads(peft), config.num_layers)


def test_orpo_matches_trl():
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    config, params, peft = _setup("llama")
    pairs = _pairs(config.vocab_size)
    peft.zero_grad()
    chosen, rejected, n_c, n_r = _peft_logps(peft, pairs)
    stub = _stub_trainer(peft)
    chosen_avg, rejected_avg = chosen / n_c, rejected / n_r
    losses, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen = ORPOTrainer.odds_ratio_loss(
        stub, chosen_avg, rejected_avg
    )
    nll = -chosen.sum() / n_c.sum()  # ORPO's CrossEntropyLoss: mean over the chosen completion tokens
    loss_ref = nll - losses.mean()
    loss_ref.backward()

    pc = PreferenceConfig(method="orpo", beta=BETA)
    loss, metrics, g = _jax_loss(config, params, peft, pc, pack_pairs(pairs, SEQ_LEN), 2 * len(pairs))
    assert_close(loss, loss_ref.item(), "f32", err_msg="loss")
    expected = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen_avg.mean(),
        "logps/rejected": rejected_avg.mean(),
        "nll_loss": nll,
        "log_odds_ratio": log_odds_ratio,
        "log_odds_chosen": log_odds_chosen,
    }
    for key, value in expected.items():
        assert_close(metrics[key], value.item(), "f32", err_msg=key)
    _check_grads(g, _lora_grads(peft), config.num_layers)


@pytest.mark.parametrize("cpo_alpha", [0.0, 1.0])
def test_simpo_matches_trl(cpo_alpha):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    config, params, peft = _setup("llama")
    pairs = _pairs(config.vocab_size)
    peft.zero_grad()
    chosen, rejected, n_c, n_r = _peft_logps(peft, pairs)
    stub = _stub_trainer(peft, alpha=0.0, loss_type="simpo", simpo_gamma=0.5, label_smoothing=0.1)
    chosen_avg, rejected_avg = chosen / n_c, rejected / n_r
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(stub, chosen_avg, rejected_avg)
    loss_ref = losses.mean() + cpo_alpha * (-chosen.sum() / n_c.sum())
    loss_ref.backward()

    pc = PreferenceConfig(method="simpo", beta=BETA, simpo_gamma=0.5, label_smoothing=0.1, cpo_alpha=cpo_alpha)
    loss, metrics, g = _jax_loss(config, params, peft, pc, pack_pairs(pairs, SEQ_LEN), 2 * len(pairs))
    assert_close(loss, loss_ref.item(), "f32", err_msg="loss")
    assert_close(metrics["rewards/chosen"], chosen_rewards.mean().item(), "f32")
    assert_close(metrics["rewards/margins"], (chosen_rewards - rejected_rewards).mean().item(), "f32")
    assert_close(metrics["logps/rejected"], rejected_avg.mean().item(), "f32")
    _check_grads(g, _lora_grads(peft), config.num_layers)


def test_kto_matches_trl():
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference, KTOTrainer

    config, params, peft = _setup("llama")
    pairs = _pairs(config.vocab_size)
    # Desirable and undesirable examples in an order whose mismatched-pair KL estimate is positive (0.27), so the
    # KL term is not clamped to 0.
    picks = ((0, 1, True), (1, 1, True), (2, 1, True), (0, 2, False), (2, 2, False))
    examples = [(pairs[i][0], pairs[i][k], d) for i, k, d in picks]
    peft.zero_grad()
    stub = _stub_trainer(peft, calculate_KL=True, loss_type="kto", desirable_weight=1.0, undesirable_weight=1.3)
    stub._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, stub)
    completions = [c for _, c, _ in examples]
    inputs = DataCollatorForUnpairedPreference(pad_token_id=0)(
        [
            {"prompt_ids": p, "completion_ids": c, "KL_completion_ids": kl, "label": d}
            for (p, c, d), kl in zip(examples, completions[-1:] + completions[:-1], strict=True)
        ]
    )
    loss_ref = KTOTrainer._compute_loss(stub, peft, inputs, return_outputs=False)
    loss_ref.backward()
    metrics_ref = {k: v[-1] for k, v in stub._metrics["train"].items()}

    batch, desirable = pack_unpaired(examples, SEQ_LEN)
    pc = PreferenceConfig(method="kto", beta=BETA, undesirable_weight=1.3)
    loss, metrics, g = _jax_loss(config, params, peft, pc, {**batch, "desirable": desirable}, 2 * len(examples))
    assert_close(loss, loss_ref.item(), "f32", err_msg="loss")
    assert metrics_ref["kl"] > 0  # the KL term is exercised, not clamped away
    for key in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert_close(metrics[key], metrics_ref[key], "f32", err_msg=key)
    _check_grads(g, _lora_grads(peft), config.num_layers)
