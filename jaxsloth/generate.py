"""Text generation with a KV cache: one prefill pass over the (left-padded) prompts, then a jitted decode loop.

Shapes are bucketed (batch, prompt length and max_new_tokens rounded up to powers of two), and every sampling
setting is a traced value, so repeated calls with similar sizes reuse one compiled program.

Layout: prompts are left-padded to P slots, so every row's last prompt token sits in slot P - 1 and new token n
goes to slot P + n for all rows at once. The cache covers slots 0 .. P + N - 1 in two parts: the prompts' slots
[L, U, P, Hk, hd], one entry per distinct prompt (``num_return_sequences`` rows sample each), and each row's new
tokens [L, B, N, Hk, hd]. A row's key slot j is visible from query slot i iff pad_b <= j <= i (and i - j < window on
sliding layers): slot differences equal position differences inside a row, so this is exactly the unpadded causal /
sliding-window mask.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence

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

log = logging.getLogger("jaxsloth")


def bucket(n: int, least: int = 8) -> int:
    """n rounded up to a power of two, at least ``least``: the lengths programs are compiled for, so varying
    lengths share a few compiled shapes."""
    return max(least, 1 << max(0, n - 1).bit_length())


def cached_attention(
    q, cache_k, cache_v, q_slot, pads, *, prompt_k=None, prompt_v=None, sliding_window=None, softcap=None, scale=None
):
    """Attention of new queries over a KV cache, with ``attention_reference``'s math.

    q: [B, T, Hq, hd] at slots q_slot .. q_slot + T - 1 (q_slot a traced scalar); cache_k, cache_v: [B, S, Hk, hd]
    (already holding these queries' keys); pads: [B] int, the first valid slot of each row. With prompt_k, prompt_v
    [U, P, Hk, hd] (slots 0 .. P - 1 shared by each prompt's B / U consecutive rows), the cache holds slots P .. P + S
    - 1. Causal, GQA (query heads grouped [Hk, Hq // Hk]), optional sliding window (i - j < window) and tanh softcap;
    softmax in f32. Returns [B, T, Hq, hd] in q.dtype.
    """
    b, t, hq, d = q.shape
    s, hk = cache_k.shape[1], cache_k.shape[2]
    scale = d**-0.5 if scale is None else scale
    qg = q.reshape(b, t, hk, hq // hk, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, cache_k, preferred_element_type=jnp.float32)
    u, p = (1, 0) if prompt_k is None else prompt_k.shape[:2]
    if prompt_k is not None:
        qu = qg.reshape(u, b // u, *qg.shape[1:])
        shared = jnp.einsum("uctkgd,upkd->uckgtp", qu, prompt_k, preferred_element_type=jnp.float32)
        scores = jnp.concatenate([shared.reshape(b, *shared.shape[2:]), scores], axis=-1)
    scores = scores * scale
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    i = q_slot + jnp.arange(t)[:, None]
    j = jnp.arange(p + s)[None, :]
    mask = (j <= i)[None] & (j[None] >= pads[:, None, None])
    if sliding_window is not None:
        mask &= ((i - j) < sliding_window)[None]
    scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(cache_v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs[..., p:], cache_v, preferred_element_type=jnp.float32)
    if prompt_k is not None:
        shared = probs[..., :p].reshape(u, b // u, *probs.shape[1:-1], p)
        out += jnp.einsum("uckgtp,upkd->uctkgd", shared, prompt_v, preferred_element_type=jnp.float32).reshape(
            out.shape
        )
    return out.reshape(b, t, hq, d).astype(q.dtype)


# --- sampling ------------------------------------------------------------------------------------------------------


def penalize_repeats(logits, seen, penalty):
    """transformers' RepetitionPenaltyLogitsProcessor: the logit of every token already in the row (prompt or
    output; ``seen``: [B, V] bool) is divided by ``penalty`` when positive, multiplied when negative. penalty 1 is
    the identity. logits: [B, V] f32."""
    return jnp.where(seen, jnp.where(logits < 0, logits * penalty, logits / penalty), logits)


def warp_logits(logits, temperature, top_k, top_p, min_p=0.0):
    """logits: [B, V] f32 -> [B, V], removed tokens at -inf: transformers' sampling warpers in their order.

    Divide by temperature; keep the top_k largest (top_k >= V keeps all); keep the smallest set of most likely tokens
    whose probability reaches top_p; keep the tokens whose probability is at least min_p times the most likely one's.
    The most likely token always stays. All four settings may be traced values.
    """
    b, v = logits.shape
    order = jnp.argsort(-logits, axis=-1)
    ranked = jnp.take_along_axis(logits, order, axis=-1) / temperature
    rank = jnp.arange(v)[None, :]
    ranked = jnp.where(rank < top_k, ranked, -jnp.inf)
    probs = jax.nn.softmax(ranked, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    ranked = jnp.where((before < top_p) | (rank == 0), ranked, -jnp.inf)
    probs = jax.nn.softmax(ranked, axis=-1)
    ranked = jnp.where(probs >= min_p * probs[:, :1], ranked, -jnp.inf)
    return jnp.zeros_like(ranked).at[jnp.arange(b)[:, None], order].set(ranked)


def sample_logits(logits, key, temperature, top_k, top_p, min_p=0.0):
    """logits: [B, V] f32 -> next tokens [B] int32: greedy (argmax) when temperature <= 0, else a sample from
    ``warp_logits``, or from logits / temperature when no setting cuts (top_k >= V, top_p >= 1, min_p <= 0: as
    transformers adds no warper then, and without sorting the whole vocabulary at every step). All settings may be
    traced values."""

    def greedy(_):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def warped(_):
        return jax.random.categorical(key, warp_logits(logits, temperature, top_k, top_p, min_p), axis=-1)

    def plain(_):
        return jax.random.categorical(key, logits / temperature, axis=-1)

    def sample(_):
        cuts = (top_k < logits.shape[-1]) | (top_p < 1.0) | (min_p > 0.0)
        return jax.lax.cond(cuts, warped, plain, None).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, sample, greedy, None)


def _pick(logits, key, seen, sampling):
    """One step's tokens [B] from logits [B, V], with the repetition penalty over ``seen`` [B, V]; returns
    (tokens, next key, seen with the tokens added)."""
    temperature, top_k, top_p, min_p, penalty = sampling
    key, sub = jax.random.split(key)
    token = sample_logits(penalize_repeats(logits, seen, penalty), sub, temperature, top_k, top_p, min_p)
    return token, key, seen.at[jnp.arange(token.shape[0]), token].set(True)


# --- the jitted program --------------------------------------------------------------------------------------------


def _grouped(tree, period: int):
    """The layer scan's steps: [L, ...] leaves as they are when every step is one layer (a [L, 1, ...] view costs
    XLA:CPU a copy of every stacked weight, inside the decode loop), else ``group_layers``' [L / period, period, ...]."""
    return tree if period == 1 else group_layers(tree, period)


def _member(group, j: int, period: int):
    """Layer ``j`` of one scan step of ``_grouped`` layers."""
    return group if period == 1 else layer_slice(group, j)


def _prefill(params, lora_layers, tokens, pads, last=None, *, config, ops, lora_rt, compute_dtype):
    """tokens: [B, S] left-padded, real up to slot ``last`` (traced; default the last slot; later slots are
    ignored by causality) -> (logits at slot ``last`` [B, V], k and v [L, B, S, Hk, hd])."""
    b, p = tokens.shape
    last = p - 1 if last is None else last
    slots = jnp.arange(p)[None, :]
    positions = jnp.maximum(slots - pads[:, None], 0).astype(jnp.int32)
    valid = (slots >= pads[:, None]).astype(jnp.int32)  # pads attend among themselves only, never to the prompt
    period = layer_period(config)
    slidings = config.sliding_layers[:period]
    ropes = {s: rope_setup(config, (last - pads + 1)[:, None], s) for s in set(slidings)}
    kw = dict(config=config, ops=ops, lora_rt=lora_rt)

    def step(h, xs):
        lp_group, ll_group = xs
        ks, vs = [], []
        for j in range(period):
            lp = _member(lp_group, j, period)
            ll = None if ll_group is None else _member(ll_group, j, period)
            inv_freq, rope_scaling, long_rope = ropes[slidings[j]]
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
    layers = _grouped(params["layers"], period)
    lora_g = None if lora_layers is None else _grouped(lora_layers, period)
    h, (ks, vs) = jax.lax.scan(step, h, (layers, lora_g))
    h = jax.lax.dynamic_slice_in_dim(h, last, 1, axis=1)
    h = ops.rms_norm(h, params["final_norm"], eps=config.rms_norm_eps, weight_offset=config.norm_weight_offset)
    flat = (config.num_layers, b, p, config.num_kv_heads, config.head_dim)
    return logits_from_hidden(params, h[:, 0], config), ks.reshape(flat), vs.reshape(flat)


def _split_cache(cache):
    """A cache argument -> (shared prompt part [L, U, P, Hk, hd] or None, per-row part [L, B, S, Hk, hd])."""
    return cache if isinstance(cache, tuple) else (None, cache)


def _decode_step(params, lora_layers, token, slot, pads, cache_k, cache_v, *, config, ops, lora_rt, compute_dtype):
    """token: [B] at cache slot ``slot`` -> (logits [B, V], updated caches). cache_k, cache_v: [L, B, S, Hk, hd], or
    (the prompts' [L, U, P, Hk, hd], each shared by B / U consecutive rows; the rows' own [L, B, S, Hk, hd] from slot
    P on), returned in the same form."""
    positions = (slot - pads)[:, None].astype(jnp.int32)
    period = layer_period(config)
    slidings = config.sliding_layers[:period]
    ropes = {s: rope_setup(config, positions + 1, s) for s in set(slidings)}
    kw = dict(config=config, ops=ops, lora_rt=lora_rt)
    (prompt_k, own_k), (prompt_v, own_v) = _split_cache(cache_k), _split_cache(cache_v)
    first = 0 if prompt_k is None else prompt_k.shape[2]  # the slot of the rows' own cache's first entry

    def step(carry, xs):
        h, own_k, own_v = carry
        lp_group, ll_group, g = xs
        for j in range(period):
            layer = g * period + j
            lp = _member(lp_group, j, period)
            ll = None if ll_group is None else _member(ll_group, j, period)
            inv_freq, rope_scaling, long_rope = ropes[slidings[j]]
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
            at = (layer, 0, slot - first, 0, 0)
            own_k = jax.lax.dynamic_update_slice(own_k, k[None].astype(own_k.dtype), at)
            own_v = jax.lax.dynamic_update_slice(own_v, v[None].astype(own_v.dtype), at)
            a = cached_attention(
                q,
                own_k[layer],
                own_v[layer],
                slot,
                pads,
                prompt_k=None if prompt_k is None else prompt_k[layer],
                prompt_v=None if prompt_v is None else prompt_v[layer],
                sliding_window=config.window_for(slidings[j]),
                softcap=config.attn_logit_softcap,
                scale=config.attention_scale,
            )
            h = layer_output(h, a, lp, ll, **kw)
        return (h, own_k, own_v), None

    h = embed(params, token[:, None], config, compute_dtype)
    layers = _grouped(params["layers"], period)
    lora_g = None if lora_layers is None else _grouped(lora_layers, period)
    (h, own_k, own_v), _ = jax.lax.scan(
        step, (h, own_k, own_v), (layers, lora_g, jnp.arange(config.num_layers // period))
    )
    h = ops.rms_norm(h, params["final_norm"], eps=config.rms_norm_eps, weight_offset=config.norm_weight_offset)
    if prompt_k is not None:
        own_k, own_v = (prompt_k, own_k), (prompt_v, own_v)
    return logits_from_hidden(params, h[:, 0], config), own_k, own_v


def _next_logits(params, lora_layers, token, seq, slot, pads, done, cache_k, cache_v, **kw):
    """The decode step of ``token`` [B] at cache slot ``slot``; seq [B, S] holds the tokens up to it of every
    row not ``done`` -> (logits [B, V], updated caches, in ``_decode_step``'s forms).

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
        return logits, _like(ks, cache_k), _like(vs, cache_v)

    if config.rope.kind != "longrope":
        return decode(None)
    orig = config.rope.original_max_position_embeddings or config.max_position_embeddings
    crossing = jnp.any((slot - pads == orig) & ~done)
    return jax.lax.cond(crossing, refill, decode, None)


def _like(full, cache):
    """A recomputed [L, B, S, Hk, hd] cache in the form and dtype of ``cache``: a shared prompt part keeps the first
    row of each prompt's rows (their prompt slots see the same tokens at the same positions)."""
    prompt, own = _split_cache(cache)
    if prompt is None:
        return full.astype(own.dtype)
    p, copies = prompt.shape[2], own.shape[1] // prompt.shape[1]
    return full[:, ::copies, :p].astype(prompt.dtype), full[:, :, p:].astype(own.dtype)


def _start(
    params,
    lora_layers,
    tokens,
    pads,
    live,
    stop_mask,
    sampling,
    key,
    *,
    config,
    ops,
    lora_rt,
    compute_dtype,
    new_slots,
    copies=1,
):
    """Prefill and the first new token -> (the decode state, the rows' pads [B]). tokens: [U, P] left-padded distinct
    prompts, pads: [U], each prompt sampled by ``copies`` consecutive rows (B = U x copies); live: [B] bool (False: a
    filler row), stop_mask: [V] bool, sampling: (temperature, top_k, top_p, min_p, repetition_penalty).

    The KV cache, in the compute dtype, is the prefill's keys and values of the U prompts [L, U, P, Hk, hd], each
    shared by its rows, and the rows' own [L, B, new_slots, Hk, hd] for the new tokens (``_decode_step``): no prompt
    is held more than once, and nothing holds the prompt's keys twice."""
    kw = dict(config=config, ops=ops, lora_rt=lora_rt, compute_dtype=compute_dtype)
    logits, ks, vs = _prefill(params, lora_layers, tokens, pads, **kw)
    tokens, pads, logits = (jnp.repeat(x, copies, axis=0) for x in (tokens, pads, logits))
    b, p = tokens.shape
    own = (config.num_layers, b, new_slots, *ks.shape[3:])
    cache_k, cache_v = (ks, jnp.zeros(own, ks.dtype)), (vs, jnp.zeros(own, vs.dtype))
    # The repetition penalty sees each row's prompt (not its padding) and every token it produces.
    valid = jnp.arange(p)[None, :] >= pads[:, None]
    v = config.vocab_size
    seen = jnp.zeros((b, v), jnp.bool_).at[jnp.arange(b)[:, None], jnp.where(valid, tokens, v)].set(True, mode="drop")
    token, key, seen = _pick(logits, key, seen, sampling)
    return dict(
        n=jnp.int32(1),
        token=token,
        cache_k=cache_k,
        cache_v=cache_v,
        out=jnp.zeros((b, new_slots), jnp.int32).at[:, 0].set(token),
        done=stop_mask[token] | ~live,
        counts=jnp.ones((b,), jnp.int32),
        key=key,
        seen=seen,
        prompt=tokens,
    ), pads


def _decode_until(params, lora_layers, state, pads, until, stop_mask, sampling, *, config, ops, lora_rt, compute_dtype):
    """Decodes until every row is done or ``until`` (traced) tokens exist -> the state."""
    kw = dict(config=config, ops=ops, lora_rt=lora_rt, compute_dtype=compute_dtype)
    p = state["cache_k"][0].shape[2]  # the prompts' slots

    def cond(s):
        return (s["n"] < until) & ~jnp.all(s["done"])

    def body(s):
        n, done = s["n"], s["done"]
        seq = jnp.concatenate([s["prompt"], s["out"]], axis=1)
        logits, cache_k, cache_v = _next_logits(
            params, lora_layers, s["token"], seq, p + n - 1, pads, done, s["cache_k"], s["cache_v"], **kw
        )
        token, key, seen = _pick(logits, s["key"], s["seen"], sampling)
        return dict(
            n=n + 1,
            token=token,
            cache_k=cache_k,
            cache_v=cache_v,
            out=jax.lax.dynamic_update_slice(s["out"], jnp.where(done, 0, token)[:, None], (0, n)),
            done=done | stop_mask[token],
            counts=s["counts"] + (~done).astype(jnp.int32),
            key=key,
            seen=seen,
            prompt=s["prompt"],
        )

    return jax.lax.while_loop(cond, body, state)


_STATIC = ("config", "ops", "lora_rt", "compute_dtype")


@functools.partial(jax.jit, static_argnames=(*_STATIC, "new_slots", "copies"))
def _generate_padded(
    params,
    lora_layers,
    tokens,
    pads,
    live,
    stop_mask,
    sampling,
    key,
    max_new,
    *,
    config,
    ops,
    lora_rt,
    compute_dtype,
    new_slots,
    copies,
):
    """The whole batch in one program -> (new tokens [B, new_slots], counts [B]: how many each row produced)."""
    kw = dict(config=config, ops=ops, lora_rt=lora_rt, compute_dtype=compute_dtype)
    state, pads = _start(
        params, lora_layers, tokens, pads, live, stop_mask, sampling, key, new_slots=new_slots, copies=copies, **kw
    )
    state = _decode_until(params, lora_layers, state, pads, max_new, stop_mask, sampling, **kw)
    return state["out"], state["counts"]


# Streaming runs the same two stages as separate programs, the decode one once per token (its state donated, so the
# KV cache is updated in place).
_start_jit = jax.jit(_start, static_argnames=(*_STATIC, "new_slots", "copies"))
_decode_until_jit = jax.jit(_decode_until, static_argnames=_STATIC, donate_argnames=("state",))


def left_pad(prompt_ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> (tokens [B, P] int32 left-padded with 0, pads [B]: the first prompt slot of each row), B and P
    rounded up to buckets. Filler rows beyond the prompts hold one token 0."""
    b = bucket(len(prompt_ids), least=1)
    p = bucket(max(len(ids) for ids in prompt_ids))
    tokens = np.zeros((b, p), np.int32)
    pads = np.full(b, p - 1, np.int32)
    for i, ids in enumerate(prompt_ids):
        pads[i] = p - len(ids)
        tokens[i, pads[i] :] = ids
    return tokens, pads


def _program_inputs(
    params,
    config: ModelConfig,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    stop_tokens: Sequence[int] = (),
    seed: int = 0,
    lora: dict | None = None,
    lora_rt: LoraRuntime | None = None,
    ops: Ops | None = None,
    compute_dtype=None,
    num_return_sequences: int = 1,
    exact_length: bool = False,
) -> tuple[tuple, dict]:
    """Validated (positional, static) arguments of ``_start`` for these prompts; the one list of ``generate``'s
    and ``generate_stream``'s settings."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if num_return_sequences < 1:
        raise ValueError(f"num_return_sequences must be >= 1, got {num_return_sequences}")
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
    if min_p is not None and not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    if repetition_penalty is not None and not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    if lora is not None and lora_rt is None:
        raise ValueError("lora is given without lora_rt (its scale): pass LoraConfig.runtime")
    stop_mask = np.zeros(config.vocab_size, bool)
    for t in stop_tokens:
        if not 0 <= t < config.vocab_size:
            raise ValueError(f"stop token {t} is outside the vocabulary [0, {config.vocab_size})")
        stop_mask[t] = True
    tokens, pads = left_pad(prompt_ids)
    sampling = (
        jnp.float32(temperature),
        jnp.int32(config.vocab_size if top_k is None else min(top_k, config.vocab_size)),
        jnp.float32(1.0 if top_p is None else top_p),
        jnp.float32(0.0 if min_p is None else min_p),
        jnp.float32(1.0 if repetition_penalty is None else repetition_penalty),
    )
    args = (
        params,
        None if lora is None else lora["layers"],
        jnp.asarray(tokens),
        jnp.asarray(pads),
        jnp.asarray(np.arange(tokens.shape[0] * num_return_sequences) < len(prompt_ids) * num_return_sequences),
        jnp.asarray(stop_mask),
        sampling,
        jax.random.key(seed),
    )
    static = dict(
        config=config,
        ops=ops or Ops(),
        lora_rt=lora_rt or LoraRuntime(),
        compute_dtype=None if compute_dtype is None else jnp.dtype(compute_dtype),
        new_slots=max_new_tokens if exact_length else bucket(max_new_tokens),
        copies=num_return_sequences,
    )
    return args, static


def generate(
    params, config: ModelConfig, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int, **settings
) -> list[list[int]]:
    """Completes each prompt; returns the new tokens per prompt.

    A row stops after its first stop token, which is INCLUDED in its output (as transformers' generate keeps EOS);
    otherwise it runs for max_new_tokens. settings, the keywords of ``_program_inputs``: greedy when temperature
    <= 0; else temperature, top_k, top_p, min_p sampling from ``seed`` (``warp_logits``); repetition_penalty
    (transformers': > 1 discourages tokens already in the row) applies to greedy and sampled decoding alike;
    stop_tokens; lora: the decoder's LoRA tree ({"layers": ...}; swap trained embed / lm_head copies into params
    first, see ``jaxsloth.lora.with_trainable``) with lora_rt, its runtime (scale); ops: kernel choice (default
    reference); compute_dtype: activations and KV cache (default: the embedding's dtype); num_return_sequences:
    completions per prompt (transformers' name), each prompt's consecutive in the output, its prompt run once through
    the prefill; exact_length: the KV cache holds exactly the prompt bucket + max_new_tokens slots (one program per
    max_new_tokens, for a fixed length such as GRPO's) instead of max_new_tokens rounded up to a bucket (a program
    shared by similar lengths).
    """
    return generate_async(params, config, prompt_ids, max_new_tokens=max_new_tokens, **settings)()


def generate_async(
    params, config: ModelConfig, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int, **settings
) -> Callable[[], list[list[int]]]:
    """``generate`` dispatched without waiting for the device (JAX's async dispatch): returns at once a function
    that waits and returns ``generate``'s tokens, so the host can work (score rewards) while the device samples."""
    args, static = _program_inputs(params, config, prompt_ids, max_new_tokens=max_new_tokens, **settings)
    out, counts = _generate_padded(*args, jnp.int32(max_new_tokens), **static)

    rows = len(prompt_ids) * static["copies"]

    def result() -> list[list[int]]:
        tokens, lengths = np.asarray(out), np.asarray(counts)
        return [tokens[i, : lengths[i]].tolist() for i in range(rows)]

    return result


def generate_stream(params, config: ModelConfig, prompt_ids: Sequence[int], *, max_new_tokens: int, **kwargs):
    """``generate`` for one prompt, yielding each new token (an int) as soon as it is decoded; the same tokens as
    ``generate(params, config, [prompt_ids], ...)[0]``. kwargs: ``generate``'s settings."""
    args, static = _program_inputs(params, config, [prompt_ids], max_new_tokens=max_new_tokens, **kwargs)
    new_slots, copies = static.pop("new_slots"), static.pop("copies")
    if copies != 1:
        raise ValueError(f"generate_stream streams one completion: num_return_sequences={copies} is for generate")
    params, lora_layers, _, _, _, stop_mask, sampling, _ = args
    state, pads = _start_jit(*args, new_slots=new_slots, copies=copies, **static)
    for n in range(1, max_new_tokens + 1):
        if n > 1:
            state = _decode_until_jit(params, lora_layers, state, pads, jnp.int32(n), stop_mask, sampling, **static)
        if int(state["counts"][0]) < n:  # the row stopped at the token before
            return
        yield int(state["out"][0, n - 1])


# --- text in, text out -------------------------------------------------------------------------------------------

# End-of-turn tokens chat templates close a turn with; a template that writes one means the model ends its answers
# with it (transformers users stop on them through the models' generation configs).
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|im_end|>", "<|end|>")

Prompt = str | Sequence[Mapping[str, str]]


def _as_batch(prompts) -> list[Prompt]:
    """A string, one conversation (a list of messages) or a list of either -> a list of prompts."""
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], Mapping):
        return [prompts]
    return prompts


def prompt_token_ids(tokenizer, prompt: Prompt) -> list[int]:
    """A raw string -> ``tokenizer(text)`` (BOS added as the tokenizer adds it, as transformers does); a
    conversation -> its chat-template rendering with the generation prompt, tokenized without added special tokens
    (the template writes its own BOS)."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    from jaxsloth.data.chat import chat_token_ids, require_chat_template

    messages = list(prompt)
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} of a conversation must be a dict with 'role' and 'content', got {m!r}")
    require_chat_template(tokenizer, "generating from chat messages")
    return chat_token_ids(tokenizer, messages, add_generation_prompt=True)


def _generation_config(model_path: str | None) -> dict:
    from converters.hf_assets import source_file

    path = source_file(model_path, "generation_config.json")
    return {} if path is None else json.loads(path.read_text())


def stop_token_ids(model, tokenizer) -> list[int]:
    """The ids that end an answer: generation_config.json's eos_token_id (int or list) beside the model's weights,
    config.json's, the tokenizer's EOS, and the end-of-turn tokens its chat template writes. Ids outside the model's
    vocabulary are dropped with a warning, as transformers ignores them."""
    ids: set[int] = set()
    for eos in (_generation_config(model.path).get("eos_token_id"), model.config.eos_token_id):
        if eos is not None:
            ids.update(eos if isinstance(eos, tuple | list) else [eos])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        for token in END_OF_TURN_TOKENS:
            tid = tokenizer.convert_tokens_to_ids(token)
            if token in template and isinstance(tid, int) and tid != tokenizer.unk_token_id:
                ids.add(tid)
    outside = sorted(t for t in ids if not 0 <= t < model.config.vocab_size)
    if outside:
        log.warning("eos_token_id %s outside the vocabulary [0, %d) is ignored", outside, model.config.vocab_size)
    return sorted(t for t in ids if 0 <= t < model.config.vocab_size)


def sampling_settings(
    do_sample: bool | None,
    temperature: float | None,
    top_k: int | None,
    top_p: float | None,
    min_p: float | None,
    repetition_penalty: float | None,
) -> dict:
    """transformers' names -> ``generate``'s settings. do_sample=None samples when a temperature > 0 is given."""
    if do_sample is None:
        do_sample = temperature is not None and temperature > 0
    if not do_sample:
        return {"temperature": 0.0, "repetition_penalty": repetition_penalty}
    temperature = 1.0 if temperature is None else temperature
    if not temperature > 0:
        raise ValueError(f"do_sample=True needs a temperature > 0, got {temperature} (do_sample=False is greedy)")
    return dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty)


def _model_inputs(model, tokenizer, prompts, stop_tokens, settings: dict) -> tuple[list[list[int]], dict]:
    from jaxsloth.lora import with_trainable

    if tokenizer is None:
        raise ValueError("generate needs a tokenizer (the model directory has none; pass one)")
    ids = [prompt_token_ids(tokenizer, p) for p in _as_batch(prompts)]
    params, lora, lora_rt = model.params, None, None
    if model.trainable is not None:
        params, lora = with_trainable(model.params, model.trainable)
        lora_rt = model.lora.runtime
    stops = sorted(set(stop_token_ids(model, tokenizer)) | set(stop_tokens))
    kw = dict(stop_tokens=stops, lora=lora, lora_rt=lora_rt, ops=model.profile.ops, compute_dtype=model.profile.dtype)
    return ids, {"params": params, "config": model.config, **kw, **settings}


def generate_text(
    model,
    tokenizer,
    prompts,
    max_new_tokens: int = 64,
    *,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    seed: int = 0,
    stop_tokens: Sequence[int] = (),
) -> list[str]:
    """Completes each prompt with ``model`` (a ``jaxsloth.api.Model``: its adapter when it has one, its profile's
    kernels and dtype); returns the new text per prompt, special tokens skipped.

    prompts: a string or a list of strings (raw completion), a conversation (a list of {"role", "content"}
    messages, answered through the tokenizer's chat template) or a list of conversations. A row stops at the
    model's stop tokens (``stop_token_ids``) or any of ``stop_tokens``. Sampling as transformers names it: greedy
    unless do_sample (default: sample when a temperature > 0 is given); top_k None keeps every token.
    """
    settings = sampling_settings(do_sample, temperature, top_k, top_p, min_p, repetition_penalty)
    ids, kw = _model_inputs(model, tokenizer, prompts, stop_tokens, settings)
    new = generate(prompt_ids=ids, max_new_tokens=max_new_tokens, seed=seed, **kw)
    return [tokenizer.decode(t, skip_special_tokens=True) for t in new]


def stream_text(
    model,
    tokenizer,
    prompt: Prompt,
    max_new_tokens: int = 64,
    *,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    seed: int = 0,
    stop_tokens: Sequence[int] = (),
) -> Iterator[str]:
    """``generate_text`` for one prompt (a string or a conversation), yielding the text as it is decoded; the
    pieces join to ``generate_text``'s answer. A piece is held back while it ends inside a multi-byte character."""
    if not isinstance(prompt, str) and prompt and not isinstance(list(prompt)[0], Mapping):
        raise ValueError("stream_text takes one prompt: a string or one conversation (a list of messages)")
    settings = sampling_settings(do_sample, temperature, top_k, top_p, min_p, repetition_penalty)
    ids, kw = _model_inputs(model, tokenizer, prompt, stop_tokens, settings)
    params, config = kw.pop("params"), kw.pop("config")
    new: list[int] = []
    shown = ""
    for token in generate_stream(params, config, ids[0], max_new_tokens=max_new_tokens, seed=seed, **kw):
        new.append(token)
        text = tokenizer.decode(new, skip_special_tokens=True)
        if not text.endswith("\ufffd") and len(text) > len(shown):
            yield text[len(shown) :]
            shown = text
    text = tokenizer.decode(new, skip_special_tokens=True)
    if len(text) > len(shown):
        yield text[len(shown) :]
