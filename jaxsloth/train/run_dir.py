"""Rules for the directories a run writes: nothing overwritten without a word, one run per output directory.

- An output directory holding another run's checkpoints is continued only when asked (``resume=True``,
  ``--resume``; the settings must match) and replaced only when asked (``overwrite=True``, ``--overwrite``, which
  removes that run's outputs); a run given neither is refused, naming both. ``resume=True`` where there is no
  checkpoint yet starts fresh (so one command serves the first start and every restart of a preemptible job).
- ``resume=<output_dir>/checkpoints/<step>`` (TRL's ``resume_from_checkpoint`` path) continues from that step; the
  run's later checkpoints are moved to ``checkpoints.superseded/``, out of the way of its saves and of a later
  resume.
- Two runs on one output directory at once would interleave checkpoints and logs: a lock file holds the first
  one's pid; the second is refused naming it. A lock left by a process that no longer runs is taken over.
- Exports (adapter, merged model) go into an empty or new directory, or replace our own files with ``overwrite``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("jaxsloth")

# What a training run writes into its output directory (jaxsloth.train and the CLI).
RUN_OUTPUTS = (
    "checkpoints",
    "checkpoints.damaged",
    "checkpoints.superseded",
    "metrics.jsonl",
    "tensorboard",
    "loss.png",
    "adapter",
)
LOCK = ".jaxsloth.lock"
# What save_adapter / save_merged (and the tokenizer saved beside a merged model) write.
EXPORT_FILES = (
    "adapter_model.safetensors",
    "adapter_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "*.tmp",
)


class OutputDirInUseError(FileExistsError):
    """Another live process holds the output directory's lock."""


def checkpoint_steps(out: Path) -> list[int]:
    ckpts = Path(out) / "checkpoints"
    return sorted(int(p.name) for p in ckpts.iterdir() if p.is_dir() and p.name.isdigit()) if ckpts.is_dir() else []


# How the refusal names the two ways on: the CLI flag and the API keyword.
ASK_RESUME, ASK_OVERWRITE = "--resume (resume=True)", "--overwrite (overwrite=True)"


def check_output_dir(
    out: str | os.PathLike,
    *,
    resume: bool | str | os.PathLike,
    overwrite: bool,
    asks: tuple[str, str] = (ASK_RESUME, ASK_OVERWRITE),
) -> None:
    """Refuses to start over another run's checkpoints unless told to continue it (``resume``) or replace it
    (``overwrite``), naming both as ``asks`` spells them; a checkpoint path given as ``resume`` must be a whole
    checkpoint of that run."""
    steps = checkpoint_steps(Path(out))
    if steps and resume is False and not overwrite:
        raise FileExistsError(
            f"{out} holds a run (checkpoints up to step {steps[-1]}): pass {asks[0]} to continue it or {asks[1]} to "
            "start again there, or choose another output directory"
        )
    if not isinstance(resume, bool):
        resume_step(out, resume)


def resume_step(out: str | os.PathLike, checkpoint: str | os.PathLike) -> int:
    """The step of ``checkpoint``, which must be a whole checkpoint of the run in ``out``: out/checkpoints/<step>."""
    from jaxsloth.train.checkpoint import damage

    path, ckpts = Path(checkpoint), Path(out) / "checkpoints"
    steps = checkpoint_steps(Path(out))
    held = f"steps {', '.join(map(str, steps))}" if steps else "no checkpoints"
    if path.resolve().parent != ckpts.resolve() or not path.name.isdigit():
        raise ValueError(
            f"resume: {path} is not a checkpoint of the run in {out} ({ckpts}/<step>; it holds {held}); give one "
            "of those, or True for the latest"
        )
    if not path.is_dir():
        raise FileNotFoundError(f"resume: checkpoint {path} not found ({out} holds {held})")
    why = damage(path)
    if why is not None:
        raise ValueError(f"resume: checkpoint {path} is damaged ({why}); give another ({out} holds {held})")
    return int(path.name)


def set_aside_later_checkpoints(out: str | os.PathLike, step: int) -> None:
    """Resuming from an earlier checkpoint than the latest: the later ones move to ``checkpoints.superseded/``."""
    ckpts = Path(out) / "checkpoints"
    later = [s for s in checkpoint_steps(Path(out)) if s > step]
    if not later:
        return
    aside = ckpts.with_name("checkpoints.superseded")
    aside.mkdir(exist_ok=True)
    for s in later:
        target, n = aside / str(s), 1
        while target.exists():
            target, n = aside / f"{s}-{n}", n + 1
        shutil.move(str(ckpts / str(s)), str(target))
    log.info("resuming from step %d: the later checkpoints (%s) moved to %s", step, ", ".join(map(str, later)), aside)


def clear_run_outputs(out: str | os.PathLike) -> None:
    """Removes what an earlier run wrote into ``out`` (only our own files: RUN_OUTPUTS)."""
    for name in RUN_OUTPUTS:
        path = Path(out) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def run_lock(out: str | os.PathLike) -> Iterator[None]:
    """Holds ``out/.jaxsloth.lock`` (pid and host) for the block; OutputDirInUseError if a live process has it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    me = f"{os.getpid()} {socket.gethostname()}\n"
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid, host = _read_lock(path)
            if pid is not None and (host != socket.gethostname() or _alive(pid)):
                where = "" if host == socket.gethostname() else f" on {host}"
                raise OutputDirInUseError(
                    f"{out} is in use by another jaxsloth run (pid {pid}{where}); wait for it to finish, stop it, "
                    f"or choose another output directory (a stale lock can be removed: {path})"
                ) from None
            with contextlib.suppress(FileNotFoundError):  # stale: its process is gone
                path.unlink()
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        break
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            if path.read_text() == me:
                path.unlink()


def _read_lock(path: Path) -> tuple[int | None, str | None]:
    try:
        pid, host = path.read_text().split()
        return int(pid), host
    except (OSError, ValueError):
        return None, None


def prepare_export_dir(path: str | os.PathLike, *, overwrite: bool) -> Path:
    """An empty (or new) directory to export into; with ``overwrite`` our own earlier files are removed first, so
    no stale shard or config of an earlier export is left beside the new one."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"export path {path} is a file, not a directory")
    present = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if present and not overwrite:
        raise FileExistsError(
            f"{path} is not empty ({', '.join(present[:3])}{', ...' if len(present) > 3 else ''}): pass "
            "overwrite=True (--overwrite) to replace its files, or choose another directory"
        )
    for pattern in EXPORT_FILES if present else ():
        for p in path.glob(pattern):
            if p.is_file():
                p.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


def remove_partial_files(path: str | os.PathLike) -> None:
    """After a failed export: the temporary files of writes that did not finish."""
    for p in Path(path).glob("*.tmp"):
        with contextlib.suppress(OSError):
            p.unlink()
