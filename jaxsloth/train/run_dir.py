"""Rules for the directories a run writes: nothing overwritten without a word, one run per output directory.

- An output directory holding another run's checkpoints is resumed (when the settings match) or refused: starting
  fresh there (``resume=False``) needs ``overwrite=True`` (``--overwrite``), which removes that run's outputs.
- Two runs on one output directory at once would interleave checkpoints and logs: a lock file holds the first
  one's pid; the second is refused naming it. A lock left by a process that no longer runs is taken over.
- Exports (adapter, merged model) go into an empty or new directory, or replace our own files with ``overwrite``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

# What a training run writes into its output directory (jaxsloth.train and the CLI).
RUN_OUTPUTS = ("checkpoints", "checkpoints.damaged", "metrics.jsonl", "tensorboard", "loss.png", "adapter")
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


def check_output_dir(out: str | os.PathLike, *, resume: bool, overwrite: bool) -> None:
    """Refuses to start fresh over another run's checkpoints unless ``overwrite``."""
    steps = checkpoint_steps(Path(out))
    if steps and not resume and not overwrite:
        raise FileExistsError(
            f"{out} holds another run's checkpoints (up to step {steps[-1]}): pass --overwrite (overwrite=True) to "
            "replace that run, resume it, or choose another output directory"
        )


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
