"""Ctrl-C and SIGTERM during training: stop at a step boundary, save, and say what was kept.

A signal that arrives while a step is being committed or a checkpoint written is held until that finishes (the
step's input buffers are donated, so stopping half-way would leave no consistent state to save); anywhere else
it raises at once, so an interrupt during compilation or data loading does not wait.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator

log = logging.getLogger("jaxsloth")

SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
# How to continue an interrupted run: a run directory is only ever continued when asked (jaxsloth.train.run_dir).
CONTINUE = "run again with --resume (resume=True) to continue"


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C or SIGTERM. saved_step: the step of the checkpoint written on the way out (None
    when none was: nothing new to save, or no checkpoint directory); kept_step: the latest checkpoint on disk."""

    def __init__(self, signum: int = signal.SIGINT, saved_step: int | None = None, kept_step: int | None = None):
        super().__init__(SIGNAL_NAMES.get(signum, f"signal {signum}"))
        self.signum = signum
        self.saved_step = saved_step
        self.kept_step = kept_step

    @property
    def exit_code(self) -> int:
        """The shell's code for death by this signal: 130 for Ctrl-C, 143 for SIGTERM."""
        return 128 + int(self.signum)


class InterruptGuard:
    """Within ``with guard:`` SIGINT and SIGTERM raise TrainingInterrupted, except inside ``guard.hold(what)``,
    where they are held until ``what`` is done. Handlers are installed only in the main thread and restored on
    exit."""

    def __init__(self):
        self.signum: int | None = None
        self._holding: str | None = None
        self._pending = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNAL_NAMES:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum
        if self._holding is None:
            raise TrainingInterrupted(signum)
        self._pending = True
        log.warning("%s: %s; please wait", SIGNAL_NAMES.get(signum, signum), self._holding)

    @contextlib.contextmanager
    def hold(self, what: str) -> Iterator[None]:
        """Signals wait until the block ends (``check`` then raises them)."""
        outer = self._holding
        self._holding = what
        try:
            yield
        finally:
            self._holding = outer

    def check(self) -> None:
        """Raises TrainingInterrupted for a signal that was held."""
        if self._pending:
            self._pending = False
            raise TrainingInterrupted(self.signum or signal.SIGINT)


def interrupted_message(e: KeyboardInterrupt, checkpoints: str | os.PathLike) -> tuple[str, int]:
    """The one line the CLI prints when training was interrupted, and its exit code (130 Ctrl-C, 143 SIGTERM).

    It says "saved" only when a checkpoint of the last completed step was written, and how to continue."""
    if not isinstance(e, TrainingInterrupted):
        e = TrainingInterrupted()
    what = f"interrupted ({e})"
    if e.saved_step is not None:
        line = f"{what}: checkpoint of step {e.saved_step} saved in {checkpoints}; {CONTINUE}"
    elif e.kept_step is not None:
        line = f"{what}: the latest checkpoint is step {e.kept_step} in {checkpoints}; {CONTINUE}"
    else:
        line = f"{what}: no checkpoint was saved (no step had completed)"
    return line, e.exit_code
