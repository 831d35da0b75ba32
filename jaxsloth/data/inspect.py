"""What training will see of a dataset, without loading the model: a few examples rendered with their trained tokens
marked, and the counts that explain a surprising loss (``jaxsloth inspect-data``).

    report = inspect_dataset(tokenize_dataset(...), pack=True, seed=0)
    print(format_report(report)); print(render_example(data[0], tokenizer, color=False))
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxsloth.data.loader import BatchLoader
from jaxsloth.data.tokenization import Example, TokenizedDataset

# Trained tokens: green on a terminal, between [[ and ]] elsewhere (logs, files, pipes).
ANSI_TRAINED, ANSI_RESET = "\x1b[1;32m", "\x1b[0m"
MARK_OPEN, MARK_CLOSE = "[[", "]]"


@dataclasses.dataclass(frozen=True)
class DataReport:
    """Counts over a tokenized dataset. tokens: every token of the kept examples; trained_tokens: the loss's
    targets; rows: packed (or one-per-example) rows of max_seq_length tokens in the first epoch's plan;
    packing_efficiency: tokens / (rows * max_seq_length), the share of row slots holding real tokens."""

    examples: int
    source_rows: int
    tokens: int
    trained_tokens: int
    truncated: int
    dropped: int
    rows: int
    max_seq_length: int
    packing: bool

    @property
    def packing_efficiency(self) -> float:
        return self.tokens / (self.rows * self.max_seq_length)


def inspect_dataset(dataset: TokenizedDataset, *, pack: bool = True, seed: int = 0) -> DataReport:
    """Counts of ``dataset``; rows come from the same BatchLoader planning training uses (epoch 0 of ``seed``)."""
    rows = BatchLoader(dataset, batch_size=1, seq_len=dataset.max_seq_length, pack=pack, seed=seed).num_batches(0)
    return DataReport(
        examples=len(dataset),
        source_rows=len(dataset) + dataset.num_dropped,
        tokens=int(dataset.lengths.sum()),
        trained_tokens=int(sum(int(e.trained[1:].sum()) for e in dataset.examples)),
        truncated=dataset.num_truncated,
        dropped=dataset.num_dropped,
        rows=rows,
        max_seq_length=dataset.max_seq_length,
        packing=pack,
    )


def render_example(example: Example, tokenizer: Any, color: bool = False) -> str:
    """The example's text with each run of trained tokens marked (ANSI green with color, else [[...]]). Position 0
    is never a target, so it is never marked."""
    trained = example.trained.copy()
    trained[0] = False
    bounds = np.flatnonzero(np.diff(trained.astype(np.int8))) + 1
    opened, closed = (ANSI_TRAINED, ANSI_RESET) if color else (MARK_OPEN, MARK_CLOSE)
    pieces = []
    for ids, mask in zip(np.split(example.input_ids, bounds), np.split(trained, bounds), strict=True):
        text = tokenizer.decode(ids.tolist(), skip_special_tokens=False)
        pieces.append(f"{opened}{text}{closed}" if mask[0] else text)
    return "".join(pieces)


def format_report(report: DataReport) -> str:
    """The counts, one per line."""
    share = report.trained_tokens / report.tokens if report.tokens else 0.0
    layout = "packed" if report.packing else "one example per row"
    return "\n".join(
        [
            f"examples:            {report.examples} (of {report.source_rows} rows)",
            f"tokens:              {report.tokens}",
            f"trained tokens:      {report.trained_tokens} ({share:.1%} of tokens)",
            f"truncated examples:  {report.truncated} (to max_seq_length={report.max_seq_length})",
            f"dropped examples:    {report.dropped} (no trained token left)",
            f"rows:                {report.rows} of {report.max_seq_length} tokens ({layout})",
            f"packing efficiency:  {report.packing_efficiency:.1%} (tokens / row slots)",
        ]
    )


def describe_dataset(
    dataset: TokenizedDataset, tokenizer: Any, *, num_examples: int = 3, color: bool = False, pack: bool = True,
    seed: int = 0,
) -> str:  # fmt: skip
    """The first ``num_examples`` examples rendered (trained tokens marked), then the counts."""
    parts = []
    for k, example in enumerate(dataset.examples[:num_examples]):
        trained = int(example.trained[1:].sum())
        parts.append(f"--- example {k} (source row {dataset.row_index[k]}, {len(example)} tokens, {trained} trained)")
        parts.append(render_example(example, tokenizer, color))
    marker = "green" if color else f"{MARK_OPEN}...{MARK_CLOSE}"
    parts.append(f"--- {dataset.format} data; trained tokens in {marker}")
    parts.append(format_report(inspect_dataset(dataset, pack=pack, seed=seed)))
    return "\n".join(parts)
