"""The generic decoder: embed -> N x (norm, attention, norm, MLP) -> norm -> head, for every family.

Params are a plain pytree (HF orientation: every projection weight is [out, in]); per-layer tensors are stacked
along a leading axis and run with ``lax.scan``. Family differences come from ``ModelConfig`` fields. Every op goes
through ``jaxsloth.ops.Ops`` (the dispatch point).

Param tree::

    embed [V, D]; final_norm [D]; lm_head [V, D] (absent when tied)
    layers: attn_norm, mlp_norm [L, D]; attn_post_norm, mlp_post_norm [L, D] (Gemma 2)
            q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj: {"weight": [L, out, in] or NF4Weight,
            "bias": [L, out] (q/k/v on Qwen 2)}

LoRA tree (optional): {"layers": {name: {"a": [L, r, in], "b": [L, out, r]}}}, scale alpha / r (or / sqrt(r)).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxsloth.models.config import ModelConfig, rope_inv_freq
from jaxsloth.ops import Ops

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
REMAT_POLICIES = ("none", "dots", "full", "offload")


@dataclasses.dataclass(frozen=True)
class LoraRuntime:
    """The static part of LoRA the forward needs: the scale and the dropout rate."""

    scale: float = 1.0
    dropout: float = 0.0


def linear_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of every projection of one layer."""
    d, hd = config.hidden_size, config.head_dim
    q, kv, f = config.num_heads * hd, config.num_kv_heads * hd, config.intermediate_size
    return {
        "q_proj": (q, d),
        "k_proj": (kv, d),
        "v_proj": (kv, d),
        "o_proj": (d, q),
        "gate_proj": (f, d),
        "up_proj": (f, d),
        "down_proj": (d, f),
    }


def param_shapes(config: ModelConfig) -> dict:
    """The param tree as ShapeDtypeStruct-free nested dict of shapes (f32 placeholders for eval_shape)."""
    L, D, V = config.num_layers, config.hidden_size, config.vocab_size
    layers: dict = {"attn_norm": (L, D), "mlp_norm": (L, D)}
    if config.post_norms:
        layers["attn_post_norm"] = (L, D)
        layers["mlp_post_norm"] = (L, D)
    for name, (o, i) in linear_shapes(config).items():
        layers[name] = {"weight": (L, o, i)}
        if config.qkv_bias and name in ("q_proj", "k_proj", "v_proj"):
            layers[name]["bias"] = (L, o)
    tree = {"embed": (V, D), "final_norm": (D,), "layers": layers}
    if not config.tie_word_embeddings:
        tree["lm_head"] = (V, D)
    return tree


def init_params(config: ModelConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> dict:
    """Random params (normal(0, std) weights, norms at their identity value). For tests and benchmarks."""
    shapes = param_shapes(config)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    paths = [
        jax.tree_util.keystr(p)
        for p, _ in jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]
    ]
    keys = jax.random.split(key, len(leaves))
    out = []
    for path, shape, k in zip(paths, leaves, keys, strict=True):
        if "norm" in path:
            out.append(jnp.full(shape, 1.0 - config.norm_weight_offset, dtype))
        else:
            out.append((std * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
    return jax.tree.unflatten(treedef, out)


def count_params(params) -> int:
    """Number of weights (an NF4 weight counts its logical elements, per stacked layer)."""

    def is_nf4(x):
        return hasattr(x, "packed")

    total = 0
    for leaf in jax.tree.leaves(params, is_leaf=is_nf4):
        if is_nf4(leaf):
            total += math.prod(leaf.packed.shape[:-1]) * math.prod(leaf.shape)
        else:
            total += math.prod(leaf.shape)
    return total


def _remat(fn: Callable, policy: str) -> Callable:
    if policy == "none":
        return fn
    if policy == "full":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)
    if policy == "dots":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    if policy == "offload":
        return jax.checkpoint(
            fn,
            policy=jax.checkpoint_policies.save_and_offload_only_these_names(
                names_which_can_be_saved=[],
                names_which_can_be_offloaded=["layer_in"],
                offload_src="device",
                offload_dst="pinned_host",
            ),
        )
    raise ValueError(f"unknown remat policy {policy!r}; choose one of {REMAT_POLICIES}")


def _layer_period(config: ModelConfig) -> int:
    """Smallest p with layer_types periodic in p and num_layers % p == 0 (Gemma 2: 2), so a scan step runs p
    layers with static attention windows (kernels skip blocks only for a static window)."""
    types = config.layer_types
    for p in range(1, len(types) + 1):
        if len(types) % p == 0 and all(types[i] == types[i % p] for i in range(len(types))):
            return p
    return len(types)


def decoder_layer(
    h,
    lp,
    ll,
    *,
    config: ModelConfig,
    ops: Ops,
    sliding: bool,
    positions,
    segment_ids,
    inv_freq,
    rope_scaling,
    lora_rt: LoraRuntime,
    dropout_key=None,
):
    """One layer. h: [B, T, D]; lp: this layer's params; ll: this layer's LoRA (or None)."""
    b, t, _ = h.shape
    hd = config.head_dim
    eps, off = config.rms_norm_eps, config.norm_weight_offset

    def proj(name, x, lora_x=None):
        p = lp[name]
        lora = None if ll is None else ll.get(name)
        return ops.linear(x, p["weight"], p.get("bias"), lora, lora_rt.scale, lora_x if lora is not None else None)

    def lora_input(x, salt):
        if ll is None or lora_rt.dropout == 0.0 or dropout_key is None:
            return None
        keep = jax.random.bernoulli(jax.random.fold_in(dropout_key, salt), 1.0 - lora_rt.dropout, x.shape)
        return jnp.where(keep, x / (1.0 - lora_rt.dropout), 0).astype(x.dtype)

    x = ops.rms_norm(h, lp["attn_norm"], eps=eps, weight_offset=off)
    xd = lora_input(x, 0)
    q = proj("q_proj", x, xd).reshape(b, t, config.num_heads, hd)
    k = proj("k_proj", x, xd).reshape(b, t, config.num_kv_heads, hd)
    v = proj("v_proj", x, xd).reshape(b, t, config.num_kv_heads, hd)
    q, k = ops.rope(q, k, positions, inv_freq, attention_scaling=rope_scaling)
    a = ops.attention(
        q,
        k,
        v,
        segment_ids=segment_ids,
        causal=True,
        sliding_window=config.window_for(sliding),
        softcap=config.attn_logit_softcap,
        scale=config.attention_scale,
    ).reshape(b, t, config.num_heads * hd)
    o = proj("o_proj", a, lora_input(a, 1))
    if config.post_norms:
        o = ops.rms_norm(o, lp["attn_post_norm"], eps=eps, weight_offset=off)
    x, h = ops.rms_norm(o, lp["mlp_norm"], h, eps=eps, weight_offset=off)
    xd = lora_input(x, 2)
    act = ops.glu(proj("gate_proj", x, xd), proj("up_proj", x, xd), activation=config.activation)
    d = proj("down_proj", act, lora_input(act, 3))
    if config.post_norms:
        d = ops.rms_norm(d, lp["mlp_post_norm"], eps=eps, weight_offset=off)
    return h + d


def embed(params, tokens, config: ModelConfig, dtype=None):
    """tokens: [B, T] int -> [B, T, D]."""
    h = jnp.take(params["embed"], tokens, axis=0)
    if dtype is not None:
        h = h.astype(dtype)
    if config.scale_embeddings:
        h = h * jnp.asarray(math.sqrt(config.hidden_size), dtype=h.dtype)
    return h


def forward_hidden(
    params,
    tokens,
    *,
    config: ModelConfig,
    ops: Ops = Ops(),
    positions=None,
    segment_ids=None,
    lora=None,
    lora_rt: LoraRuntime = LoraRuntime(),
    remat: str = "none",
    dropout_key=None,
    compute_dtype=None,
):
    """tokens: [B, T] int32 -> final-normed hidden states [B, T, D].

    positions: [B, T] (default arange; packed rows restart per segment); segment_ids: [B, T] (packing; no attention
    across segments); lora: LoRA tree or None; remat: none / dots / full / offload (per layer).
    """
    b, t = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    inv_freq_np, rope_scaling = rope_inv_freq(config, seq_len=t)
    inv_freq = jnp.asarray(inv_freq_np)
    h = embed(params, tokens, config, compute_dtype)
    period = _layer_period(config)
    groups = config.num_layers // period

    def group_params(tree):
        return jax.tree.map(lambda x: x.reshape(groups, period, *x.shape[1:]), tree)

    layers = group_params(params["layers"])
    lora_layers = None if lora is None else group_params(lora["layers"])
    slidings = config.sliding_layers[:period]

    def step(h, xs):
        lp_group, ll_group, idx = xs
        h = checkpoint_name(h, "layer_in")
        for j in range(period):
            lp = jax.tree.map(lambda x, j=j: x[j], lp_group)
            ll = None if ll_group is None else jax.tree.map(lambda x, j=j: x[j], ll_group)
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, idx * period + j)
            h = decoder_layer(
                h,
                lp,
                ll,
                config=config,
                ops=ops,
                sliding=slidings[j],
                positions=positions,
                segment_ids=segment_ids,
                inv_freq=inv_freq,
                rope_scaling=rope_scaling,
                lora_rt=lora_rt,
                dropout_key=key,
            )
        return h, None

    h, _ = jax.lax.scan(_remat(step, remat), h, (layers, lora_layers, jnp.arange(groups)))
    return ops.rms_norm(h, params["final_norm"], eps=config.rms_norm_eps, weight_offset=config.norm_weight_offset)


def lm_head(params, config: ModelConfig):
    """[V, D]: the LM head, or the tied embedding."""
    return params["embed"] if config.tie_word_embeddings else params["lm_head"]


def logits_from_hidden(params, hidden, config: ModelConfig):
    """hidden: [..., D] -> logits [..., V] in f32 (final softcap applied). Materialises logits: generation/eval."""
    head = lm_head(params, config)
    logits = jnp.einsum("...d,vd->...v", hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32)
    if config.final_logit_softcap is not None:
        c = config.final_logit_softcap
        logits = c * jnp.tanh(logits / c)
    return logits


def forward(params, tokens, *, config: ModelConfig, **kwargs):
    """tokens: [B, T] -> logits [B, T, V] (f32). See ``forward_hidden`` for the keyword arguments."""
    return logits_from_hidden(params, forward_hidden(params, tokens, config=config, **kwargs), config)


def loss_sum_and_count(params, batch, *, config: ModelConfig, ops: Ops = Ops(), head_grad: bool = True, **kwargs):
    """batch: tokens, targets (next-token labels, -100 = no loss), optional positions and segment_ids, all [B, T].

    Returns (sum of token losses, number of counted tokens); the fused LM-head loss never builds the logits when the
    profile picks the Pallas cross-entropy.
    """
    hidden = forward_hidden(
        params,
        batch["tokens"],
        config=config,
        ops=ops,
        positions=batch.get("positions"),
        segment_ids=batch.get("segment_ids"),
        **kwargs,
    )
    head = lm_head(params, config).astype(hidden.dtype)
    return ops.cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]),
        head,
        batch["targets"].reshape(-1),
        softcap=config.final_logit_softcap,
        head_grad=head_grad,
    )
