"""Training checkpoints: LoRA tree, optimizer state, step, data position and RNG, through orbax, each with a
manifest (``jaxsloth.json``) of what it belongs to and the checksums of its files.

Orbax writes each step into a temporary directory and renames it only when complete; the manifest is written
(atomically) after that, so a step directory without a valid manifest is incomplete. Before a resume every step
directory is checked newest first against its manifest: a damaged one (truncated, zeroed or flipped file, missing
files, an empty or stray directory) is moved aside to ``<directory>.damaged/`` with one line saying why, and the
newest whole checkpoint is used. ``keep`` bounds how many are kept.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger("jaxsloth")
MANIFEST = "jaxsloth.json"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, no permission); the previous one is kept."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def _is_disk_full(e: BaseException) -> bool:
    while e is not None:
        if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def damage(step_dir: Path) -> str | None:
    """Why ``step_dir`` is not a whole checkpoint, or None when every file matches its manifest."""
    manifest = step_dir / MANIFEST
    if not manifest.is_file():
        return "no manifest (an incomplete save or not a jaxsloth checkpoint)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"its {MANIFEST} is damaged"
    if not any(name.startswith("state/") for name in files):
        return "no state/ files listed"
    for name, (size, digest) in files.items():
        path = step_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
        if _sha256(path) != digest:
            return f"{name} does not match its checksum"
    return None


class _KeptSteps:
    """Orbax preservation policy: keep the steps in ``steps`` (a set the owner updates as training goes)."""

    def __init__(self, steps: set[int]):
        self.steps = steps

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        return [c.step in self.steps for c in checkpoints]


class Checkpointer:
    """save(step, state, meta, identity) / latest_good() / restore(step, abstract_state) over a directory of step
    folders.

    state: pytree of arrays (trainable, opt_state, rng key data); meta: JSON-able dict (step, data position);
    identity: JSON-able dict of what the checkpoint belongs to (jaxsloth.train.identity.run_identity).
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 3):
        self.directory = Path(directory).absolute()
        self.keep = keep
        self.kept_steps: set[int] = set()  # kept besides the latest ``keep`` (the best evaluated step)
        self._manager: ocp.CheckpointManager | None = None

    @property
    def manager(self) -> ocp.CheckpointManager:
        # Created lazily: latest_good() may first move damaged step directories out of orbax's sight.
        if self._manager is None:
            self._manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(
                    preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(
                        [ocp.checkpoint_managers.LatestN(self.keep), _KeptSteps(self.kept_steps)]
                    ),
                    create=True,
                    cleanup_tmp_directories=True,
                ),
            )
        return self._manager

    def step_dirs(self) -> list[tuple[int, Path]]:
        """(step, directory) of every integer-named directory, newest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(p.name), p) for p in self.directory.iterdir() if p.is_dir() and p.name.isdigit()]
        return sorted(found, reverse=True)

    def latest_good(self) -> tuple[int, dict] | None:
        """(step, manifest) of the newest whole checkpoint; newer damaged ones are moved aside, saying so."""
        damaged = []
        for step, path in self.step_dirs():
            why = damage(path)
            if why is None:
                if damaged:
                    log.warning("%s; resuming from step %d, the latest whole checkpoint", "; ".join(damaged), step)
                return step, json.loads((path / MANIFEST).read_text())
            damaged.append(f"checkpoint {path} is damaged ({why}), moved to {self._quarantine(path)}")
        if damaged:
            log.warning("%s; no whole checkpoint left: starting from step 0", "; ".join(damaged))
        return None

    def _quarantine(self, path: Path) -> Path:
        aside = self.directory.with_name(self.directory.name + ".damaged")
        aside.mkdir(parents=True, exist_ok=True)
        target = aside / path.name
        n = 1
        while target.exists():
            target, n = aside / f"{path.name}-{n}", n + 1
        if jax.process_index() == 0:
            shutil.move(str(path), str(target))
        return target

    def _clear_step(self, step: int) -> None:
        """Removes a step's directory and orbax temporaries (a save that was interrupted or failed half-way)."""
        self.manager.wait_until_finished()
        for p in list(self.directory.glob(f"{step}")) + list(self.directory.glob(f"{step}.orbax-checkpoint-tmp*")):
            shutil.rmtree(p, ignore_errors=True)
        self.manager.reload()

    def save(self, step: int, state, meta: dict, identity: dict | None = None) -> None:
        """Writes the step (replacing an incomplete directory of that step) and then its manifest. A write that
        fails leaves no partial files and raises CheckpointWriteError naming the directory."""
        step_dir = self.directory / str(step)
        if step_dir.exists():
            self._clear_step(step)
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                force=True,
            )
            self.manager.wait_until_finished()
            if jax.process_index() == 0:
                files = {str(p.relative_to(step_dir)): [p.stat().st_size, _sha256(p)] for p in _files(step_dir)}
                tmp = step_dir / (MANIFEST + ".tmp")
                tmp.write_text(json.dumps({"step": step, "identity": identity, "files": files}, indent=1))
                os.replace(tmp, step_dir / MANIFEST)
        except Exception as e:
            if not isinstance(e, OSError) and not _is_disk_full(e):
                raise
            self._clear_step(step)
            code = errno.ENOSPC if _is_disk_full(e) else getattr(e, "errno", None) or errno.EIO
            why = f"{os.strerror(code)} while writing the checkpoint of step {step}; the previous one is kept"
            raise CheckpointWriteError(code, why, str(step_dir)) from e

    def restore(self, step: int, abstract_state):
        """Restores into the structure, shapes and dtypes of ``abstract_state`` (arrays or ShapeDtypeStructs)."""
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()),
        )
        return out.state, dict(out.meta)

    def read_meta(self, step: int) -> dict:
        """The JSON meta of a step alone (what a caller needs to know the shapes of the state to restore)."""
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out.meta)

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()


def key_to_array(key: jax.Array) -> np.ndarray:
    """A typed PRNG key as plain uint32 data (checkpointable)."""
    return np.asarray(jax.random.key_data(key))


def array_to_key(data) -> jax.Array:
    return jax.random.wrap_key_data(np.asarray(data, np.uint32))
