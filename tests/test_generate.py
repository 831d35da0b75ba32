"""KV-cache generation against transformers' generate, sampling semantics, stop tokens, compile reuse."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from converters.hf import load_hf_model
from jaxsloth import generate as gen
from jaxsloth.lora import with_trainable
from jaxsloth.models.decoder import LoraRuntime
from jaxsloth.ops import KernelChoice, Ops
from tests.tiny_models import NEW_CODE_FAMILIES, SLIDING_WINDOW, hf_model, saved_model
from tests.tolerances import assert_close

LENGTHS = (5, 13, 2)  # a batch of different lengths; 13 + new tokens runs past the sliding window (7)
NEW = 9


def _prompts(config, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, config.vocab_size, n).tolist() for n in LENGTHS]


def _hf_generate(model, prompts, max_new_tokens, **generate_kw):
    """transformers' greedy generate on the left-padded batch, EOS disabled: (its output, the padded width)."""
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
            **generate_kw,
        )
    return out, width


def _hf_greedy(model, prompts, max_new_tokens):
    """New tokens per row of transformers' greedy generate."""
    out, width = _hf_generate(model, prompts, max_new_tokens)
    return out[:, width:].tolist()


@pytest.mark.parametrize("family", ["llama", "gemma2", "mistral", "qwen2", *NEW_CODE_FAMILIES])
def test_greedy_matches_transformers(family):
    path = saved_model(family)
    config, params = load_hf_model(path, dtype=jnp.float32)
    prompts = _prompts(config)
    assert max(LENGTHS) + NEW > SLIDING_WINDOW
    ours = gen.generate(params, config, prompts, max_new_tokens=NEW)
    assert ours == _hf_greedy(hf_model(path), prompts, NEW)


@pytest.mark.parametrize("family", ["gemma2", "mistral", "gemma3"])
def test_cached_step_logits_match_transformers(family):
    """The logits behind every generated token (prefill, then each cached decode step), not only their argmax:
    tiny random models repeat tokens, which could hide a wrong cache or window mask."""
    path = saved_model(family)
    config, params = load_hf_model(path, dtype=jnp.float32)
    prompts = _prompts(config, seed=2)
    out, width = _hf_generate(hf_model(path), prompts, NEW, return_dict_in_generate=True, output_logits=True)
    hf_logits = np.stack([x.float().numpy() for x in out.logits], axis=1)  # [B, NEW, V]
    new_tokens = out.sequences[:, width:].numpy()

    tokens, pads = gen.left_pad(prompts)
    b, p = tokens.shape
    kw = dict(config=config, ops=Ops(), lora_rt=LoraRuntime(), compute_dtype=None)
    logits, ks, vs = jax.jit(lambda t, pd: gen._prefill(params, None, t, pd, **kw))(tokens, pads)
    shape = (config.num_layers, b, p + NEW, config.num_kv_heads, config.head_dim)
    cache_k = jnp.zeros(shape).at[:, :, :p].set(ks)
    cache_v = jnp.zeros(shape).at[:, :, :p].set(vs)
    step = jax.jit(lambda tok, s, ck, cv: gen._decode_step(params, None, tok, s, jnp.asarray(pads), ck, cv, **kw))
    ours = [logits]
    for n in range(NEW - 1):
        token = np.zeros(b, np.int32)
        token[: len(prompts)] = new_tokens[:, n]
        logits, cache_k, cache_v = step(token, p + n, cache_k, cache_v)
        ours.append(logits)
    assert_close(np.stack(ours, axis=1)[: len(prompts)], hf_logits, "f32_logits")


def test_stop_token_stops_and_is_included():
    config, params = load_hf_model(saved_model("llama"), dtype=jnp.float32)
    prompts = _prompts(config)
    free = gen.generate(params, config, prompts, max_new_tokens=NEW)
    stop = free[0][3]
    stopped = gen.generate(params, config, prompts, max_new_tokens=NEW, stop_tokens=[stop])
    for row, full in zip(stopped, free, strict=True):
        expected = full[: full.index(stop) + 1] if stop in full else full
        assert row == expected
    assert stopped[0][-1] == stop and len(stopped[0]) <= 4


def test_sampling_reproducible_and_seed_dependent():
    config, params = load_hf_model(saved_model("qwen2"), dtype=jnp.float32)
    prompts = _prompts(config)
    kw = dict(max_new_tokens=NEW, temperature=1.5, top_k=20, top_p=0.95)
    a = gen.generate(params, config, prompts, seed=3, **kw)
    assert a == gen.generate(params, config, prompts, seed=3, **kw)
    assert a != gen.generate(params, config, prompts, seed=4, **kw)
    assert all(len(row) == NEW for row in a)


def test_sample_logits_respects_top_k_and_top_p():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(4, 50)) * 3, jnp.float32)
    k = 5
    allowed = np.argsort(-np.asarray(logits), axis=-1)[:, :k]
    sample = jax.jit(gen.sample_logits)
    seen = np.stack([sample(logits, jax.random.key(s), 2.0, k, 1.0) for s in range(200)], axis=1)
    for row in range(4):
        assert set(seen[row]) <= set(allowed[row])
        assert len(set(seen[row])) == k  # a high temperature reaches every allowed token
    # top_p: only the smallest prefix of the ranked tokens whose probability reaches p.
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    order = np.argsort(-probs, axis=-1)
    ranked = np.take_along_axis(probs, order, axis=-1)
    p = 0.6
    seen = np.stack([sample(logits, jax.random.key(s), 1.0, 50, p) for s in range(200)], axis=1)
    for row in range(4):
        n_keep = int(np.searchsorted(np.cumsum(ranked[row]), p)) + 1
        assert set(seen[row]) <= set(order[row, :n_keep])
    greedy = sample(logits, jax.random.key(0), 0.0, 50, 1.0)
    np.testing.assert_array_equal(greedy, np.argmax(np.asarray(logits), axis=-1))


def test_sampling_without_cuts_draws_what_the_warper_draws():
    """No top_k, top_p or min_p cut: the sample skips the vocabulary sort and draws the tokens the warper's
    unchanged logits give for the same keys."""
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(4, 50)), jnp.float32)
    sample = jax.jit(gen.sample_logits)
    for s in range(20):
        key = jax.random.key(s)
        expected = jax.random.categorical(key, gen.warp_logits(logits, 1.3, 50, 1.0, 0.0), axis=-1)
        np.testing.assert_array_equal(sample(logits, key, 1.3, 50, 1.0, 0.0), expected)


def test_compiles_once_per_bucket():
    config, params = load_hf_model(saved_model("llama"), dtype=jnp.float32)
    rng = np.random.default_rng(5)
    gen.generate(params, config, [rng.integers(3, 100, 9).tolist()], max_new_tokens=3)
    size = gen._generate_padded._cache_size()
    gen.generate(params, config, [rng.integers(3, 100, 12).tolist()], max_new_tokens=6, temperature=0.7, seed=1)
    gen.generate(params, config, [rng.integers(3, 100, 16).tolist()], max_new_tokens=8, top_k=3, stop_tokens=[5])
    assert gen._generate_padded._cache_size() == size


def test_cached_attention_equals_reference_on_the_last_queries():
    """Queries at the end of a left-padded cache see what attention_reference shows the same rows, unpadded."""
    from pallas_kernels.attention import attention_reference

    rng = np.random.default_rng(7)
    b, s, hq, hk, d, t = 2, 11, 6, 2, 16, 3
    q = jnp.asarray(rng.normal(size=(b, t, hq, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, s, hk, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, s, hk, d)), jnp.float32)
    pads = jnp.asarray([0, 4])
    kw = dict(sliding_window=5, softcap=4.0, scale=0.3)
    out = gen.cached_attention(q, k, v, s - t, pads, **kw)
    for row in range(b):
        p = int(pads[row])
        ref = attention_reference(q[row : row + 1], k[row : row + 1, p:], v[row : row + 1, p:], **kw)
        assert_close(out[row], ref[0], "f32")


def test_pallas_kernels_interpret_qlora_greedy_equals_reference():
    """The profile's Pallas kernels (interpret mode on CPU) on an NF4 base: decode shapes (one token per row) and
    the prefill's padded segments run through every kernel and give the reference path's tokens."""
    config, params = load_hf_model(saved_model("llama"), dtype=jnp.float32, load_in_4bit=True)
    prompts = _prompts(config, seed=4)
    ref = gen.generate(params, config, prompts, max_new_tokens=5)
    ops = Ops(KernelChoice.all("pallas", interpret=True))
    assert gen.generate(params, config, prompts, max_new_tokens=5, ops=ops) == ref


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_gpu_profile_generation(family):
    """On the GPU with the device's profile kernels (Triton/cuDNN): f32 at highest matmul precision gives the
    reference path's greedy tokens; the profile's bf16 runs and fills max_new_tokens."""
    from jaxsloth.profiles import profile_for_device

    profile = profile_for_device()
    config, params = load_hf_model(saved_model(family), dtype=jnp.float32)
    prompts = _prompts(config, seed=5)
    with jax.default_matmul_precision("highest"):
        ref = gen.generate(params, config, prompts, max_new_tokens=NEW)
        ours = gen.generate(params, config, prompts, max_new_tokens=NEW, ops=profile.ops)
    assert ours == ref
    _, params16 = load_hf_model(saved_model(family), dtype=profile.dtype)
    out = gen.generate(params16, config, prompts, max_new_tokens=NEW, ops=profile.ops, compute_dtype=profile.dtype)
    assert [len(r) for r in out] == [NEW] * len(prompts)


class _CharTokenizer:
    """Letters a..z <-> ids 3..28; id 2 is EOS (the tiny models' eos_token_id)."""

    eos_token_id = 2

    def __call__(self, text):
        return {"input_ids": [3 + ord(c) - ord("a") for c in text]}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(ord("a") + i - 3) if 3 <= i < 29 else ("" if skip_special_tokens else f"<{i}>") for i in ids)


def test_generate_text_uses_adapter_profile_and_eos():
    """Model.generate with an adapter: the text of generate()'s tokens with EOS among the stops, and each of those
    tokens is the argmax of the full (uncached) LoRA forward over the prompt and the tokens before it."""
    import jaxsloth
    from jaxsloth.models import forward
    from jaxsloth.profiles import profile_for_device

    config, params = load_hf_model(saved_model("qwen2"), dtype=jnp.float32)
    model = jaxsloth.Model(config, params, profile_for_device(name="cpu"))
    model = jaxsloth.add_lora(model, r=4, lora_alpha=8.0)
    model.trainable = jax.tree.map(lambda x: x + 0.1, model.trainable)
    prompts = ["hello", "thecatsat"]
    tok = _CharTokenizer()
    texts = model.generate(tok, prompts, max_new_tokens=NEW, stop_tokens=[5])
    p, lora = with_trainable(params, model.trainable)
    ids = gen.generate(
        p,
        config,
        [tok(s)["input_ids"] for s in prompts],
        max_new_tokens=NEW,
        stop_tokens=[2, 5],
        lora=lora,
        lora_rt=model.lora.runtime,
    )
    assert texts == [tok.decode(row, skip_special_tokens=True) for row in ids]
    for prompt, new in zip(prompts, ids, strict=True):
        seq = tok(prompt)["input_ids"] + new[:-1]
        logits = forward(p, jnp.asarray([seq]), config=config, lora=lora, lora_rt=model.lora.runtime)
        assert new == np.argmax(np.asarray(logits[0, len(seq) - len(new) :]), axis=-1).tolist()


@pytest.mark.parametrize(
    "temperature,top_k,top_p,min_p",
    [(0.7, 10, 0.9, 0.05), (1.3, 50, 0.5, 0.0), (1.0, 3, 1.0, 0.2), (0.5, 50, 1.0, 0.3)],
)
def test_warp_logits_match_transformers_warpers(temperature, top_k, top_p, min_p):
    """Temperature, top-k, top-p and min-p in transformers' order: the same surviving tokens and scaled logits."""
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = np.random.default_rng(1).normal(size=(4, 50)).astype(np.float32) * 3
    scores = torch.tensor(logits)
    warpers = [TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k)]
    warpers += [TopPLogitsWarper(top_p)] if top_p < 1 else []
    warpers += [MinPLogitsWarper(min_p)] if min_p > 0 else []
    for w in warpers:
        scores = w(None, scores)
    expected = scores.numpy()
    ours = np.asarray(jax.jit(gen.warp_logits)(jnp.asarray(logits), temperature, top_k, top_p, min_p))
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(expected))
    assert np.isinf(expected).any() and not np.isinf(expected).all(axis=-1).any()
    kept = ~np.isinf(expected)
    assert_close(ours[kept], expected[kept], "f32")


def test_repetition_penalty_matches_transformers():
    """Greedy decoding with repetition_penalty: transformers' RepetitionPenaltyLogitsProcessor over each row's prompt
    (not its left padding) and output; tiny random models repeat themselves, so the penalty changes the tokens."""
    path = saved_model("llama")
    config, params = load_hf_model(path, dtype=jnp.float32)
    prompts = _prompts(config, seed=3)
    ours = gen.generate(params, config, prompts, max_new_tokens=NEW, repetition_penalty=1.8)
    out, width = _hf_generate(hf_model(path), prompts, NEW, repetition_penalty=1.8)
    assert ours == out[:, width:].tolist()
    assert ours != gen.generate(params, config, prompts, max_new_tokens=NEW)


def test_stream_yields_generate_tokens_one_by_one():
    config, params = load_hf_model(saved_model("qwen2"), dtype=jnp.float32)
    prompt = _prompts(config)[1]
    full = gen.generate(params, config, [prompt], max_new_tokens=NEW)[0]
    assert list(gen.generate_stream(params, config, prompt, max_new_tokens=NEW)) == full
    stop = full[3]
    stopped = list(gen.generate_stream(params, config, prompt, max_new_tokens=NEW, stop_tokens=[stop]))
    assert stopped == full[: full.index(stop) + 1]


def _char_model(config, params, **config_changes):
    """A jaxsloth Model of the tiny checkpoint on the CPU profile, its config changed as given."""
    import dataclasses

    import jaxsloth
    from jaxsloth.profiles import profile_for_device

    return jaxsloth.Model(dataclasses.replace(config, **config_changes), params, profile_for_device(name="cpu"))


def test_eos_outside_vocabulary_warns_and_is_ignored(caplog):
    """transformers ignores a config eos_token_id the vocabulary cannot hold (with a warning); so does generate."""
    config, params = load_hf_model(saved_model("qwen2"), dtype=jnp.float32)
    tok = _CharTokenizer()
    model = _char_model(config, params, eos_token_id=(2, config.vocab_size + 7))
    with caplog.at_level("WARNING", logger="jaxsloth"):
        texts = model.generate(tok, ["hello"], max_new_tokens=NEW)
    assert [str(config.vocab_size + 7) in r.getMessage() for r in caplog.records].count(True) == 1
    assert texts == _char_model(config, params).generate(tok, ["hello"], max_new_tokens=NEW)


def test_generate_text_sampling_names():
    """do_sample=False is greedy whatever the temperature; do_sample with a seed is reproducible; a stream of the
    same prompt joins to generate's text."""
    from jaxsloth.generate import stream_text

    config, params = load_hf_model(saved_model("qwen2"), dtype=jnp.float32)
    model, tok = _char_model(config, params), _CharTokenizer()
    greedy = model.generate(tok, ["hello"], max_new_tokens=NEW)
    assert model.generate(tok, ["hello"], max_new_tokens=NEW, do_sample=False, temperature=1.5) == greedy
    kw = dict(max_new_tokens=NEW, do_sample=True, temperature=1.5, min_p=0.05, repetition_penalty=1.2, seed=2)
    sampled = model.generate(tok, ["hello"], **kw)
    assert sampled == model.generate(tok, ["hello"], **kw)
    assert "".join(stream_text(model, tok, "hello", **kw)) == sampled[0]
    with pytest.raises(ValueError, match="temperature"):
        model.generate(tok, ["hello"], do_sample=True, temperature=0.0)
