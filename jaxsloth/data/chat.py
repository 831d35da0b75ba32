"""Rendering conversations with the tokenizer's chat template and finding which tokens the assistant wrote.

Two ways to find the assistant tokens:
- templates with `{% generation %}` blocks: transformers' `return_assistant_tokens_mask` marks them exactly;
- any other template: render the conversation prefix by prefix. The text the template adds for assistant
  turn i, minus the generation prompt it would emit before it, is that turn's answer. Character spans are
  mapped to tokens through the offsets of ONE tokenization of the whole text, so BPE merges across turn
  boundaries cannot shift the mask.
"""

import os
import re
from collections.abc import Sequence
from typing import Any

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def require_chat_template(tokenizer: Any, why: str) -> None:
    """Raise ValueError when `tokenizer` has no chat template (`why` says which data needs one)."""
    if getattr(tokenizer, "chat_template", None) is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"{why} needs a chat template, but tokenizer {name!r} has none; set tokenizer.chat_template "
            "to a Jinja template, or use a tokenizer that ships one (an *-Instruct model's)"
        )


def encode_chat(
    tokenizer: Any,
    messages: Sequence[dict[str, Any]],
    *,
    train_on_inputs: bool,
    tools: list[dict] | None = None,
    first_trained: int = 0,
) -> tuple[list[int], list[bool]]:
    """Render and tokenize one conversation.

    Returns (input_ids: [len], trained: [len]) where trained[j] says whether token j is a training target:
    every token when `train_on_inputs`, else the assistant answers (tool calls included) and their end-of-turn
    token. tools: function schemas for the template (`tools=` of apply_chat_template). first_trained: assistant
    turns before this message index are context, not trained (a prompt-completion pair's prompt).
    Raises ValueError when the template renders earlier turns differently once later turns are added
    (and has no `{% generation %}` blocks), since the answer spans cannot then be found.
    """
    messages = list(messages)
    if train_on_inputs:
        ids = chat_token_ids(tokenizer, messages, tools=tools)
        return ids, [True] * len(ids)
    if _GENERATION_TAG.search(tokenizer.get_chat_template()) and not first_trained:
        out = tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        return list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]
    text = _render(tokenizer, messages, tools=tools)
    spans = _assistant_char_spans(tokenizer, messages, text, tools, first_trained)
    enc = tokenize_rendered(tokenizer, text, return_offsets_mapping=True)
    trained = [any(start <= a < end for start, end in spans) for a, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), trained


def _render(
    tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = False, tools: list | None = None
) -> str:
    return tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _assistant_char_spans(
    tokenizer: Any, messages: list[dict[str, Any]], text: str, tools: list | None, first_trained: int
) -> list[tuple[int, int]]:
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < first_trained:
            continue
        upto = _render(tokenizer, messages[: i + 1], tools=tools)
        if not text.startswith(upto):
            raise ValueError(
                f"the chat template renders turns 0..{i} differently once later turns follow, so the "
                "assistant answers cannot be located; use a template with {% generation %} blocks or "
                "train_on_inputs=True"
            )
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True, tools=tools) if i else ""
        if i and upto.startswith(prompt):
            start = len(prompt)
        else:
            # The finished turn differs from the generation prompt (e.g. an inserted empty think block),
            # or there is no prompt before a leading assistant turn: start at the answer text itself.
            shared = len(os.path.commonprefix([prompt, upto]))
            start = upto.find(message["content"].strip(), shared)
            if start < 0:
                raise ValueError(f"assistant turn {i} ({message['content'][:40]!r}...) not found in its rendering")
        end = len(upto)
        # The separator a template puts after the end-of-turn token is layout, not part of the answer.
        while end > start and upto[end - 1].isspace():
            end -= 1
        spans.append((start, end))
    return spans


def chat_token_ids(
    tokenizer: Any,
    messages: Sequence[dict[str, Any]],
    *,
    add_generation_prompt: bool = False,
    tools: list | None = None,
) -> list[int]:
    """The token ids of a conversation as the chat template renders it (with the assistant's generation prompt when
    ``add_generation_prompt``), for training and generation alike. The template writes every special token itself
    (BOS included), so the tokenizer adds none: tokenizing with them would double Llama 3's and Gemma's BOS."""
    text = _render(tokenizer, list(messages), add_generation_prompt, tools=tools)
    return list(tokenize_rendered(tokenizer, text)["input_ids"])


def tokenize_rendered(tokenizer: Any, text: str, **kwargs: Any) -> Any:
    """``tokenizer(text)`` for text a chat template rendered: no special tokens added (see ``chat_token_ids``)."""
    return tokenizer(text, add_special_tokens=False, **kwargs)
