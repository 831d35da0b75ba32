"""The decoder as Flax NNX modules (jaxsloth.models.modules): the same arrays as the functional trees, the same
logits as transformers, the training step over the split state compiling to the functional step's program, and a
jaxsloth model trained inside a user's own nnx.Module with nnx.Optimizer."""

from __future__ import annotations

import collections
import functools
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import jaxsloth
from jaxsloth.config import LoraConfig, TrainConfig
from jaxsloth.lora import init_lora
from jaxsloth.models import decoder, moe
from jaxsloth.models.config import config_from_hf_dict
from jaxsloth.models.modules import (
    CausalLM,
    LoRAParam,
    NF4Param,
    module_trees,
    split,
    state_shardings,
)
from jaxsloth.profiles import PROFILES
from jaxsloth.sharding import lora_shardings, make_mesh, param_shardings, place_train_state
from jaxsloth.train import module_step
from jaxsloth.train.module_step import init_optimizer_state, make_fit_step, make_module_train_step
from jaxsloth.train.step import make_optimizer, make_train_step
from tests.moe_models import MOE_FAMILIES, hf_moe_config
from tests.tiny_models import hf_config, hf_model, saved_model
from tests.tolerances import assert_close

LORA = LoraConfig(r=4, lora_alpha=8.0)


@functools.cache
def _tiny(family: str):
    """(config, params, trainable with a non-zero B, so every LoRA gradient is non-zero), built in one jit."""
    hf = hf_moe_config(family) if family in MOE_FAMILIES else hf_config(family)
    config = config_from_hf_dict(hf.to_dict())

    def build():
        params = decoder.init_params(config, jax.random.key(0), std=0.1)
        trainable = init_lora(config, LORA, jax.random.key(1))
        trainable = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), trainable)
        return params, trainable

    return config, *jax.jit(build)()


def _same_arrays(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(x is y for x, y in zip(la, lb, strict=True))


def _tokens(config, shape=(2, 9), seed=3):
    return jax.random.randint(jax.random.key(seed), shape, 0, config.vocab_size, jnp.int32)


@pytest.fixture(scope="module")
def loaded():
    """jaxsloth.load of a tiny saved Llama (the safetensors converter), with an adapter."""
    model, _ = jaxsloth.load(saved_model("llama"), dtype="float32", profile="cpu")
    return jaxsloth.add_lora(model, r=4, lora_alpha=8.0, seed=1)


def test_loaded_model_is_an_nnx_module_over_the_same_arrays_and_matches_transformers(loaded):
    module = loaded.module
    assert isinstance(module, nnx.Module)
    params, trainable = module_trees(module)
    assert _same_arrays(params, loaded.params) and _same_arrays(trainable, loaded.trainable)  # nothing copied
    assert module.layers.attention.q_proj.weight[...] is loaded.params["layers"]["q_proj"]["weight"]
    assert module.layers.attention.q_proj.weight[...].shape == (3, 96, 96)  # stacked: [layers, out, in]
    assert module.layers.attention.q_proj.weight.get_metadata()["out_sharding"] == ("layers", "out", "in")
    # The trainable set is a filter: exactly the LoRA tree's arrays, and nothing frozen.
    assert _same_arrays(module_trees(nnx.state(module, LoRAParam))[1], loaded.trainable)
    assert "LoRAParam" in repr(module) and "q_proj=Linear" in repr(module)
    ids = np.array([[1, 5, 17, 99, 42, 7, 130, 3]])
    with torch.no_grad():
        ref = hf_model(saved_model("llama"))(torch.tensor(ids)).logits.numpy()
    base = CausalLM.from_trees(loaded.config, loaded.params, ops=loaded.profile.ops)
    assert_close(np.asarray(base(jnp.asarray(ids))), ref, "f32_logits")  # B = 0: the base model's logits


def test_assigning_a_module_sets_the_model_arrays(loaded):
    module = loaded.module
    bumped = jax.tree.map(lambda x: x + 1.0, nnx.state(module, LoRAParam))
    nnx.update(module, bumped)
    model = jaxsloth.add_lora(loaded, r=4, lora_alpha=8.0, overwrite=True)
    model.module = module
    assert model.trainable["layers"]["q_proj"]["a"] is module.layers.attention.q_proj.lora_a[...]
    assert model.params["embed"] is loaded.params["embed"]


def test_nf4_weights_are_frozen_variables_holding_the_packed_arrays():
    model, _ = jaxsloth.load(saved_model("llama"), dtype="float32", profile="cpu", load_in_4bit=True)
    model = jaxsloth.add_lora(model, r=4)
    module = model.module
    weight = module.layers.mlp.down_proj.weight
    assert isinstance(weight, NF4Param) and "NF4Param" in repr(module)
    assert _same_arrays(weight.get_value(), model.params["layers"]["down_proj"]["weight"])
    assert not any(isinstance(v, NF4Param) for _, v in nnx.state(module, nnx.Param).flat_state())
    _, lora_state, frozen_state = split(module)
    params, _ = module_trees(frozen_state)
    assert _same_arrays(params, model.params)
    toks = _tokens(model.config)
    expected = _forward(model.config, model.params, model.trainable, toks)
    np.testing.assert_array_equal(np.asarray(_call(module, toks)), np.asarray(expected))


def test_unrolled_layout_and_gemma2_layers_run_the_functional_core():
    config, params, trainable = _tiny("gemma2")  # post norms, softcaps, alternating sliding layers
    stacked = CausalLM.from_trees(config, params, trainable, lora=LORA)
    toks = _tokens(config)
    expected = _forward(config, params, trainable, toks)
    np.testing.assert_array_equal(np.asarray(_call(stacked, toks)), np.asarray(expected))
    per_layer = decoder.unstack_layers(params)
    unrolled = CausalLM.from_trees(config, per_layer, trainable, lora=LORA)
    assert isinstance(unrolled.layers, nnx.List) and len(unrolled.layers) == config.num_layers
    back_params, back_trainable = module_trees(unrolled)
    assert _same_arrays(back_params, per_layer) and _same_arrays(back_trainable, trainable)
    assert_close(np.asarray(_call(unrolled, toks)), np.asarray(expected), "f32_logits")
    # One unrolled layer called alone is decoder.decoder_layer with that layer's weights (layer 1: global).
    h = decoder.embed(params, toks, config)
    inv_freq, scaling, _ = decoder.rope_setup(config)
    positions = jnp.broadcast_to(jnp.arange(toks.shape[1]), toks.shape)
    ref = jax.jit(
        lambda lp, h: decoder.decoder_layer(
            h, lp, None, config=config, ops=unrolled.ops, sliding=config.sliding_layers[1], positions=positions,
            segment_ids=None, inv_freq=inv_freq, rope_scaling=scaling, lora_rt=decoder.LoraRuntime(LORA.scale),
        )
    )(per_layer["layers"][1], h)  # fmt: skip
    layer = nnx.jit(lambda layer, h: layer(h, layer=1))(unrolled.layers[1], h)
    np.testing.assert_array_equal(np.asarray(layer), np.asarray(ref))


def test_mixture_of_experts_layers_hold_one_matrix_and_adapter_per_expert():
    config, params, trainable = _tiny("qwen3_moe")  # router + fused gate/up and down experts, LoRA on experts
    toks = _tokens(config)
    expected = _forward(config, params, trainable, toks)
    stacked = CausalLM.from_trees(config, params, trainable, lora=LORA)
    experts = stacked.layers.mlp.experts_gate_up
    assert experts.lora_a[...].shape[:2] == (config.num_layers, config.num_experts)
    assert experts.weight.sharding_names[:2] == ("layers", "experts")
    assert _same_arrays(module_trees(stacked), (params, trainable))
    np.testing.assert_array_equal(np.asarray(_call(stacked, toks)), np.asarray(expected))
    per_layer = decoder.unstack_layers(params)
    unrolled = CausalLM.from_trees(config, per_layer, trainable, lora=LORA)
    assert _same_arrays(module_trees(unrolled), (per_layer, trainable))
    assert_close(np.asarray(_call(unrolled, toks)), np.asarray(expected), "f32_logits")
    # The MoE block called alone is moe.moe_mlp with that layer's weights (no adapter on an unrolled layer).
    x = jax.random.normal(jax.random.key(4), (2, 5, config.hidden_size))
    ref = jax.jit(lambda lp, x: moe.moe_mlp(x, lp, None, config=config, ops=unrolled.ops, lora_scale=0.0)[0])
    got = nnx.jit(lambda mlp, x: mlp(x))(unrolled.layers[0].mlp, x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref(per_layer["layers"][0], x)))


@nnx.jit
def _call(module, tokens):
    return module(tokens)


def _forward(config, params, trainable, tokens):
    run = jax.jit(lambda p, t, x: decoder.forward(p, x, config=config, lora=t, lora_rt=LORA.runtime))
    return run(params, trainable, tokens)


def _op_counts(lowered) -> collections.Counter:
    """Ops of the lowered program (calls included), each distinct private function counted once: lowering may emit
    one function per call site (``jnp.where``'s) where another trace shares one, the same program either way."""
    functions = re.split(r"\n  func\.func ", lowered.as_text())
    bodies = {re.sub(r"@[\w.]+|%[\w#]+|\{[^{}]*\}", "", f.split("{", 1)[-1]) for f in functions[1:]}
    ops = re.findall(r"\b(?:stablehlo|chlo|mhlo|func|call)\.[a-z_]+", "".join(sorted(bodies)))
    return collections.Counter(ops)


def test_step_over_the_split_state_is_the_functional_step():
    """Same compiled program (op for op) and the same loss, gradient norm and LoRA update, bit for bit."""
    config, params, trainable = _tiny("llama")
    profile = PROFILES["cpu"]
    tc = TrainConfig(learning_rate=1e-2, max_steps=4)
    optimizer = make_optimizer(tc, LORA, trainable)
    batch = {"tokens": _tokens(config, (4, 9)), "targets": _tokens(config, (4, 9), seed=4)}
    key = jax.random.key(5)
    module = CausalLM.from_trees(config, params, trainable, lora=LORA)
    graphdef, lora_state, frozen_state = split(module)
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731  (the steps donate their inputs)

    functional = make_train_step(config, LORA, tc, profile, optimizer)
    module_step = make_module_train_step(config, LORA, tc, profile, optimizer)
    f_args = (copy(trainable), optimizer.init(trainable), params, batch, key)
    m_args = (copy(lora_state), init_optimizer_state(optimizer, lora_state), frozen_state, batch, key)
    f_lowered, m_lowered = functional.lower(*f_args), module_step.lower(*m_args)
    assert _op_counts(f_lowered) == _op_counts(m_lowered)
    f_trainable, f_opt, f_metrics = f_lowered.compile()(*f_args)
    m_state, m_opt, m_metrics = m_lowered.compile()(*m_args)
    for name in ("loss", "grad_norm"):
        assert float(f_metrics[name]) == float(m_metrics[name])
    assert isinstance(m_state, nnx.State)
    _, m_trainable = module_trees(m_state)
    for a, b in zip(jax.tree.leaves(f_trainable), jax.tree.leaves(m_trainable), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(f_opt), jax.tree.leaves(m_opt), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    merged = nnx.merge(graphdef, m_state, frozen_state)
    assert not np.array_equal(merged.layers.attention.q_proj.lora_a[...], trainable["layers"]["q_proj"]["a"])
    assert merged.layers.attention.q_proj.weight[...] is params["layers"]["q_proj"]["weight"]
    # On a device mesh, compiled for the states' placements (state_shardings): the functional step's program too.
    mesh = make_mesh("data=1", devices=jax.devices()[:1])
    p_mesh, t_mesh, o_mesh, (t_sh, o_sh, p_sh) = place_train_state(params, trainable, optimizer, mesh)
    functional = make_train_step(config, LORA, tc, profile, optimizer, mesh=mesh, shardings=(t_sh, o_sh, p_sh))
    shardings = (state_shardings(lora_state, mesh), o_sh, state_shardings(frozen_state, mesh))
    module_step = make_module_train_step(config, LORA, tc, profile, optimizer, mesh=mesh, shardings=shardings)
    f_lowered = functional.lower(t_mesh, o_mesh, p_mesh, batch, key)
    m_lowered = module_step.lower(lora_state, o_mesh, frozen_state, batch, key)
    assert _op_counts(f_lowered) == _op_counts(m_lowered)


def test_jaxsloth_train_runs_the_module_step_over_the_trees(monkeypatch):
    """``jaxsloth.train`` of a LoRA model compiles the module step (make_fit_step), called with the trees; called
    directly, it gives the functional step's results bit for bit, and the frozen state is built once."""
    config, params, trainable = _tiny("llama")
    profile = PROFILES["cpu"]
    tc = TrainConfig(learning_rate=1e-2, max_steps=4)
    optimizer = make_optimizer(tc, LORA, trainable)
    batch = {"tokens": _tokens(config, (4, 9)), "targets": _tokens(config, (4, 9), seed=4)}
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731  (the steps donate their inputs)
    f_out = make_train_step(config, LORA, tc, profile, optimizer)(
        copy(trainable), optimizer.init(trainable), params, batch, jax.random.key(5)
    )
    fit_step = make_fit_step(config, LORA, tc, profile, optimizer)
    args = (copy(trainable), optimizer.init(trainable), params, batch, jax.random.key(5))
    compiled = fit_step.lower(*args).compile()
    frozen = compiled.states.frozen(params)
    m_out = compiled(*args)
    assert compiled.states.frozen(params) is frozen  # the same arrays: the same state, not rebuilt per step
    for a, b in zip(jax.tree.leaves(f_out), jax.tree.leaves(m_out), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.structure(m_out[0]) == jax.tree.structure(trainable)

    built = []
    real = module_step.make_module_train_step
    monkeypatch.setattr(module_step, "make_module_train_step", lambda *a, **k: built.append(a) or real(*a, **k))
    demo = Path(jaxsloth.__file__).parent / "demo_assets"
    model, tokenizer = jaxsloth.load(demo / "model", profile="cpu", max_seq_length=64)
    model = jaxsloth.add_lora(model, r=4, seed=1)
    result = jaxsloth.train(model, tokenizer, str(demo / "train.jsonl"), max_steps=2, progress=False)
    assert len(built) == 1 and len(result.history) == 2


def test_state_shardings_are_the_sharding_rules_of_the_trees():
    config, params, trainable = _tiny("qwen2")
    module = CausalLM.from_trees(config, params, trainable, lora=LORA)
    mesh = jax.sharding.AbstractMesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    for shard_lora in (False, True):
        shardings = state_shardings(nnx.state(module), mesh, shard_lora)
        p_sh, t_sh = module_trees(shardings)
        assert p_sh == param_shardings(params, mesh) and t_sh == lora_shardings(trainable, mesh, shard_lora)
    spec = lambda v: v.get_value().spec  # noqa: E731
    assert spec(shardings["layers"]["attention"]["q_proj"]["weight"]) == jax.P(None, "fsdp", None)  # out: 96 / 4
    assert spec(shardings["embed"]["weight"]) == jax.P(None, "fsdp")  # vocab 131 does not divide: hidden instead
    assert spec(shardings["layers"]["attention"]["q_proj"]["bias"]) == jax.P()
    logical = nnx.get_partition_spec(nnx.state(module))
    assert logical["layers"]["attention"]["q_proj"]["weight"].get_value() == jax.P("layers", "out", "in")
    assert logical["layers"]["mlp"]["down_proj"]["lora_a"].get_value() == jax.P("layers", "lora_rank", "in")


class Classifier(nnx.Module):
    """A user's model: a jaxsloth LoRA model and a linear head on the last token's hidden state."""

    def __init__(self, lm: CausalLM, classes: int, rngs: nnx.Rngs):
        self.lm = lm
        self.head = nnx.Linear(lm.config.hidden_size, classes, rngs=rngs)

    def __call__(self, tokens):
        return self.head(self.lm.hidden_states(tokens)[:, -1])


def test_jaxsloth_model_trains_inside_a_users_nnx_module_with_nnx_optimizer():
    config, params, trainable = _tiny("qwen2")  # q/k/v biases: frozen Params beside the LoRA pair
    model = Classifier(CausalLM.from_trees(config, params, trainable, lora=LORA), 3, nnx.Rngs(0))
    wrt = nnx.Any(LoRAParam, nnx.PathContains("head"))
    optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=wrt)
    tokens = _tokens(config, (6, 7))
    labels = jnp.array([0, 1, 2, 0, 1, 2])

    @nnx.jit
    def train_step(model, optimizer, tokens, labels):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(tokens), labels).mean()

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
        optimizer.update(model, grads)
        return loss

    before = jax.tree.map(np.asarray, nnx.state(model))
    losses = [float(train_step(model, optimizer, tokens, labels)) for _ in range(5)]
    assert losses[-1] < 0.5 * losses[0], losses
    after = nnx.state(model)
    changed = {
        "/".join(map(str, path)): not np.array_equal(np.asarray(v.get_value()), before_v.get_value())
        for (path, v), (_, before_v) in zip(after.flat_state(), before.flat_state(), strict=True)
    }
    trained = {p for p, c in changed.items() if c}
    expected = {p for p in changed if p.startswith("head/") or p.rsplit("/", 1)[-1] in ("lora_a", "lora_b")}
    assert trained == expected, sorted(trained ^ expected)


def test_one_step_of_tunix_peft_trainer_on_a_jaxsloth_model(tmp_path):
    """Tunix's PeftTrainer finds the LoRAParams, builds nnx.Optimizer(wrt=nnx.LoRAParam) and takes one step.

    google-tunix 0.1.7 works with this JAX and Flax; its declared dependencies pull newer ones, so it runs from a
    directory of its own: ``pip install --target DIR --no-deps google-tunix google-metrax clu wrapt jaxtyping
    sentencepiece perfetto wadler_lindig`` (what its trainer imports beyond this venv), then PYTHONPATH=.:DIR."""
    peft_trainer = pytest.importorskip("tunix.sft.peft_trainer", reason="google-tunix is not installed")
    config, params, trainable = _tiny("llama")
    module = CausalLM.from_trees(config, params, trainable, lora=LORA)
    frozen_before = jax.tree.map(np.asarray, nnx.state(module, nnx.Not(LoRAParam)))
    lora_before = jax.tree.map(np.asarray, nnx.state(module, LoRAParam))
    loss = nnx.jit(lambda model, tokens, targets: model.loss({"tokens": tokens, "targets": targets}))
    expected_loss = float(loss(module, _tokens(config, (2, 9)), _tokens(config, (2, 9), 4)))

    def loss_fn(model, tokens, targets):
        return model.loss({"tokens": tokens, "targets": targets})

    training = peft_trainer.TrainingConfig(eval_every_n_steps=100, max_steps=1, pbar_description=None)
    trainer = peft_trainer.PeftTrainer(module, optax.sgd(1e-1), training).with_loss_fn(loss_fn)
    example = {"tokens": np.asarray(_tokens(config, (2, 9))), "targets": np.asarray(_tokens(config, (2, 9), 4))}
    trainer.train([example])
    assert trainer.train_steps == 1
    trainer.close()
    trained = trainer.model
    assert all(
        np.array_equal(a, np.asarray(b))
        for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(nnx.state(trained, nnx.Not(LoRAParam))))
    )
    moved = [
        not np.array_equal(a, np.asarray(b))
        for a, b in zip(jax.tree.leaves(lora_before), jax.tree.leaves(nnx.state(trained, LoRAParam)), strict=True)
    ]
    assert all(moved)
    assert float(loss(trained, example["tokens"], example["targets"])) < expected_loss
