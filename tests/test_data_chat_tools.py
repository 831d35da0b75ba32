"""Formats beyond text/alpaca/messages: TRL's prompt-completion (standard and conversational), a named text column,
and tool-calling chats, whose trained tokens must be exactly the assistant's in the template's own rendering."""

import json
import re

import datasets
import pytest

from jaxsloth.data import detect_format, tokenize_dataset
from tests.test_data_formats import trained_runs
from tests.test_data_tokenizer import make_tokenizer

# Qwen 2.5's layout of tools: the schemas in the system turn, calls as <tool_call> JSON inside the assistant turn,
# consecutive tool results in one user turn of <tool_response> blocks.
TOOL_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'you are helpful' }}{%- endif %}"
    "{{- '\n\n# Tools\n<tools>' }}"
    "{%- for tool in tools %}{{- '\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\n</tools><|im_end|>\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\n' }}"
    "{%- if message.content %}{{- message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls | default([]) %}"
    "{%- if loop.first and message.content %}{{- '\n' }}{%- endif %}"
    "{%- set call = tool_call.function if tool_call.function is defined else tool_call %}"
    '{{- \'<tool_call>\n{"name": "\' + call.name + \'", "arguments": \' }}'
    "{%- if call.arguments is string %}{{- call.arguments }}{%- else %}{{- call.arguments | tojson }}{%- endif %}"
    "{{- '}\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "add two numbers",
        "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}},
    },
}
TOOL_ROWS = [
    {
        "tools": [WEATHER, ADD],
        "messages": [
            {"role": "user", "content": "what is the weather in Paris and two plus two?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                    {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}},
                ],
            },
            {"role": "tool", "name": "get_weather", "content": "sunny"},
            {"role": "tool", "name": "add", "content": "4"},
            {"role": "assistant", "content": "it is sunny, and two plus two is four."},
        ],
    },
    {
        "tools": [WEATHER],
        "messages": [
            {"role": "system", "content": "you are a calculator"},
            {"role": "user", "content": "hello world"},
            {"role": "assistant", "content": "how are you today?"},
        ],
    },
]

ASSISTANT = re.compile(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", re.DOTALL)


def assistant_texts(tok, row) -> list[str]:
    """What each assistant turn adds to the template's own rendering (answer, calls and end-of-turn token)."""
    text = tok.apply_chat_template(row["messages"], tools=row.get("tools"), tokenize=False)
    return ASSISTANT.findall(text)


@pytest.mark.parametrize("as_dataset", [False, True])
def test_tool_calls_train_exactly_the_assistant_turns(as_dataset):
    tok = make_tokenizer(TOOL_TEMPLATE)
    # Through Arrow, fields one message lacks come back as None on it (tool_calls on the user turn...).
    rows = datasets.Dataset.from_list(TOOL_ROWS) if as_dataset else TOOL_ROWS
    data = tokenize_dataset(rows, tok)
    assert data.format == "messages" and len(data) == 2
    first = assistant_texts(tok, TOOL_ROWS[0])
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in first[0]
    for example, row in zip(data.examples, TOOL_ROWS, strict=True):
        assert trained_runs(tok, example) == assistant_texts(tok, row)
        rendered = tok.apply_chat_template(row["messages"], tools=row["tools"], tokenize=False)
        assert tok.decode(example.input_ids) == rendered  # the schemas and tool results are in the input


def test_tools_as_a_json_string_column():
    tok = make_tokenizer(TOOL_TEMPLATE)
    row = {**TOOL_ROWS[1], "tools": json.dumps(TOOL_ROWS[1]["tools"])}
    a, b = tokenize_dataset([row], tok), tokenize_dataset(TOOL_ROWS[1:], tok)
    assert a.examples[0].input_ids.tolist() == b.examples[0].input_ids.tolist()


def test_prompt_completion_standard_trains_the_completion_and_eos():
    tok = make_tokenizer()
    rows = [{"prompt": "the cat sat on", "completion": " the mat"}, {"prompt": "hello", "completion": " world"}]
    assert detect_format(rows[0]) == "prompt_completion"
    data = tokenize_dataset(rows, tok)
    for example, row in zip(data.examples, rows, strict=True):
        assert tok.decode(example.input_ids) == "<s>" + row["prompt"] + row["completion"] + "<|im_end|>"
        assert trained_runs(tok, example) == [row["completion"] + "<|im_end|>"]
    everything = tokenize_dataset(rows, tok, train_on_inputs=True)
    assert everything.examples[0].trained[1:].all()


def test_prompt_completion_conversational_trains_only_the_completion():
    tok = make_tokenizer()
    row = {
        "prompt": [
            {"role": "user", "content": "hello world"},
            {"role": "assistant", "content": "the cat sat"},  # a few-shot turn of the prompt: context only
            {"role": "user", "content": "what is two plus two?"},
        ],
        "completion": [{"role": "assistant", "content": "two plus two is four."}],
    }
    data = tokenize_dataset([row], tok)
    example = data.examples[0]
    rendered = tok.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
    assert tok.decode(example.input_ids) == rendered
    assert trained_runs(tok, example) == ["two plus two is four.<|im_end|>"]


def test_dataset_text_field_trains_a_named_column():
    tok = make_tokenizer()
    rows = [{"body": "the cat sat on the mat", "id": 1}, {"body": "hello world", "id": 2}]
    data = tokenize_dataset(rows, tok, text_field="body")
    reference = tokenize_dataset([{"text": r["body"]} for r in rows], tok)
    assert data.format == "text"
    assert [e.input_ids.tolist() for e in data.examples] == [e.input_ids.tolist() for e in reference.examples]
    with pytest.raises(
        ValueError, match=r"dataset_text_field 'content' is not a column; the columns: \['body', 'id'\]"
    ):
        tokenize_dataset(rows, tok, text_field="content")
    with pytest.raises(ValueError, match="needs format 'text', not 'alpaca'"):
        tokenize_dataset(rows, tok, text_field="body", format="alpaca")
