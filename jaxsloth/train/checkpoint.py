"""Training checkpoints: LoRA tree, optimizer state, step, data position and RNG, through orbax.

Orbax's CheckpointManager writes each step into a temporary directory and renames it only when complete, so an
interrupted save never replaces the last good checkpoint; ``keep`` bounds how many are kept.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
    """save(step, state, meta) / restore_latest(abstract_state) over a directory of step folders.

    state: pytree of arrays (trainable, opt_state, rng key data); meta: JSON-able dict (data position, config).
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 3):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def save(self, step: int, state, meta: dict, *, wait: bool = True) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        if wait:
            self.manager.wait_until_finished()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, step: int, abstract_state):
        """Restores into the structure, shapes and dtypes of ``abstract_state`` (arrays or ShapeDtypeStructs)."""
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()),
        )
        return out.state, dict(out.meta)

    def close(self) -> None:
        self.manager.close()


def key_to_array(key: jax.Array) -> np.ndarray:
    """A typed PRNG key as plain uint32 data (checkpointable)."""
    return np.asarray(jax.random.key_data(key))


def array_to_key(data) -> jax.Array:
    return jax.random.wrap_key_data(np.asarray(data, np.uint32))
