"""The training step: value_and_grad over the trainable tree (the LoRA tree, or in full fine-tuning every
weight), gradient accumulation inside the jitted step, AdamW with warmup + schedule (moments in f32 or 8 bits,
jaxsloth.train.optim8bit), global-norm clipping and a weight-decay mask.

Loss = (sum of token losses over every micro-batch) / (number of counted tokens over every micro-batch), so
accumulation gives exactly the large-batch loss. A non-finite loss or gradient never reaches the weights: the step
keeps the old state and reports ``finite=False``; the host loop stops (naming the step) or skips, per TrainConfig.
TrainConfig (every training setting) is defined in jaxsloth.config.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsloth.config import LoraConfig, TrainConfig
from jaxsloth.context_parallel import ContextOps, context_parallel_loss
from jaxsloth.lora import with_trainable
from jaxsloth.models.config import ModelConfig
from jaxsloth.models.decoder import loss_sum_and_count
from jaxsloth.ops import Ops
from jaxsloth.profiles import Profile
from jaxsloth.sharding import BATCH_AXES, ShardedOps, batch_sharding, has_context_axis, replicated
from jaxsloth.train import optim8bit


def learning_rate_schedule(tc: TrainConfig, peak: float | None = None) -> optax.Schedule:
    """Linear warmup from 0, then cosine / linear decay to 0 at max_steps, or constant (as HF Trainer)."""
    peak = tc.learning_rate if peak is None else peak
    warm = tc.num_warmup_steps
    if tc.lr_scheduler_type == "constant":
        decay = optax.constant_schedule(peak)
    elif tc.max_steps is None:
        raise ValueError(f"the {tc.lr_scheduler_type} learning-rate schedule needs max_steps")
    elif tc.lr_scheduler_type == "cosine":
        decay = optax.cosine_decay_schedule(peak, max(tc.max_steps - warm, 1))
    else:
        decay = optax.linear_schedule(peak, 0.0, max(tc.max_steps - warm, 1))
    if warm == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), decay], [warm])


def _decay_mask(tree):
    """Weight decay on matrices (LoRA A/B, projection weights, embeddings, LM head), never on norms or biases (as
    transformers' Trainer: its decay list leaves out biases and norm weights; a stacked norm is [layers, D])."""

    def decays(path, x) -> bool:
        name = str(getattr(path[-1], "key", path[-1])) if path else ""
        return x.ndim >= 2 and name != "bias" and not name.endswith("norm")

    return jax.tree_util.tree_map_with_path(decays, tree)


def make_optimizer(
    tc: TrainConfig, lora: LoraConfig | None, trainable: dict, optimizer_state: str = "float32"
) -> optax.GradientTransformation:
    """AdamW over ``trainable`` (lora None: full fine-tuning, every weight); optimizer_state: "float32" or "8bit"
    moments (the profile's)."""

    def adamw(peak):
        return optim8bit.adamw(
            learning_rate_schedule(tc, peak),
            b1=tc.adam_beta1,
            b2=tc.adam_beta2,
            eps=tc.adam_epsilon,
            weight_decay=tc.weight_decay,
            mask=_decay_mask,
            state=optimizer_state,
        )

    embedding_lr = None if lora is None else lora.embedding_learning_rate
    if embedding_lr is not None and any(k in trainable for k in ("embed", "lm_head")):
        labels = {k: ("embedding" if k in ("embed", "lm_head") else "lora") for k in trainable}
        inner = optax.multi_transform({"lora": adamw(None), "embedding": adamw(embedding_lr)}, labels)
    else:
        inner = adamw(None)
    if not tc.max_grad_norm:  # None or 0: no clipping (clipping to norm 0 would zero every update)
        return inner
    return optax.chain(optax.clip_by_global_norm(tc.max_grad_norm), inner)


def make_loss_fn(
    config: ModelConfig,
    lora: LoraConfig | None,
    profile: Profile,
    ops: Ops | None = None,
    with_router_aux: bool = False,
) -> Callable:
    """(trainable, params, micro_batch, key) -> (loss_sum, count), or with ``with_router_aux`` (loss_sum, (count,
    the mixture of experts' load-balancing loss)). ops: default the profile's. lora None: full fine-tuning:
    trainable is every weight of the model and params is unused."""
    ops = profile.ops if ops is None else ops

    def loss_fn(trainable, params, batch, key):
        if lora is None:
            p, lora_tree, lora_kwargs, head_grad = trainable, None, {}, True
        else:
            p, lora_tree = with_trainable(params, trainable)
            lora_kwargs = dict(lora_rt=lora.runtime, dropout_key=key if lora.lora_dropout > 0 else None)
            head_grad = "embed" in trainable or "lm_head" in trainable
        return loss_sum_and_count(
            p,
            batch,
            config=config,
            ops=ops,
            lora=lora_tree,
            **lora_kwargs,
            **profile.forward_settings,
            head_grad=head_grad,
            loss_chunk=profile.loss_chunk,
            with_router_aux=with_router_aux,
        )

    if not with_router_aux:
        return loss_fn
    return lambda *args: (lambda total, count, balance: (total, (count, balance)))(*loss_fn(*args))


def make_mesh_loss_fn(
    config: ModelConfig,
    lora: LoraConfig | None,
    profile: Profile,
    mesh: Mesh | None,
    with_router_aux: bool = False,
) -> Callable:
    """``make_loss_fn`` for a step over ``mesh``: per-device Pallas kernels (ShardedOps), and with a "context" axis
    each sequence split over it (jaxsloth.context_parallel)."""
    if has_context_axis(mesh):
        if with_router_aux:
            raise ValueError(
                "output_router_logits: the load-balancing loss is not split over a context axis; "
                "set output_router_logits: false or drop context from the mesh"
            )
        ops = ContextOps(profile.kernels, mesh=mesh)
        return context_parallel_loss(make_loss_fn(config, lora, profile, ops), mesh, config)
    ops = None if mesh is None else ShardedOps(profile.kernels, mesh=mesh)
    return make_loss_fn(config, lora, profile, ops, with_router_aux)


def make_train_step(
    config: ModelConfig,
    lora: LoraConfig | None,
    tc: TrainConfig,
    profile: Profile,
    optimizer: optax.GradientTransformation,
    *,
    mesh: Mesh | None = None,
    shardings: tuple | None = None,
) -> Callable:
    """Returns jitted ``step(trainable, opt_state, params, batch, key) -> (trainable, opt_state, metrics)``.

    batch: dict of [gradient_accumulation_steps * micro_batch, seq] int32 arrays (tokens, targets, positions, segment_ids).
    trainable and opt_state are donated. Compiles once per (shapes, profile). lora None: full fine-tuning
    (trainable holds every weight; params is an empty dict).

    mesh: run over a ("data", "fsdp") device mesh (jaxsloth.sharding): every micro-batch is split by rows over
    data x fsdp, so micro_batch must divide by data * fsdp; a "context" axis also splits each sequence's tokens.
    shardings: (trainable, opt_state, params) trees of NamedSharding the step is compiled for; the new trainable
    and opt_state keep theirs.
    """
    step = train_step_fn(config, lora, tc, profile, optimizer, mesh=mesh)
    if shardings is None:
        return jax.jit(step, donate_argnums=(0, 1))
    t_sh, o_sh, p_sh = shardings
    rep = replicated(mesh)
    return jax.jit(
        step,
        donate_argnums=(0, 1),
        in_shardings=(t_sh, o_sh, p_sh, batch_sharding(mesh), rep),
        out_shardings=(t_sh, o_sh, rep),
    )


def train_step_fn(
    config: ModelConfig,
    lora: LoraConfig | None,
    tc: TrainConfig,
    profile: Profile,
    optimizer: optax.GradientTransformation,
    *,
    mesh: Mesh | None = None,
) -> Callable:
    """The step ``make_train_step`` jits, unjitted, for callers that jit it over other argument types (the NNX
    module state: ``jaxsloth.train.module_step``)."""
    router_aux = config.is_moe and config.output_router_logits  # logged as the metric router_aux_loss
    value_and_grad = jax.value_and_grad(make_mesh_loss_fn(config, lora, profile, mesh, router_aux), has_aux=True)

    def grad_fn(*args):
        """((loss_sum, count, load-balancing loss), grads): a mixture of experts' load-balancing loss is in the sum
        as transformers adds it, and returned alone (without its coefficient) for the metric; 0 otherwise."""
        (l, aux), g = value_and_grad(*args)
        count, balance = aux if router_aux else (aux, jnp.zeros((), jnp.float32))
        return (l, count, balance), g

    def step(trainable, opt_state, params, batch, key):
        n = tc.gradient_accumulation_steps
        micro = jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)
        if mesh is not None:  # each micro-batch over every device (not micro-batch i on a subset of them)
            micro = jax.lax.with_sharding_constraint(micro, NamedSharding(mesh, P(None, BATCH_AXES)))
        keys = jax.random.split(key, n)

        def accumulate(carry, xs):
            g_sum, l_sum, c_sum, b_sum = carry
            (l, c, b), g = grad_fn(trainable, params, *xs)
            g_sum = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_sum, g)
            return (g_sum, l_sum + l, c_sum + c, b_sum + b), None

        if n == 1:  # no f32 accumulator (in full fine-tuning, twice the 16-bit weights' size)
            (l_sum, count, b_sum), g_sum = grad_fn(trainable, params, jax.tree.map(lambda x: x[0], micro), keys[0])
        else:
            zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable)
            init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32))
            (g_sum, l_sum, count, b_sum), _ = jax.lax.scan(accumulate, init, (micro, keys))
        denom = jnp.maximum(count, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g, p: (g.astype(jnp.float32) / denom).astype(p.dtype), g_sum, trainable)
        loss = l_sum / denom
        updates, new_opt = optimizer.update(grads, opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        metrics = {"loss": loss, "tokens": count, "grad_norm": grad_norm, "finite": finite}
        if router_aux:  # the mean over micro-batches, as transformers' aux_loss of each forward
            metrics["router_aux_loss"] = b_sum / n
        return keep(new_trainable, trainable), keep(new_opt, opt_state), metrics

    return step


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient became NaN/Inf; the message names the step."""


class StepDoesNotFitError(MemoryError):
    """XLA ran out of device memory compiling or running the step; the message says what to change."""


def explain_oom(err: Exception, *, batch: int, seq_len: int, profile: Profile) -> StepDoesNotFitError:
    return StepDoesNotFitError(
        f"the training step does not fit in device memory (batch={batch} sequences of seq_len={seq_len} tokens, "
        f"profile {profile.name!r}: remat={profile.remat!r}, kernels={profile.kernels}). Try, in order: "
        "remat='full' or 'offload', a smaller per_device_train_batch_size with more gradient_accumulation_steps, "
        "load_in_4bit=True, "
        f"a shorter max_seq_length. XLA said: {str(err).splitlines()[0][:300]}"
    )


def is_oom(err: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(err) or "Out of memory" in str(err)
