"""The dense LoRA step's memory plan: no buffer XLA holds for no reason (compiled on abstract inputs: nothing is
allocated)."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import pytest

from jaxsloth.config import LoraConfig, TrainConfig
from jaxsloth.lora import init_lora
from jaxsloth.models.decoder import init_params, unstack_layers
from jaxsloth.models.presets import preset
from jaxsloth.profiles import profile_for_device
from jaxsloth.train.step import make_loss_fn
from tests.abstract_step import compile_abstract_step

LAYERS = 4


def _small_llama():
    """Llama 3.1's structure with wide weights and few tokens: the frozen weights dominate the step's memory."""
    config = preset("llama3.1-8b")
    return dataclasses.replace(
        config,
        vocab_size=256,
        hidden_size=512,
        intermediate_size=1024,
        num_layers=LAYERS,
        layer_types=config.layer_types[:LAYERS],
        num_heads=4,
        num_kv_heads=2,
        head_dim=128,
    )


def _compiled_step(remat: str, layer_loop: str):
    config = _small_llama()
    profile = profile_for_device(name="cpu", remat=remat, layer_loop=layer_loop)
    lora, tc = LoraConfig(r=16, lora_alpha=16.0), TrainConfig(learning_rate=2e-4, max_steps=10)
    params = jax.eval_shape(lambda k: init_params(config, k, profile.dtype), jax.random.key(0))
    return compile_abstract_step(config, profile, params, tokens=32, lora=lora, tc=tc)


@pytest.fixture(scope="module", params=[("attn_dots", "unrolled"), ("full", "scan")], ids=["unrolled", "scan"])
def compiled_step(request):
    return _compiled_step(*request.param)


def _copied_parameters(hlo: str) -> list[str]:
    """Names of the entry parameters the optimized program copies whole (``copy(%param)``)."""
    entry = hlo[hlo.index("ENTRY") :]
    params = set(re.findall(r"%(\S+) = \S+ parameter\(\d+\)", entry))
    return [name for name in re.findall(r" copy\(%([^)]+)\)", entry) if name in params]


def test_adamw_updates_the_donated_moments_in_place(compiled_step):
    """The update reads each old moment once: XLA copies no moment (8 bytes per LoRA value, which it would schedule
    at the start of the step and hold through it)."""
    compiled, _ = compiled_step
    copied = [n for n in _copied_parameters(compiled.as_text()) if "mu" in n or "nu" in n]
    assert not copied, f"copies of the AdamW moments: {copied}"


def test_scan_holds_no_copy_of_the_stacked_weights():
    """The layer scan over one layer per step reads the stacked frozen weights in place: its temporaries stay under
    half of them (XLA:CPU copies the whole stack before the loop when the scan reads a [L, 1, ...] view of it)."""
    compiled, params = _compiled_step("full", "scan")
    stacked = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params["layers"]))
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < stacked / 2, f"temporaries {temp / 2**20:.1f} MiB vs stacked weights {stacked / 2**20:.1f} MiB"


def test_unrolled_layers_save_no_lora_slices(capsys):
    """The unrolled loop slices each layer's LoRA from the stacked tree inside the layer's remat: the forward saves
    no f32 slice for the backward (every layer's, held from its forward to its backward: 4 bytes per LoRA value)."""
    config = _small_llama()
    profile = profile_for_device(name="cpu", remat="attn_dots", layer_loop="unrolled", compute_dtype="bfloat16")
    lora = LoraConfig(r=16, lora_alpha=16.0)
    params = unstack_layers(init_params(config, jax.random.key(0), profile.dtype))
    trainable = init_lora(config, lora, jax.random.key(1))
    tokens = jnp.zeros((1, 32), jnp.int32)
    loss = make_loss_fn(config, lora, profile)
    jax.ad_checkpoint.print_saved_residuals(
        lambda tr: loss(tr, params, {"tokens": tokens, "targets": tokens}, None)[0], trainable
    )
    slices = [line for line in capsys.readouterr().out.splitlines() if "layer_slice" in line]
    assert not slices, f"{len(slices)} LoRA slices saved for the backward, e.g. {slices[0]}"
