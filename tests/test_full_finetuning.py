"""Full fine-tuning and continued pretraining: the full-FT step against transformers + torch.optim.AdamW, 8-bit AdamW
moments against bitsandbytes' quantization map and the f32 moments, the settings from the CLI / YAML / Unsloth's
names, and the trained model exported for transformers."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsloth
from converters.hf import load_hf_model, to_hf_state_dict
from jaxsloth import cli, demo
from jaxsloth.config import TrainConfig, split_settings
from jaxsloth.models import forward
from jaxsloth.profiles import profile_for_device
from jaxsloth.train import optim8bit
from jaxsloth.train.step import make_loss_fn, make_optimizer, make_train_step
from tests.tiny_models import hf_model, saved_model
from tests.tolerances import TOLERANCES, assert_close

PROFILE = profile_for_device(name="cpu")
# AdamW settings away from the defaults, so a setting that does not reach the optimizer changes the weights.
ADAMW = dict(
    learning_rate=1e-3, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6, weight_decay=0.1, max_grad_norm=1.0
)


def _batches(vocab: int, n: int, seed: int = 0) -> list[dict]:
    """n batches of 2 rows x 10 tokens; targets are the next tokens, a few masked with -100."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tokens = rng.integers(3, vocab, (2, 10)).astype(np.int32)
        targets = np.concatenate([tokens[:, 1:], np.full((2, 1), -100)], axis=1).astype(np.int32)
        targets[0, :2] = -100
        out.append({"tokens": tokens, "targets": targets})
    return out


@pytest.fixture(scope="module")
def tiny():
    path = saved_model("llama")
    config, params = load_hf_model(path, dtype=jnp.float32)
    return path, config, params


_STEPS = {}


def _step(config, optimizer_state: str):
    """Our full fine-tuning step and its optimizer, built (and so compiled) once per optimizer_state."""
    if optimizer_state not in _STEPS:
        tc = TrainConfig(**ADAMW, lr_scheduler_type="constant")
        optimizer = make_optimizer(tc, None, {}, optimizer_state)
        _STEPS[optimizer_state] = make_train_step(config, None, tc, PROFILE, optimizer), optimizer
    return _STEPS[optimizer_state]


def _train_steps(config, params, batches, optimizer_state="float32"):
    """Our steps over ``batches``; returns the weights after each step and the step metrics."""
    step, optimizer = _step(config, optimizer_state)
    trainable = jax.tree.map(jnp.copy, params)  # the step donates its state
    opt_state = optimizer.init(trainable)
    weights, metrics = [], []
    for b in batches:
        trainable, opt_state, m = step(trainable, opt_state, {}, jax.tree.map(jnp.asarray, b), jax.random.key(0))
        weights.append(jax.tree.map(np.asarray, trainable))
        metrics.append(jax.device_get(m))
    return weights, metrics


def _torch_steps(path, batches):
    """transformers' model with torch.optim.AdamW (decay on every weight but biases and norms, as Trainer), global
    norm clipping, the mean token loss; returns its state dict after each step and the first step's gradients."""
    import torch

    model = hf_model(path).train()
    named = list(model.named_parameters())
    no_decay = [p for n, p in named if n.endswith("bias") or "norm" in n]
    decay = [p for n, p in named if not (n.endswith("bias") or "norm" in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": ADAMW["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=ADAMW["learning_rate"],
        betas=(ADAMW["adam_beta1"], ADAMW["adam_beta2"]),
        eps=ADAMW["adam_epsilon"],
    )
    states, grads, losses = [], None, []
    for b in batches:
        opt.zero_grad()
        logits = model(input_ids=torch.tensor(b["tokens"], dtype=torch.long)).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), torch.tensor(b["targets"], dtype=torch.long).reshape(-1)
        )
        loss.backward()
        if grads is None:
            grads = {n: p.grad.detach().numpy().copy() for n, p in named}
        torch.nn.utils.clip_grad_norm_(model.parameters(), ADAMW["max_grad_norm"])
        opt.step()
        losses.append(loss.item())
        states.append({k: v.detach().numpy().copy() for k, v in model.state_dict().items()})
    return states, grads, losses


def test_full_finetuning_steps_match_torch_adamw(tiny):
    path, config, params = tiny
    batches = _batches(config.vocab_size, 3)
    states, torch_grads, torch_losses = _torch_steps(path, batches)

    loss_fn = make_loss_fn(config, None, PROFILE)
    (loss_sum, count), g = jax.value_and_grad(loss_fn, has_aux=True)(params, {}, batches[0], None)
    ours = to_hf_state_dict(jax.tree.map(lambda x: x / count, g), config)
    assert set(ours) == set(torch_grads)  # a gradient for every weight
    for name, grad in ours.items():
        assert_close(grad, torch_grads[name], "f32_grad", err_msg=name)

    weights, metrics = _train_steps(config, params, batches)
    assert_close([float(m["loss"]) for m in metrics], torch_losses, "f32")
    assert metrics[0]["grad_norm"] > ADAMW["max_grad_norm"]  # the clipping is exercised
    for step, (w, state) in enumerate(zip(weights, states, strict=True), 1):
        for name, value in to_hf_state_dict(w, config).items():
            assert_close(value, state[name], "adamw_f32_weights", err_msg=f"step {step}: {name}")


def test_dynamic_map_is_bitsandbytes_and_quantization_picks_the_nearest_value():
    import bitsandbytes.functional as bnbf

    for signed in (True, False):
        np.testing.assert_allclose(optim8bit.dynamic_map(signed), bnbf.create_dynamic_map(signed=signed).numpy(),
                                   rtol=0, atol=1e-7)  # fmt: skip
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(1000) * np.exp(rng.uniform(-12, 0, 1000))).astype(np.float32)
    for signed, values in ((True, x), (False, np.abs(x))):
        q = optim8bit.quantize_blockwise(jnp.asarray(values), signed)
        blocks = np.pad(values, (0, 24)).reshape(4, 256)
        absmax = np.abs(blocks).max(axis=1)
        np.testing.assert_array_equal(np.asarray(q.absmax), absmax)
        code = optim8bit.dynamic_map(signed)
        dist = np.abs(blocks[..., None] / absmax[:, None, None] - code)
        chosen = np.take_along_axis(dist, np.asarray(q.codes, np.int64)[..., None], axis=-1)[..., 0]
        np.testing.assert_array_equal(chosen, dist.min(axis=-1))  # the nearest map value (ties either way)
        back = optim8bit.dequantize_blockwise(q, signed, values.shape)
        assert np.abs(np.asarray(back) - values).max() <= 0.02 * np.abs(values).max()


def test_float32_moments_are_optax_adamw():
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((64, 80)), jnp.float32), "norm": jnp.ones((80,))}
    mask = lambda t: {"w": True, "norm": False}  # noqa: E731
    ours = optim8bit.adamw(1e-2, b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.1, mask=mask)
    ref = optax.adamw(1e-2, b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.1, mask=mask)
    s_ours, s_ref = ours.init(params), ref.init(params)
    for _ in range(3):
        g = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)  # noqa: B023
        u_ours, s_ours = ours.update(g, s_ours, params)
        u_ref, s_ref = ref.update(g, s_ref, params)
        for a, b in zip(jax.tree.leaves((u_ours, s_ours)), jax.tree.leaves((u_ref, s_ref)), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_8bit_moments_train_and_step_close_to_float32(tiny):
    _, config, params = tiny
    batch = _batches(config.vocab_size, 1, seed=2)[0]
    w32, _ = _train_steps(config, params, [batch] * 8)
    w8, m8 = _train_steps(config, params, [batch] * 8, "8bit")
    losses = [float(m["loss"]) for m in m8]
    assert losses[-1] < 0.7 * losses[0], losses
    bound = TOLERANCES["adam8bit_update"]["rtol"]
    for step in range(1, 8):  # from step 2 the stored (quantized) moments enter the update
        d32 = np.concatenate(
            [(b - a).ravel() for a, b in zip(jax.tree.leaves(w32[step - 1]), jax.tree.leaves(w32[step]))]
        )  # noqa: E501
        d8 = np.concatenate([(b - a).ravel() for a, b in zip(jax.tree.leaves(w8[step - 1]), jax.tree.leaves(w8[step]))])  # noqa: E501
        rel = np.linalg.norm(d8 - d32) / np.linalg.norm(d32)
        assert rel < bound, f"step {step + 1}: 8-bit update differs from the f32 one by {rel:.3g} (relative)"
    state = _step(config, "8bit")[1].init(params)
    f32_state_bytes = 8 * sum(x.size for x in jax.tree.leaves(params))
    assert sum(x.nbytes for x in jax.tree.leaves(state)) < 0.3 * f32_state_bytes  # a quarter, plus the small tensors


# --- the settings, from Python, YAML, the CLI and Unsloth's names ---------------------------------------------------


@pytest.fixture(scope="module")
def records():
    train, _ = demo.task_splits(num_train=16, num_heldout=1, seed=3)
    return train


def test_full_finetuning_with_load_in_4bit_is_an_error_naming_both():
    with pytest.raises(ValueError, match=r"full_finetuning.*load_in_4bit"):
        jaxsloth.load(demo.MODEL_DIR, full_finetuning=True, load_in_4bit=True)
    model, _ = jaxsloth.load(demo.MODEL_DIR, full_finetuning=True, profile="cpu")
    with pytest.raises(ValueError, match="full_finetuning"):
        jaxsloth.add_lora(model)


def test_unsloth_full_finetuning_trains_every_weight_and_saves_for_transformers(records, tmp_path):
    """Unsloth's full fine-tuning cells: from_pretrained(full_finetuning=True), SFTTrainer without an adapter,
    save_pretrained: transformers loads the folder and gives the trained model's logits."""
    import torch
    from transformers import AutoModelForCausalLM

    from jaxsloth import FastLanguageModel, SFTConfig, SFTTrainer

    with pytest.warns(UserWarning, match="load_in_4bit turned off"):  # Unsloth's default load_in_4bit=True
        model, tokenizer = FastLanguageModel.from_pretrained(
            str(demo.MODEL_DIR), max_seq_length=64, full_finetuning=True, profile="cpu"
        )
    with pytest.warns(UserWarning, match="no adapter added"):
        assert FastLanguageModel.get_peft_model(model, r=8) is model
    before = jax.tree.map(np.asarray, model.params)
    args = SFTConfig(per_device_train_batch_size=4, max_steps=3, learning_rate=1e-3, output_dir=str(tmp_path / "o"))
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=records, args=args)
    stats = trainer.train()
    assert stats.global_step == 3 and model.trainable is None
    after = model.params
    changed = [float(np.abs(np.asarray(a) - b).max()) for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before))]
    assert min(changed) > 0  # every weight trained: projections, norms, embeddings, LM head

    out = model.save_pretrained(tmp_path / "full", tokenizer)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = np.array([[1, 5, 9, 13, 17, 21, 25, 2]])
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(forward(model.params, jnp.asarray(ids), config=model.config))
    assert_close(ours, theirs, "f32_logits")


def test_cli_trains_every_weight_from_yaml_and_writes_the_model(records, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {demo.MODEL_DIR}\ndata: {data}\noutput_dir: {tmp_path / 'o'}\nfull_finetuning: true\n"
        "optimizer_state: float32\nmax_seq_length: 64\nper_device_train_batch_size: 4\nmax_steps: 2\nprofile: cpu\n"
    )
    assert cli.main(["train", str(config), "--learning-rate", "1e-3"]) == 0
    assert "model: " in capsys.readouterr().out
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "o" / "model").state_dict()
    base = AutoModelForCausalLM.from_pretrained(demo.MODEL_DIR).state_dict()
    assert all((trained[k] != base[k]).any() for k in base)
    assert not (tmp_path / "o" / "adapter").exists()
    # LoRA settings do not apply to full fine-tuning: one line naming them, before the model loads.
    assert cli.main(["train", str(config), "--r", "8", "--output-dir", str(tmp_path / "p")]) == 2
    assert "drop r" in capsys.readouterr().err


def _settings(argv, tmp_path, yaml_text):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: m\ndata: d\n{yaml_text}")
    return cli.train_settings(cli.build_parser().parse_args(["train", str(config), *argv]))


def test_full_finetuning_and_optimizer_state_from_yaml_and_flags(tmp_path):
    s = _settings([], tmp_path, "full_finetuning: true\noptimizer_state: 8bit\n")
    assert s["full_finetuning"] and s["optimizer_state"] == "8bit"
    s = _settings(["--no-full-finetuning", "--optimizer-state", "float32"], tmp_path, "full_finetuning: true\n")
    assert not s["full_finetuning"] and s["optimizer_state"] == "float32"
    with pytest.raises(ValueError, match="optimizer_state"):
        _settings(["--optimizer-state", "4bit"], tmp_path, "")
    load = split_settings({"full_finetuning": True, "optimizer_state": "8bit", "profile": "cpu"})[0]
    assert load.build_profile().optimizer_state == "8bit"


def test_embedding_learning_rate_from_yaml_and_flag_reaches_the_optimizer(tmp_path, tiny):
    """YAML sets it, the flag overrides it; one AdamW step moves each weight by its group's learning rate (Adam's
    first step is lr x sign(gradient)), so the trained embeddings move by embedding_learning_rate."""
    _, config, params = tiny
    yaml_text = "train_embeddings: true\ntrain_lm_head: true\nembedding_learning_rate: 1e-5\nlearning_rate: 1e-3\n"
    assert _settings([], tmp_path, yaml_text)["embedding_learning_rate"] == 1e-5
    s = _settings(["--embedding-learning-rate", "3e-5", "--max-steps", "5"], tmp_path, yaml_text)
    _, lora, tc = split_settings(s)
    assert lora.embedding_learning_rate == 3e-5
    from jaxsloth.lora import init_lora

    trainable = init_lora(config, lora, jax.random.key(0), params=params)
    optimizer = make_optimizer(tc, lora, trainable)
    ones = jax.tree.map(jnp.ones_like, trainable)
    updates, _ = optimizer.update(ones, optimizer.init(trainable), trainable)
    new = optax.apply_updates(trainable, updates)
    moved = {k: max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(new[k]), jax.tree.leaves(trainable[k])))
             for k in trainable}  # fmt: skip
    # linear schedule from the peak at step 0; max_grad_norm clips the ones, which Adam's first step ignores
    np.testing.assert_allclose(moved["embed"], 3e-5, rtol=1e-3)
    np.testing.assert_allclose(moved["lm_head"], 3e-5, rtol=1e-3)
    np.testing.assert_allclose(moved["layers"], 1e-3, rtol=1e-3)


def test_unsloth_target_modules_embed_tokens_and_lm_head_train_full_copies():
    from jaxsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(str(demo.MODEL_DIR), load_in_4bit=False, profile="cpu")
    model = FastLanguageModel.get_peft_model(
        model, r=4, target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"], embedding_learning_rate=5e-6
    )
    lora = model.lora
    assert lora.train_embeddings and lora.train_lm_head and lora.embedding_learning_rate == 5e-6
    assert lora.target_modules == ("q_proj", "v_proj") and {"embed", "lm_head"} <= set(model.trainable)


def test_bench_full_finetuning_step_and_memory_model(tmp_path):
    """`jaxsloth.bench.step --full-finetuning` (the H200 suite full_ft_h200.sh): XLA's plan for the step takes every
    weight and both f32 moments as arguments, and the memory model counts them with a gradient per weight."""
    from jaxsloth.bench import step
    from jaxsloth.models.decoder import count_params
    from jaxsloth.train.memory import GIB, estimate_step_memory

    out = tmp_path / "plan.jsonl"
    step.main(["--model-path", str(demo.MODEL_DIR), "--quant", "bf16", "--full-finetuning", "--profile", "cpu"]
              + ["--batch", "1", "--seq", "32", "--compile-only", "--out", str(out)])  # fmt: skip
    rec = json.loads(out.read_text().splitlines()[0])
    assert rec["workload"] == "model-full-b1-s32" and rec["optimizer_state"] == "float32"
    config, params = load_hf_model(demo.MODEL_DIR, dtype=jnp.float32)
    n = count_params(params)
    assert rec["compiled_argument_gib"] * GIB >= n * (4 + 8)  # f32 weights and two f32 moments per weight
    kw = dict(batch=1, seq_len=32, quantized=False, lora_r=None)
    full = estimate_step_memory(config, PROFILE, **kw)
    eight = estimate_step_memory(config, PROFILE.replace(optimizer_state="8bit"), **kw)
    assert full.fixed_gib * GIB == pytest.approx(n * (4 + 4 + 8) + GIB)  # weights, gradients, moments, workspace
    assert (full.fixed_gib - eight.fixed_gib) * GIB == pytest.approx(n * (8 - 2 * (1 + 4 / 256)))
    with pytest.raises(SystemExit, match="bf16"):
        step.main(["--model-path", str(demo.MODEL_DIR), "--quant", "nf4", "--full-finetuning", "--out", str(out)])
