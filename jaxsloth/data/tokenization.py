"""Records -> tokenized examples with a per-token loss mask, validated before any model code runs."""

import dataclasses
import functools
import hashlib
import logging
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxsloth.data import chat, formats
from jaxsloth.data.sources import open_dataset

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
    records: Any,
    tokenizer: Any,
    *,
    format: str = "auto",
    max_seq_length: int = 2048,
    train_on_inputs: bool = False,
    truncate: bool = True,
    vocab_size: int | None = None,
    use_chat_template: bool = False,
    text_field: str | None = None,
    num_proc: int | None = None,
    split: str = "train",
    name: str | None = None,
) -> TokenizedDataset:
    """Tokenize and validate a dataset.

    records: anything `open_dataset` accepts (a file, dataset folder, Hub id, list of dicts, `datasets.Dataset`;
    split/name pick a folder's or Hub dataset's split and configuration). tokenizer: a Hugging Face (fast)
    tokenizer. format: "auto" (from the first row's keys), "text", "alpaca", "messages" (alias "sharegpt"),
    "prompt_completion". text_field: train on the raw text of this column (format "text").
    train_on_inputs: also train on prompts / user turns (text data always trains every token).
    truncate: cut examples longer than max_seq_length (counted, logged) instead of raising ValueError.
    vocab_size: the model's vocabulary size; any token id >= it raises ValueError.
    use_chat_template: render alpaca rows with the tokenizer's chat template instead of the alpaca prompt.
    num_proc: processes tokenizing a `datasets.Dataset` (files, folders and Hub ids are read as one); datasets
    forks them, which only tokenize (no JAX work runs in them).

    A `datasets.Dataset` is tokenized with `Dataset.map`, cached on disk beside its Arrow files under a
    fingerprint of the data, the tokenizer, the settings and this code: a second run, a resumed run or another
    host of the same run reads the tokens back instead of tokenizing again. Lists are tokenized in memory.

    Raises ValueError/TypeError naming the file (when given one) and row for a missing or mistyped field, a
    conversation the chat template rejects, an out-of-vocab id or an over-long example (truncate=False);
    ValueError for an empty dataset, a missing chat template, or when no example has a trained token.
    """
    if max_seq_length < 2:
        raise ValueError(f"max_seq_length must be >= 2 (one input and one target), got {max_seq_length}")
    source = open_dataset(records, split=split, name=name)
    encoder = make_encoder(source[0], tokenizer, format, train_on_inputs, use_chat_template, text_field)
    encoder.where = source_name(records)
    if isinstance(source, list):
        encoded = encoder.encode(source, range(len(source)))
        rows = range(len(source))
    else:
        encoded, rows = _map_dataset(source, encoder, num_proc)
    return _collect(
        encoded, rows, len(source), encoder.format, max_seq_length, truncate, vocab_size, tokenizer, train_on_inputs
    )


def make_encoder(
    first_row: Mapping[str, Any],
    tokenizer: Any,
    format: str = "auto",
    train_on_inputs: bool = False,
    use_chat_template: bool = False,
    text_field: str | None = None,
) -> "Encoder":
    """The row encoder for a dataset whose first row is `first_row` (format resolved, chat template checked)."""
    name = formats.resolve_format(format, first_row, text_field)
    if name == "messages":
        chat.require_chat_template(tokenizer, "format 'messages'")
    if name == "alpaca" and use_chat_template:
        chat.require_chat_template(tokenizer, "alpaca with use_chat_template=True")
    if name == "prompt_completion" and not isinstance(first_row.get("prompt"), str):
        chat.require_chat_template(tokenizer, "conversational prompt-completion rows")
    return Encoder(tokenizer, name, train_on_inputs, use_chat_template, text_field or "text")


@dataclasses.dataclass
class Encoder:
    """Rows -> (input_ids, trained) pairs for one format; picklable, so `Dataset.map` can run it in processes."""

    tokenizer: Any
    format: str
    train_on_inputs: bool
    use_chat_template: bool
    text_field: str = "text"
    where: str = ""  # the file or id errors name

    def encode(self, rows: Sequence[Mapping[str, Any]], indices: Iterable[int]) -> list[tuple[list[int], list[bool]]]:
        """(input_ids, trained) of each row; `indices` are the rows' numbers in the dataset, for errors."""
        indices = list(indices)
        try:
            return _encode(rows, indices, self)
        except (ValueError, TypeError) as e:
            if not self.where:
                raise
            raise type(e)(f"{self.where} {e}") from None

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        """`Dataset.map(batched=True, with_indices=True)` form: columns in, input_ids/trained/row out."""
        rows = [dict(zip(batch, values)) for values in zip(*batch.values(), strict=True)]
        encoded = self.encode(rows, indices)
        return {"input_ids": [e[0] for e in encoded], "trained": [e[1] for e in encoded], "row": list(indices)}

    def fingerprint(self, data_fingerprint: str) -> str:
        """Names the tokenized cache: the data, every tokenizer part that changes ids, the settings, this code."""
        tok = self.tokenizer
        backend = getattr(tok, "backend_tokenizer", None)
        parts = [
            data_fingerprint,
            backend.to_str() if backend is not None else repr(tok),
            repr(getattr(tok, "chat_template", None)),
            repr(tok.special_tokens_map),
            repr((tok.bos_token_id, tok.eos_token_id, self.format, self.train_on_inputs, self.use_chat_template)),
            self.text_field,
        ]
        digest = hashlib.sha256()
        for part in parts + [Path(m.__file__).read_text() for m in (chat, formats, sys.modules[__name__])]:
            digest.update(part.encode())
            digest.update(b"\0")
        return digest.hexdigest()[:32]


def source_name(records: Any) -> str:
    """The file or id a dataset came from, for errors ('' for objects)."""
    return os.fspath(records) if isinstance(records, str | os.PathLike) else ""


def _map_dataset(dataset: Any, encoder: Encoder, num_proc: int | None) -> tuple[Iterable, np.ndarray]:
    """Tokenize a `datasets.Dataset` with `map` (cached on disk when the dataset lives in files)."""
    import datasets

    features = datasets.Features(
        {
            "input_ids": datasets.List(datasets.Value("int32")),
            "trained": datasets.List(datasets.Value("bool")),
            "row": datasets.Value("int64"),
        }
    )
    mapped = dataset.map(
        encoder,
        batched=True,
        with_indices=True,
        num_proc=num_proc if num_proc and num_proc > 1 else None,
        remove_columns=dataset.column_names,
        features=features,
        new_fingerprint=encoder.fingerprint(dataset._fingerprint),
        desc="tokenizing",
    )
    table = mapped.with_format("arrow")[:]
    ids, trained = table.column("input_ids").combine_chunks(), table.column("trained").combine_chunks()
    offsets = ids.offsets.to_numpy()
    id_values = ids.values.to_numpy()
    trained_values = trained.values.to_numpy(zero_copy_only=False)
    encoded = (
        (id_values[offsets[k] : offsets[k + 1]], trained_values[offsets[k] : offsets[k + 1]])
        for k in range(len(offsets) - 1)
    )
    return encoded, table.column("row").to_numpy()


def _collect(
    encoded: Iterable,
    rows: Sequence[int],
    num_rows: int,
    name: str,
    max_seq_length: int,
    truncate: bool,
    vocab_size: int | None,
    tokenizer: Any,
    train_on_inputs: bool,
) -> TokenizedDataset:
    examples, row_index, num_truncated, num_cut_away = [], [], 0, 0
    for i, (ids, trained) in zip(rows, encoded, strict=True):
        ids, trained = np.asarray(ids, np.int32), np.asarray(trained, np.bool_)
        if vocab_size is not None and len(ids):
            bad = int(ids.max())
            if bad >= vocab_size:
                raise ValueError(f"row {i}: token id {bad} >= the model's vocab_size {vocab_size}")
        if len(ids) > max_seq_length:
            if not truncate:
                raise ValueError(f"row {i}: {len(ids)} tokens > max_seq_length {max_seq_length} (truncate=False)")
            answered = trained[1:].any()
            ids, trained = ids[:max_seq_length], trained[:max_seq_length]
            num_truncated += 1
            num_cut_away += bool(answered and not trained[1:].any())
        if not trained[1:].any():
            continue
        examples.append(Example(ids, trained))
        row_index.append(int(i))

    num_dropped = num_rows - len(examples)
    if num_truncated:
        logger.warning(
            "truncated %d of %d examples to max_seq_length=%d tokens",
            num_truncated,
            num_rows,
            max_seq_length,
        )
    if num_dropped:
        logger.warning("dropped %d of %d examples with no trained token", num_dropped, num_rows)
    if not examples:
        raise ValueError(
            f"none of the {num_rows} examples has a trained token (format {name!r}, "
            f"train_on_inputs={train_on_inputs}, max_seq_length={max_seq_length}): "
            + _no_trained_token_cause(name, train_on_inputs, max_seq_length, num_cut_away)
        )
    return TokenizedDataset(
        examples=examples,
        format=name,
        max_seq_length=max_seq_length,
        pad_id=pad_id_for(tokenizer, vocab_size),
        num_truncated=num_truncated,
        num_dropped=num_dropped,
        row_index=np.asarray(row_index, np.int64),
    )


def _no_trained_token_cause(name: str, train_on_inputs: bool, max_seq_length: int, num_cut_away: int) -> str:
    """The likely reason a dataset has no trained token at all, for the error that refuses it."""
    if num_cut_away:
        return (
            f"max_seq_length={max_seq_length} truncates every answer away ({num_cut_away} examples lost theirs); "
            "raise max_seq_length or shorten the prompts"
        )
    if name == "text":
        return "every text is empty"
    if name == "messages":
        return "no conversation has an assistant turn with content (or the chat template renders none)" + (
            "" if train_on_inputs else "; train_on_inputs=True would also train on the other turns"
        )
    answer = "output" if name == "alpaca" else "completion"
    return f"every {answer} is empty: prompt-only data" + (
        "" if train_on_inputs else "; add answers, or set train_on_inputs=True to train on the prompts"
    )


def _encode(rows: Sequence[Mapping[str, Any]], indices: list[int], enc: Encoder) -> list[tuple[list[int], list[bool]]]:
    tokenizer, name = enc.tokenizer, enc.format
    if name == "messages" or (name == "alpaca" and enc.use_chat_template):
        to_messages = formats.chat_messages if name == "messages" else formats.alpaca_messages
        return [
            _encode_chat(tokenizer, to_messages(row, i), i, enc.train_on_inputs, formats.tools_field(row, i))
            for i, row in zip(indices, rows, strict=True)
        ]
    bos, eos = _bos_eos(tokenizer)
    if name == "text":
        texts = [formats.text_field(row, i, enc.text_field) for i, row in zip(indices, rows, strict=True)]
        out = []
        for ids in _batch_ids(tokenizer, texts):
            ids = bos + ids + eos
            out.append((ids, [True] * len(ids)))
        return out
    if name == "prompt_completion":
        pairs = [formats.prompt_completion(row, i) for i, row in zip(indices, rows, strict=True)]
        if pairs and not isinstance(pairs[0][0], str):
            return [
                _encode_chat(tokenizer, p + c, i, enc.train_on_inputs, formats.tools_field(row, i), len(p))
                for (p, c), i, row in zip(pairs, indices, rows, strict=True)
            ]
        for (p, _), i in zip(pairs, indices, strict=True):
            if not isinstance(p, str):
                raise TypeError(f"row {i}: 'prompt' is a list of messages but row {indices[0]}'s is a string")
    else:
        pairs = [formats.alpaca_fields(row, i) for i, row in zip(indices, rows, strict=True)]
    prompts = _batch_ids(tokenizer, [p for p, _ in pairs])
    answers = _batch_ids(tokenizer, [a for _, a in pairs])
    out = []
    for prompt, answer in zip(prompts, answers, strict=True):
        head, tail = bos + prompt, answer + eos
        out.append((head + tail, [enc.train_on_inputs] * len(head) + [True] * len(tail)))
    return out


def _encode_chat(
    tokenizer: Any, messages: list[dict], index: int, train_on_inputs: bool, tools: list | None, first_trained=0
) -> tuple[list[int], list[bool]]:
    from jinja2 import TemplateError

    try:
        return chat.encode_chat(
            tokenizer, messages, train_on_inputs=train_on_inputs, tools=tools, first_trained=first_trained
        )
    except TemplateError as e:  # a strict template's raise_exception("roles must alternate ...") and the like
        raise ValueError(f"row {index}: the chat template rejects this conversation: {_one_line(e)}") from None
    except ValueError as e:
        raise ValueError(f"row {index}: {_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _batch_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _bos_eos(tokenizer: Any) -> tuple[list[int], list[int]]:
    """[bos] when the tokenizer itself adds BOS when encoding (Llama, Gemma; not Qwen), and [eos] if any."""
    bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos = [bos_id] if bos_id is not None and probe[:1] == [bos_id] else []
    return bos, ([eos_id] if eos_id is not None else [])


def pad_id_for(tokenizer: Any, vocab_size: int | None) -> int:
    """The id padding uses: the tokenizer's pad token, else EOS, else 0 (each only if < vocab_size)."""
    # Padding is masked out everywhere, but the id still goes through the embedding: keep it in range.
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None and (vocab_size is None or candidate < vocab_size):
            return int(candidate)
    return 0
