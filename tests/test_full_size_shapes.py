"""Full-size architectures build under jax.eval_shape (no weights allocated) with the published counts."""

import jax
import jax.numpy as jnp
import pytest

from jaxsloth.models import count_params, init_params
from jaxsloth.models.presets import PRESETS, PUBLISHED_PARAM_COUNTS, preset


def _hf_count(name):
    """Independent count: transformers' own model on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    d = dict(PRESETS[name])
    cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_param_count_matches_published(name):
    config = preset(name)
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0), jnp.bfloat16))
    assert count_params(shapes) == PUBLISHED_PARAM_COUNTS[name]


@pytest.mark.parametrize(
    "name", ["llama3.1-8b", "gemma2-9b", "phi3-mini", "qwen3-8b", "gemma3-12b", "mistral-nemo-12b", "phi4"]
)
def test_param_count_matches_transformers(name):
    config = preset(name)
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0), jnp.bfloat16))
    assert count_params(shapes) == _hf_count(name)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_memory_model_counts_every_weight(name):
    """The memory model's frozen weights in bf16 are two bytes per published parameter (q/k and post-norms too)."""
    from jaxsloth.train.memory import _weights_bytes

    assert _weights_bytes(preset(name), quantized=False, e=2) == 2 * PUBLISHED_PARAM_COUNTS[name]
