"""Placing examples into fixed-length rows (packed or one per row) and building the batch arrays."""

from collections.abc import Sequence

import numpy as np

from jaxsloth.data.tokenization import IGNORE_INDEX, Example


def plan_rows(lengths: np.ndarray, order: np.ndarray, seq_len: int, *, pack: bool, window: int = 16) -> list[list[int]]:
    """Assign examples to rows of `seq_len` tokens, deterministically.

    lengths: [num_examples] token counts; order: the example indices in the order to place them.
    pack=False gives one example per row. pack=True is first-fit over a window of `window` open rows: each
    example goes into the first open row with room, else a new row; when the window is full its fullest
    row is closed. The window bounds the cost (O(n * window)) and keeps rows near the shuffled order.
    Returns rows of example indices, each with total length <= seq_len.
    """
    too_long = np.flatnonzero(lengths[order] > seq_len)
    if too_long.size:
        i = int(order[too_long[0]])
        raise ValueError(
            f"example {i} has {int(lengths[i])} tokens > seq_len {seq_len}; tokenize with a smaller "
            "max_seq_length or use a longer seq_len"
        )
    if not pack:
        return [[int(i)] for i in order]
    closed: list[list[int]] = []
    open_rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = int(lengths[i])
        for r, room in enumerate(free):
            if room >= n:
                open_rows[r].append(int(i))
                free[r] -= n
                break
        else:
            if len(open_rows) == window:
                r = free.index(min(free))
                closed.append(open_rows.pop(r))
                free.pop(r)
            open_rows.append([int(i)])
            free.append(seq_len - n)
    return closed + open_rows


def build_batch(
    examples: Sequence[Example], rows: Sequence[Sequence[int]], batch_size: int, seq_len: int, pad_id: int
) -> dict[str, np.ndarray]:
    """Lay `rows` (lists of example indices, at most batch_size of them) out as one batch.

    Returns int32 arrays, each [batch_size, seq_len]: tokens (pad_id in padding), targets (next token where
    trained, -100 elsewhere, including every segment's last token and padding), positions (restart at 0
    for each example), segment_ids (1..k for the k examples of a row, 0 for padding). Missing rows are
    all padding.
    """
    assert len(rows) <= batch_size, (len(rows), batch_size)
    tokens = np.full((batch_size, seq_len), pad_id, np.int32)
    targets = np.full((batch_size, seq_len), IGNORE_INDEX, np.int32)
    positions = np.zeros((batch_size, seq_len), np.int32)
    segment_ids = np.zeros((batch_size, seq_len), np.int32)
    for b, row in enumerate(rows):
        start = 0
        for k, i in enumerate(row):
            example = examples[i]
            end = start + len(example)
            assert end <= seq_len, (row, seq_len)
            tokens[b, start:end] = example.input_ids
            targets[b, start:end] = example.targets()
            positions[b, start:end] = np.arange(len(example))
            segment_ids[b, start:end] = k + 1
            start = end
    return {"tokens": tokens, "targets": targets, "positions": positions, "segment_ids": segment_ids}
