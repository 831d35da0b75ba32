"""Several devices and hosts: a ("data", "fsdp") device mesh (with a "context" axis for context parallelism),
sharding rules for params, LoRA, optimizer state and batches, per-process batch placement, and multi-host start.

Data parallelism and FSDP are one mechanism here: the batch axis is split over BOTH mesh axes (so FSDP is also
data-parallel over its axis), while frozen weights (bf16 or NF4) are split over "fsdp" only. The jitted step is
compiled with these shardings and XLA's partitioner inserts the collectives: per-layer all-gathers of the frozen
weights inside the layer scan (FSDP), all-reduces of the LoRA gradients (replicated LoRA) or reduce-scatters
(LoRA sharded over fsdp). Pallas kernels are opaque custom calls to that partitioner, which would run them
replicated on gathered inputs; ``ShardedOps`` runs them per device on the local batch rows through ``shard_map``.

Context parallelism: a "context" axis (``make_mesh("context=2,fsdp=4")``) splits each sequence's tokens over its
devices (``jaxsloth.context_parallel``); weights and batch rows are split as without it, and replicated along it.
A mesh is built with the axis only when its size is above 1, so a size of 1 is exactly the path without it.

    mesh = make_mesh("data=2,fsdp=4")          # 8 devices; make_mesh(None): every device data-parallel
    params = shard_params(params, mesh)
    batch = shard_batch(global_numpy_batch, mesh)   # each process contributes only its own rows
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsloth.ops import Ops
from jaxsloth.quant import NF4Weight, is_nf4

log = logging.getLogger("jaxsloth")

AXES = ("data", "fsdp")
CONTEXT = "context"
# The batch axis is split over both mesh axes: FSDP ranks see different rows, like data-parallel ranks.
BATCH_AXES = AXES


def parse_mesh_spec(spec: str | Mapping[str, int]) -> dict[str, int]:
    """ "data=2,fsdp=4" (or a mapping) -> {"data": 2, "fsdp": 4}; an absent axis has size 1, one axis may be -1
    (the rest of the devices). "context" (sequence split) appears in the result only when given and not 1."""
    if isinstance(spec, Mapping):
        items = [(str(k), v) for k, v in spec.items()]
    else:
        items = []
        for part in str(spec).split(","):
            if not part.strip():
                continue
            name, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"mesh spec {spec!r}: expected axis=size pairs like 'data=2,fsdp=4', got {part!r}")
            try:
                items.append((name.strip(), int(value)))
            except ValueError:
                raise ValueError(f"mesh spec {spec!r}: size of axis {name.strip()!r} is not an integer") from None
    sizes = {}
    for name, value in items:
        if name not in (*AXES, CONTEXT):
            raise ValueError(f"mesh spec {spec!r}: unknown axis {name!r}; axes are {(*AXES, CONTEXT)}")
        if name in sizes:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} given twice")
        if not isinstance(value, int) or (value < 1 and value != -1):
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} has size {value!r}; sizes are >= 1 or -1")
        sizes[name] = value
    if list(sizes.values()).count(-1) > 1:
        raise ValueError(f"mesh spec {spec!r}: at most one axis may be -1")
    context = {CONTEXT: sizes[CONTEXT]} if sizes.get(CONTEXT, 1) != 1 else {}
    return {**{a: sizes.get(a, 1) for a in AXES}, **context}


def make_mesh(spec: str | Mapping[str, int] | None = None, devices=None, context_axis: bool = False) -> Mesh:
    """A ("data", "fsdp") mesh over ``devices`` (default: every device of every process), with a third axis
    "context" when the spec gives it a size above 1 (neighbours on it are adjacent devices: the ring's hops).

    spec None or "": all devices data-parallel. The product of the sizes must equal the number of devices.
    context_axis: keep the "context" axis at size 1 too (ring attention's code on unsplit sequences: its cost).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec or {"data": -1})
    known = math.prod(v for v in sizes.values() if v != -1)
    for a, v in sizes.items():
        if v == -1:
            if len(devices) % known:
                raise ValueError(f"mesh {sizes}: {len(devices)} devices do not split over the other axes ({known})")
            sizes[a] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(
            f"mesh {sizes} needs {math.prod(sizes.values())} devices but there are {len(devices)}; "
            "the sizes must multiply to the device count (use -1 for one axis to take the rest)"
        )
    axes = (*AXES, CONTEXT) if context_axis or sizes.get(CONTEXT, 1) != 1 else AXES
    shape = tuple(sizes.get(a, 1) for a in axes)
    # Auto axes: XLA's partitioner propagates shardings (GSPMD); make_mesh's default in JAX 0.11 is Explicit.
    return jax.make_mesh(shape, axes, axis_types=(AxisType.Auto,) * len(axes), devices=devices)


def resolve_mesh(mesh: Mesh | str | Mapping[str, int] | None) -> Mesh | None:
    """The API's default: None with a single device (today's single-device path), else a data-parallel mesh over
    every device; a spec string or mapping builds that mesh; a Mesh is used as is."""
    if isinstance(mesh, Mesh):
        return mesh
    if mesh is None or mesh == "":
        return None if jax.device_count() == 1 else make_mesh(None)
    return make_mesh(mesh)


def batch_devices(mesh: Mesh | None) -> int:
    """How many ways the batch axis is split (data * fsdp); 1 without a mesh."""
    return 1 if mesh is None else math.prod(mesh.shape[a] for a in BATCH_AXES)


def context_size(mesh: Mesh | None) -> int:
    """How many ways each sequence is split (the "context" axis); 1 without a mesh or the axis."""
    return 1 if mesh is None else dict(mesh.shape).get(CONTEXT, 1)


def has_context_axis(mesh: Mesh | None) -> bool:
    """Whether the step runs context parallelism (``make_mesh`` leaves out an axis of size 1 unless asked)."""
    return mesh is not None and CONTEXT in mesh.axis_names


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[batch, ...] arrays: rows split over data x fsdp."""
    return NamedSharding(mesh, P(BATCH_AXES))


def _split_axis(shape: tuple[int, ...], axes: tuple[int, ...], n: int) -> int | None:
    """The first of ``axes`` whose size divides by n (None: keep the array whole)."""
    if n == 1:
        return None
    return next((a for a in axes if shape[a] % n == 0), None)


def _on_axis(mesh: Mesh, ndim: int, axis: int | None) -> NamedSharding:
    if axis is None:
        return replicated(mesh)
    spec = [None] * ndim
    spec[axis] = "fsdp"
    return NamedSharding(mesh, P(*spec))


def _nf4_shardings(w: NF4Weight, mesh: Mesh) -> NF4Weight:
    """Packed bytes and absmax are row-major over blocks: split their flat axis only where every shard holds whole
    blocks (so dequantizing a shard needs no neighbour); nested_absmax only where it holds whole 256-block groups."""
    n = mesh.shape["fsdp"]
    whole_blocks = w.numel % w.blocksize == 0 and w.nblocks % n == 0 and n > 1
    flat = _on_axis(mesh, w.packed.ndim, w.packed.ndim - 1 if whole_blocks else None)
    nested = None
    if w.nested_absmax is not None:
        groups = whole_blocks and w.nblocks % (256 * n) == 0
        nested = _on_axis(mesh, w.nested_absmax.ndim, w.nested_absmax.ndim - 1 if groups else None)
    offset = None if w.offset is None else replicated(mesh)
    return dataclasses.replace(w, packed=flat, absmax=flat, nested_absmax=nested, offset=offset)


def _names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def param_shardings(params, mesh: Mesh):
    """NamedSharding per leaf of a param tree (arrays or ShapeDtypeStructs; see jaxsloth.models.decoder).

    Stacked projection weights [L, out, in]: ``out`` over fsdp when divisible, else ``in``, else whole. NF4 weights:
    their flat block axis over fsdp (see ``_nf4_shardings``). embed / lm_head [V, D]: vocab over fsdp, else hidden.
    Norms and biases (small) are replicated.
    """
    n = mesh.shape["fsdp"]

    def rule(path, x):
        if is_nf4(x):
            return _nf4_shardings(x, mesh)
        names = _names(path)
        if names and names[0] in ("embed", "lm_head") and x.ndim == 2:
            return _on_axis(mesh, 2, _split_axis(x.shape, (0, 1), n))
        if names and names[-1] == "weight" and x.ndim == 3:
            return _on_axis(mesh, 3, _split_axis(x.shape, (1, 2), n))
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(rule, params, is_leaf=is_nf4)


def lora_shardings(trainable, mesh: Mesh, shard: bool = False):
    """NamedSharding per leaf of the trainable tree. shard=False: everything replicated (LoRA is small; the
    gradient all-reduce is cheap). shard=True: A [L, r, in] splits ``in`` and B [L, out, r] splits ``out`` over
    fsdp; trained embed / lm_head copies split like the frozen ones."""
    if not shard:
        return jax.tree.map(lambda _: replicated(mesh), trainable)
    n = mesh.shape["fsdp"]

    def rule(path, x):
        names = _names(path)
        if names[0] in ("embed", "lm_head") and x.ndim == 2:
            return _on_axis(mesh, 2, _split_axis(x.shape, (0, 1), n))
        if names[-1] == "a" and x.ndim == 3:
            return _on_axis(mesh, 3, _split_axis(x.shape, (2,), n))
        if names[-1] == "b" and x.ndim == 3:
            return _on_axis(mesh, 3, _split_axis(x.shape, (1,), n))
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(rule, trainable)


def matching_shardings(tree, like, like_shardings, mesh: Mesh):
    """Shardings for a tree that embeds copies of ``like`` (optax state holds mu / nu trees shaped like the
    trainable): a leaf whose path ends with a path of ``like`` and has its shape takes that leaf's sharding; the
    rest (step counters, scalars) is replicated."""
    table = [
        (jax.tree_util.keystr(p), x.shape, s)
        for (p, x), s in zip(
            jax.tree_util.tree_flatten_with_path(like)[0], jax.tree.leaves(like_shardings), strict=True
        )
    ]

    def rule(path, x):
        key = jax.tree_util.keystr(path)
        for suffix, shape, sharding in table:
            if key.endswith(suffix) and tuple(x.shape) == tuple(shape):
                return sharding
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(rule, tree)


def put(tree, shardings):
    """Places every leaf of ``tree`` (arrays or numpy, the same global value on every process) on its sharding.

    One process: a device-to-device transfer. Several: each process fills only its addressable shards from its
    host copy, so no process ever needs another's memory.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x, sharding):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(one, tree, shardings)


def shard_params(params, mesh: Mesh):
    """The frozen params placed per ``param_shardings`` (NF4 weights keep their pytree type)."""
    return put(params, param_shardings(params, mesh))


def put_key(key: jax.Array, mesh: Mesh) -> jax.Array:
    """A typed PRNG key replicated over the mesh (the same key on every process)."""
    data = np.asarray(jax.random.key_data(key))
    return jax.random.wrap_key_data(put(data, replicated(mesh)), impl=jax.random.key_impl(key))


def place_train_state(params, trainable, optimizer, mesh: Mesh, shard_lora: bool = False):
    """Frozen params, trainable and a fresh optimizer state placed on ``mesh``.

    Returns (params, trainable, opt_state, (trainable, opt_state, params) shardings); the optimizer state is
    created directly on its shardings (its mu / nu follow the trainable's, its counters are replicated).
    """
    p_sh = param_shardings(params, mesh)
    t_sh = lora_shardings(trainable, mesh, shard_lora)
    params, trainable = put(params, p_sh), put(trainable, t_sh)
    o_sh = matching_shardings(jax.eval_shape(optimizer.init, trainable), trainable, t_sh, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=o_sh)(trainable)
    return params, trainable, opt_state, (t_sh, o_sh, p_sh)


def process_rows(mesh: Mesh, rows: int) -> slice:
    """The rows of a global [rows, ...] batch that this process's devices hold under ``batch_sharding``.

    ``make_mesh`` orders devices process by process, so each process's rows are one contiguous range.
    """
    if rows % batch_devices(mesh):
        raise ValueError(
            f"a batch of {rows} rows does not split over the {batch_devices(mesh)} data x fsdp devices of "
            f"mesh {dict(mesh.shape)}; use a multiple of {batch_devices(mesh)}"
        )
    index = batch_sharding(mesh).addressable_devices_indices_map((rows,))
    starts = sorted({(s[0].start or 0, rows if s[0].stop is None else s[0].stop) for s in index.values()})
    for (_, stop), (start, _) in zip(starts, starts[1:], strict=False):
        assert stop == start, f"process {jax.process_index()} holds non-contiguous batch rows {starts}"
    return slice(starts[0][0], starts[-1][1])


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """A global batch (every process built the same one, e.g. from the same seeded loader) -> global arrays,
    rows split over data x fsdp; each process hands over only its own rows ``process_rows(mesh, rows)``.

    batch: dict of [rows, ...] arrays.
    """
    sharding = batch_sharding(mesh)
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        local = v[process_rows(mesh, v.shape[0])]
        out[k] = jax.make_array_from_process_local_data(sharding, local, v.shape)
    return out


def initialize_distributed() -> bool:
    """Starts multi-host JAX before any other JAX call. Returns True when running as one of several processes.

    Reads JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID; without them,
    under SLURM or Open MPI (or another cluster JAX detects) it lets ``jax.distributed.initialize`` find the
    values itself; otherwise it does nothing (single host).
    """
    env = {k: os.environ.get(k) for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}
    given = {k: v for k, v in env.items() if v}
    if given:
        missing = sorted(set(env) - set(given))
        if missing:
            raise ValueError(f"multi-host start: {sorted(given)} are set but {missing} are not; set all three")
        try:
            num, pid = int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"])
        except ValueError:
            raise ValueError(
                f"JAX_NUM_PROCESSES={env['JAX_NUM_PROCESSES']!r} and JAX_PROCESS_ID={env['JAX_PROCESS_ID']!r} "
                "must be integers"
            ) from None
        if not 0 <= pid < num:
            raise ValueError(f"JAX_PROCESS_ID={pid} is outside [0, JAX_NUM_PROCESSES={num})")
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], num_processes=num, process_id=pid)
    elif any(k in os.environ for k in ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")):
        jax.distributed.initialize()
    else:
        return False
    log.info("process %d of %d, %d local devices", jax.process_index(), jax.process_count(), jax.local_device_count())
    return jax.process_count() > 1


# Positional arguments of each op's implementation that carry the batch (or flattened batch x seq) on axis 0,
# and keyword arguments that do. Every other array argument (weights, frequencies) is whole on each device.
_BATCHED_ARGS = {
    "rms_norm": (0, 2),
    "rope": (0, 1, 2),
    "swiglu": (0, 1),
    "geglu": (0, 1),
    "attention": (0, 1, 2),
    "attention_block": (0, 1, 2),  # ring attention's block pairs: (out, lse) and (dq, dk, dv) are per row too
    "attention_block_grad": (0, 1, 2, 3, 4, 5),
    "cross_entropy": (0, 2),
    "nf4_matmul": (0,),
}
_BATCHED_KWARGS = {
    "attention": ("segment_ids",),
    "attention_block": ("q_segment_ids", "kv_segment_ids"),
    "attention_block_grad": ("q_segment_ids", "kv_segment_ids"),
}


@dataclasses.dataclass(frozen=True)
class ShardedOps(Ops):
    """Ops for a step over ``mesh``: Pallas kernels run per device on their local batch rows (``shard_map``;
    weights arrive whole, which for FSDP-sharded weights is the per-layer all-gather); every other op's output is
    pinned to the batch sharding so the partitioner keeps activations split by rows and gathers weights instead."""

    mesh: Mesh | None = None

    def _constrain(self, y):
        def one(a):
            if a.ndim == 0 or a.shape[0] % batch_devices(self.mesh):
                return a
            return jax.lax.with_sharding_constraint(a, batch_sharding(self.mesh))

        return jax.tree.map(one, y)

    def _kernel_mesh(self):
        """The mesh the per-device kernel calls' shard_map runs over."""
        return self.mesh

    def linear(self, x, weight, bias=None, lora=None, lora_scale: float = 0.0, lora_x=None):
        return self._constrain(super().linear(x, weight, bias, lora, lora_scale, lora_x))

    def _call(self, op: str, impl: str, *args, **kwargs):
        if impl != "pallas":
            y = super()._call(op, impl, *args, **kwargs)
            return y if op == "cross_entropy" else self._constrain(y)
        rows = args[0].shape[0]
        if rows % batch_devices(self.mesh):
            return super()._call(op, impl, *args, **kwargs)  # too few rows to split: the partitioner's way
        batched = set(_BATCHED_ARGS[op]) | set(_BATCHED_KWARGS.get(op, ()))
        names = [i for i, a in enumerate(args) if isinstance(a, jax.Array) or is_nf4(a)]  # an NF4Weight: whole
        names += [k for k, v in kwargs.items() if isinstance(v, jax.Array)]
        values = [args[n] if isinstance(n, int) else kwargs[n] for n in names]
        specs = tuple(P(BATCH_AXES) if n in batched else P() for n in names)

        def local(*vals):
            a, kw = list(args), dict(kwargs)
            for n, v in zip(names, vals, strict=True):
                if isinstance(n, int):
                    a[n] = v
                else:
                    kw[n] = v
            y = super(ShardedOps, self)._call(op, impl, *a, **kw)
            if op == "cross_entropy":  # (loss_sum, count) per device, as [1] arrays summed outside
                return tuple(v[None] for v in y)
            return y

        # Over the batch axes only: under context parallelism this runs inside the shard_map over "context".
        y = jax.shard_map(
            local,
            mesh=self._kernel_mesh(),
            in_specs=specs,
            out_specs=P(BATCH_AXES),
            axis_names=set(BATCH_AXES),
            check_vma=False,
        )(*values)
        if op == "cross_entropy":
            return tuple(v.sum() for v in y)
        return y
