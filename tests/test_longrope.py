"""Phi-3 LongRoPE against transformers: generation that crosses the original context, and packed / padded rows.

A tiny Phi-3 with original_max_position_embeddings 16 (max 64, so the attention scaling is not 1) crosses from
the short to the long factors within a few tokens. transformers decides per forward call from max position + 1,
and its Phi-3 generate re-runs the whole sequence at the step that first crosses: its step logits equal a
full forward over the sequence so far, which is what ours must give, step by step.
"""

import functools
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

from converters.hf import load_hf_model
from jaxsloth import generate as gen
from jaxsloth.models import forward
from tests.tiny_models import _COMMON, hf_model
from tests.tolerances import assert_close

ORIG = 16


@functools.cache
def _model() -> Path:
    from transformers import AutoModelForCausalLM, Phi3Config

    rng = np.random.default_rng(0)
    half = _COMMON["head_dim"] // 2
    cfg = Phi3Config(
        **{**_COMMON, "max_position_embeddings": 64},
        original_max_position_embeddings=ORIG,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [float(x) for x in 1 + rng.random(half)],
            "long_factor": [float(x) for x in 2 + 2 * rng.random(half)],
        },
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float()
    path = Path(tempfile.mkdtemp(prefix="tiny-phi3-longrope16-")) / "model"
    model.save_pretrained(path)
    return path


def _hf_generate(model, prompt, new):
    """transformers' greedy generate on one prompt: (new tokens, step logits [new, V])."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences[0, len(prompt) :].tolist(), torch.stack(out.logits)[:, 0].float().numpy()


def _our_step_logits(params, config, prompt, forced):
    """Our prefill then decode steps (the generate loop's own step function), teacher-forced with ``forced``:
    step logits [1 + len(forced), V]."""
    tokens, pads = gen.left_pad([prompt])
    b, p = tokens.shape
    s = p + len(forced)
    kw = dict(config=config, ops=gen.Ops(), lora_rt=gen.LoraRuntime(), compute_dtype=None)
    logits, ks, vs = gen._prefill(params, None, jnp.asarray(tokens), jnp.asarray(pads), p - 1, **kw)
    cache_k = jnp.zeros((ks.shape[0], b, s, *ks.shape[3:]), ks.dtype).at[:, :, :p].set(ks)
    cache_v = jnp.zeros_like(cache_k).at[:, :, :p].set(vs)
    seq = np.zeros((b, s), np.int32)
    seq[:, :p] = tokens
    out = [np.asarray(logits[0])]
    done = jnp.zeros((b,), bool)
    step = jax.jit(functools.partial(gen._next_logits, **kw))
    for i, t in enumerate(forced):
        seq[0, p + i] = t
        token = jnp.full((b,), t, jnp.int32)
        logits, cache_k, cache_v = step(
            params, None, token, jnp.asarray(seq), p + i, jnp.asarray(pads), done, cache_k, cache_v
        )
        out.append(np.asarray(logits[0]))
    return np.stack(out)


def test_step_logits_across_the_original_context_match_transformers():
    path = _model()
    config, params = load_hf_model(path, dtype=jnp.float32)
    prompt = np.random.default_rng(1).integers(3, config.vocab_size, ORIG - 4).tolist()
    new = 10  # positions 12 .. 21: crosses at position 16
    hf_tokens, hf_logits = _hf_generate(hf_model(path), prompt, new)
    ours = _our_step_logits(params, config, prompt, hf_tokens[:-1])
    assert_close(ours, hf_logits, "f32_logits")


def test_greedy_generation_per_row_matches_transformers_on_each_prompt():
    """Rows of different lengths cross at different steps (one starts past the original context); each row
    generates what transformers generates for its prompt alone."""
    path = _model()
    config, params = load_hf_model(path, dtype=jnp.float32)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, config.vocab_size, n).tolist() for n in (5, ORIG - 2, ORIG, ORIG + 3)]
    hf = hf_model(path)
    ours = gen.generate(params, config, prompts, max_new_tokens=9)
    assert ours == [_hf_generate(hf, p, 9)[0] for p in prompts]


def test_packed_and_padded_rows_choose_factors_per_example():
    """A packed row with a short and a long example (relative to the original context), and a right-padded
    short example in a row longer than the original context: each example gets transformers' logits alone."""
    path = _model()
    config, params = load_hf_model(path, dtype=jnp.float32)
    hf = hf_model(path)
    rng = np.random.default_rng(3)
    a, b = rng.integers(3, config.vocab_size, ORIG - 6), rng.integers(3, config.vocab_size, ORIG + 8)
    width = len(a) + len(b) + 2
    packed = np.concatenate([a, b, [0, 0]])
    segs_packed = np.concatenate([np.ones(len(a)), 2 * np.ones(len(b)), [0, 0]])
    pos_packed = np.concatenate([np.arange(len(a)), np.arange(len(b)), [0, 0]])
    padded = np.concatenate([a, np.zeros(width - len(a), int)])
    segs_padded = np.concatenate([np.ones(len(a)), np.zeros(width - len(a))])
    pos_padded = np.concatenate([np.arange(len(a)), np.zeros(width - len(a))])
    ours = np.asarray(
        forward(
            params,
            jnp.asarray(np.stack([packed, padded]), jnp.int32),
            config=config,
            positions=jnp.asarray(np.stack([pos_packed, pos_padded]), jnp.int32),
            segment_ids=jnp.asarray(np.stack([segs_packed, segs_padded]), jnp.int32),
        )
    )
    with torch.no_grad():
        hf_a = hf(torch.tensor(a[None])).logits[0].numpy()
        hf_b = hf(torch.tensor(b[None])).logits[0].numpy()
    assert_close(ours[0, : len(a)], hf_a, "f32_logits")
    assert_close(ours[0, len(a) : len(a) + len(b)], hf_b, "f32_logits")
    assert_close(ours[1, : len(a)], hf_a, "f32_logits")


def test_default_positions_pick_factors_from_the_row_length():
    path = _model()
    config, params = load_hf_model(path, dtype=jnp.float32)
    hf = hf_model(path)
    for n in (ORIG + 1,):
        ids = np.random.default_rng(n).integers(3, config.vocab_size, (1, n))
        with torch.no_grad():
            ref = hf(torch.tensor(ids)).logits.numpy()
        assert_close(forward(params, jnp.asarray(ids), config=config), ref, "f32_logits")
