"""Context parallelism: each sequence's tokens split over the mesh's "context" axis.

The training loss runs inside one ``shard_map`` that is manual over "context" only (data and fsdp stay with XLA's
partitioner, so FSDP's per-layer weight gathers and the batch split are as without the axis): embeddings, norms,
projections, MLP (and its tiles), the loss (and its tiles) and remat all run on the device's own tokens, and
attention is ring attention (``jaxsloth.models.ring_attention``). The batch enters padded to a multiple of twice
the axis size (padding: targets -100, after every real token, so the causal mask hides it) and in zigzag order,
positions made explicit first, so RoPE, segment ids and labels stay with their tokens. The loss is a sum over
tokens, so the order does not change it; each device returns its (loss sum, count) and the step adds them.

    mesh = make_mesh("context=2,fsdp=2,data=2")
    step = make_train_step(..., mesh=mesh, ...)   # picks ContextOps and context_parallel_loss by itself
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsloth.models.config import ModelConfig
from jaxsloth.models.ring_attention import AXIS, ring_attention, zigzag_order
from jaxsloth.sharding import BATCH_AXES, ShardedOps, batch_devices, context_size

# Padding values of the batch's [B, T] arrays (positions continue their row's count instead).
_PAD = {"targets": -100, "segment_ids": -1}


@dataclasses.dataclass(frozen=True)
class ContextOps(ShardedOps):
    """ShardedOps inside the shard_map over "context": attention is ring attention over that axis."""

    def _constrain(self, y):
        # A bare PartitionSpec: inside the shard_map the mesh in context has "context" manual, which a
        # NamedSharding on ``self.mesh`` (all axes auto) would contradict.
        def one(a):
            if a.ndim == 0 or a.shape[0] % batch_devices(self.mesh):
                return a
            return jax.lax.with_sharding_constraint(a, P(BATCH_AXES))

        return jax.tree.map(one, y)

    def _kernel_mesh(self):
        return jax.sharding.get_abstract_mesh()  # the mesh in context: "context" already manual

    def attention(self, q, k, v, *, segment_ids=None, causal=True, sliding_window=None, softcap=None, scale=None):
        if not causal:
            raise ValueError("context parallelism runs causal attention only (decoder training)")
        n = context_size(self.mesh)
        if n == 1:
            # A ring of one device holds the whole sequence: the profile's own attention (cuDNN on the H200) is
            # exact there, where the ring's two-chunk split would run three flash block pairs (slower: BENCHMARKS.md).
            return super().attention(
                q, k, v, segment_ids=segment_ids, causal=True, sliding_window=sliding_window, softcap=softcap,
                scale=scale,
            )  # fmt: skip
        return ring_attention(
            self,
            q,
            k,
            v,
            axis_size=n,
            segment_ids=segment_ids,
            sliding_window=sliding_window,
            softcap=softcap,
            scale=scale,
        )


def check_supported(config: ModelConfig) -> None:
    """Raises for models whose forward reads more than each token's own position: longrope picks its factors
    from each example's length, found from neighbouring tokens, which a device's zigzag share does not hold."""
    if config.rope.kind == "longrope":
        raise ValueError(
            f"context parallelism does not support rope type {config.rope.kind!r} (model {config.model_type!r}); "
            "use a mesh without a context axis"
        )


def zigzag_batch(batch: dict, n: int) -> dict:
    """[B, T] arrays -> [B, Tp] (Tp: T rounded up to a multiple of 2n) in zigzag order (``zigzag_order``), with
    explicit positions (arange unless given)."""
    tokens = batch["tokens"]
    b, t = tokens.shape
    tp = -(-t // (2 * n)) * (2 * n)
    batch = dict(batch)
    if "positions" not in batch:
        batch["positions"] = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    order = zigzag_order(tp, n)
    out = {}
    for key, x in batch.items():
        if key == "positions":
            tail = x[:, -1:] + 1 + jnp.arange(tp - t, dtype=x.dtype)[None]
            x = jnp.concatenate([x, tail.astype(x.dtype)], axis=1)
        else:
            x = jnp.pad(x, ((0, 0), (0, tp - t)), constant_values=_PAD.get(key, 0))
        out[key] = x[:, order]
    return out


def context_parallel_loss(loss_fn: Callable, mesh, config: ModelConfig) -> Callable:
    """(trainable, params, batch, key) -> (loss_sum, count) over the mesh's context axis; ``loss_fn`` is the
    per-device loss (``make_loss_fn`` with ``ContextOps``)."""
    check_supported(config)
    n = context_size(mesh)

    def local(trainable, params, batch, key):
        loss, count = loss_fn(trainable, params, batch, key)
        return loss[None], count[None]

    def run(trainable, params, batch, key):
        batch = zigzag_batch(batch, n)
        batch = jax.lax.with_sharding_constraint(batch, NamedSharding(mesh, P(BATCH_AXES, AXIS)))
        # check_vma=False (Pallas calls inside): the replicated weights' gradients are still summed over the axis,
        # since each device's loss is an output of its own (out_specs P(AXIS)), added outside.
        losses, counts = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(P(), P(), P(None, AXIS), P()),
            out_specs=(P(AXIS), P(AXIS)),
            axis_names={AXIS},
            check_vma=False,
        )(trainable, params, batch, key)
        return losses.sum(), counts.sum()

    return run
