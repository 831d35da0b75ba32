"""Records -> tokenized examples with a per-token loss mask, validated before any model code runs."""

import dataclasses
import functools
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from jaxsloth.data import chat, formats
from jaxsloth.data.sources import load_records

logger = logging.getLogger(__name__)

# The loss's "no target" label (pallas_kernels.cross_entropy.IGNORE_INDEX, checked equal by the tests);
# defined here so reading data never imports the kernels.
IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True, eq=False)
class Example:
    """One tokenized example.

    input_ids: [len] int32. trained: [len] bool, True where the token is a training target, i.e. the
    loss includes predicting it from the tokens before it (so trained[0] never counts).
    """

    input_ids: np.ndarray
    trained: np.ndarray

    def __len__(self) -> int:
        return len(self.input_ids)

    def targets(self) -> np.ndarray:
        """targets: [len] int32, the next token where it is trained, IGNORE_INDEX (-100) elsewhere and at
        the last position (nothing follows it inside this example)."""
        out = np.full(len(self.input_ids), IGNORE_INDEX, np.int32)
        out[:-1] = np.where(self.trained[1:], self.input_ids[1:], IGNORE_INDEX)
        return out


@dataclasses.dataclass(frozen=True, eq=False)
class TokenizedDataset:
    """Tokenized examples plus what tokenization had to do to them.

    num_truncated: examples cut to max_seq_length. num_dropped: examples left with no trained token
    (e.g. the answer was truncated away), which are removed. row_index[k]: the source row of examples[k].
    """

    examples: list[Example]
    format: str
    max_seq_length: int
    pad_id: int
    num_truncated: int
    num_dropped: int
    row_index: np.ndarray

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, k: int) -> Example:
        return self.examples[k]

    @functools.cached_property
    def lengths(self) -> np.ndarray:
        """lengths: [num_examples] int64 token counts."""
        return np.array([len(e) for e in self.examples], np.int64)


def tokenize_dataset(
    records: str | os.PathLike | Iterable[Mapping[str, Any]],
    tokenizer: Any,
    *,
    format: str = "auto",
    max_seq_length: int = 2048,
    train_on_inputs: bool = False,
    truncate: bool = True,
    vocab_size: int | None = None,
    use_chat_template: bool = False,
) -> TokenizedDataset:
    """Tokenize and validate a dataset.

    records: anything `load_records` accepts. tokenizer: a Hugging Face (fast) tokenizer.
    format: "auto" (from the first row's keys), "text", "alpaca", "messages" (alias "sharegpt").
    train_on_inputs: also train on prompts / user turns (text data always trains every token).
    truncate: cut examples longer than max_seq_length (counted, logged) instead of raising ValueError.
    vocab_size: the model's vocabulary size; any token id >= it raises ValueError.
    use_chat_template: render alpaca rows with the tokenizer's chat template instead of the alpaca prompt.

    Raises ValueError/TypeError naming the row for a missing or mistyped field, an out-of-vocab id or an
    over-long example (truncate=False); ValueError for an empty dataset, a missing chat template, or when
    no example has a trained token.
    """
    if max_seq_length < 2:
        raise ValueError(f"max_seq_length must be >= 2 (one input and one target), got {max_seq_length}")
    rows = load_records(records)
    name = formats.resolve_format(format, rows[0])
    if name == "messages":
        chat.require_chat_template(tokenizer, "format 'messages'")
    if name == "alpaca" and use_chat_template:
        chat.require_chat_template(tokenizer, "alpaca with use_chat_template=True")

    encoded = _encode(rows, tokenizer, name, train_on_inputs, use_chat_template)

    examples, row_index, num_truncated = [], [], 0
    for i, (ids, trained) in enumerate(encoded):
        if vocab_size is not None and ids:
            bad = max(ids)
            if bad >= vocab_size:
                raise ValueError(f"row {i}: token id {bad} >= the model's vocab_size {vocab_size}")
        if len(ids) > max_seq_length:
            if not truncate:
                raise ValueError(f"row {i}: {len(ids)} tokens > max_seq_length {max_seq_length} (truncate=False)")
            ids, trained = ids[:max_seq_length], trained[:max_seq_length]
            num_truncated += 1
        if not any(trained[1:]):
            continue
        examples.append(Example(np.asarray(ids, np.int32), np.asarray(trained, np.bool_)))
        row_index.append(i)

    num_dropped = len(rows) - len(examples)
    if num_truncated:
        logger.warning(
            "truncated %d of %d examples to max_seq_length=%d tokens",
            num_truncated,
            len(rows),
            max_seq_length,
        )
    if num_dropped:
        logger.warning("dropped %d of %d examples with no trained token", num_dropped, len(rows))
    if not examples:
        raise ValueError(
            f"none of the {len(rows)} examples has a trained token (format {name!r}, "
            f"train_on_inputs={train_on_inputs}, max_seq_length={max_seq_length})"
        )
    return TokenizedDataset(
        examples=examples,
        format=name,
        max_seq_length=max_seq_length,
        pad_id=_pad_id(tokenizer, vocab_size),
        num_truncated=num_truncated,
        num_dropped=num_dropped,
        row_index=np.asarray(row_index, np.int64),
    )


def _encode(
    rows: list[dict[str, Any]], tokenizer: Any, name: str, train_on_inputs: bool, use_chat_template: bool
) -> list[tuple[list[int], list[bool]]]:
    if name == "messages" or (name == "alpaca" and use_chat_template):
        to_messages = formats.chat_messages if name == "messages" else formats.alpaca_messages
        return [
            chat.encode_chat(tokenizer, to_messages(row, i), train_on_inputs=train_on_inputs)
            for i, row in enumerate(rows)
        ]
    bos, eos = _bos_eos(tokenizer)
    if name == "text":
        texts = [formats.text_field(row, i) for i, row in enumerate(rows)]
        out = []
        for ids in _batch_ids(tokenizer, texts):
            ids = bos + ids + eos
            out.append((ids, [True] * len(ids)))
        return out
    pairs = [formats.alpaca_fields(row, i) for i, row in enumerate(rows)]
    prompts = _batch_ids(tokenizer, [p for p, _ in pairs])
    answers = _batch_ids(tokenizer, [a for _, a in pairs])
    out = []
    for prompt, answer in zip(prompts, answers):
        head, tail = bos + prompt, answer + eos
        out.append((head + tail, [train_on_inputs] * len(head) + [True] * len(tail)))
    return out


def _batch_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _bos_eos(tokenizer: Any) -> tuple[list[int], list[int]]:
    """[bos] when the tokenizer itself adds BOS when encoding (Llama, Gemma; not Qwen), and [eos] if any."""
    bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos = [bos_id] if bos_id is not None and probe[:1] == [bos_id] else []
    return bos, ([eos_id] if eos_id is not None else [])


def _pad_id(tokenizer: Any, vocab_size: int | None) -> int:
    # Padding is masked out everywhere, but the id still goes through the embedding: keep it in range.
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None and (vocab_size is None or candidate < vocab_size):
            return int(candidate)
    return 0
