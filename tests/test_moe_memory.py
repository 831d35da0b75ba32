"""The mixture-of-experts training step's memory plan: XLA's temporaries scale with the routed rows, not with every
expert times every routed row (compiled on abstract inputs: nothing is allocated)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxsloth.config import LoraConfig, TrainConfig
from jaxsloth.lora import init_lora
from jaxsloth.models.decoder import init_params
from jaxsloth.models.moe import expert_shapes
from jaxsloth.models.presets import preset
from jaxsloth.profiles import profile_for_device
from jaxsloth.train.step import make_optimizer, make_train_step
from tests.abstract_step import compile_abstract_step


def _small_qwen3_moe():
    """Qwen3-30B-A3B's structure at a size where the experts dominate: 64 experts of width 32, 4 per token, hidden
    256 (a dense expansion over the experts is then far wider than any activation)."""
    config = preset("qwen3-30b-a3b")
    return dataclasses.replace(
        config,
        vocab_size=256,
        hidden_size=256,
        num_layers=1,
        layer_types=config.layer_types[:1] if config.layer_types else config.layer_types,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        num_experts=64,
        num_experts_per_tok=4,
        moe_intermediate_size=32,
    )


def test_lora_step_temporaries_do_not_scale_with_experts_times_rows():
    config = _small_qwen3_moe()
    profile = profile_for_device(name="cpu")
    lora = LoraConfig(r=4, lora_alpha=8.0)
    tc = TrainConfig(learning_rate=1e-4, max_steps=10)
    params = jax.eval_shape(lambda k: init_params(config, k, profile.dtype), jax.random.key(0))
    trainable = jax.eval_shape(lambda k: init_lora(config, lora, k), jax.random.key(1))
    assert "experts_gate_up" in trainable["layers"] and "experts_down" in trainable["layers"]
    optimizer = make_optimizer(tc, lora, trainable, profile.optimizer_state)
    batch_size, seq = 1, 256
    tokens = jax.ShapeDtypeStruct((batch_size, seq), jnp.int32)
    step = make_train_step(config, lora, tc, profile, optimizer)
    compiled = step.lower(
        trainable,
        jax.eval_shape(optimizer.init, trainable),
        params,
        {"tokens": tokens, "targets": tokens},
        jax.eval_shape(lambda: jax.random.key(2)),
    ).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    # One routed row per (token, expert) pair; a dense expansion of them over every expert (what a ragged dot's
    # transpose builds for the adapters' gradients) is experts x rows x hidden.
    rows = batch_size * seq * config.num_experts_per_tok
    expanded = config.num_experts * rows * config.hidden_size * jnp.dtype(profile.dtype).itemsize
    assert temp < expanded / 2, f"step temporaries {temp / 2**20:.1f} MiB vs one expansion {expanded / 2**20:.1f} MiB"


def _qlora_step_temp(config, profile, lora, tc) -> int:
    """Temporaries of the QLoRA step (every expert matrix NF4, as the bench builds them) at 1 x 256 tokens."""
    from jaxsloth.bench.step import build_params

    params = jax.eval_shape(lambda k: build_params(config, "nf4", profile.dtype, k), jax.random.key(0))
    compiled, _ = compile_abstract_step(config, profile, params, tokens=256, lora=lora, tc=tc)
    return compiled.memory_analysis().temp_size_in_bytes


def test_unrolled_qlora_step_keeps_no_layers_dequantized_experts():
    """The unrolled layer loop (the GPU profiles' under attn_dots): each layer's experts are dequantized when its
    rows arrive, not all up front, so the temporaries grow per layer by less than one layer's dequantized experts."""
    config = _small_qwen3_moe()
    profile = profile_for_device(name="cpu", remat="attn_dots", layer_loop="unrolled")
    lora, tc = LoraConfig(r=4, lora_alpha=8.0), TrainConfig(learning_rate=1e-4, max_steps=10)
    temps = [_qlora_step_temp(_with_layers(config, n), profile, lora, tc) for n in (1, 3)]
    experts = sum(e * o * i for e, o, i in expert_shapes(config).values()) * jnp.dtype(profile.dtype).itemsize
    per_layer = (temps[1] - temps[0]) / 2
    assert per_layer < experts, f"{per_layer / 2**20:.1f} MiB per layer vs {experts / 2**20:.1f} MiB of experts"


def _with_layers(config, n: int):
    types = config.layer_types[:1] * n if config.layer_types else config.layer_types
    return dataclasses.replace(config, num_layers=n, layer_types=types)


def test_grouped_matmul_loops_hold_no_accumulator_beyond_their_layer():
    """Layers of tiled grouped matmuls under remat, as the step runs its experts: each extra layer holds its input
    (the remat checkpoint), not the zero accumulators of its forward, recomputed and backward loops (XLA shares one
    zero constant between every loop and copies it for each at the start of the program, unless the accumulator is
    created after the loop's input)."""
    from pallas_kernels.grouped_matmul import grouped_matmul_tiled

    rows, width, groups = 1024, 128, 8
    gs = jax.ShapeDtypeStruct((groups,), jnp.int32)
    x = jax.ShapeDtypeStruct((rows, width), jnp.float32)

    def temp(layers: int) -> int:
        def loss(x, ws, gs):
            for w in ws:  # frozen experts: the gradient is the rows'
                x = jax.checkpoint(lambda x, w: x + jnp.tanh(grouped_matmul_tiled(x, w, gs)))(x, w)
            return jnp.sum(x)

        ws = [jax.ShapeDtypeStruct((groups, width, width), jnp.float32)] * layers
        return jax.jit(jax.grad(loss)).lower(x, ws, gs).compile().memory_analysis().temp_size_in_bytes

    per_layer = (temp(4) - temp(1)) / 3
    one_layer_input = rows * width * 4
    assert per_layer < 1.5 * one_layer_input, f"{per_layer / one_layer_input:.2f} layer inputs held per layer"


def test_moe_layers_hold_only_their_inputs():
    """Layers of the expert MLP under remat, in bf16 with frozen experts (a nonlinearity before each, as the norm in
    the decoder): each extra layer holds its input (the remat checkpoint), not zero buffers of its loops or of its
    row gather's gradient scatter hoisted to the program start."""
    from jaxsloth.models.moe import moe_mlp
    from jaxsloth.ops import KernelChoice, Ops

    config = _small_qwen3_moe()
    tokens, d = 512, config.hidden_size
    x = jax.ShapeDtypeStruct((1, tokens, d), jnp.bfloat16)
    shapes = {n: (e, o, i) for n, (e, o, i) in expert_shapes(config).items()}
    layer = {n: {"weight": jax.ShapeDtypeStruct(s, jnp.bfloat16)} for n, s in shapes.items()}
    layer["router"] = {"weight": jax.ShapeDtypeStruct((config.num_experts, d), jnp.bfloat16)}

    def temp(layers: int) -> int:
        def mlp(x, lp):
            return x + moe_mlp(jnp.tanh(x), lp, None, config=config, ops=Ops(KernelChoice()), lora_scale=0.0)[0]

        def loss(x, lps):
            for lp in lps:
                x = jax.checkpoint(mlp)(x, lp)
            return jnp.sum(x)

        return jax.jit(jax.grad(loss)).lower(x, [layer] * layers).compile().memory_analysis().temp_size_in_bytes

    per_layer = (temp(4) - temp(1)) / 3
    layer_input = tokens * d * 2
    assert per_layer < 1.5 * layer_input, f"{per_layer / layer_input:.2f} layer inputs held per layer"
