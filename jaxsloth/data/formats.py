"""Dataset formats: detection from a row's keys, and the fields each format needs (with row-numbered errors).

text      {"text": str}                                   continued pretraining, every token trained
alpaca    {"instruction": str, "input": str?, "output": str}
messages  {"messages": [{"role", "content"}, ...]} or sharegpt {"conversations": [{"from", "value"}, ...]};
          assistant turns may carry "tool_calls", "tool" turns the results, and a "tools" column the function
          schemas handed to the chat template
prompt_completion  TRL's {"prompt", "completion"}: two strings (standard), or two lists of messages
          (conversational); loss on the completion only
"""

import json
from collections.abc import Mapping
from typing import Any

FORMATS = ("text", "alpaca", "messages", "prompt_completion")
_ALIASES = {"sharegpt": "messages", "conversations": "messages", "chat": "messages", "completion": "prompt_completion"}

# sharegpt and other dumps use several names for the same two roles.
ROLE_NAMES = {
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


def resolve_format(format: str, first_row: Mapping[str, Any], text_field: str | None = None) -> str:
    """The canonical format name: `format` itself (aliases such as "sharegpt" resolved), or, for "auto",
    the one detected from the first row's keys ("text" whenever `text_field` names the text column).
    Raises ValueError for an unknown or undetectable format."""
    if text_field is not None:
        if format not in ("auto", "text"):
            raise ValueError(
                f"dataset_text_field={text_field!r} trains on raw text: it needs format 'text', not {format!r}"
            )
        if text_field not in first_row:
            raise ValueError(f"dataset_text_field {text_field!r} is not a column; the columns: {sorted(first_row)}")
        return "text"
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
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if "text" in keys:
        return "text"
    raise ValueError(
        f"cannot detect the dataset format from the first row's keys {sorted(keys)}: expected 'text', "
        "'instruction'+'output' (alpaca), 'messages'/'conversations' (chat) or 'prompt'+'completion'; or pass "
        "format=..., or dataset_text_field=<column> to train on a column's raw text"
    )


def text_field(row: Mapping[str, Any], index: int, field: str = "text") -> str:
    """The text column `field` of row `index`."""
    return _string_field(row, index, field, "text")


def prompt_completion(row: Mapping[str, Any], index: int) -> tuple[str, str] | tuple[list[dict], list[dict]]:
    """(prompt, completion) of row `index`: two strings, or two normalised message lists (conversational)."""
    prompt, completion = row.get("prompt"), row.get("completion")
    for field, value in (("prompt", prompt), ("completion", completion)):
        if value is None:
            raise ValueError(f"row {index}: missing field {field!r} (needed by format 'prompt_completion')")
    if isinstance(prompt, str) and isinstance(completion, str):
        return prompt, completion
    if isinstance(prompt, list | tuple) and isinstance(completion, list | tuple) and completion:
        return _messages(prompt, index, "prompt"), _messages(completion, index, "completion")
    raise TypeError(
        f"row {index}: 'prompt' and 'completion' must both be strings or both lists of messages, got a "
        f"{type(prompt).__name__} and a {type(completion).__name__}"
    )


def tools_field(row: Mapping[str, Any], index: int) -> list[dict] | None:
    """The function schemas of row `index` ("tools": a list of dicts, or that list as a JSON string), or None."""
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise ValueError(f"row {index}: field 'tools' is a string but not JSON ({e.msg})") from None
    if tools is None:
        return None
    if not isinstance(tools, list | tuple) or not all(isinstance(t, Mapping) for t in tools):
        raise TypeError(f"row {index}: field 'tools' must be a list of function schemas (dicts)")
    return [_drop_nones(t) for t in tools]


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
    return _messages(turns, index, key)


def _messages(turns: Any, index: int, key: str) -> list[dict[str, Any]]:
    if not isinstance(turns, list | tuple) or not turns:
        raise ValueError(f"row {index}: field {key!r} must be a non-empty list of messages")
    messages = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise TypeError(f"row {index}: {key}[{j}] is a {type(turn).__name__}, expected a dict")
        # Arrow fills fields a message lacks with None (tool_calls on a user turn...): a template testing
        # `'tool_calls' in message` must not see them.
        turn = _drop_nones(turn)
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role is None:
            raise ValueError(f"row {index}: {key}[{j}] is missing field 'role' (or sharegpt 'from')")
        if content is None and turn.get("tool_calls"):
            content = ""  # a turn that only calls tools
        if content is None:
            raise ValueError(f"row {index}: {key}[{j}] is missing field 'content' (or sharegpt 'value')")
        if not isinstance(content, str):
            raise TypeError(f"row {index}: {key}[{j}] content must be a string, got a {type(content).__name__}")
        canonical = ROLE_NAMES.get(str(role).lower())
        if canonical is None:
            raise ValueError(f"row {index}: {key}[{j}] has unknown role {role!r}; known roles: {sorted(ROLE_NAMES)}")
        message = {k: v for k, v in turn.items() if k not in ("from", "value")}
        message.update(role=canonical, content=content)
        messages.append(message)
    return messages


def _drop_nones(value: Any) -> Any:
    """`value` without the None fields of its dicts, at any depth."""
    if isinstance(value, Mapping):
        return {k: _drop_nones(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_drop_nones(v) for v in value]
    return value


def _string_field(row: Mapping[str, Any], index: int, field: str, format: str) -> str:
    value = row.get(field)
    if value is None:
        raise ValueError(f"row {index}: missing field {field!r} (needed by format {format!r})")
    if not isinstance(value, str):
        raise TypeError(f"row {index}: field {field!r} must be a string, got a {type(value).__name__}")
    return value
