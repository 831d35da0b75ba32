"""A training run's checkpoint writes, shared by the SFT loop (``loop.fit``) and GRPO's (``grpo_train``).

Each write runs under the run's InterruptGuard (a signal waits for it), at most once per step, never of a state that
an interrupted step already took (its buffers were donated to the step), and a failed write is not retried (a full
disk fails again). On any exit the run saves once more and turns Ctrl-C / SIGTERM into ``TrainingInterrupted``,
which names the step saved on the way out and the latest one on disk.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable

import jax

from jaxsloth.train.interrupts import InterruptGuard, TrainingInterrupted

log = logging.getLogger("jaxsloth")


def consumed(tree) -> bool:
    """Whether a step that was cut short already took (donated) these buffers."""
    return any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(tree))


class RunSaver:
    """The checkpoint writes of one run. ``ckpt`` None: a run without a checkpoint directory (every call is a no-op).
    ``step``: the step the run starts from (resumed or 0), which counts as saved."""

    def __init__(self, ckpt, guard: InterruptGuard, identity: dict, step: int):
        self.ckpt, self.guard, self.identity = ckpt, guard, identity
        self.saved_at, self.last_save, self.failed = step, time.monotonic(), False

    def due(self, step: int, every_steps: int | None, every_seconds: float | None) -> bool:
        """Whether the run's schedule asks for a checkpoint after ``step``."""
        by_steps = bool(every_steps) and step % every_steps == 0
        return by_steps or bool(every_seconds) and time.monotonic() - self.last_save >= every_seconds

    def save(self, step: int, live, contents: Callable[[], tuple[dict, dict]]) -> None:
        """Writes step ``step``: ``contents()`` -> (arrays, metadata), called only when a write happens; ``live``: the
        arrays the step donates (trainable, optimizer state), checked before anything is read."""
        if self.ckpt is None or step == self.saved_at or self.failed:
            return
        if consumed(live):
            log.warning("the interrupted step had already taken the state of step %d: nothing new saved", step)
            return
        state, meta = contents()
        with self.guard.hold(f"saving the checkpoint of step {step} (stopping now keeps step {self.saved_at}'s)"):
            try:
                self.ckpt.save(step, state, meta, self.identity)
            except OSError:
                self.failed = True
                raise
            self.saved_at, self.last_save = step, time.monotonic()

    def finish(self, step: int, failure: BaseException | None, save: Callable[[], None]) -> BaseException | None:
        """The write on the way out (at the end, on Ctrl-C / SIGTERM, on any crash: nothing trained is lost) ->
        the exception the run raises (None: it ended well). The first failure wins; a later save error is logged."""
        if self.ckpt is not None:
            try:
                save()
            except BaseException as e:  # noqa: BLE001 - the first failure is the one raised
                if failure is None:
                    failure = e
                else:
                    log.error("could not save the checkpoint of step %d: %s", step, e)
        if isinstance(failure, KeyboardInterrupt):
            signum = getattr(failure, "signum", signal.SIGINT)
            kept = self.saved_at if self.ckpt is not None and self.saved_at > 0 else None
            failure = TrainingInterrupted(signum, saved_step=kept if kept == step else None, kept_step=kept)
        return failure
