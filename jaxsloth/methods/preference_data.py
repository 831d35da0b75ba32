"""Preference data as TRL shapes it: examples -> (prompt ids, completion ids), packed into fixed-shape rows.

Formats (TRL's): paired ``prompt``/``chosen``/``rejected`` (strings or conversational message lists), the implicit
prompt (only ``chosen``/``rejected``, full conversations sharing a prefix), and KTO's unpaired
``prompt``/``completion``/``label``. As TRL does, the prompt and prompt+completion are tokenized separately (chat
template applied once per conversation; EOS appended to string completions) and the completion starts where the two
diverge. Packing puts each prompt+completion in a segment of its own, a pair's chosen and rejected in consecutive
segments of one row, with no padding to the longer of the two.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxsloth.data.chat import chat_token_ids
from jaxsloth.data.formats import ROLE_NAMES

IGNORE_INDEX = -100


def _is_conversational(value: Any) -> bool:
    return isinstance(value, list) and (not value or isinstance(value[0], dict))


def extract_prompt(example: dict) -> dict:
    """chosen/rejected that share a prefix (messages, or characters) -> prompt/chosen/rejected, as TRL's
    ``extract_prompt``: the longest common prefix is the prompt, minus a trailing space of a string prompt."""
    chosen, rejected = example["chosen"], example["rejected"]
    idx = min(len(chosen), len(rejected))
    for i in range(idx):
        if chosen[i] != rejected[i]:
            idx = i - 1 if i > 0 and chosen[i - 1] == " " else i
            break
    return {**example, "prompt": chosen[:idx], "chosen": chosen[idx:], "rejected": rejected[idx:]}


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _token_ids(tokenizer: Any, value: Any, add_generation_prompt: bool = False) -> list[int]:
    if _is_conversational(value):
        return chat_token_ids(tokenizer, value, add_generation_prompt=add_generation_prompt)
    return list(tokenizer(value)["input_ids"])


def _turn(message: dict) -> dict:
    """A message with ShareGPT's from/value keys (human, gpt, ...) as role/content; others as they are."""
    if "from" in message and "value" in message and "role" not in message:
        return {"role": ROLE_NAMES.get(message["from"], message["from"]), "content": message["value"]}
    return message


def _as_turns(answer: Any) -> list[dict]:
    """An answer to a conversational prompt as a list of messages: a string is one assistant turn, a message one."""
    if isinstance(answer, str):
        return [{"role": "assistant", "content": answer}]
    return [_turn(m) for m in ([answer] if isinstance(answer, dict) else answer)]


def map_fields(
    example: dict,
    *,
    prompt_field: str = "prompt",
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
    system_field: str | None = None,
    chat_answers: bool = False,
) -> dict:
    """A row under the dataset's own column names -> TRL's prompt/chosen/rejected (other columns kept). system_field:
    a system turn put before a conversational prompt. chat_answers: a string prompt becomes a user turn (after the
    system turn) and string answers assistant turns, so the tokenizer's chat template formats them."""
    out = dict(example)
    for field, name in ((prompt_field, "prompt"), (chosen_field, "chosen"), (rejected_field, "rejected")):
        if field != name:
            if field not in example:
                raise ValueError(f"no {field!r} column ({name}_field) in the row (columns: {sorted(example)})")
            out.pop(name, None)
            out[name] = out.pop(field)
    system = out.pop(system_field, None) if system_field else None
    if chat_answers and isinstance(out.get("prompt"), str):
        out["prompt"] = [{"role": "user", "content": out["prompt"]}]
        for name in ("chosen", "rejected", "completion"):
            if isinstance(out.get(name), str):
                out[name] = _as_turns(out[name])
    if system and _is_conversational(out.get("prompt")):
        out["prompt"] = [{"role": "system", "content": system}, *out["prompt"]]
    return out


def tokenize_completions(tokenizer: Any, prompt: Any, completions: Sequence[Any]) -> tuple[list[int], list[list[int]]]:
    """prompt and its completions (strings or message lists) -> (prompt ids, [completion ids]) as TRL builds them:
    prompt+completion tokenized whole, split where it diverges from the tokenized prompt (the shortest such split
    over the completions, so every completion shares the prompt ids). A conversational prompt's completion may also
    be one message or a string (one assistant turn)."""
    conversational = _is_conversational(prompt)
    if conversational:
        prompt = [_turn(m) for m in prompt]
        completions = [_as_turns(c) for c in completions]
    if not conversational:
        eos = tokenizer.eos_token
        if eos is None:
            raise ValueError("the tokenizer has no eos_token, which string completions end with (as in TRL)")
        completions = [c if c.endswith(eos) else c + eos for c in completions]
    prompt_ids = _token_ids(tokenizer, prompt, add_generation_prompt=True)
    full = [_token_ids(tokenizer, (list(prompt) + list(c)) if conversational else prompt + c) for c in completions]
    n = min(_common_prefix_length(prompt_ids, f) for f in full)
    return prompt_ids[:n], [f[n:] for f in full]


def tokenize_pair(tokenizer: Any, example: dict) -> tuple[list[int], list[int], list[int]]:
    """A paired example (explicit or implicit prompt) -> (prompt ids, chosen ids, rejected ids)."""
    for key in ("chosen", "rejected"):
        if key not in example:
            raise ValueError(f"preference example has no {key!r} field (keys: {sorted(example)})")
    if "prompt" not in example:
        example = extract_prompt(example)
    prompt, (chosen, rejected) = tokenize_completions(
        tokenizer, example["prompt"], [example["chosen"], example["rejected"]]
    )
    return prompt, chosen, rejected


def tokenize_unpaired(tokenizer: Any, example: dict) -> tuple[list[int], list[int], bool]:
    """A KTO example -> (prompt ids, completion ids, desirable)."""
    for key in ("prompt", "completion", "label"):
        if key not in example:
            raise ValueError(f"KTO example has no {key!r} field (keys: {sorted(example)})")
    prompt, (completion,) = tokenize_completions(tokenizer, example["prompt"], [example["completion"]])
    return prompt, completion, bool(example["label"])


def pack(groups: Sequence[Sequence[tuple[Sequence[int], Sequence[int]]]], seq_len: int, num_rows: int | None = None):
    """groups of (prompt ids, completion ids) sequences -> packed rows, every group's sequences in one row.

    Sequences are numbered in order across all groups (``sequence_index``). Returns numpy int32 arrays, each
    [rows, seq_len]: tokens; targets (the next token where it is a completion token, else -100); positions
    (restart per sequence); segment_ids (1.. per row, 0 = padding); sequence_index (-1 = padding).
    Rows are filled in order; ``num_rows`` fixes the row count (an error if the groups need more).
    """
    rows: list[list[tuple[int, Sequence[int], Sequence[int]]]] = []
    used: list[int] = []
    index = 0
    for group in groups:
        size = sum(len(p) + len(c) for p, c in group)
        if size > seq_len:
            raise ValueError(f"a group of {size} tokens does not fit in seq_len={seq_len}")
        if not rows or used[-1] + size > seq_len:
            rows.append([])
            used.append(0)
        for prompt, completion in group:
            if not completion:
                raise ValueError(f"sequence {index} has an empty completion")
            rows[-1].append((index, prompt, completion))
            index += 1
        used[-1] += size
    n_rows = len(rows) if num_rows is None else num_rows
    if len(rows) > n_rows:
        raise ValueError(f"the sequences need {len(rows)} rows of {seq_len} tokens, more than num_rows={num_rows}")
    out = {
        "tokens": np.zeros((n_rows, seq_len), np.int32),
        "targets": np.full((n_rows, seq_len), IGNORE_INDEX, np.int32),
        "positions": np.zeros((n_rows, seq_len), np.int32),
        "segment_ids": np.zeros((n_rows, seq_len), np.int32),
        "sequence_index": np.full((n_rows, seq_len), -1, np.int32),
    }
    for r, row in enumerate(rows):
        start = 0
        for k, (i, prompt, completion) in enumerate(row):
            ids = np.asarray(list(prompt) + list(completion), np.int32)
            end = start + len(ids)
            out["tokens"][r, start:end] = ids
            # Token j predicts token j + 1; only completion tokens are scored.
            out["targets"][r, start + len(prompt) - 1 : end - 1] = ids[len(prompt) :]
            out["positions"][r, start:end] = np.arange(len(ids))
            out["segment_ids"][r, start:end] = k + 1
            out["sequence_index"][r, start:end] = i
            start = end
    return out


def pack_pairs(pairs: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]], seq_len: int, num_rows=None):
    """(prompt, chosen, rejected) ids -> ``pack`` rows; pair i's chosen is sequence 2i, its rejected 2i + 1."""
    if any(not p for p, _, _ in pairs):
        raise ValueError("a preference pair has an empty prompt (the first completion token needs a context)")
    return pack([[(p, c), (p, r)] for p, c, r in pairs], seq_len, num_rows)


def pack_unpaired(examples: Sequence[tuple[Sequence[int], Sequence[int], bool]], seq_len: int, num_rows=None):
    """KTO (prompt, completion, desirable) ids -> (``pack`` rows, desirable [n] bool). Sequences 0..n-1 are the
    examples; n + i is the mismatched KL sequence (prompt i, completion i - 1 cyclically), as TRL pairs them."""
    if any(not p for p, _, _ in examples):
        raise ValueError("a KTO example has an empty prompt (the first completion token needs a context)")
    n = len(examples)
    seqs = [(p, c) for p, c, _ in examples]
    seqs += [(examples[i][0], examples[i - 1][1]) for i in range(n)]
    return pack([[s] for s in seqs], seq_len, num_rows), np.asarray([d for _, _, d in examples], bool)
