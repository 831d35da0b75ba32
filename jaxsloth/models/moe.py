"""Mixture-of-experts MLP (Qwen 3 MoE, Mixtral): top-k routing, experts as grouped matmuls over the tokens sorted by
expert, and the router's load-balancing loss, all as transformers 5 computes them.

Params of one layer (stacked over layers like every other weight, HF orientation [out, in] per expert)::

    router          {"weight": [L, E, D]}          (transformers' mlp.gate, frozen: never a LoRA target)
    experts_gate_up {"weight": [L, E, 2 * I, D]}   (gate rows first, then up: transformers' experts.gate_up_proj)
    experts_down    {"weight": [L, E, D, I]}       (experts.down_proj)

Under QLoRA each expert matrix is an NF4 weight of its own (lead axes [L, E]), dequantized a layer at a time.

LoRA on the experts is PEFT's ``target_parameters`` layout: one adapter per expert on the fused gate_up and on down,
{"a": [L, E, r, in], "b": [L, E, out, r]}; the dense names "gate_proj"/"up_proj"/"down_proj" of ``target_modules``
select them in an MoE model.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxsloth.models.config import ModelConfig

EXPERT_LINEARS = ("experts_gate_up", "experts_down")
# target_modules names of the dense MLP -> the expert projection they adapt in a mixture-of-experts model.
EXPERT_TARGETS = {"gate_proj": "experts_gate_up", "up_proj": "experts_gate_up", "down_proj": "experts_down"}


def expert_shapes(config: ModelConfig) -> dict[str, tuple[int, int, int]]:
    """(experts, out, in) of each expert projection of one layer."""
    e, d, i = config.num_experts, config.hidden_size, config.moe_intermediate_size
    return {"experts_gate_up": (e, 2 * i, d), "experts_down": (e, d, i)}


def layer_param_shapes(config: ModelConfig) -> dict:
    """The MLP params of the layers (leading layer axis), for ``decoder.param_shapes``."""
    L = config.num_layers
    tree = {"router": {"weight": (L, config.num_experts, config.hidden_size)}}
    for name, shape in expert_shapes(config).items():
        tree[name] = {"weight": (L, *shape)}
    return tree


def lora_targets(config: ModelConfig, target_modules) -> tuple[str, ...]:
    """The expert projections ``target_modules`` adapts. PEFT adapts gate and up together (one fused parameter), so
    naming one of them without the other is refused."""
    named = {EXPERT_TARGETS[m] for m in target_modules if m in EXPERT_TARGETS}
    if ("gate_proj" in target_modules) != ("up_proj" in target_modules):
        raise ValueError(
            f"target_modules names one of gate_proj/up_proj for {config.model_type!r}, whose experts fuse them "
            "(PEFT adapts experts.gate_up_proj whole): name both or neither"
        )
    return tuple(n for n in EXPERT_LINEARS if n in named)


def route(x, router_weight, config: ModelConfig):
    """x: [N, D], router_weight: [E, D] -> (routing weights [N, k] f32, expert ids [N, k] int32, probs [N, E] f32).

    softmax in f32 of the router logits, top k (ties to the lower expert id, as torch.topk does), renormalised when
    ``norm_topk_prob`` (always for Mixtral)."""
    logits = jnp.einsum("nd,ed->ne", x, router_weight.astype(x.dtype))
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, config.num_experts_per_tok)
    if config.norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32), probs


@dataclasses.dataclass(frozen=True)
class RouterStats:
    """Sums over layers and counted tokens of what the load-balancing loss needs: top-k selections per expert
    ``counts`` [E], router probabilities per expert ``probs`` [E], and ``rows`` (tokens x layers)."""

    counts: jax.Array
    probs: jax.Array
    rows: jax.Array

    def __add__(self, other: RouterStats) -> RouterStats:
        return RouterStats(self.counts + other.counts, self.probs + other.probs, self.rows + other.rows)


jax.tree_util.register_dataclass(RouterStats, data_fields=["counts", "probs", "rows"], meta_fields=[])


def load_balancing_loss(stats: RouterStats, config: ModelConfig) -> jax.Array:
    """transformers' ``load_balancing_loss_func`` (Switch Transformer eqs. 4-6): E x sum over experts of the
    fraction of top-k selections times the mean router probability, both over every layer's counted tokens."""
    rows = jnp.maximum(stats.rows, 1.0)
    return config.num_experts * jnp.sum((stats.counts / rows) * (stats.probs / rows))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _gather_rows(x, index, rows: int):
    """x[index] (x: [rows, D], index: [M] int32 -> [M, D]), whose backward scatters into zeros created from the
    incoming gradient: the zeros autodiff would scatter into are one constant that XLA shares between every layer,
    copies for each, and holds from the start of the step until that layer's backward."""
    return x[index]


def _gather_rows_fwd(x, index, rows):
    return x[index], index


def _gather_rows_bwd(rows, index, dy):
    zero, _ = jax.lax.optimization_barrier((jnp.zeros((), dy.dtype), dy))
    dx = jnp.broadcast_to(zero, (rows, dy.shape[1])).at[index].add(dy)
    return dx, np.zeros(index.shape, jax.dtypes.float0)


_gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def moe_mlp(x, lp, ll, *, config: ModelConfig, ops, lora_scale: float, token_mask=None):
    """x: [B, T, D] (the normed MLP input) -> (MLP output [B, T, D], RouterStats of this layer).

    token_mask: [B, T] bool, the tokens the load-balancing statistics count (transformers': the attention mask).
    Each token's k (token, expert) pairs are sorted by expert, run through the experts as grouped matmuls, weighted
    and summed back per token."""
    b, t, d = x.shape
    k, n_exp, inter = config.num_experts_per_tok, config.num_experts, config.moe_intermediate_size
    x2 = x.reshape(-1, d)
    weights, experts, probs = route(x2, lp["router"]["weight"], config)
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = order // k
    group_sizes = jnp.bincount(flat, length=n_exp).astype(jnp.int32)
    lora = {} if ll is None else ll

    def proj(name, rows):
        return ops.grouped_matmul(rows, lp[name]["weight"], group_sizes, lora.get(name), lora_scale)

    gate_up = proj("experts_gate_up", _gather_rows(x2, token, b * t))
    act = ops.glu(gate_up[:, :inter], gate_up[:, inter:], activation=config.activation)
    out = proj("experts_down", act)
    # transformers scales each expert's output by its routing weight, casts to the hidden dtype, then sums per token.
    scaled = (out * weights.reshape(-1)[order][:, None].astype(out.dtype)).astype(x.dtype)
    y = jnp.zeros_like(x2).at[token].add(scaled)
    mask = jnp.ones((b * t,), jnp.float32) if token_mask is None else token_mask.reshape(-1).astype(jnp.float32)
    counts = jnp.zeros((n_exp,), jnp.float32).at[flat].add(jnp.repeat(mask, k))
    stats = RouterStats(counts, jnp.sum(probs * mask[:, None], axis=0), jnp.sum(mask))
    return y.reshape(b, t, d), stats
