"""jaxsloth inspect-data on the demo data and tokenizer: examples rendered with their trained tokens marked, counts
checked against the chat template rendered by transformers directly; and the refusal of data with no trained token,
naming the cause."""

import json
import math
import re

import pytest

from jaxsloth import cli, demo
from jaxsloth.api import load_tokenizer
from jaxsloth.data import tokenize_dataset
from jaxsloth.data.inspect import ANSI_RESET, ANSI_TRAINED

DATA = demo.ASSETS / "train.jsonl"


@pytest.fixture(scope="module")
def rows():
    return [json.loads(line) for line in DATA.read_text().splitlines()]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(demo.MODEL_DIR)


def _expected(rows, tokenizer, max_seq_length):
    """Counts from transformers' own rendering: whole conversations, and the prompt before the assistant's answer
    (the answer and its end-of-turn token are the trained tokens)."""
    examples = tokens = trained = truncated = dropped = 0
    for row in rows:
        full = len(tokenizer.apply_chat_template(row["messages"], tokenize=True)["input_ids"])
        prompt = len(tokenizer.apply_chat_template(row["messages"][:1], tokenize=True, add_generation_prompt=True)
                     ["input_ids"])  # fmt: skip
        kept = min(full, max_seq_length)
        truncated += full > max_seq_length
        if kept <= prompt:
            dropped += 1
            continue
        examples, tokens, trained = examples + 1, tokens + kept, trained + kept - prompt
    return examples, tokens, trained, truncated, dropped


def _count(out, name):
    return int(re.search(rf"^{name}:\s+(\d+)", out, re.M).group(1))


def _inspect(capsys, *flags):
    code = cli.main(["inspect-data", *map(str, flags)])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


@pytest.mark.parametrize("max_seq_length", [64, 10])
def test_counts_match_the_chat_template(capsys, rows, tokenizer, max_seq_length):
    out = _inspect(capsys, "--model", demo.MODEL_DIR, "--data", DATA, "--max-seq-length", max_seq_length)
    examples, tokens, trained, truncated, dropped = _expected(rows, tokenizer, max_seq_length)
    assert f"examples:            {examples} (of {len(rows)} rows)" in out
    assert (_count(out, "tokens"), _count(out, "trained tokens")) == (tokens, trained)
    assert (_count(out, "truncated examples"), _count(out, "dropped examples")) == (truncated, dropped)
    if max_seq_length == 10:  # some rows are cut, some of those lose the whole answer
        assert 0 < dropped < truncated < len(rows)
    packed_rows = _count(out, "rows")
    assert math.ceil(tokens / max_seq_length) <= packed_rows <= examples
    if max_seq_length == 64:
        assert packed_rows < examples / 3  # the demo's short examples: at least three share a row
    efficiency = float(re.search(r"packing efficiency:\s+([\d.]+)%", out).group(1))
    assert efficiency == pytest.approx(100 * tokens / (packed_rows * max_seq_length), abs=0.05)


def test_examples_show_the_trained_answer(capsys, rows):
    out = _inspect(capsys, "--model", demo.MODEL_DIR, "--data", DATA, "--num-examples", 2)
    for row in rows[:2]:
        user, answer = (m["content"] for m in row["messages"])
        assert f"<|user|>{user}<|end|><|assistant|>[[{answer}<|end|>]]" in out
    assert out.count("--- example") == 2
    out = _inspect(capsys, "--model", demo.MODEL_DIR, "--data", DATA, "--num-examples", 1, "--color", "--no-packing")
    answer = rows[0]["messages"][1]["content"]
    assert f"{ANSI_TRAINED}{answer}<|end|>{ANSI_RESET}" in out and "[[" not in out
    assert _count(out, "rows") == len(rows)  # one example per row


def test_reads_an_axolotl_config(capsys, tmp_path, rows):
    config = tmp_path / "axolotl.yml"
    config.write_text(
        f"base_model: {demo.MODEL_DIR}\nadapter: lora\nsequence_len: 64\ntrain_on_inputs: true\n"
        f"datasets:\n  - path: {DATA}\n    type: chat_template\n"
    )
    out = _inspect(capsys, config, "--num-examples", 1)
    user, answer = (m["content"] for m in rows[0]["messages"])
    assert f"[[{user}<|end|><|assistant|>{answer}<|end|>]]" in out  # train_on_inputs: all but the first token


def test_all_masked_data_is_refused_naming_the_cause(tmp_path, tokenizer, capsys):
    prompts_only = tmp_path / "prompts.jsonl"
    prompts_only.write_text(json.dumps({"messages": [{"role": "user", "content": "abc"}]}) + "\n")
    code = cli.main(["inspect-data", "--model", str(demo.MODEL_DIR), "--data", str(prompts_only)])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE
    assert "none of the 1 examples has a trained token" in err and "no conversation has an assistant turn" in err
    with pytest.raises(ValueError, match="max_seq_length=6 truncates every answer away") as e:
        tokenize_dataset(DATA, tokenizer, max_seq_length=6)  # no prompt is shorter
    assert "400 examples lost theirs" in str(e.value)
