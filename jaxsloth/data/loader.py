"""A resumable loader of fixed-shape batches: shuffled per epoch from a seed, packed or padded."""

from typing import Any

import numpy as np

from jaxsloth.data.packing import build_batch, plan_rows
from jaxsloth.data.tokenization import TokenizedDataset


def check_fingerprint(state: dict[str, Any], own: dict[str, int]) -> None:
    """ValueError naming the first setting a saved loader state was made with that this loader does not share."""
    for key, value in own.items():
        if key in state and int(state[key]) != value:
            raise ValueError(f"loader state has {key}={int(state[key])} but this loader has {key}={value}")


class BatchLoader:
    """Iterator of batches {tokens, targets, positions, segment_ids}, each int32 [batch_size, seq_len].

    Epoch e visits the examples in the order of a permutation drawn from (seed, e) (or in dataset order
    when shuffle=False), packs them into rows (pack=True) or puts one per row (pack=False), and groups
    the rows into batches; a final partial batch is filled with all-padding rows, or dropped when
    drop_last=True. Iteration runs for num_epochs epochs, or forever when it is None.

    The position is (epoch, index): `index` batches of `epoch` have been handed out. Because every epoch's
    plan is a pure function of the seed, `state_dict()` saved after any batch and `load_state_dict()` on a
    new loader over the same data make it yield exactly the batches the first one would have yielded next.
    """

    def __init__(
        self,
        dataset: TokenizedDataset,
        batch_size: int,
        seq_len: int,
        *,
        pack: bool = True,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        drop_last: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        longest = int(dataset.lengths.max())
        if longest > seq_len:
            raise ValueError(
                f"seq_len {seq_len} is shorter than the longest example ({longest} tokens); "
                f"tokenize with max_seq_length <= {seq_len}"
            )
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.pack = pack
        self.seed = seed
        self.shuffle = shuffle
        self.num_epochs = num_epochs
        self.drop_last = drop_last
        self.epoch = 0
        self.index = 0
        self._plan_epoch: int | None = None
        self._plan: list[list[list[int]]] = []

    def __iter__(self) -> "BatchLoader":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.index >= self.num_batches(self.epoch):
            self.epoch, self.index = self.epoch + 1, 0
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        rows = self._batches(self.epoch)[self.index]
        self.index += 1
        return build_batch(self.dataset.examples, rows, self.batch_size, self.seq_len, self.dataset.pad_id)

    def num_batches(self, epoch: int) -> int:
        """How many batches epoch `epoch` has (with packing it depends on that epoch's order)."""
        return len(self._batches(epoch))

    def state_dict(self) -> dict[str, int]:
        """The position plus what it is only valid for, as plain ints (checkpoint-friendly)."""
        return {"epoch": self.epoch, "index": self.index, **self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()` output; ValueError if it came from other data or settings."""
        missing = {"epoch", "index"} - set(state)
        if missing:
            raise ValueError(f"loader state is missing {sorted(missing)}")
        check_fingerprint(state, self._fingerprint())
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def _fingerprint(self) -> dict[str, int]:
        return {
            "seed": self.seed,
            "num_examples": len(self.dataset),
            "num_tokens": int(self.dataset.lengths.sum()),
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "pack": int(self.pack),
            "shuffle": int(self.shuffle),
        }

    def _batches(self, epoch: int) -> list[list[list[int]]]:
        if self._plan_epoch != epoch:
            self._plan = self._make_plan(epoch)
            self._plan_epoch = epoch
        return self._plan

    def _make_plan(self, epoch: int) -> list[list[list[int]]]:
        n = len(self.dataset)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
        else:
            order = np.arange(n)
        rows = plan_rows(self.dataset.lengths, order, self.seq_len, pack=self.pack)
        batches = [rows[s : s + self.batch_size] for s in range(0, len(rows), self.batch_size)]
        if self.drop_last and len(batches[-1]) < self.batch_size:
            batches.pop()
        if not batches:
            raise ValueError(
                f"epoch {epoch} fills {len(rows)} rows, fewer than batch_size {self.batch_size}, and "
                "drop_last=True: no batch to yield"
            )
        return batches
