"""Text generation with a KV cache: one prefill pass over the (left-padded) prompts, then a jitted decode loop.

Shapes are bucketed (batch, prompt length and max_new_tokens rounded up to powers of two), and every sampling
setting is a traced value, so repeated calls with similar sizes reuse one compiled program.

Layout: prompts are left-padded to P slots, so every row's last prompt token sits in slot P - 1 and new token n
goes to slot P + n for all rows at once. The cache is [L, B, S, Hk, hd] with S = P + N; a row's key slot j is
visible from query slot i iff pad_b <= j <= i (and i - j < window on sliding layers): slot differences equal
position differences inside a row, so this is exactly the unpadded causal / sliding-window mask.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsloth.models.config import ModelConfig
from jaxsloth.models.decoder import (
    LoraRuntime,
    attention_inputs,
    embed,
    group_layers,
    layer_output,
    layer_period,
    layer_slice,
    logits_from_hidden,
    rope_setup,
)
from jaxsloth.ops import Ops
from pallas_kernels.attention import MASK_VALUE


def _bucket(n: int, least: int = 8) -> int:
    """n rounded up to a power of two, at least ``least``."""
    return max(least, 1 << max(0, n - 1).bit_length())


def cached_attention(q, cache_k, cache_v, q_slot, pads, *, sliding_window=None, softcap=None, scale=None):
    """Attention of new queries over a KV cache, with ``attention_reference``'s math.

    q: [B, T, Hq, hd] at slots q_slot .. q_slot + T - 1 (q_slot a traced scalar); cache_k, cache_v: [B, S, Hk, hd]
    (already holding these queries' keys); pads: [B] int, the first valid slot of each row. Causal, GQA (query heads
    grouped [Hk, Hq // Hk]), optional sliding window (i - j < window) and tanh softcap; softmax in f32.
    Returns [B, T, Hq, hd] in q.dtype.
    """
    b, t, hq, d = q.shape
    s, hk = cache_k.shape[1], cache_k.shape[2]
    scale = d**-0.5 if scale is None else scale
    qg = q.reshape(b, t, hk, hq // hk, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, cache_k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    i = q_slot + jnp.arange(t)[:, None]
    j = jnp.arange(s)[None, :]
    mask = (j <= i)[None] & (j[None] >= pads[:, None, None])
    if sliding_window is not None:
        mask &= ((i - j) < sliding_window)[None]
    scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(cache_v.dtype), cache_v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, hq, d).astype(q.dtype)


# --- sampling ------------------------------------------------------------------------------------------------------


def sample_logits(logits, key, temperature, top_k, top_p):
    """logits: [B, V] f32 -> next tokens [B] int32.

    Greedy (argmax) when temperature <= 0; otherwise, as transformers' warpers in their order: divide by
    temperature, keep the top_k largest (top_k >= V keeps all), keep the smallest set of most likely tokens whose
    probability reaches top_p (at least one), and sample. All four settings may be traced values.
    """

    def greedy(_):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sample(_):
        v = logits.shape[-1]
        order = jnp.argsort(-logits, axis=-1)
        ranked = jnp.take_along_axis(logits, order, axis=-1) / temperature
        rank = jnp.arange(v)[None, :]
        ranked = jnp.where(rank < top_k, ranked, -jnp.inf)
        probs = jax.nn.softmax(ranked, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        ranked = jnp.where((before < top_p) | (rank == 0), ranked, -jnp.inf)
        pick = jax.random.categorical(key, ranked, axis=-1)
        return jnp.take_along_axis(order, pick[:, None], axis=-1)[:, 0].astype(jnp.int32)

    return jax.lax.cond(temperature > 0, sample, greedy, None)


# --- the jitted program --------------------------------------------------------------------------------------------


def _prefill(params, lora_layers, tokens, pads, last=None, *, config, ops, lora_rt, compute_dtype):
    """tokens: [B, S] left-padded, real up to slot ``last`` (traced; default the last slot; later slots are
    ignored by causality) -> (logits at slot ``last`` [B, V], k and v [L, B, S, Hk, hd])."""
    b, p = tokens.shape
    last = p - 1 if last is None else last
    slots = jnp.arange(p)[None, :]
    positions = jnp.maximum(slots - pads[:, None], 0).astype(jnp.int32)
    valid = (slots >= pads[:, None]).astype(jnp.int32)  # pads attend among themselves only, never to the prompt
    inv_freq, rope_scaling, long_rope = rope_setup(config, (last - pads + 1)[:, None])
    period = layer_period(config)
    slidings = config.sliding_layers[:period]
    kw = dict(config=config, ops=ops, lora_rt=lora_rt)

    def step(h, xs):
        lp_group, ll_group = xs
        ks, vs = [], []
        for j in range(period):
            lp = layer_slice(lp_group, j)
            ll = None if ll_group is None else layer_slice(ll_group, j)
            q, k, v = attention_inputs(
                h,
                lp,
                ll,
                positions=positions,
                inv_freq=inv_freq,
                rope_scaling=rope_scaling,
                long_rope=long_rope,
                **kw,
            )
            a = ops.attention(
                q,
                k,
                v,
                segment_ids=valid,
                causal=True,
                sliding_window=config.window_for(slidings[j]),
                softcap=config.attn_logit_softcap,
                scale=config.attention_scale,
            )
            h = layer_output(h, a, lp, ll, **kw)
            ks.append(k)
            vs.append(v)
        return h, (jnp.stack(ks), jnp.stack(vs))

    h = embed(params, tokens, config, compute_dtype)
    layers = group_layers(params["layers"], period)
    lora_g = None if lora_layers is None else group_layers(lora_layers, period)
    h, (ks, vs) = jax.lax.scan(step, h, (layers, lora_g))
    h = jax.lax.dynamic_slice_in_dim(h, last, 1, axis=1)
    h = ops.rms_norm(h, params["final_norm"], eps=config.rms_norm_eps, weight_offset=config.norm_weight_offset)
    flat = (config.num_layers, b, p, config.num_kv_heads, config.head_dim)
    return logits_from_hidden(params, h[:, 0], config), ks.reshape(flat), vs.reshape(flat)


def _decode_step(params, lora_layers, token, slot, pads, cache_k, cache_v, *, config, ops, lora_rt, compute_dtype):
    """token: [B] at cache slot ``slot`` -> (logits [B, V], updated caches)."""
    positions = (slot - pads)[:, None].astype(jnp.int32)
    inv_freq, rope_scaling, long_rope = rope_setup(config, positions + 1)
    period = layer_period(config)
    slidings = config.sliding_layers[:period]
    kw = dict(config=config, ops=ops, lora_rt=lora_rt)

    def step(carry, xs):
        h, cache_k, cache_v = carry
        lp_group, ll_group, g = xs
        for j in range(period):
            layer = g * period + j
            lp = layer_slice(lp_group, j)
            ll = None if ll_group is None else layer_slice(ll_group, j)
            q, k, v = attention_inputs(
                h,
                lp,
                ll,
                positions=positions,
                inv_freq=inv_freq,
                rope_scaling=rope_scaling,
                long_rope=long_rope,
                **kw,
            )
            at = (layer, 0, slot, 0, 0)
            cache_k = jax.lax.dynamic_update_slice(cache_k, k[None].astype(cache_k.dtype), at)
            cache_v = jax.lax.dynamic_update_slice(cache_v, v[None].astype(cache_v.dtype), at)
            a = cached_attention(
                q,
                cache_k[layer],
                cache_v[layer],
                slot,
                pads,
                sliding_window=config.window_for(slidings[j]),
                softcap=config.attn_logit_softcap,
                scale=config.attention_scale,
            )
            h = layer_output(h, a, lp, ll, **kw)
        return (h, cache_k, cache_v), None

    h = embed(params, token[:, None], config, compute_dtype)
    layers = group_layers(params["layers"], period)
    lora_g = None if lora_layers is None else group_layers(lora_layers, period)
    (h, cache_k, cache_v), _ = jax.lax.scan(
        step, (h, cache_k, cache_v), (layers, lora_g, jnp.arange(config.num_layers // period))
    )
    h = ops.rms_norm(h, params["final_norm"], eps=config.rms_norm_eps, weight_offset=config.norm_weight_offset)
    return logits_from_hidden(params, h[:, 0], config), cache_k, cache_v


def _next_logits(params, lora_layers, token, seq, slot, pads, done, cache_k, cache_v, **kw):
    """The decode step of ``token`` [B] at cache slot ``slot``; seq [B, S] holds the tokens up to it of every
    row not ``done`` -> (logits [B, V], updated caches).

    Longrope (Phi-3): the step at which a row's length first exceeds the original context switches that row to
    the long factors for the whole sequence, which changes every cached key and value (keys are rotated, and the
    hidden states of later layers depend on earlier layers' rotations), so that step re-runs the prefill over
    the row's tokens so far and replaces the cache. transformers' Phi-3 generate drops its cache at the same step
    for the same reason. Re-rotating only the cached keys would be wrong past the first layer; storing unrotated
    keys would cost every step a rotation of the whole cache. At most one re-prefill per distinct crossing step."""
    config = kw["config"]

    def decode(_):
        return _decode_step(params, lora_layers, token, slot, pads, cache_k, cache_v, **kw)

    def refill(_):
        logits, ks, vs = _prefill(params, lora_layers, seq, pads, slot, **kw)
        return logits, ks.astype(cache_k.dtype), vs.astype(cache_v.dtype)

    if config.rope.kind != "longrope":
        return decode(None)
    orig = config.rope.original_max_position_embeddings or config.max_position_embeddings
    crossing = jnp.any((slot - pads == orig) & ~done)
    return jax.lax.cond(crossing, refill, decode, None)


@functools.partial(jax.jit, static_argnames=("config", "ops", "lora_rt", "compute_dtype", "new_slots"))
def _generate_padded(
    params,
    lora_layers,
    tokens,
    pads,
    live,
    max_new,
    stop_mask,
    temperature,
    top_k,
    top_p,
    key,
    *,
    config,
    ops,
    lora_rt,
    compute_dtype,
    new_slots,
):
    """tokens: [B, P] left-padded, pads: [B], live: [B] bool (False: a filler row), stop_mask: [V] bool ->
    (new tokens [B, new_slots], counts [B]: how many of them each row produced)."""
    b, p = tokens.shape
    kw = dict(config=config, ops=ops, lora_rt=lora_rt, compute_dtype=compute_dtype)
    logits, ks, vs = _prefill(params, lora_layers, tokens, pads, **kw)
    s = p + new_slots
    cache_shape = (config.num_layers, b, s, config.num_kv_heads, config.head_dim)
    cache_k = jnp.zeros(cache_shape, ks.dtype).at[:, :, :p].set(ks)
    cache_v = jnp.zeros(cache_shape, vs.dtype).at[:, :, :p].set(vs)
    key, sub = jax.random.split(key)
    token = sample_logits(logits, sub, temperature, top_k, top_p)
    out = jnp.zeros((b, new_slots), jnp.int32).at[:, 0].set(token)
    done = stop_mask[token] | ~live
    counts = jnp.ones((b,), jnp.int32)

    def cond(state):
        n, _, _, _, _, done, _, _ = state
        return (n < max_new) & ~jnp.all(done)

    def body(state):
        n, token, cache_k, cache_v, out, done, counts, key = state
        seq = jnp.concatenate([tokens, out], axis=1)
        logits, cache_k, cache_v = _next_logits(
            params, lora_layers, token, seq, p + n - 1, pads, done, cache_k, cache_v, **kw
        )
        key, sub = jax.random.split(key)
        token = sample_logits(logits, sub, temperature, top_k, top_p)
        out = jax.lax.dynamic_update_slice(out, jnp.where(done, 0, token)[:, None], (0, n))
        counts = counts + (~done).astype(jnp.int32)
        done = done | stop_mask[token]
        return n + 1, token, cache_k, cache_v, out, done, counts, key

    state = (jnp.int32(1), token, cache_k, cache_v, out, done, counts, key)
    _, _, _, _, out, _, counts, _ = jax.lax.while_loop(cond, body, state)
    return out, counts


def left_pad(prompt_ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> (tokens [B, P] int32 left-padded with 0, pads [B]: the first prompt slot of each row), B and P
    rounded up to buckets. Filler rows beyond the prompts hold one token 0."""
    b = _bucket(len(prompt_ids), least=1)
    p = _bucket(max(len(ids) for ids in prompt_ids))
    tokens = np.zeros((b, p), np.int32)
    pads = np.full(b, p - 1, np.int32)
    for i, ids in enumerate(prompt_ids):
        pads[i] = p - len(ids)
        tokens[i, pads[i] :] = ids
    return tokens, pads


def generate(
    params,
    config: ModelConfig,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    seed: int = 0,
    lora: dict | None = None,
    lora_rt: LoraRuntime | None = None,
    ops: Ops | None = None,
    compute_dtype=None,
) -> list[list[int]]:
    """Completes each prompt; returns the new tokens per prompt.

    A row stops after its first stop token, which is INCLUDED in its output (as transformers' generate keeps EOS);
    otherwise it runs for max_new_tokens. Greedy when temperature <= 0; else temperature, top_k, top_p sampling
    from ``seed``. lora: the decoder's LoRA tree ({"layers": ...}; swap trained embed / lm_head copies into
    params first, see ``jaxsloth.lora.with_trainable``) with its runtime (scale); ops: kernel choice (default
    reference); compute_dtype: activations and KV cache (default: the embedding's dtype).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: pass at least one prompt")
    for i, ids in enumerate(prompt_ids):
        if len(ids) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        bad = [t for t in ids if not 0 <= t < config.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, {config.vocab_size}): {bad[:5]}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if lora is not None and lora_rt is None:
        raise ValueError("lora is given without lora_rt (its scale): pass LoraConfig.runtime")
    stop_mask = np.zeros(config.vocab_size, bool)
    for t in stop_tokens:
        if not 0 <= t < config.vocab_size:
            raise ValueError(f"stop token {t} is outside the vocabulary [0, {config.vocab_size})")
        stop_mask[t] = True

    n = len(prompt_ids)
    tokens, pads = left_pad(prompt_ids)
    b = tokens.shape[0]
    out, counts = _generate_padded(
        params,
        None if lora is None else lora["layers"],
        jnp.asarray(tokens),
        jnp.asarray(pads),
        jnp.asarray(np.arange(b) < n),
        jnp.int32(max_new_tokens),
        jnp.asarray(stop_mask),
        jnp.float32(temperature),
        jnp.int32(config.vocab_size if top_k is None else min(top_k, config.vocab_size)),
        jnp.float32(1.0 if top_p is None else top_p),
        jax.random.key(seed),
        config=config,
        ops=ops or Ops(),
        lora_rt=lora_rt or LoraRuntime(),
        compute_dtype=None if compute_dtype is None else jnp.dtype(compute_dtype),
        new_slots=_bucket(max_new_tokens),
    )
    out, counts = np.asarray(out), np.asarray(counts)
    return [out[i, : counts[i]].tolist() for i in range(n)]


def generate_text(model, tokenizer, prompts: Sequence[str] | str, max_new_tokens: int = 64, **sampling) -> list[str]:
    """Completes each prompt with ``model`` (a ``jaxsloth.api.Model``): its adapter when it has one, its profile's
    kernels and dtype. The tokenizer's EOS always stops a row (besides ``stop_tokens``); the returned text is the
    new tokens only, special tokens skipped. sampling: temperature, top_k, top_p, seed, stop_tokens."""
    from jaxsloth.lora import with_trainable

    if tokenizer is None:
        raise ValueError("generate needs a tokenizer (the model directory has none; pass one)")
    if isinstance(prompts, str):
        prompts = [prompts]
    stops = set(sampling.pop("stop_tokens", ()))
    for eos in (tokenizer.eos_token_id, model.config.eos_token_id):
        if eos is not None:
            stops.update(eos if isinstance(eos, tuple | list) else [eos])
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    params, lora, lora_rt = model.params, None, None
    if model.trainable is not None:
        params, lora = with_trainable(model.params, model.trainable)
        lora_rt = model.lora.runtime
    new = generate(
        params,
        model.config,
        ids,
        max_new_tokens=max_new_tokens,
        stop_tokens=sorted(stops),
        lora=lora,
        lora_rt=lora_rt,
        ops=model.profile.ops,
        compute_dtype=model.profile.dtype,
        **sampling,
    )
    return [tokenizer.decode(t, skip_special_tokens=True) for t in new]
