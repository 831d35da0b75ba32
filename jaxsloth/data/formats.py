"""Dataset formats: detection from a row's keys, and the fields each format needs (with row-numbered errors).

text      {"text": str}                                   continued pretraining, every token trained
alpaca    {"instruction": str, "input": str?, "output": str}
messages  {"messages": [{"role", "content"}, ...]} or sharegpt {"conversations": [{"from", "value"}, ...]}
"""

from collections.abc import Mapping
from typing import Any

FORMATS = ("text", "alpaca", "messages")
_ALIASES = {"sharegpt": "messages", "conversations": "messages", "chat": "messages"}

# sharegpt and other dumps use several names for the same two roles.
_ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "chatgpt": "assistant",
    "tool": "tool",
}

# The Stanford Alpaca prompt, kept byte-for-byte so models trained elsewhere on it see the same text.
_ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def resolve_format(format: str, first_row: Mapping[str, Any]) -> str:
    """The canonical format name: `format` itself (aliases such as "sharegpt" resolved), or, for "auto",
    the one detected from the first row's keys. Raises ValueError for an unknown or undetectable format."""
    if format == "auto":
        return detect_format(first_row)
    name = _ALIASES.get(format, format)
    if name not in FORMATS:
        raise ValueError(f"unknown dataset format {format!r}; expected 'auto', one of {FORMATS} or {sorted(_ALIASES)}")
    return name


def detect_format(row: Mapping[str, Any]) -> str:
    """Guess the format from a row's keys (chat keys win over alpaca keys, which win over "text")."""
    keys = set(row)
    if keys & {"messages", "conversations"}:
        return "messages"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if "text" in keys:
        return "text"
    raise ValueError(
        f"cannot detect the dataset format from the first row's keys {sorted(keys)}: expected 'text', "
        "'instruction'+'output' (alpaca), or 'messages'/'conversations' (chat); or pass format=..."
    )


def text_field(row: Mapping[str, Any], index: int) -> str:
    """The "text" field of row `index`."""
    return _string_field(row, index, "text", "text")


def alpaca_fields(row: Mapping[str, Any], index: int) -> tuple[str, str]:
    """(prompt, response) of alpaca row `index`; the prompt is the fixed alpaca template filled in."""
    instruction = _string_field(row, index, "instruction", "alpaca")
    output = _string_field(row, index, "output", "alpaca")
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        raise TypeError(f"row {index}: field 'input' must be a string, got a {type(extra).__name__}")
    template = _ALPACA_WITH_INPUT if extra.strip() else _ALPACA_NO_INPUT
    return template.format(instruction=instruction, input=extra), output


def alpaca_messages(row: Mapping[str, Any], index: int) -> list[dict[str, str]]:
    """Alpaca row `index` as a two-turn chat, for rendering with the tokenizer's chat template."""
    instruction = _string_field(row, index, "instruction", "alpaca")
    output = _string_field(row, index, "output", "alpaca")
    extra = row.get("input") or ""
    user = f"{instruction}\n\n{extra}" if isinstance(extra, str) and extra.strip() else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def chat_messages(row: Mapping[str, Any], index: int) -> list[dict[str, str]]:
    """The conversation of row `index` as [{"role", "content"}] with roles normalised to
    system/user/assistant/tool (sharegpt's "conversations" with from/value and human/gpt accepted)."""
    key = "messages" if "messages" in row else "conversations"
    turns = row.get(key)
    if turns is None:
        raise ValueError(f"row {index}: missing field 'messages' (or 'conversations') for format 'messages'")
    if not isinstance(turns, list | tuple) or not turns:
        raise ValueError(f"row {index}: field {key!r} must be a non-empty list of messages")
    messages = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise TypeError(f"row {index}: {key}[{j}] is a {type(turn).__name__}, expected a dict")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role is None:
            raise ValueError(f"row {index}: {key}[{j}] is missing field 'role' (or sharegpt 'from')")
        if content is None:
            raise ValueError(f"row {index}: {key}[{j}] is missing field 'content' (or sharegpt 'value')")
        if not isinstance(content, str):
            raise TypeError(f"row {index}: {key}[{j}] content must be a string, got a {type(content).__name__}")
        canonical = _ROLES.get(str(role).lower())
        if canonical is None:
            raise ValueError(f"row {index}: {key}[{j}] has unknown role {role!r}; known roles: {sorted(_ROLES)}")
        messages.append({"role": canonical, "content": content})
    return messages


def _string_field(row: Mapping[str, Any], index: int, field: str, format: str) -> str:
    value = row.get(field)
    if value is None:
        raise ValueError(f"row {index}: missing field {field!r} (needed by format {format!r})")
    if not isinstance(value, str):
        raise TypeError(f"row {index}: field {field!r} must be a string, got a {type(value).__name__}")
    return value
