"""What a GRPO checkpoint holds besides the adapter and optimizer state, so a resumed run continues exactly as an
uninterrupted one: the step, the generation counter (each generation's sampling seeds derive from it), the prompt
order (the epoch's permutation, the position in it and the random generator's state, which also shuffles each
generation's rows) and, when the checkpoint falls inside a generation that serves several steps
(num_iterations > 1), that generation's batch (its rows, advantages and old / reference log-probs) with its
reward metrics, so the remaining steps train on the very same samples.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import jax
import numpy as np


class PromptOrder:
    """Batches of ``per_step`` prompt indices, each epoch in a new order drawn from ``rng`` (TRL's RandomSampler;
    an epoch's remainder too small for a generation is skipped)."""

    def __init__(self, n: int, per_step: int, rng: np.random.Generator):
        if n < per_step:
            raise ValueError(f"method='grpo': {n} prompts, fewer than the {per_step} prompts of one generation")
        self.n, self.per_step, self.rng = n, per_step, rng
        self.order: np.ndarray | None = None
        self.position = 0

    def next(self) -> np.ndarray:
        if self.order is None or self.position + self.per_step > self.n:
            self.order, self.position = self.rng.permutation(self.n).astype(np.int32), 0
        self.position += self.per_step
        return self.order[self.position - self.per_step : self.position]

    def state_dict(self) -> dict:
        """{"order": [n] int32 (the epoch's permutation; zeros before the first), "position", "rng"} (JSON-able but
        for the array)."""
        order = np.zeros(self.n, np.int32) if self.order is None else self.order
        return {"order": order, "position": self.position, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.order = np.asarray(state["order"], np.int32)
        self.position = int(state["position"])
        self.rng.bit_generator.state = state["rng"]


@dataclasses.dataclass
class Generation:
    """One generation's samples as the step trains on them. micro: [accumulation, rows, ...] arrays (on the
    devices); metrics: its reward and completion metrics; done: steps trained on it so far; generate_s, reward_s:
    its sampling and scoring seconds (reported with its first step)."""

    micro: dict
    metrics: dict
    tokens: int
    done: int = 0
    generate_s: float = 0.0
    reward_s: float = 0.0

    def to_checkpoint(self) -> tuple[dict, dict]:
        """(host arrays for the checkpoint's state, JSON for its meta)."""
        arrays = {k: np.asarray(v) for k, v in jax.device_get(self.micro).items()}
        shapes = {k: [list(v.shape), v.dtype.name] for k, v in arrays.items()}
        return arrays, {"done": self.done, "metrics": self.metrics, "tokens": self.tokens, "shapes": shapes}

    @staticmethod
    def abstract(meta: dict) -> dict:
        """Host arrays of the shapes a checkpoint's meta names (the restore's target)."""
        return {k: np.zeros(shape, dtype) for k, (shape, dtype) in meta["shapes"].items()}

    @classmethod
    def from_checkpoint(cls, arrays: dict, meta: dict, place) -> Generation:
        return cls(place(arrays), meta["metrics"], int(meta["tokens"]), int(meta["done"]))


class PromptsIdentity:
    """The data part of a GRPO checkpoint's identity (``jaxsloth.train.identity.run_identity`` reads
    ``state_dict``): the prompts, and how many a generation takes and samples."""

    def __init__(self, rows: list[dict], prompts_per_generation: int, num_generations: int):
        digest = hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.state = {"prompts": digest, "prompts_per_generation": prompts_per_generation,
                      "num_generations": num_generations}  # fmt: skip

    def state_dict(self) -> dict:
        return self.state
