"""Logit parity of the generic decoder against transformers, for every supported family."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from converters.hf import load_hf_model
from jaxsloth.models import forward
from tests.tiny_models import FAMILIES, SLIDING_WINDOW, hf_model, saved_gemma3_multimodal, saved_model
from tests.tolerances import assert_close

T = 19  # longer than the sliding window (7), not a multiple of anything


def _hf_logits(model, ids, attention_mask=None, position_ids=None):
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(np.asarray(ids)),
            attention_mask=None if attention_mask is None else torch.tensor(np.asarray(attention_mask)),
            position_ids=None if position_ids is None else torch.tensor(np.asarray(position_ids)),
        )
    return out.logits.float().numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family):
    path = saved_model(family)
    config, params = load_hf_model(path, dtype=jnp.float32)
    assert T > SLIDING_WINDOW
    ids = np.random.default_rng(1).integers(0, config.vocab_size, (2, T))
    ours = jax.jit(lambda p, t: forward(p, t, config=config))(params, jnp.asarray(ids))
    assert_close(ours, _hf_logits(hf_model(path), ids), "f32_logits")


@pytest.mark.parametrize("family", ["llama", "gemma2", "mistral"])
def test_packed_batch_matches_examples_one_by_one(family):
    """Two examples packed in one row (segment ids, positions restarting) give each example's own logits."""
    path = saved_model(family)
    config, params = load_hf_model(path, dtype=jnp.float32)
    rng = np.random.default_rng(2)
    a, b = rng.integers(3, config.vocab_size, 11), rng.integers(3, config.vocab_size, 6)
    pad = 2
    tokens = np.concatenate([a, b, np.zeros(pad, int)])[None]
    segs = np.concatenate([np.ones(11), 2 * np.ones(6), np.zeros(pad)]).astype(np.int32)[None]
    pos = np.concatenate([np.arange(11), np.arange(6), np.arange(pad)]).astype(np.int32)[None]
    ours = np.asarray(
        forward(
            params,
            jnp.asarray(tokens),
            config=config,
            positions=jnp.asarray(pos),
            segment_ids=jnp.asarray(segs),
        )
    )
    hf = hf_model(path)
    assert_close(ours[0, :11], _hf_logits(hf, a[None])[0], "f32_logits")
    assert_close(ours[0, 11:17], _hf_logits(hf, b[None])[0], "f32_logits")


@pytest.mark.parametrize("family", ["qwen2", "phi3"])
def test_right_padded_batch_matches_attention_mask(family):
    path = saved_model(family)
    config, params = load_hf_model(path, dtype=jnp.float32)
    rng = np.random.default_rng(3)
    ids = rng.integers(3, config.vocab_size, (2, T))
    mask = np.ones((2, T), np.int64)
    mask[1, 12:] = 0
    ours = np.asarray(forward(params, jnp.asarray(ids), config=config, segment_ids=jnp.asarray(mask, jnp.int32)))
    ref = _hf_logits(hf_model(path), ids, attention_mask=mask)
    assert_close(ours[0], ref[0], "f32_logits")
    assert_close(ours[1, :12], ref[1, :12], "f32_logits")


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_bf16_logits_close_to_f32_reference(family):
    path = saved_model(family)
    config, params = load_hf_model(path, dtype=jnp.bfloat16)
    ids = np.random.default_rng(4).integers(0, config.vocab_size, (2, T))
    ours = np.asarray(forward(params, jnp.asarray(ids), config=config))
    ref = _hf_logits(hf_model(path), ids)
    # bf16 weights and activations (8-bit mantissa) through 3-4 layers: errors relative to the logit scale.
    scale = np.abs(ref).max()
    assert_close(ours / scale, ref / scale, "bf16")


def test_gemma3_multimodal_text_tower_matches_transformers(tmp_path):
    """A Gemma 3 image-text checkpoint loads as its text tower (the vision tower's tensors unread) with the logits
    transformers' image-text model gives text; its export is a text-only Gemma 3 that Gemma3ForCausalLM loads."""
    from transformers import AutoModelForCausalLM, Gemma3ForConditionalGeneration

    from converters.hf import save_hf_model

    path = saved_gemma3_multimodal()
    config, params = load_hf_model(path, dtype=jnp.float32)
    assert config.model_type == "gemma3_text" and config.qk_norm and config.local_rope is not None
    ids = np.random.default_rng(5).integers(3, 128, (2, T))  # below the image tokens
    ours = forward(params, jnp.asarray(ids), config=config)
    mm = Gemma3ForConditionalGeneration.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    assert_close(ours, _hf_logits(mm.eval(), ids), "f32_logits")
    save_hf_model(params, config, tmp_path, dtype=jnp.float32)
    text = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager", dtype=torch.float32)
    assert type(text).__name__ == "Gemma3ForCausalLM"
    assert_close(ours, _hf_logits(text.eval(), ids), "f32_logits")
