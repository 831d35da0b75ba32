"""The generic decoder: embed -> N x (norm, attention, norm, MLP) -> norm -> head, for every family.

Params are a plain pytree (HF orientation: every projection weight is [out, in]); per-layer tensors are stacked
along a leading axis and run with ``lax.scan``, or, unstacked into one tree per layer (``unstack_layers``, the
training step's layout on Hopper), run as an unrolled loop. Family differences come from ``ModelConfig`` fields.
Every op goes through ``jaxsloth.ops.Ops`` (the dispatch point).

Param tree::

    embed [V, D]; final_norm [D]; lm_head [V, D] (absent when tied)
    layers: attn_norm, mlp_norm [L, D]; attn_post_norm, mlp_post_norm [L, D] (Gemma 2 and 3);
            q_norm, k_norm [L, head_dim] (Qwen 3, Gemma 3)
            q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj: {"weight": [L, out, in] or NF4Weight,
            "bias": [L, out] (q/k/v on Qwen 2)}

LoRA tree (optional): {"layers": {name: {"a": [L, r, in], "b": [L, out, r]}}}, scale alpha / r (or / sqrt(r)).

Mixture-of-experts models (``config.is_moe``) have no gate/up/down_proj: their MLP is ``jaxsloth.models.moe``'s
(router, experts_gate_up, experts_down).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxsloth.models import moe
from jaxsloth.models.config import ModelConfig, rope_inv_freq
from jaxsloth.ops import Ops
from jaxsloth.quant import is_nf4

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
REMAT_POLICIES = ("none", "dots", "attn_dots", "full", "offload")
# Projections whose outputs "attn_dots" keeps: everything but the two wide MLP inputs (gate, up), which are
# recomputed; at 2048 tokens a layer then saves 4 * hidden + 2 * kv_dim values per token instead of all of them.
ATTN_DOTS = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")
# The attention forward launches whose outputs (attention output and log-sum-exp, the backward's residuals) "dots"
# also keeps, so the backward does not run the attention forward a second time: the Pallas kernel's pallas_call by
# name, cuDNN's forward primitive. Names put inside a custom_vjp's forward rule are not honoured by the remat
# policy (the forward is recomputed whole), hence a policy on the launches themselves.
_ATTENTION_FORWARD_KERNELS = ("flash_attention_fwd",)
_ATTENTION_FORWARD_PRIMITIVES = ("dot_product_attention_fwd", "dot_product_attention_fwd_wrapper")


def _save_projections_and_attention(*names):
    save_named = jax.checkpoint_policies.save_only_these_names(*names)

    def policy(prim, *args, **params):
        if prim.name == "pallas_call":
            return params.get("name") in _ATTENTION_FORWARD_KERNELS
        if prim.name in _ATTENTION_FORWARD_PRIMITIVES:
            return True
        return save_named(prim, *args, **params)

    return policy


@dataclasses.dataclass(frozen=True)
class LoraRuntime:
    """The static part of LoRA the forward needs: the scale and the dropout rate."""

    scale: float = 1.0
    dropout: float = 0.0


def linear_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of every projection of one layer (a mixture of experts' are ``moe.expert_shapes``)."""
    d, hd = config.hidden_size, config.head_dim
    q, kv, f = config.num_heads * hd, config.num_kv_heads * hd, config.intermediate_size
    shapes = {"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q)}
    if not config.is_moe:
        shapes.update({"gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)})
    return shapes


def param_shapes(config: ModelConfig) -> dict:
    """The param tree as ShapeDtypeStruct-free nested dict of shapes (f32 placeholders for eval_shape)."""
    L, D, V = config.num_layers, config.hidden_size, config.vocab_size
    layers: dict = {"attn_norm": (L, D), "mlp_norm": (L, D)}
    if config.post_norms:
        layers["attn_post_norm"] = (L, D)
        layers["mlp_post_norm"] = (L, D)
    if config.qk_norm:
        layers["q_norm"] = (L, config.head_dim)
        layers["k_norm"] = (L, config.head_dim)
    for name, (o, i) in linear_shapes(config).items():
        layers[name] = {"weight": (L, o, i)}
        if config.qkv_bias and name in ("q_proj", "k_proj", "v_proj"):
            layers[name]["bias"] = (L, o)
    if config.is_moe:
        layers.update(moe.layer_param_shapes(config))
    tree = {"embed": (V, D), "final_norm": (D,), "layers": layers}
    if not config.tie_word_embeddings:
        tree["lm_head"] = (V, D)
    return tree


def param_count(config: ModelConfig) -> int:
    """Number of weights of the full-precision model (``param_shapes``), without building it."""
    shapes = jax.tree.leaves(param_shapes(config), is_leaf=lambda x: isinstance(x, tuple))
    return sum(math.prod(shape) for shape in shapes)


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
        return jax.checkpoint(fn, policy=_save_projections_and_attention(*LINEARS))
    if policy == "attn_dots":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.save_only_these_names(*ATTN_DOTS))
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


def layer_period(config: ModelConfig, remat_group: int = 1) -> int:
    """Layers per scan step: the smallest p with layer_types periodic in p (Gemma 2: 2), so every step runs its
    layers with static attention windows (kernels skip blocks only for a static window), times ``remat_group``
    (layers per residual checkpoint, for long sequences) when that divides the layer count."""
    types = config.layer_types
    p = next(
        p
        for p in range(1, len(types) + 1)
        if len(types) % p == 0 and all(types[i] == types[i % p] for i in range(len(types)))
    )
    k = p * max(remat_group, 1) // math.gcd(p, max(remat_group, 1))
    return k if config.num_layers % k == 0 else p


def group_layers(tree, period: int):
    """[L, ...] leaves -> [L / period, period, ...], the scan's per-step slices."""
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // period, period, *x.shape[1:]), tree)


def scan_steps(tree, period: int):
    """The layer scan's xs: [L, ...] leaves as they are when every step is one layer (a [L, 1, ...] view of the
    stacked arrays makes XLA:CPU copy every one of them before the loop: the whole stacked weights, held through the
    step), else ``group_layers``' [L / period, period, ...]."""
    return tree if period == 1 else group_layers(tree, period)


def scan_member(group, j: int, period: int):
    """Layer ``j`` of one scan step of ``scan_steps``."""
    return group if period == 1 else layer_slice(group, j)


LAYER_LOOPS = ("scan", "unrolled", "auto")


def layer_slice(tree, i: int):
    """Entry ``i`` along the leading (layer) axis of every leaf."""
    return jax.tree.map(lambda x: x[i], tree)


def layers_unstacked(params) -> bool:
    """Whether ``params["layers"]`` is a tuple of per-layer trees (``unstack_layers``) rather than stacked arrays."""
    return isinstance(params["layers"], (list, tuple))


def unstack_layers(params: dict, consume: bool = False) -> dict:
    """The same params with ``params["layers"]`` as a tuple of per-layer trees (leaves without the layer axis),
    which ``forward_hidden`` runs as a Python loop: every projection then reads its own weight buffer, where the
    scan's per-step slice of the stacked arrays is a copy of each layer's weights, forward and backward.

    Call it outside jit (slicing inside a jitted step would copy again). ``consume``: move the projections out of
    ``params["layers"]`` one at a time, so that a caller passing the only reference to its weights peaks at the
    weights plus one projection's stack instead of twice the weights; should a split fail (out of memory), the
    projections already moved are stacked back before the error propagates."""
    return _relayout(params, consume, to_layers=True)


def stack_layers(params: dict, consume: bool = False) -> dict:
    """Inverse of ``unstack_layers`` (the stacked layout every other part of jaxsloth reads); ``consume`` as there
    (the per-layer dicts are emptied)."""
    return _relayout(params, consume, to_layers=False)


def _relayout(params: dict, consume: bool, to_layers: bool) -> dict:
    """Moves params["layers"] between {name: stacked tree} and a tuple of per-layer {name: tree}, one projection at
    a time (see ``unstack_layers``)."""
    source = params["layers"]
    count = jax.tree.leaves(source)[0].shape[0] if to_layers else len(source)
    names = list(source if to_layers else source[0])
    split = jax.jit(lambda x: tuple(x[i] for i in range(count)))
    stack = jax.jit(lambda *xs: jnp.stack(xs))

    def per_layer(tree) -> list:
        leaves, treedef = jax.tree.flatten(tree)
        pieces = [split(leaf) for leaf in leaves]
        return [jax.tree.unflatten(treedef, [p[i] for p in pieces]) for i in range(count)]

    def stacked(trees: list):
        return jax.tree.map(lambda *xs: stack(*xs), *trees)

    target: list[dict] | dict = [{} for _ in range(count)] if to_layers else {}
    moved: list[str] = []
    try:
        for name in names:
            if to_layers:
                for layer, tree in zip(target, per_layer(source[name]), strict=True):
                    layer[name] = tree
                if consume:
                    del source[name]
            else:
                target[name] = stacked([layer[name] for layer in source])
                if consume:
                    for layer in source:
                        del layer[name]
            moved.append(name)
    except BaseException:
        for name in moved if consume else ():  # back into the source's own layout before the error propagates
            if to_layers:
                source[name] = stacked([layer[name] for layer in target])
            else:
                for layer, tree in zip(source, per_layer(target[name]), strict=True):
                    layer[name] = tree
        raise
    return {**params, "layers": tuple(target) if to_layers else target}


def _projector(lp, ll, ops: Ops, lora_rt: LoraRuntime, dropout_key):
    """proj(name, x, salt): the projection with its LoRA term; LoRA dropout drawn from (key, salt) when training."""

    def lora_input(x, salt):
        if ll is None or lora_rt.dropout == 0.0 or dropout_key is None:
            return None
        keep = jax.random.bernoulli(jax.random.fold_in(dropout_key, salt), 1.0 - lora_rt.dropout, x.shape)
        return jnp.where(keep, x / (1.0 - lora_rt.dropout), 0).astype(x.dtype)

    def proj(name, x, salt):
        p = lp[name]
        lora = None if ll is None else ll.get(name)
        lx = lora_input(x, salt) if lora is not None else None
        y = ops.linear(x, p["weight"], p.get("bias"), lora, lora_rt.scale, lx)
        return checkpoint_name(y, name)  # remat policies choose which projection outputs to keep by name

    return proj


def attention_inputs(
    h,
    lp,
    ll,
    *,
    config: ModelConfig,
    ops: Ops,
    positions,
    inv_freq,
    rope_scaling,
    lora_rt: LoraRuntime,
    dropout_key=None,
    long_rope=None,
):
    """First half of a layer. h: [B, T, D] -> rotated q [B, T, Hq, hd], k and v [B, T, Hk, hd].

    inv_freq, rope_scaling, long_rope: this layer's kind's :func:`rope_setup`; long_rope: None, or longrope's
    (long inv_freq, use_long [B, T] bool)."""
    b, t, _ = h.shape
    hd = config.head_dim
    eps, off = config.rms_norm_eps, config.norm_weight_offset
    proj = _projector(lp, ll, ops, lora_rt, dropout_key)
    x = ops.rms_norm(h, lp["attn_norm"], eps=eps, weight_offset=off)
    q = proj("q_proj", x, 0).reshape(b, t, config.num_heads, hd)
    k = proj("k_proj", x, 0).reshape(b, t, config.num_kv_heads, hd)
    v = proj("v_proj", x, 0).reshape(b, t, config.num_kv_heads, hd)
    if config.qk_norm:
        q = ops.rms_norm(q, lp["q_norm"], eps=eps, weight_offset=off)
        k = ops.rms_norm(k, lp["k_norm"], eps=eps, weight_offset=off)
    q, k = apply_rope(ops, q, k, positions, inv_freq, rope_scaling, long_rope)
    return q, k, v


def example_lengths(positions, segment_ids=None):
    """positions, segment_ids: [B, T] -> [B, T] int32: the length (last position + 1) of the example each token
    belongs to. An example is a run of one segment id whose positions increase (packed rows restart at 0)."""
    b, t = positions.shape
    seg = jnp.zeros_like(positions) if segment_ids is None else segment_ids
    ends = (seg[:, 1:] != seg[:, :-1]) | (positions[:, 1:] <= positions[:, :-1])
    ends = jnp.concatenate([ends, jnp.ones((b, 1), bool)], axis=1)
    last = jax.lax.cummin(jnp.where(ends, jnp.arange(t), t), axis=1, reverse=True)
    return (jnp.take_along_axis(positions, last, axis=1) + 1).astype(jnp.int32)


def rope_setup(config: ModelConfig, lengths=None, sliding: bool = False):
    """(inv_freq, attention_scaling, long_rope) for :func:`attention_inputs` of full-attention layers, or with
    ``sliding`` of sliding-window layers (Gemma 3 gives them a RoPE of their own: ``ModelConfig.rope_for``).

    Longrope (Phi-3) rotates with its long factors when the sequence is longer than the original context, which
    transformers decides per forward call from max position + 1. Here each token decides from its own example's
    length (``lengths``: [B, T] or [B, 1], e.g. :func:`example_lengths`), so a packed or padded row gives every
    example what transformers gives it alone: long_rope = (long inv_freq, lengths > original context). None for
    every other rope (and ``lengths`` unused)."""
    inv_freq, scaling = rope_inv_freq(config, sliding=sliding)
    if config.rope_for(sliding).kind != "longrope":
        return jnp.asarray(inv_freq), scaling, None
    orig = config.rope.original_max_position_embeddings or config.max_position_embeddings
    long_inv_freq, _ = rope_inv_freq(config, seq_len=orig + 1)
    return jnp.asarray(inv_freq), scaling, (jnp.asarray(long_inv_freq), lengths > orig)


def apply_rope(ops: Ops, q, k, positions, inv_freq, scaling: float, long_rope=None):
    """q: [B, T, Hq, hd], k: [B, T, Hk, hd] rotated by ``ops.rope``. With long_rope, tokens whose use_long is
    set take the long inv_freq: both rotations are computed and selected per token, so the rope kernel keeps its
    one-inv_freq interface (longrope's scaling is the same for both factor sets)."""
    qs, ks = ops.rope(q, k, positions, inv_freq, attention_scaling=scaling)
    if long_rope is None:
        return qs, ks
    long_inv_freq, use_long = long_rope
    ql, kl = ops.rope(q, k, positions, long_inv_freq, attention_scaling=scaling)
    pick = use_long[:, :, None, None]
    return jnp.where(pick, ql, qs), jnp.where(pick, kl, ks)


def _in_chunks(fn, x, chunk: int):
    """fn over sequence chunks of x [B, T, D], each chunk rematerialised in the backward pass, so fn's
    intermediates exist for one chunk at a time (long sequences: the MLP's [T, F] activations never exist whole)."""
    b, t, d = x.shape
    n = -(-t // chunk)
    xp = jnp.pad(x, ((0, 0), (0, n * chunk - t), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)
    ys = jax.lax.map(jax.checkpoint(fn), (xp, jnp.arange(n)))
    return ys.swapaxes(0, 1).reshape(b, n * chunk, -1)[:, :t]


def layer_output(
    h,
    a,
    lp,
    ll,
    *,
    config: ModelConfig,
    ops: Ops,
    lora_rt: LoraRuntime,
    dropout_key=None,
    mlp_chunk: int | None = None,
    router_stats: list | None = None,
    token_mask=None,
):
    """Second half of a layer. h: [B, T, D] (layer input), a: attention output [B, T, Hq, hd] -> [B, T, D]:
    o_proj, post-norm (Gemma 2), residual, MLP (in sequence chunks of ``mlp_chunk`` when set), residual.

    A mixture of experts appends its ``moe.RouterStats`` (over the tokens of ``token_mask`` [B, T]) to
    ``router_stats`` when given."""
    b, t = h.shape[:2]
    eps, off = config.rms_norm_eps, config.norm_weight_offset
    proj = _projector(lp, ll, ops, lora_rt, dropout_key)
    o = proj("o_proj", a.reshape(b, t, -1), 1)
    if config.post_norms:
        o = ops.rms_norm(o, lp["attn_post_norm"], eps=eps, weight_offset=off)
    x, h = ops.rms_norm(o, lp["mlp_norm"], h, eps=eps, weight_offset=off)

    def mlp(x, chunk_idx=0):
        p = _projector(
            lp, ll, ops, lora_rt, None if dropout_key is None else jax.random.fold_in(dropout_key, chunk_idx)
        )
        act = ops.glu(p("gate_proj", x, 2), p("up_proj", x, 2), activation=config.activation)
        return p("down_proj", act, 3)

    if config.is_moe:
        d, stats = moe.moe_mlp(x, lp, ll, config=config, ops=ops, lora_scale=lora_rt.scale, token_mask=token_mask)
        if router_stats is not None:
            router_stats.append(stats)
    elif mlp_chunk and t > mlp_chunk:
        d = _in_chunks(lambda xs: mlp(*xs), x, mlp_chunk)
    else:
        d = mlp(x)
    if config.post_norms:
        d = ops.rms_norm(d, lp["mlp_post_norm"], eps=eps, weight_offset=off)
    return h + d


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
    mlp_chunk: int | None = None,
    long_rope=None,
    router_stats: list | None = None,
):
    """One layer. h: [B, T, D]; lp: this layer's params; ll: this layer's LoRA (or None); router_stats: see
    ``layer_output`` (the tokens counted: segment id not 0)."""
    q, k, v = attention_inputs(
        h,
        lp,
        ll,
        config=config,
        ops=ops,
        positions=positions,
        inv_freq=inv_freq,
        rope_scaling=rope_scaling,
        lora_rt=lora_rt,
        dropout_key=dropout_key,
        long_rope=long_rope,
    )
    a = ops.attention(
        q,
        k,
        v,
        segment_ids=segment_ids,
        causal=True,
        sliding_window=config.window_for(sliding),
        softcap=config.attn_logit_softcap,
        scale=config.attention_scale,
    )
    return layer_output(
        h,
        a,
        lp,
        ll,
        config=config,
        ops=ops,
        lora_rt=lora_rt,
        dropout_key=dropout_key,
        mlp_chunk=mlp_chunk,
        router_stats=router_stats,
        token_mask=None if segment_ids is None else segment_ids != 0,
    )


def embed(params, tokens, config: ModelConfig, dtype=None):
    """tokens: [B, T] int -> [B, T, D]."""
    return embedded_rows(jnp.take(params["embed"], tokens, axis=0), config, dtype)


def embedded_rows(rows, config: ModelConfig, dtype=None):
    """The embedding table's rows of each token [B, T, D] -> the decoder's input (cast, and scaled where the family
    scales it): what ``embed`` returns, for rows looked up elsewhere (the host, ``jaxsloth.train.host_embedding``)."""
    h = rows if dtype is None else rows.astype(dtype)
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
    mlp_chunk: int | None = None,
    remat_group: int = 1,
    dots_layers: int = 0,
    with_router_stats: bool = False,
    embedded=None,
):
    """tokens: [B, T] int32 -> final-normed hidden states [B, T, D]; with ``with_router_stats`` (mixtures of
    experts), (hidden, ``moe.RouterStats`` summed over layers). embedded: the embedding table's rows of ``tokens``
    [B, T, D], looked up by the caller (the table kept on the host); then ``params["embed"]`` is not read.

    positions: [B, T] (default arange; packed rows restart per segment); segment_ids: [B, T] (packing; no attention
    across segments); lora: LoRA tree or None; remat: none / dots / attn_dots / full / offload, applied per scan step
    of ``remat_group`` layers (one residual checkpoint per group); mlp_chunk: MLP sequence tile (long sequences);
    dots_layers: the first this many layers (whole groups) remat "dots" instead (unstacked layers only): a memory
    budget between ``remat`` and "dots", layer by layer.
    """
    b, t = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    lengths = example_lengths(positions, segment_ids) if config.rope.kind == "longrope" else None
    if embedded is None:
        h = embed(params, tokens, config, compute_dtype)
    else:
        h = embedded_rows(embedded, config, compute_dtype)
    period = layer_period(config, remat_group)
    groups = config.num_layers // period
    slidings = config.sliding_layers[:period]
    ropes = {sliding: rope_setup(config, lengths, sliding) for sliding in set(slidings)}

    def run_group(h, lps, lls, idx):
        """The ``period`` layers of one remat group: lps, lls are their per-layer (unstacked) trees."""
        h = checkpoint_name(h, "layer_in")
        stats: list = []
        for j in range(period):
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, idx * period + j)
            inv_freq, rope_scaling, long_rope = ropes[slidings[j]]
            h = decoder_layer(
                h,
                lps[j],
                None if lls is None else lls[j],
                config=config,
                ops=ops,
                sliding=slidings[j],
                positions=positions,
                segment_ids=segment_ids,
                inv_freq=inv_freq,
                rope_scaling=rope_scaling,
                lora_rt=lora_rt,
                dropout_key=key,
                mlp_chunk=mlp_chunk,
                long_rope=long_rope,
                router_stats=stats,
            )
        return h, (sum(stats[1:], stats[0]) if stats else None)

    if layers_unstacked(params):
        # Unstacked layers (``unstack_layers``): a Python loop, every projection reading its own weight buffer.
        # The scan below slices the stacked weights per step, which XLA:GPU does by copying each layer's weights
        # into a buffer of their own, forward and backward; the loop reads them in place (BENCHMARKS.md, layer loop).
        def run_stacked_lora(h, lps, lora_layers, idx, first: int):
            """run_group with this group's LoRA sliced from the stacked tree inside the remat: the backward slices
            again instead of holding every layer's f32 slices from its forward."""
            lls = None if lora_layers is None else [layer_slice(lora_layers, first + j) for j in range(period)]
            return run_group(h, lps, lls, idx)

        router = []
        for g in range(groups):
            lps = params["layers"][g * period : (g + 1) * period]
            run = functools.partial(run_stacked_lora, first=g * period)  # a static slice: its gradient is a pad
            h, stats = _remat(run, "dots" if g * period < dots_layers else remat)(
                h, lps, None if lora is None else lora["layers"], g
            )
            router.append(stats)
        router = None if router[0] is None else sum(router[1:], router[0])
    else:
        if dots_layers:
            raise ValueError(f"dots_layers={dots_layers} needs the unrolled layer loop (unstack_layers)")

        def step(h, xs):
            lp_group, ll_group, idx = xs
            lps = [scan_member(lp_group, j, period) for j in range(period)]
            lls = None if ll_group is None else [scan_member(ll_group, j, period) for j in range(period)]
            return run_group(h, lps, lls, idx)

        layers = scan_steps(params["layers"], period)
        lora_layers = None if lora is None else scan_steps(lora["layers"], period)
        h, router = jax.lax.scan(_remat(step, remat), h, (layers, lora_layers, jnp.arange(groups)))
        router = None if router is None else jax.tree.map(lambda x: jnp.sum(x, axis=0), router)
    hidden = ops.rms_norm(h, params["final_norm"], eps=config.rms_norm_eps, weight_offset=config.norm_weight_offset)
    return (hidden, router) if with_router_stats else hidden


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


def loss_sum_and_count(
    params,
    batch,
    *,
    config: ModelConfig,
    ops: Ops = Ops(),
    head_grad: bool = True,
    loss_chunk: int | None = None,
    with_router_aux: bool = False,
    **kwargs,
):
    """batch: tokens, targets (next-token labels, -100 = no loss), optional positions and segment_ids, all [B, T],
    and optional "embedded": the embedding table's rows of the tokens [B, T, D] (``jaxsloth.train.host_embedding``).

    Returns (sum of token losses, number of counted tokens). The Pallas loss never builds the logits; ``loss_chunk``
    also tiles the tokens (each tile rematerialised), so the loss's temporaries stay bounded at any length.
    A mixture of experts whose config sets ``output_router_logits`` adds router_aux_loss_coef x the load-balancing
    loss to the mean, as transformers does (count x that to the sum); ``with_router_aux`` (for the metric) returns
    (sum, count, that load-balancing loss without its coefficient) instead.
    """
    aux = config.is_moe and config.output_router_logits
    hidden = forward_hidden(
        params,
        batch["tokens"],
        config=config,
        ops=ops,
        positions=batch.get("positions"),
        segment_ids=batch.get("segment_ids"),
        with_router_stats=aux,
        embedded=batch.get("embedded"),
        **kwargs,
    )
    if aux:
        hidden, router = hidden
        total, count = _token_loss(params, hidden, batch, config, ops, head_grad, loss_chunk)
        balance = moe.load_balancing_loss(router, config)
        total = total + config.router_aux_loss_coef * balance * count.astype(total.dtype)
        return (total, count, balance) if with_router_aux else (total, count)
    total, count = _token_loss(params, hidden, batch, config, ops, head_grad, loss_chunk)
    return (total, count, jnp.zeros((), jnp.float32)) if with_router_aux else (total, count)


def _token_loss(params, hidden, batch, config: ModelConfig, ops: Ops, head_grad: bool, loss_chunk: int | None):
    """(sum of token losses, count) of hidden [B, T, D] against batch["targets"]."""
    head = lm_head(params, config).astype(hidden.dtype)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t2 = batch["targets"].reshape(-1)

    def ce(h, t):
        return ops.cross_entropy(h, head, t, softcap=config.final_logit_softcap, head_grad=head_grad)

    n = h2.shape[0]
    if not loss_chunk or n <= loss_chunk:
        return ce(h2, t2)
    m = -(-n // loss_chunk)
    hp = jnp.pad(h2, ((0, m * loss_chunk - n), (0, 0))).reshape(m, loss_chunk, -1)
    tp = jnp.pad(t2, (0, m * loss_chunk - n), constant_values=-100).reshape(m, loss_chunk)
    sums, counts = jax.lax.map(jax.checkpoint(lambda xs: ce(*xs)), (hp, tp))
    return jnp.sum(sums), jnp.sum(counts)
