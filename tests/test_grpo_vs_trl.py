"""One GRPO step on fixed prompts, completions and rewards equals TRL's GRPOTrainer on the same tiny model and
adapter: advantages, reward and completion metrics, loss, kl / entropy / clip metrics and LoRA gradients.

TRL's side is a real ``trl.GRPOTrainer`` around the PEFT model, its sampler replaced by the fixed samples: its own
``_generate_and_score_completions`` (rewards, advantages, reference log-probs with the adapter off, metrics) and
``_compute_loss`` run. jaxsloth's side: ``rewards.score``, ``grpo.group_advantages``, ``rollout.completion_batch``
and the jitted step's loss function.
"""

import functools
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from converters.hf import load_hf_model
from jaxsloth.lora import LoraConfig
from jaxsloth.methods.grpo import GRPOLossConfig, completion_metrics, group_advantages
from jaxsloth.methods.grpo_step import make_grpo_loss_fn, make_logps_fn
from jaxsloth.methods.rewards import reward_name, score
from jaxsloth.methods.rollout import completion_batch
from tests.test_lora_step_vs_peft import _trainable_from_peft
from tests.test_preference_vs_trl import _check_grads, _lora_grads
from tests.tiny_models import hf_model, saved_model
from tests.tiny_tokenizers import CHAT_FAMILIES, tiny_tokenizer
from tests.tolerances import assert_close

R, ALPHA = 4, 8.0
G = 3
MAX_COMPLETION = 6
EOT = 3  # the tiny llama-3.2 tokenizer's <|eot_id|>
CHUNK = 8  # several log-prob chunks, the last one padded
PROMPTS = [("ab", "7"), ("cde", "1")]
# Per prompt, G completions (text, ends with EOT): unscorable, truncated (MAX_COMPLETION tokens, no EOT) and
# ordinary ones, so every branch of the advantages and of mask_truncated_completions is taken.
COMPLETIONS = [("Zq", True), ("U7y", True), ("hello!", False), ("U1", True), ("x1", True), ("long t", False)]


def length_reward(prompts, completions, answer, **kwargs):
    return [
        None if c.startswith("Z") else float(len(c)) + (2.0 if a in c else 0.0) for c, a in zip(completions, answer)
    ]


def has_u(prompts, completions, **kwargs):
    return [1.0 if "U" in c else None for c in completions]


REWARDS = [length_reward, has_u]
WEIGHTS = [1.0, 0.5]


@functools.cache
def _setup():
    from datasets import Dataset
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from trl import GRPOConfig, GRPOTrainer

    path = saved_model("llama")
    config, params = load_hf_model(path, dtype=jnp.float32)
    model = hf_model(path)
    tok = tiny_tokenizer(CHAT_FAMILIES["llama-3.2"], model.config.vocab_size)
    cfg = PeftLoraConfig(
        r=R,
        lora_alpha=ALPHA,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    torch.manual_seed(0)
    peft = get_peft_model(model, cfg)
    torch.manual_seed(1)
    with torch.no_grad():  # non-zero B: the policy differs from the reference and A has a gradient
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=len(COMPLETIONS),
        num_generations=G,
        max_completion_length=MAX_COMPLETION,
        reward_weights=WEIGHTS,
        report_to="none",
        use_cpu=True,
        bf16=False,
    )
    data = Dataset.from_dict({"prompt": [p for p, _ in PROMPTS], "answer": [a for _, a in PROMPTS]})
    trainer = GRPOTrainer(model=peft, reward_funcs=REWARDS, args=args, train_dataset=data, processing_class=tok)
    trainer.current_gradient_accumulation_steps = 1
    prompt_ids = [tok(p)["input_ids"] for p, _ in PROMPTS for _ in range(G)]
    completion_ids = [tok(t, add_special_tokens=False)["input_ids"] + ([EOT] if eot else []) for t, eot in COMPLETIONS]
    assert max(len(c) for c in completion_ids) == MAX_COMPLETION

    def fixed_samples(prompts):
        texts = tok.batch_decode(completion_ids, skip_special_tokens=True)
        return prompt_ids, completion_ids, None, texts, None, {}, None, []

    trainer._generate = fixed_samples
    return config, params, peft, trainer, tok, prompt_ids, completion_ids


@functools.cache
def _logps_fn(config):
    return make_logps_fn(config, LoraConfig(r=R, lora_alpha=ALPHA), chunk=CHUNK)  # compiled once for every case


CASES = {  # loss_type, beta, epsilon_high, scale_rewards, mask_truncated_completions, off-policy samples, KL
    # bias correction
    "grpo": ("grpo", 0.0, None, "group", False, False, True),
    "bnpo": ("bnpo", 0.3, None, "batch", True, True, False),
    "dr_grpo": ("dr_grpo", 0.0, 0.28, "none", False, True, True),
    "dapo": ("dapo", 0.3, 0.28, "group", True, True, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_grpo_step_matches_trl(case):
    loss_type, beta, epsilon_high, scale_rewards, mask_truncated, off_policy, bias_correction = CASES[case]
    config, params, peft, trainer, tok, prompt_ids, completion_ids = _setup()
    trainer.beta, trainer.loss_type, trainer.scale_rewards = beta, loss_type, scale_rewards
    trainer.epsilon_high = epsilon_high if epsilon_high is not None else trainer.epsilon_low
    trainer.mask_truncated_completions = mask_truncated
    trainer.args.use_bias_correction_kl = bias_correction
    trainer._metrics["train"].clear()
    peft.train()
    peft.zero_grad()
    inputs = [{"prompt": p, "answer": a} for p, a in PROMPTS for _ in range(G)]
    out = trainer._generate_and_score_completions(inputs)
    old = None
    if off_policy:  # samples from earlier weights (num_iterations > 1): old log-probs off by up to +-0.5
        with torch.no_grad():
            ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
            attention = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
            logps, _, _ = trainer._get_per_token_logps_and_entropies(peft, ids, attention, MAX_COMPLETION)
        shift = torch.from_numpy(np.random.default_rng(0).uniform(-0.5, 0.5, logps.shape).astype(np.float32))
        old = logps + shift
        out["old_per_token_logps"] = old
    loss_ref = trainer._compute_loss(peft, out)
    loss_ref.backward()
    metrics_ref = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    # jaxsloth: rewards, advantages and metrics on the host, then the loss function of the jitted step.
    texts = tok.batch_decode(completion_ids, skip_special_tokens=True)
    prompts = [p for p, _ in PROMPTS for _ in range(G)]
    rewards = score(REWARDS, prompts, texts, completion_ids, {"answer": [a for _, a in PROMPTS for _ in range(G)]})
    names = [reward_name(f) for f in REWARDS]
    advantages, metrics = group_advantages(rewards, WEIGHTS, G, scale_rewards, names)
    assert_close(advantages, out["advantages"].numpy(), "f32", err_msg="advantages")
    truncated = np.array([c[-1] != EOT for c in completion_ids])
    metrics |= completion_metrics([len(c) for c in completion_ids], truncated)
    batch = completion_batch(
        prompt_ids, completion_ids, MAX_COMPLETION, truncated=truncated, mask_truncated_completions=mask_truncated
    )
    batch["advantages"] = advantages
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    lora = LoraConfig(r=R, lora_alpha=ALPHA)
    trainable = _trainable_from_peft(peft, config.num_layers)
    if old is not None:  # jaxsloth's sampling-time log-probs (make_logps_fn), shifted as TRL's
        sampled = np.asarray(_logps_fn(config)(trainable, params, batch))
        mask = batch["completion_mask"]
        assert_close(sampled * mask, logps.numpy() * mask, "f32", err_msg="sampling-time log-probs")
        batch["old_logps"] = jnp.asarray(sampled + shift.numpy())
    lc = GRPOLossConfig(
        beta=beta,
        epsilon_high=epsilon_high,
        loss_type=loss_type,
        max_completion_length=MAX_COMPLETION,
        use_bias_correction_kl=bias_correction,
    )
    loss_fn = make_grpo_loss_fn(config, lora, lc, chunk=CHUNK)
    num_items = jnp.sum(batch["completion_mask"].astype(jnp.float32))
    (loss, step_metrics), g = jax.value_and_grad(loss_fn, has_aux=True)(trainable, params, batch, num_items)
    metrics |= {k: float(v) for k, v in step_metrics.items()}

    assert_close(float(loss), loss_ref.item(), "f32", err_msg="loss")
    if off_policy:  # the ratios leave [1 - epsilon, 1 + epsilon_high] (on both sides, all rows counted)
        assert metrics_ref["clip_ratio/region_mean"] > 0
        if not mask_truncated:
            assert metrics_ref["clip_ratio/low_mean"] > 0 and metrics_ref["clip_ratio/high_mean"] > 0
    if beta:
        assert metrics_ref["kl"] > 1e-4  # the adapter moves the policy away from the reference
    keys = set(metrics_ref) - {"num_tokens"}
    assert keys <= set(metrics), sorted(keys - set(metrics))
    for key in sorted(keys):
        assert_close(metrics[key], metrics_ref[key], "f32", err_msg=key)  # NaN matches NaN
    _check_grads(g, _lora_grads(peft), config.num_layers)


def test_accumulated_step_matches_trl():
    """The jitted step over two micro-batches (bnpo: each normalised by its own tokens, then / 2), with the
    reference's log-probs computed beforehand, against TRL's ``_compute_loss`` on the two halves with
    gradient_accumulation_steps=2, gradients accumulated."""
    import optax

    from jaxsloth.methods.grpo_step import make_grpo_step

    config, params, peft, trainer, tok, prompt_ids, completion_ids = _setup()
    trainer.beta, trainer.loss_type, trainer.scale_rewards = 0.3, "bnpo", "group"
    trainer.epsilon_high, trainer.mask_truncated_completions = 0.28, False
    trainer.args.use_bias_correction_kl = True
    trainer._metrics["train"].clear()
    peft.train()
    peft.zero_grad()
    out = trainer._generate_and_score_completions([{"prompt": p, "answer": a} for p, a in PROMPTS for _ in range(G)])
    shift = np.random.default_rng(1).uniform(-0.5, 0.5, out["completion_ids"].shape).astype(np.float32)
    with torch.no_grad():
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
        attention = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
        logps, _, _ = trainer._get_per_token_logps_and_entropies(peft, ids, attention, MAX_COMPLETION)
    out["old_per_token_logps"] = logps + torch.from_numpy(shift)
    trainer.current_gradient_accumulation_steps = 2
    half = len(COMPLETIONS) // 2
    try:
        loss_ref = 0.0
        for rows in (slice(0, half), slice(half, None)):
            part = {k: v[rows] if torch.is_tensor(v) and v.dim() else v for k, v in out.items()}
            loss = trainer._compute_loss(peft, part)
            loss.backward()
            loss_ref += loss.item()
    finally:
        trainer.current_gradient_accumulation_steps = 1
    metrics_ref = {k: np.mean(v) for k, v in trainer._metrics["train"].items()}

    batch = completion_batch(prompt_ids, completion_ids, MAX_COMPLETION)
    batch["advantages"] = out["advantages"].numpy()
    batch["old_logps"] = out["old_per_token_logps"].numpy()
    # The reference's log-probs computed before the step, as jaxsloth.train's GRPO loop does (adapter off).
    batch["ref_logps"] = np.asarray(_logps_fn(config)(None, params, {k: jnp.asarray(v) for k, v in batch.items()}))
    micro = {k: jnp.asarray(v.reshape(2, half, *v.shape[1:])) for k, v in batch.items()}
    lora = LoraConfig(r=R, lora_alpha=ALPHA)
    lc = GRPOLossConfig(beta=0.3, epsilon_high=0.28, loss_type="bnpo", max_completion_length=MAX_COMPLETION)
    sgd = optax.sgd(1.0)  # the update is minus the gradient
    step = make_grpo_step(config, lora, lc, sgd, chunk=CHUNK)
    trainable = _trainable_from_peft(peft, config.num_layers)
    before = jax.tree.map(np.array, trainable)
    after, _, metrics = step(trainable, sgd.init(trainable), params, micro)
    g = jax.tree.map(lambda b, a: b - np.asarray(a), before, after)

    assert_close(float(metrics["loss"]), loss_ref, "f32", err_msg="loss")
    assert metrics_ref["clip_ratio/region_mean"] > 0 and metrics_ref["kl"] > 1e-4
    for key in ("kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert_close(float(metrics[key]), metrics_ref[key], "f32", err_msg=key)
    _check_grads(g, _lora_grads(peft), config.num_layers)
