"""The decoder as Flax NNX modules: the model's structure and variables over the functional core.

The modules hold the weights as NNX variables and run the functions of ``jaxsloth.models.decoder`` (every op through
``jaxsloth.ops``), so a module traces to the functional core's program. Variable types:

- ``nnx.Param``: frozen full-precision weights (embedding, norms, projections, biases, LM head);
- ``NF4Param``: an NF4 weight, its ``NF4Weight`` pytree (packed codes and absmax) as the value; not an nnx.Param,
  so no Param filter ever makes it trainable;
- ``LoRAParam`` (Flax's ``nnx.LoRAParam``): LoRA A [.., r, in] and B [.., out, r] (PEFT's orientation), and the
  trained embedding / LM head copies. ``nnx.state(model, LoRAParam)`` is the trainable set, the filter Flax
  libraries (Tunix's PeftTrainer) train with.

Layouts: stacked (``layers`` is one DecoderLayer whose variables have a leading layer axis, run with ``lax.scan``)
or unrolled (``layers`` is an nnx.List of per-layer DecoderLayers, the Hopper step's layout; their LoRA stays
stacked in ``layer_adapters``, as the functional core keeps it, so the trainable set has the same arrays in both).

Variables carry logical sharding axes (``sharding_names``); placement on a mesh stays ``jaxsloth.sharding``'s
(its rules fall back to another axis when a dimension does not divide, which logical names cannot say).

Conversions with the dict trees of the functional core (``CausalLM.from_trees``, ``module_trees``, ``state_like``)
move references: no array is copied.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsloth.config import LoraConfig
from jaxsloth.lora import with_trainable
from jaxsloth.models import decoder, moe
from jaxsloth.models.config import ModelConfig
from jaxsloth.ops import Ops
from jaxsloth.quant import is_nf4

LoRAParam = nnx.LoRAParam
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
LAYER_NORMS = ("attn_norm", "mlp_norm", "attn_post_norm", "mlp_post_norm")
QK_NORMS = ("q_norm", "k_norm")


class NF4Param(nnx.Variable):
    """A frozen NF4 weight; its value is the ``NF4Weight`` pytree (jaxsloth.quant)."""


def _variable(kind: type, value, axes: tuple[str, ...]):
    """A variable with logical axes; the value stays where it is (no placement at creation)."""
    return kind(value, sharding_names=axes, eager_sharding=False)


def _lead(stacked: bool) -> tuple[str, ...]:
    return ("layers",) if stacked else ()


class RMSNorm(nnx.Module):
    """weight: [D] (or [L, D] stacked); the family's eps and weight offset (Gemma: weight + 1)."""

    def __init__(self, weight, config: ModelConfig, stacked: bool = False):
        self.weight = _variable(nnx.Param, weight, (*_lead(stacked), "norm"))
        self.eps, self.weight_offset = config.rms_norm_eps, config.norm_weight_offset

    def __call__(self, x, residual=None, ops: Ops = Ops()):
        """x: [..., D] -> normed x, or (normed x + residual, x + residual) with a residual."""
        return ops.rms_norm(x, self.weight[...], residual, eps=self.eps, weight_offset=self.weight_offset)


class Linear(nnx.Module):
    """One projection y = x W^T (+ b) + scale * (x A^T) B^T. weight: [out, in] (nnx.Param) or an NF4Weight
    (NF4Param); bias: [out] or None; lora_a: [r, in], lora_b: [out, r] or None. Stacked: a leading [L] on each;
    a mixture of experts' projections also lead with [E] (``experts``): one matrix and one adapter per expert."""

    def __init__(
        self, weight, bias=None, lora_a=None, lora_b=None, *, lora_scale: float = 0.0, stacked=False, experts=False
    ):
        lead = (*_lead(stacked), *(("experts",) if experts else ()))
        self.weight = NF4Param(weight) if is_nf4(weight) else _variable(nnx.Param, weight, (*lead, "out", "in"))
        self.bias = None if bias is None else _variable(nnx.Param, bias, (*lead, "out"))
        self.lora_a = None if lora_a is None else _variable(LoRAParam, lora_a, (*lead, "lora_rank", "in"))
        self.lora_b = None if lora_b is None else _variable(LoRAParam, lora_b, (*lead, "out", "lora_rank"))
        self.lora_scale = lora_scale

    def __call__(self, x, ops: Ops = Ops()):
        """x: [..., in] -> [..., out] (one layer's projection)."""
        lora = None if self.lora_a is None else {"a": self.lora_a[...], "b": self.lora_b[...]}
        bias = None if self.bias is None else self.bias[...]
        return ops.linear(x, self.weight.get_value(), bias, lora, self.lora_scale)


class Attention(nnx.Module):
    """q, k, v, o projections and Qwen 3 / Gemma 3's q / k norms. It runs inside DecoderLayer (the decoder's
    ``attention_inputs`` norms the layer input with the layer's own attn_norm first)."""

    def __init__(self, projections: dict, norms: dict):
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (projections[n] for n in ATTENTION)
        self.q_norm, self.k_norm = (norms.get(n) for n in QK_NORMS)


class MLP(nnx.Module):
    """Gated MLP: down(act(gate(x)) * up(x)), SwiGLU or GeGLU per the family."""

    def __init__(self, projections: dict, activation: str):
        self.gate_proj, self.up_proj, self.down_proj = (projections[n] for n in MLP_PROJECTIONS)
        self.activation = activation

    def __call__(self, x, ops: Ops = Ops()):
        """x: [..., D] (normed) -> [..., D]."""
        act = ops.glu(self.gate_proj(x, ops), self.up_proj(x, ops), activation=self.activation)
        return self.down_proj(act, ops)


class MoE(nnx.Module):
    """A mixture of experts' MLP (``jaxsloth.models.moe``): the router (frozen) and every expert's fused gate/up and
    down projections, one matrix per expert."""

    def __init__(self, router, projections: dict, config: ModelConfig):
        self.router = router
        self.experts_gate_up, self.experts_down = (projections[n] for n in moe.EXPERT_LINEARS)
        self.config = config

    def __call__(self, x, ops: Ops = Ops()):
        """x: [B, T, D] (normed, one layer's) -> [B, T, D]."""
        lp, ll = _layer_trees({"mlp": nnx.state(self).to_pure_dict()})
        return moe.moe_mlp(x, lp, ll or None, config=self.config, ops=ops, lora_scale=self.experts_down.lora_scale)[0]


class DecoderLayer(nnx.Module):
    """Norms, attention and MLP of one layer, or of every layer stacked along a leading axis (``stacked``)."""

    def __init__(self, config: ModelConfig, lp: dict, ll: dict | None, lora_scale: float, stacked: bool):
        def linear(name, experts=False):
            p, ab = lp[name], (ll or {}).get(name, {})
            return Linear(
                p["weight"], p.get("bias"), ab.get("a"), ab.get("b"), lora_scale=lora_scale, stacked=stacked,
                experts=experts,
            )  # fmt: skip

        def norm(name):
            return RMSNorm(lp[name], config, stacked) if name in lp else None

        self.config, self.stacked = config, stacked
        self.attn_norm, self.mlp_norm, self.attn_post_norm, self.mlp_post_norm = (norm(n) for n in LAYER_NORMS)
        self.attention = Attention({n: linear(n) for n in ATTENTION}, {n: norm(n) for n in QK_NORMS})
        if config.is_moe:
            experts = {n: linear(n, experts=True) for n in moe.EXPERT_LINEARS}
            self.mlp = MoE(linear("router"), experts, config)
        else:
            self.mlp = MLP({n: linear(n) for n in MLP_PROJECTIONS}, config.activation)

    def __call__(self, h, *, layer: int, positions=None, segment_ids=None, ops: Ops = Ops()):
        """h: [B, T, D] -> [B, T, D]: ``decoder.decoder_layer`` with this layer's own variables (an unrolled layer's
        LoRA is the model's ``layer_adapters``, which CausalLM applies); ``layer`` (its index) picks the layer kind
        (sliding or global attention). One layer only: stacked layers run in CausalLM (the layer scan)."""
        if self.stacked:
            raise ValueError("a stacked DecoderLayer holds every layer: run it through CausalLM (the layer scan)")
        lp, ll = _layer_trees(nnx.state(self).to_pure_dict())
        b, t = h.shape[:2]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        sliding = self.config.sliding_layers[layer]
        lengths = decoder.example_lengths(positions, segment_ids) if self.config.rope.kind == "longrope" else None
        inv_freq, scaling, long_rope = decoder.rope_setup(self.config, lengths, sliding)
        return decoder.decoder_layer(
            h, lp, ll or None, config=self.config, ops=ops, sliding=sliding, positions=positions,
            segment_ids=segment_ids, inv_freq=inv_freq, rope_scaling=scaling, long_rope=long_rope,
            lora_rt=decoder.LoraRuntime(self.attention.q_proj.lora_scale),
        )  # fmt: skip


class LoRA(nnx.Module):
    """A projection's stacked LoRA pair (the unrolled layout's adapters): a [L, r, in], b [L, out, r] (an expert
    projection's: [L, E, ...])."""

    def __init__(self, a, b):
        lead = ("layers", *(("experts",) if a.ndim == 4 else ()))
        self.lora_a = _variable(LoRAParam, a, (*lead, "lora_rank", "in"))
        self.lora_b = _variable(LoRAParam, b, (*lead, "out", "lora_rank"))


class Embedding(nnx.Module):
    """weight: [V, D] frozen; trained_weight: the trained copy (continued pretraining) that replaces it, or None."""

    def __init__(self, weight, config: ModelConfig, trained_weight=None):
        self.weight = _variable(nnx.Param, weight, ("vocab", "embed"))
        self.trained_weight = (
            None if trained_weight is None else _variable(LoRAParam, trained_weight, ("vocab", "embed"))
        )
        self.config = config

    def __call__(self, tokens, dtype=None):
        """tokens: [B, T] int -> [B, T, D] (Gemma: times sqrt(D))."""
        weight = self.weight if self.trained_weight is None else self.trained_weight
        return decoder.embed({"embed": weight[...]}, tokens, self.config, dtype)


class LMHead(nnx.Module):
    """weight: [V, D] (untied models); trained_weight as Embedding's."""

    def __init__(self, weight, config: ModelConfig, trained_weight=None):
        self.weight = _variable(nnx.Param, weight, ("vocab", "embed"))
        self.trained_weight = (
            None if trained_weight is None else _variable(LoRAParam, trained_weight, ("vocab", "embed"))
        )
        self.config = config

    def __call__(self, hidden):
        """hidden: [..., D] -> logits [..., V] f32 (final softcap applied)."""
        weight = self.weight if self.trained_weight is None else self.trained_weight
        return decoder.logits_from_hidden({"lm_head": weight[...]}, hidden, self.config)


class CausalLM(nnx.Module):
    """The decoder model: embed -> layers -> final_norm -> LM head (the tied embedding when lm_head is None).

    Built from the functional core's trees (``from_trees``, zero-copy) or at random (``init``). ``ops``: the
    dispatch point the calls use (a profile's ``ops``); ``lora``: the adapter's settings (scale, dropout), None
    without an adapter.
    """

    def __init__(
        self, config: ModelConfig, params: dict, trainable: dict | None = None, *, lora: LoraConfig | None = None,
        ops: Ops = Ops(),
    ):  # fmt: skip
        trainable = trainable or {}
        if trainable.get("layers") and lora is None:
            raise ValueError("a LoRA adapter needs its LoraConfig (lora=...) for its scale and dropout")
        scale = 0.0 if lora is None else lora.scale
        self.config, self.lora, self.ops = config, lora, ops
        self.embed = Embedding(params["embed"], config, trainable.get("embed"))
        lora_layers = trainable.get("layers")
        if decoder.layers_unstacked(params):
            self.layers = nnx.List([DecoderLayer(config, lp, None, scale, False) for lp in params["layers"]])
            self.layer_adapters = (
                None if not lora_layers else nnx.Dict({n: LoRA(ab["a"], ab["b"]) for n, ab in lora_layers.items()})
            )
        else:
            self.layers = DecoderLayer(config, params["layers"], lora_layers, scale, True)
            self.layer_adapters = None
        self.final_norm = RMSNorm(params["final_norm"], config)
        self.lm_head = None if "lm_head" not in params else LMHead(params["lm_head"], config, trainable.get("lm_head"))

    @classmethod
    def from_trees(cls, config: ModelConfig, params: dict, trainable: dict | None = None, **kwargs) -> CausalLM:
        """The module over the functional core's params (stacked or ``unstack_layers``'s layout) and LoRA tree
        (``jaxsloth.lora``), holding the same arrays (nothing is copied)."""
        return cls(config, params, trainable, **kwargs)

    @classmethod
    def init(cls, config: ModelConfig, key: jax.Array, dtype=jnp.float32, **kwargs) -> CausalLM:
        """Random weights (``decoder.init_params``), no adapter."""
        return cls(config, decoder.init_params(config, key, dtype), **kwargs)

    def trees(self) -> tuple[dict, dict | None]:
        """(params, trainable or None): the functional core's trees of this module's current arrays."""
        return module_trees(nnx.state(self))

    def _core_inputs(self, lora_dropout_key) -> tuple[dict, dict]:
        """(params for the functional core, its LoRA keyword arguments)."""
        params, trainable = self.trees()
        if trainable is None:
            return params, {}
        params, lora_tree = with_trainable(params, trainable)
        key = lora_dropout_key if self.lora.lora_dropout > 0 else None
        return params, dict(lora=lora_tree, lora_rt=self.lora.runtime, dropout_key=key)

    def hidden_states(self, tokens, *, positions=None, segment_ids=None, dropout_key=None, **kwargs):
        """tokens: [B, T] int32 -> final-normed hidden states [B, T, D] (``decoder.forward_hidden``; kwargs: its
        remat, compute_dtype, mlp_chunk, ...). dropout_key: LoRA dropout's key when training (None: no dropout)."""
        params, lora_kwargs = self._core_inputs(dropout_key)
        return decoder.forward_hidden(
            params, tokens, config=self.config, ops=self.ops, positions=positions, segment_ids=segment_ids,
            **lora_kwargs, **kwargs,
        )  # fmt: skip

    def __call__(self, tokens, *, positions=None, segment_ids=None, dropout_key=None, **kwargs):
        """tokens: [B, T] int32 -> logits [B, T, V] f32 (``decoder.forward``)."""
        params, _ = self._core_inputs(None)
        hidden = self.hidden_states(tokens, positions=positions, segment_ids=segment_ids, dropout_key=dropout_key,
                                    **kwargs)  # fmt: skip
        return decoder.logits_from_hidden(params, hidden, self.config)

    def loss(self, batch: dict, *, dropout_key=None, **kwargs):
        """batch: tokens, targets (-100: no loss), optional positions / segment_ids, [B, T] -> mean token loss
        (``decoder.loss_sum_and_count`` divided by the counted tokens)."""
        params, lora_kwargs = self._core_inputs(dropout_key)
        head_grad = self.embed.trained_weight is not None or (
            self.lm_head is not None and self.lm_head.trained_weight is not None
        )
        total, count = decoder.loss_sum_and_count(
            params, batch, config=self.config, ops=self.ops, head_grad=head_grad, **lora_kwargs, **kwargs
        )
        return total / jnp.maximum(count, 1)


def _layer_trees(layer: dict) -> tuple[dict, dict]:
    """One DecoderLayer's pure state -> (layer params, layer LoRA) as the functional core names them."""
    lp: dict = {}
    ll: dict = {}
    for path, value in _flat(layer):
        kind, tree_path = _layer_path(path)
        _put(lp if kind == "params" else ll, tree_path, value)
    return lp, ll


def _layer_path(path: tuple) -> tuple[str, tuple]:
    """Path inside a DecoderLayer -> ("params" or "trainable", path in the layer's tree)."""
    if path[0] in ("attention", "mlp"):
        path = path[1:]
    name, leaf = path
    if name.endswith("norm"):
        return "params", (name,)
    if leaf in ("lora_a", "lora_b"):
        return "trainable", (name, leaf[-1])
    return "params", (name, leaf)


def tree_path(path: tuple) -> tuple[str, tuple]:
    """A variable's path in the CausalLM state -> ("params" or "trainable", its path in that functional tree)."""
    head, *rest = path
    if head in ("embed", "lm_head"):
        return ("trainable" if rest[0] == "trained_weight" else "params"), (head,)
    if head == "final_norm":
        return "params", (head,)
    if head == "layer_adapters":
        name, leaf = rest
        return "trainable", ("layers", name, leaf[-1])
    if head == "layers" and isinstance(rest[0], int):
        kind, inner = _layer_path(tuple(rest[1:]))
        return kind, ("layers", rest[0], *inner)
    if head == "layers":
        kind, inner = _layer_path(tuple(rest))
        return kind, ("layers", *inner)
    raise ValueError(f"{'/'.join(map(str, path))} is not a variable of a jaxsloth CausalLM")


def _flat(tree: dict, prefix: tuple = ()):
    """(path, value) of every leaf of a nested dict (values that are not dicts: arrays, NF4Weights)."""
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat(v, (*prefix, k))
        else:
            yield (*prefix, k), v


def _put(tree: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _get(tree, path: tuple):
    for k in path:
        tree = tree[k]
    return tree


def module_trees(state) -> tuple[dict, dict | None]:
    """A CausalLM's state (all of it, or a filtered part such as ``nnx.state(model, LoRAParam)``; or the module
    itself) -> (params, trainable or None): the functional core's trees, holding the same arrays. Works on traced
    states inside jit. Unrolled layers come back as a tuple of per-layer trees (``decoder.unstack_layers``)."""
    if isinstance(state, nnx.Module):
        state = nnx.state(state)
    trees: dict = {"params": {}, "trainable": {}}
    for path, value in _flat(state.to_pure_dict()):
        kind, path_in_tree = tree_path(path)
        _put(trees[kind], path_in_tree, value)
    params, trainable = trees["params"], trees["trainable"]
    layers = params.get("layers")
    if layers and all(isinstance(k, int) for k in layers):
        params["layers"] = tuple(layers[i] for i in range(len(layers)))
    return params, (trainable or None)


def state_like(like: nnx.State, params: dict | None = None, trainable: dict | None = None) -> nnx.State:
    """A state shaped as ``like`` (its variable types and metadata) whose values come from the functional trees
    (arrays, or any per-leaf values such as shardings): the inverse of ``module_trees``."""
    trees = {"params": params, "trainable": trainable}

    def value(path, variable: nnx.Variable):
        kind, path_in_tree = tree_path(tuple(getattr(k, "key", k) for k in path))
        return variable.replace(_get(trees[kind], path_in_tree))

    return jax.tree_util.tree_map_with_path(value, like, is_leaf=lambda x: isinstance(x, nnx.Variable))


def split(model: CausalLM) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graph definition, LoRA state, frozen state): what the jitted step takes (``nnx.merge`` rebuilds the model)."""
    return nnx.split(model, LoRAParam, ...)


def state_shardings(state: nnx.State, mesh, shard_lora: bool = False) -> nnx.State:
    """A CausalLM state's placement on ``mesh`` (a jax.sharding.Mesh or AbstractMesh with an "fsdp" axis): the
    state's shape with a NamedSharding per array, by ``jaxsloth.sharding``'s rules (frozen weights over fsdp,
    LoRA replicated unless ``shard_lora``), so the module places its arrays exactly as the functional trees do.
    ``jax.device_put(state, state_shardings(state, mesh))`` places them; the module step takes these as its
    ``shardings``."""
    from jaxsloth.sharding import lora_shardings, param_shardings

    params, trainable = module_trees(state)
    return state_like(
        state,
        params=param_shardings(params, mesh) if params else None,
        trainable=None if trainable is None else lora_shardings(trainable, mesh, shard_lora),
    )
