"""GRPO over several devices of one host: data parallelism on a ``data`` mesh axis (``jaxsloth.sharding``).

Sampling: each device samples its own share of a generation's prompts (whole groups) from its own copy of the
weights (the replicated arrays' per-device shards, no copy), all devices at once through JAX's async dispatch.
Training: the generation's rows are split over the devices (each micro-batch by rows), the weights, LoRA and
optimizer state replicated, and XLA's partitioner adds the gradient all-reduce, so a step computes what one device
computes on the whole batch (the GRPO loss is normalised over the global batch, as on one device).

Not supported, each refused in one line: FSDP and context axes (sampling reads whole weights per device), and
several processes (rewards are scored on one host over the whole generation).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsloth.sharding import BATCH_AXES, CONTEXT, batch_devices, replicated, resolve_mesh


def grpo_mesh(spec) -> Mesh | None:
    """The run's mesh (``resolve_mesh``: None with one device, every device data-parallel by default), checked for
    what GRPO can use; a mesh of one device is no mesh."""
    mesh = resolve_mesh(spec)
    if mesh is None:
        return None
    shape = dict(mesh.shape)
    for axis in (CONTEXT, "fsdp"):
        if shape.get(axis, 1) > 1:
            raise ValueError(
                f"method='grpo' runs data-parallel only: mesh {shape} has {axis}={shape[axis]}; use "
                f"mesh='data={mesh.size}'"
            )
    if jax.process_count() > 1:
        raise ValueError(f"method='grpo' runs on one host; this run has {jax.process_count()} processes")
    return None if mesh.size == 1 else mesh


def mesh_devices(mesh: Mesh | None) -> list | None:
    """The devices that sample, in the mesh's order (None without a mesh)."""
    return None if mesh is None else list(mesh.devices.flat)


def device_views(tree, devices: list) -> list:
    """One tree per device of replicated ``tree``: each leaf's shard on that device (the same buffer, no copy)."""
    leaves, treedef = jax.tree.flatten(tree)
    shards = [{s.device: s.data for s in x.addressable_shards} for x in leaves]
    return [treedef.unflatten([s[d] for s in shards]) for d in devices]


def place_rows(arrays: dict, mesh: Mesh | None, leading: int = 0) -> dict:
    """Arrays (host or device) onto the devices: [..., rows, ...] split by rows (axis ``leading``) over the mesh,
    or whole where the rows do not split evenly (an eval batch's remainder); without a mesh, onto the default
    device."""
    if mesh is None:
        return {k: jnp.asarray(v) for k, v in arrays.items()}
    out = {}
    for k, v in arrays.items():
        split = v.ndim > leading and v.shape[leading] % batch_devices(mesh) == 0
        spec = P(*([None] * leading), BATCH_AXES) if split else P()
        out[k] = jax.device_put(v, NamedSharding(mesh, spec))
    return out


def sharded_step(step: Callable, shardings: tuple, mesh: Mesh) -> Callable:
    """``step(trainable, opt_state, params, micro)`` compiled for the mesh: state on its shardings (donated), the
    micro-batches [accumulation, rows, ...] split by rows, metrics replicated."""
    t_sh, o_sh, p_sh = shardings
    rows = NamedSharding(mesh, P(None, BATCH_AXES))
    return jax.jit(
        step,
        in_shardings=(t_sh, o_sh, p_sh, rows),
        out_shardings=(t_sh, o_sh, replicated(mesh)),
        donate_argnums=(0, 1),
    )
