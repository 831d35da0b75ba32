"""The memory model (jaxsloth.train.memory) against XLA's compiled plan of the mixture-of-experts QLoRA step, and its
coverage of every preset architecture. Compiled on abstract inputs: nothing is allocated."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import pytest

import pallas_kernels.attention
from jaxsloth.config import LoraConfig, TrainConfig
from jaxsloth.models.presets import PRESETS, preset
from jaxsloth.profiles import PROFILES, profile_for_device
from jaxsloth.train.memory import GIB, XLA_WORKSPACE_BYTES, _weights_bytes, estimate_step_memory, longest_sequence


@jax.custom_vjp
def _flash_sized_attention(q, k, v):
    """Stands in for the GPU's flash attention (cuDNN) in a CPU plan: output and gradients the size of q, k and v,
    no [T, T] scores (which the CPU reference holds and the GPU never writes). The values are not attention's."""
    return q + (jnp.sum(k) + jnp.sum(v)).astype(q.dtype)


def _flash_fwd(q, k, v):
    return _flash_sized_attention(q, k, v), (k, v)


def _flash_bwd(res, g):
    k, v = res
    return g, jnp.zeros_like(k) + jnp.sum(g).astype(k.dtype), jnp.zeros_like(v)


_flash_sized_attention.defvjp(_flash_fwd, _flash_bwd)


def _qwen3_moe_layers(n: int):
    """Qwen3-30B-A3B at full width with ``n`` of its 48 layers."""
    config = preset("qwen3-30b-a3b")
    return dataclasses.replace(config, num_layers=n, layer_types=config.layer_types[:n] if config.layer_types else None)


def _compiled_plan_bytes(config, profile, batch: int, seq: int) -> int:
    """Arguments + temporaries of the QLoRA step's compiled plan (as the bench builds it: every expert NF4)."""
    from jaxsloth.bench.step import build_params
    from jaxsloth.lora import init_lora
    from jaxsloth.models.decoder import unstack_layers
    from jaxsloth.train.step import make_optimizer, make_train_step

    lora, tc = LoraConfig(r=16, lora_alpha=16.0), TrainConfig(learning_rate=2e-4, max_steps=10)
    params = jax.eval_shape(lambda k: build_params(config, "nf4", profile.dtype, k), jax.random.key(0))
    if profile.unrolled_layers:
        params = jax.eval_shape(unstack_layers, params)
    trainable = jax.eval_shape(lambda k: init_lora(config, lora, k), jax.random.key(1))
    optimizer = make_optimizer(tc, lora, trainable, profile.optimizer_state)
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    step = make_train_step(config, lora, tc, profile, optimizer)
    args = (trainable, jax.eval_shape(optimizer.init, trainable), params, {"tokens": tokens, "targets": tokens})
    stats = step.lower(*args, jax.eval_shape(lambda: jax.random.key(2))).compile().memory_analysis()
    return stats.argument_size_in_bytes + stats.temp_size_in_bytes


@pytest.mark.parametrize("layers", [1, 2])
def test_moe_estimate_follows_the_compiled_plan(monkeypatch, layers):
    """Qwen3-30B-A3B's QLoRA step at 2 x 2048 on the H200 profile (LoRA r=16 on attention and every expert), one and
    two of its layers at full width: the estimate, less the XLA workspace it reserves, within 15% of XLA's plan. The GPU
    kernels that do not run on CPU take their XLA references; attention takes a stand-in of flash attention's size."""
    monkeypatch.setattr(
        pallas_kernels.attention, "attention_reference", lambda q, k, v, *a, **kw: _flash_sized_attention(q, k, v)
    )
    # The XLA paths the CPU compiles as the GPU would (interpreted Pallas kernels plan differently).
    profile = profile_for_device(
        name="h200", rms_norm="reference", rope="reference", attention="reference", grouped_matmul="tiled"
    )
    config = _qwen3_moe_layers(layers)
    plan = _compiled_plan_bytes(config, profile, batch=2, seq=2048)
    est = estimate_step_memory(config, profile, batch=2, seq_len=2048, quantized=True)
    model = est.device_gib * GIB - XLA_WORKSPACE_BYTES
    assert abs(model - plan) <= 0.15 * plan, f"model {model / GIB:.2f} GiB vs plan {plan / GIB:.2f} GiB"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_has_an_estimate(name):
    """Each preset, LoRA and QLoRA, on every profile: a finite estimate above its frozen weights, growing with the
    sequence; on the H200 the QLoRA step of every preset fits at 2 x 2048 with a longest length to name."""
    config = preset(name)
    for profile in PROFILES.values():
        for quantized in (True, False):
            kw = dict(batch=2, quantized=quantized)
            short = estimate_step_memory(config, profile, seq_len=2048, **kw)
            long = estimate_step_memory(config, profile, seq_len=8192, **kw)
            assert math.isfinite(long.device_gib) and short.device_gib * GIB > _weights_bytes(
                config, quantized, profile.dtype.itemsize
            )
            assert long.device_gib > short.device_gib
    h200 = PROFILES["h200"]
    assert estimate_step_memory(config, h200, batch=2, seq_len=2048, quantized=True).device_gib < 139
    assert longest_sequence(config, h200, batch=2, quantized=True, device_gib=139, host_gib=120).tokens >= 2048


def test_host_memory_is_capped_by_xla_pinned_allocator(monkeypatch):
    """Offloaded checkpoints live in XLA's pinned host memory, capped at XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB (64 by
    default): a machine with more RAM still cannot hold more there, and the error says which variable raises it."""
    import os
    import types

    import jax

    from jaxsloth.train import memory

    gpu = types.SimpleNamespace(memory_stats=lambda: {"bytes_limit": 140 * memory.GIB})
    monkeypatch.setattr(jax, "local_devices", lambda: [gpu])
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / memory.GIB
    monkeypatch.delenv(memory.PINNED_HOST_LIMIT_ENV, raising=False)
    assert memory.machine_memory_gib() == (140.0, min(0.85 * ram, 64.0))
    monkeypatch.setenv(memory.PINNED_HOST_LIMIT_ENV, "0.5")
    assert memory.machine_memory_gib() == (140.0, min(0.85 * ram, 0.5))
    monkeypatch.setenv(memory.PINNED_HOST_LIMIT_ENV, "lots")
    with pytest.raises(ValueError, match="XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB='lots'"):
        memory.machine_memory_gib()
    config = _qwen3_moe_layers(1)
    profile = profile_for_device(name="h200").replace(remat="offload", mlp_chunk=8192, loss_chunk=16384)
    with pytest.raises(MemoryError, match="XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"):
        memory.check_fits(config, profile, batch=1, seq_len=400_000, quantized=True, device_gib=140.0, host_gib=0.5)
