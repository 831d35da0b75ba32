"""Batches from a dataset streamed in order (larger than memory), with a resume state that is exact.

A `datasets.IterableDataset` is read row by row, tokenized a chunk at a time and packed greedily in stream order:
examples go into the current row while they fit, then the row closes. Nothing is shuffled (shuffle the corpus
beforehand, or pass `dataset.shuffle(seed, buffer_size)`, which datasets replays identically).

Resume: the state is (epoch, rows_consumed), where rows_consumed counts the source rows before the first example
not yet handed out in a batch. `load_state_dict` restarts the stream with `dataset.skip(rows_consumed)` and
re-tokenizes from there, so the batches that follow are exactly those the interrupted loader would have yielded.
Skipping re-reads the skipped rows (datasets streams cannot seek), so resuming deep into a corpus costs one read
of its beginning, not a re-tokenization of it.
"""

from collections.abc import Iterator
from typing import Any

import numpy as np

from jaxsloth.data.loader import check_fingerprint
from jaxsloth.data.packing import build_batch
from jaxsloth.data.sources import open_dataset
from jaxsloth.data.tokenization import Encoder, Example, make_encoder, pad_id_for, source_name


def streaming_loader(
    data: Any,
    tokenizer: Any,
    *,
    batch_size: int,
    seq_len: int,
    format: str = "auto",
    text_field: str | None = None,
    train_on_inputs: bool = False,
    use_chat_template: bool = False,
    pack: bool = True,
    vocab_size: int | None = None,
    num_epochs: int | None = None,
    split: str = "train",
    name: str | None = None,
) -> "StreamingBatchLoader":
    """A `StreamingBatchLoader` over `data` (anything `open_dataset` accepts, opened with streaming=True; a list
    or an in-memory Dataset is streamed too), its format found from the first row as `tokenize_dataset` does."""
    stream = open_dataset(data, split=split, name=name, streaming=True)
    if isinstance(stream, list):
        import datasets

        stream = datasets.Dataset.from_list(stream)
    if hasattr(stream, "to_iterable_dataset"):
        stream = stream.to_iterable_dataset()
    first = next(iter(stream), None)
    if first is None:
        raise ValueError(f"dataset is empty: {source_name(data) or type(data).__name__}")
    encoder = make_encoder(first, tokenizer, format, train_on_inputs, use_chat_template, text_field)
    encoder.where = source_name(data)
    return StreamingBatchLoader(
        stream,
        encoder,
        batch_size,
        seq_len,
        pad_id=pad_id_for(tokenizer, vocab_size),
        pack=pack,
        vocab_size=vocab_size,
        num_epochs=num_epochs,
    )


class StreamingBatchLoader:
    """Iterator of batches {tokens, targets, positions, segment_ids}, each int32 [batch_size, seq_len], from
    `dataset` (an iterable of dict rows with `.skip(n)`, e.g. `datasets.IterableDataset`) in order.

    encoder: from `jaxsloth.data.tokenization.make_encoder`. Examples longer than seq_len are truncated,
    examples with no trained token skipped. Each pass over the stream is an epoch; its last batch is filled
    with padding rows. Runs for num_epochs passes, or forever when it is None.
    """

    def __init__(
        self,
        dataset: Any,
        encoder: Encoder,
        batch_size: int,
        seq_len: int,
        *,
        pad_id: int,
        pack: bool = True,
        vocab_size: int | None = None,
        num_epochs: int | None = None,
        chunk: int = 256,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
        self.dataset = dataset
        self.encoder = encoder
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.pack = pack
        self.vocab_size = vocab_size
        self.num_epochs = num_epochs
        self.chunk = chunk
        self.epoch = 0
        self.rows_consumed = 0
        self.num_truncated = 0
        self._stream: Iterator[tuple[int, Example]] | None = None
        self._pending: tuple[int, Example] | None = None

    def __iter__(self) -> "StreamingBatchLoader":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        examples, rows = self._fill()
        if not rows:  # the stream is exhausted: next epoch
            if self.rows_consumed == 0:
                raise ValueError("the streamed dataset has no example with a trained token")
            self.epoch, self.rows_consumed, self._stream = self.epoch + 1, 0, None
            return next(self)
        return build_batch(examples, rows, self.batch_size, self.seq_len, self.pad_id)

    def state_dict(self) -> dict[str, int]:
        """The position plus what it is only valid for, as plain ints (checkpoint-friendly)."""
        return {
            "epoch": self.epoch,
            "rows_consumed": self.rows_consumed,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "pack": int(self.pack),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()` output; ValueError if it came from another loader kind or settings."""
        if "rows_consumed" not in state:
            raise ValueError("loader state has no 'rows_consumed': it was saved by a non-streaming loader")
        check_fingerprint(state, {k: int(getattr(self, k)) for k in ("batch_size", "seq_len", "pack")})
        self.epoch, self.rows_consumed = int(state["epoch"]), int(state["rows_consumed"])
        self._stream, self._pending = None, None

    def _fill(self) -> tuple[list[Example], list[list[int]]]:
        """The next batch's examples and rows (indices into them), packed in stream order."""
        examples: list[Example] = []
        rows: list[list[int]] = []
        row: list[int] = []
        used = 0
        while len(rows) < self.batch_size:
            item = self._peek()
            if item is None:
                break
            i, example = item
            if row and (not self.pack or used + len(example) > self.seq_len):
                rows.append(row)
                row, used = [], 0
                continue
            row.append(len(examples))
            examples.append(example)
            used += len(example)
            self._pending = None
            self.rows_consumed = i + 1
        if row and len(rows) < self.batch_size:
            rows.append(row)
        return examples, rows

    def _peek(self) -> tuple[int, Example] | None:
        if self._pending is None:
            if self._stream is None:
                self._stream = self._examples(self.rows_consumed)
            self._pending = next(self._stream, None)
        return self._pending

    def _examples(self, start: int) -> Iterator[tuple[int, Example]]:
        """(source row number, example) from row `start` on, tokenized `chunk` rows at a time."""
        source = self.dataset.skip(start) if start else self.dataset
        rows: list[dict] = []
        for row in source:
            rows.append(row)
            if len(rows) == self.chunk:
                yield from self._encode(rows, start)
                start += len(rows)
                rows = []
        yield from self._encode(rows, start)

    def _encode(self, rows: list[dict], start: int) -> Iterator[tuple[int, Example]]:
        indices = range(start, start + len(rows))
        for i, (ids, trained) in zip(indices, self.encoder.encode(rows, indices), strict=True):
            ids, trained = np.asarray(ids, np.int32), np.asarray(trained, np.bool_)
            if self.vocab_size is not None and len(ids) and int(ids.max()) >= self.vocab_size:
                raise ValueError(f"row {i}: token id {int(ids.max())} >= the model's vocab_size {self.vocab_size}")
            if len(ids) > self.seq_len:
                ids, trained = ids[: self.seq_len], trained[: self.seq_len]
                self.num_truncated += 1
            if trained[1:].any():
                yield i, Example(ids, trained)
