"""The unrolled layer loop over per-layer weight arrays against the layer scan over stacked ones."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsloth.lora import LoraConfig, init_lora, with_trainable
from jaxsloth.models import init_params
from jaxsloth.models.config import config_from_hf_dict
from jaxsloth.models.decoder import layers_unstacked, loss_sum_and_count, stack_layers, unstack_layers
from jaxsloth.ops import KernelChoice, Ops
from jaxsloth.profiles import Profile, profile_for_device
from tests.test_models_kernels import CONFIGS, quantize_projections
from tests.tolerances import assert_close

DEMO = Path(__file__).parents[1] / "jaxsloth" / "demo_assets"


def _model(family: str, quantized: bool):
    config = config_from_hf_dict({**CONFIGS[family], "num_hidden_layers": 4})
    params = init_params(config, jax.random.key(0), jnp.float32, std=0.05)
    return config, quantize_projections(params) if quantized else params


@pytest.mark.parametrize("family,quantized", [("llama", True), ("gemma2", False)])
@pytest.mark.parametrize("remat", ["none", "dots", "offload"])
def test_unrolled_loop_equals_the_scan(family, quantized, remat):
    # Same loss and LoRA gradients from either layout, for every remat policy; Gemma 2 runs its alternating
    # sliding/global layers in groups of two either way, and the dropout keys follow the layer index in both.
    config, params = _model(family, quantized)
    lora = LoraConfig(r=4, lora_alpha=8.0, lora_dropout=0.1)
    trainable = jax.tree.map(
        lambda x: x + 0.02 * jax.random.normal(jax.random.key(2), x.shape), init_lora(config, lora, jax.random.key(1))
    )
    tokens = np.random.default_rng(3).integers(0, config.vocab_size, (2, 21))
    batch = {"tokens": jnp.asarray(tokens, jnp.int32), "targets": jnp.asarray(np.roll(tokens, -1, 1), jnp.int32)}

    def loss(t, p):
        p, lt = with_trainable(p, t)
        s, c = loss_sum_and_count(
            p, batch, config=config, ops=Ops(KernelChoice()), lora=lt, lora_rt=lora.runtime, head_grad=False,
            remat=remat, dropout_key=jax.random.key(5),
        )  # fmt: skip
        return s / c

    unstacked = unstack_layers(params)
    assert layers_unstacked(unstacked) and len(unstacked["layers"]) == config.num_layers
    want_loss, want_g = jax.jit(jax.value_and_grad(loss))(trainable, params)
    got_loss, got_g = jax.jit(jax.value_and_grad(loss))(trainable, unstacked)
    assert_close(got_loss, want_loss, "f32")
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got_g)[0], jax.tree.leaves(want_g), strict=True):
        assert_close(a, b, "f32_grad", err_msg=jax.tree_util.keystr(path))


def test_unstack_and_stack_round_trip_and_consume():
    _, params = _model("llama", quantized=True)
    want = jax.tree.map(np.asarray, params)
    layer0 = jax.tree.map(lambda x: np.asarray(x)[0], params["layers"])
    unstacked = unstack_layers(params)
    assert params["layers"], "without consume the caller's tree is left as it was"
    for a, b in zip(jax.tree.leaves(unstacked["layers"][0]), jax.tree.leaves(layer0), strict=True):
        np.testing.assert_array_equal(a, b)
    consumed = unstack_layers(params, consume=True)
    assert params["layers"] == {}, "consume empties the stacked dict as it goes"
    back = stack_layers(consumed, consume=True)
    assert all(layer == {} for layer in consumed["layers"])
    assert jax.tree.structure(back) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_failed_split_puts_the_moved_projections_back():
    # consume moves projections one at a time; an error midway (here a leaf without a layer axis, where an
    # out-of-memory would be the real case) must leave the caller's stacked weights whole.
    _, params = _model("llama", quantized=False)
    layers = params["layers"]
    names = list(layers)
    want = {n: np.asarray(layers[n]["weight"]) for n in names if isinstance(layers[n], dict)}
    bad = list(want)[len(want) // 2]
    layers[bad] = {"weight": jnp.zeros((), jnp.float32)}
    with pytest.raises(IndexError):
        unstack_layers(params, consume=True)
    assert sorted(params["layers"]) == sorted(names)
    for n, w in want.items():
        if n != bad:
            np.testing.assert_array_equal(params["layers"][n]["weight"], w)


def test_train_unstacks_for_the_step_and_restores_the_model():
    # jaxsloth.train under an unrolled profile: the same losses as the scan, the model's weights back in the stacked
    # layout afterwards, bit for bit.
    import jaxsloth

    def run(layer_loop):
        model, tok = jaxsloth.load(
            DEMO / "model", load_in_4bit=True, profile="cpu", max_seq_length=64, layer_loop=layer_loop
        )
        before = jax.tree.map(np.asarray, model.params)
        model = jaxsloth.add_lora(model, r=8)
        result = jaxsloth.train(model, tok, str(DEMO / "train.jsonl"), max_steps=2, progress=False)
        assert not layers_unstacked(model.params)
        assert jax.tree.structure(model.params) == jax.tree.structure(before)
        for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(before), strict=True):
            np.testing.assert_array_equal(a, b)
        return [r["loss"] for r in result.history]

    np.testing.assert_allclose(run("unrolled"), run("scan"), rtol=1e-5)


def test_layer_loop_is_validated_and_hopper_unrolls_but_for_the_lean_remats():
    with pytest.raises(ValueError, match="layer_loop 'loop'"):
        Profile("x", layer_loop="loop")
    h200 = profile_for_device(name="h200")
    assert h200.layer_loop == "auto" and h200.unrolled_layers and h200.replace(remat="dots").unrolled_layers
    assert not h200.replace(remat="full").unrolled_layers and not h200.replace(remat="offload").unrolled_layers
    assert h200.replace(remat="full", layer_loop="unrolled").unrolled_layers
    assert not profile_for_device(name="a100").unrolled_layers


def test_dots_layers_keep_dots_outputs_in_the_first_layers_only():
    # attn_dots with dots_layers=k: the first k layers recompute nothing in the backward (as "dots"), the rest
    # recompute gate/up (as "attn_dots"): the gradient's matmul count falls by k layers' worth of that recompute,
    # and the values are the same as without remat.
    config, params = _model("llama", quantized=False)
    lora = LoraConfig(r=4, lora_alpha=8.0)
    trainable = init_lora(config, lora, jax.random.key(1))
    trainable = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(jax.random.key(2), x.shape), trainable)
    tokens = np.random.default_rng(3).integers(0, config.vocab_size, (1, 13))
    batch = {"tokens": jnp.asarray(tokens, jnp.int32), "targets": jnp.asarray(np.roll(tokens, -1, 1), jnp.int32)}
    unstacked = unstack_layers(params)

    def loss(t, p, remat, dots_layers=0):
        p, lt = with_trainable(p, t)
        s, c = loss_sum_and_count(
            p, batch, config=config, lora=lt, lora_rt=lora.runtime, remat=remat, dots_layers=dots_layers
        )
        return s / c

    def count(jaxpr, name="dot_general") -> int:  # every occurrence, inside sub-jaxprs too (printing shares them)
        n = 0
        for eqn in jaxpr.eqns:
            n += eqn.primitive.name == name
            for value in eqn.params.values():
                for sub in value if isinstance(value, (list, tuple)) else [value]:
                    sub = getattr(sub, "jaxpr", sub)
                    n += count(sub, name) if hasattr(sub, "eqns") else 0
        return n

    def matmuls(remat, k=0):
        return count(jax.make_jaxpr(jax.grad(lambda t: loss(t, unstacked, remat, k)))(trainable).jaxpr)

    attn, dots, mixed = matmuls("attn_dots"), matmuls("dots"), matmuls("attn_dots", 2)
    assert dots < attn and (attn - dots) % config.num_layers == 0
    assert mixed == attn - 2 * (attn - dots) // config.num_layers
    want = jax.grad(lambda t: loss(t, params, "none"))(trainable)
    got = jax.grad(lambda t: loss(t, unstacked, "attn_dots", 2))(trainable)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want), strict=True):
        assert_close(a, b, "f32_grad", err_msg=jax.tree_util.keystr(path))
    with pytest.raises(ValueError, match="dots_layers=2 needs the unrolled layer loop"):
        loss(trainable, params, "attn_dots", 2)
    with pytest.raises(ValueError, match="needs layer_loop 'unrolled' or 'auto'"):
        Profile("x", layer_loop="scan", dots_layers=2)
    assert Profile("x", remat="full", layer_loop="auto", dots_layers=2).unrolled_layers


def test_memory_model_counts_dots_layers_between_the_two_policies():
    from jaxsloth.models.presets import preset
    from jaxsloth.train.memory import estimate_step_memory

    config, h200 = preset("llama3.1-8b"), profile_for_device(name="h200")

    def gib(**overrides):
        return estimate_step_memory(config, h200.replace(**overrides), batch=2, seq_len=2048, quantized=True).device_gib

    attn, dots = gib(remat="attn_dots"), gib(remat="dots")
    assert gib(remat="attn_dots", dots_layers=16) == pytest.approx((attn + dots) / 2)
    assert gib(remat="attn_dots", dots_layers=32) == pytest.approx(dots)
