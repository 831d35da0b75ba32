"""Tokenization of each format: token ids, completion-only loss masks (token by token), validation errors."""

import json
import logging

import numpy as np
import pytest

from jaxsloth.data import tokenize_dataset
from tests.test_data_tokenizer import CHATML, CHATML_GENERATION, CHATML_THINK, make_tokenizer

EOS = "<|im_end|>"

CHAT = [
    {
        "messages": [
            {"role": "system", "content": "you are a calculator"},
            {"role": "user", "content": "what is two plus two?"},
            {"role": "assistant", "content": "two plus two is four."},
            {"role": "user", "content": "and the cat?"},
            {"role": "assistant", "content": "the cat sat on the mat"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "hello world"},
            {"role": "assistant", "content": "how are you today?"},
        ]
    },
]
ANSWERS = [["two plus two is four.", "the cat sat on the mat"], ["how are you today?"]]

ALPACA = [
    {"instruction": "add two and two", "input": "", "output": "four"},
    {"instruction": "describe", "input": "the cat", "output": "it sat on the mat"},
]


def trained_runs(tok, example) -> list[str]:
    """Decoded text of each maximal run of trained tokens (position 0 is never a target)."""
    runs, current = [], []
    for j, (token, trained) in enumerate(zip(example.input_ids, example.trained)):
        if trained and j > 0:
            current.append(int(token))
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    return runs


def reference_targets(example) -> list[int]:
    ids, trained = example.input_ids.tolist(), example.trained.tolist()
    return [ids[j + 1] if trained[j + 1] else -100 for j in range(len(ids) - 1)] + [-100]


def test_text_trains_every_token_with_bos_and_eos():
    tok = make_tokenizer()
    texts = ["the cat sat on the mat", "hello world, how are you?"]
    data = tokenize_dataset([{"text": t} for t in texts], tok)
    assert data.format == "text" and len(data) == 2
    for text, ex in zip(texts, data.examples):
        assert ex.input_ids.dtype == np.int32
        assert ex.input_ids.tolist() == [1] + tok(text, add_special_tokens=False)["input_ids"] + [2]
        assert ex.trained.all()
        assert ex.targets().tolist() == reference_targets(ex) == ex.input_ids[1:].tolist() + [-100]


def test_alpaca_trains_output_and_eos_only():
    tok = make_tokenizer()
    data = tokenize_dataset(ALPACA, tok)
    assert data.format == "alpaca"
    for row, ex in zip(ALPACA, data.examples):
        assert trained_runs(tok, ex) == [row["output"] + EOS]
        n_prompt = int(np.argmax(ex.trained))
        prompt = tok.decode(ex.input_ids[:n_prompt].tolist())
        assert prompt.startswith("<s>Below is an instruction")
        assert prompt.endswith(
            f"### Instruction:\n{row['instruction']}\n\n"
            + (f"### Input:\n{row['input']}\n\n" if row["input"] else "")
            + "### Response:\n"
        )
        assert ex.targets().tolist() == reference_targets(ex)


def test_alpaca_train_on_inputs():
    tok = make_tokenizer()
    masked = tokenize_dataset(ALPACA, tok)
    full = tokenize_dataset(ALPACA, tok, train_on_inputs=True)
    for a, b in zip(masked.examples, full.examples):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        assert b.trained.all() and not a.trained.all()


def test_alpaca_with_chat_template():
    tok = make_tokenizer()
    data = tokenize_dataset(ALPACA, tok, use_chat_template=True)
    ex = data.examples[1]
    assert trained_runs(tok, ex) == ["it sat on the mat" + EOS]
    assert tok.decode(ex.input_ids.tolist()).startswith("<|im_start|>user\ndescribe\n\nthe cat<|im_end|>")


def test_messages_train_on_assistant_answers_only():
    tok = make_tokenizer()
    data = tokenize_dataset(CHAT, tok)
    assert data.format == "messages"
    for row, answers, ex in zip(CHAT, ANSWERS, data.examples):
        assert trained_runs(tok, ex) == [a + EOS for a in answers]
        assert tok.decode(ex.input_ids.tolist()) == tok.apply_chat_template(row["messages"], tokenize=False)
        assert ex.targets().tolist() == reference_targets(ex)


def test_messages_train_on_inputs():
    tok = make_tokenizer()
    masked, full = tokenize_dataset(CHAT, tok), tokenize_dataset(CHAT, tok, train_on_inputs=True)
    for a, b in zip(masked.examples, full.examples):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        assert b.trained.all()


def test_sharegpt_aliases_match_messages():
    tok = make_tokenizer()
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = [
        {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in row["messages"]]} for row in CHAT
    ]
    reference = tokenize_dataset(CHAT, tok)
    for fmt in ("auto", "sharegpt", "messages"):
        data = tokenize_dataset(sharegpt, tok, format=fmt)
        assert data.format == "messages"
        for a, b in zip(reference.examples, data.examples):
            np.testing.assert_array_equal(a.input_ids, b.input_ids)
            np.testing.assert_array_equal(a.trained, b.trained)


def test_generation_tag_template_gives_same_mask():
    incremental = tokenize_dataset(CHAT, make_tokenizer(CHATML))
    tagged = tokenize_dataset(CHAT, make_tokenizer(CHATML_GENERATION))
    for a, b in zip(incremental.examples, tagged.examples):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.trained, b.trained)


def test_template_with_think_block_and_leading_assistant_turn():
    tok = make_tokenizer(CHATML_THINK)
    rows = [
        {
            "messages": [
                {"role": "assistant", "content": "hello, how are you?"},
                {"role": "user", "content": "what is two plus two?"},
                {"role": "assistant", "content": "four"},
            ]
        }
    ]
    (ex,) = tokenize_dataset(rows, tok).examples
    # After a generation prompt the model itself writes the think block, so it is trained; a leading turn
    # has no prompt to diff against and is trained from its answer text.
    assert trained_runs(tok, ex) == ["hello, how are you?" + EOS, "<think>\n\n</think>\n\nfour" + EOS]
    assert tok.decode(ex.input_ids.tolist()).startswith("<|im_start|>system\nyou are helpful")


def test_template_that_rewrites_history_is_rejected():
    # Marks the final turn differently, so a prefix of the conversation renders differently from the whole.
    unstable = (
        "{% for m in messages %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' }}"
        "{% if loop.last %}{{ '<s>' }}{% endif %}{{ '\\n' }}"
        "{% endfor %}"
    )
    with pytest.raises(ValueError, match="renders turns 0..2 differently"):
        tokenize_dataset(CHAT, make_tokenizer(unstable))
    tokenize_dataset(CHAT, make_tokenizer(unstable), train_on_inputs=True)


def test_reads_a_file_path(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in CHAT))
    data = tokenize_dataset(path, make_tokenizer())
    assert len(data) == 2 and data.row_index.tolist() == [0, 1]


def test_missing_field_names_row_and_field():
    rows = ALPACA + [{"instruction": "no answer", "input": ""}]
    with pytest.raises(ValueError, match="row 2: missing field 'output'"):
        tokenize_dataset(rows, make_tokenizer())
    with pytest.raises(TypeError, match="row 1: field 'output' must be a string"):
        tokenize_dataset([ALPACA[0], {"instruction": "x", "output": 5}], make_tokenizer())
    with pytest.raises(ValueError, match="row 0: missing field 'text'"):
        tokenize_dataset([{"body": "x"}], make_tokenizer(), format="text")
    bad_turn = [CHAT[0], {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}]
    with pytest.raises(ValueError, match=r"row 1: messages\[1\] is missing field 'content'"):
        tokenize_dataset(bad_turn, make_tokenizer())
    bad_role = [{"conversations": [{"from": "narrator", "value": "once"}]}]
    with pytest.raises(ValueError, match="row 0: conversations\\[0\\] has unknown role 'narrator'"):
        tokenize_dataset(bad_role, make_tokenizer())


def test_token_id_beyond_vocab():
    tok = make_tokenizer()
    maxes = [int(e.input_ids.max()) for e in tokenize_dataset(ALPACA, tok).examples]
    vocab = max(maxes)
    row = next(i for i, m in enumerate(maxes) if m >= vocab)
    with pytest.raises(ValueError, match=f"row {row}: token id {maxes[row]} >= the model's vocab_size {vocab}"):
        tokenize_dataset(ALPACA, tok, vocab_size=vocab)
    tokenize_dataset(ALPACA, tok, vocab_size=len(tok))


def test_chat_needs_a_template():
    tok = make_tokenizer(chat_template=None)
    with pytest.raises(ValueError, match="format 'messages' needs a chat template"):
        tokenize_dataset(CHAT, tok)
    with pytest.raises(ValueError, match="use_chat_template=True needs a chat template"):
        tokenize_dataset(ALPACA, tok, use_chat_template=True)
    assert tokenize_dataset(ALPACA, tok).format == "alpaca"


def test_truncation_counted_and_logged(caplog):
    tok = make_tokenizer()
    rows = [{"text": "the cat sat on the mat " * 8}, {"text": "hi"}, {"text": "the dog sat on the log " * 8}]
    full = tokenize_dataset(rows, tok)
    limit = 12
    long_rows = sum(len(e) > limit for e in full.examples)
    assert long_rows == 2
    with caplog.at_level(logging.WARNING, logger="jaxsloth.data.tokenization"):
        data = tokenize_dataset(rows, tok, max_seq_length=limit)
    assert data.num_truncated == 2
    assert "truncated 2 of 3 examples to max_seq_length=12" in caplog.text
    for a, b in zip(full.examples, data.examples):
        np.testing.assert_array_equal(a.input_ids[:limit], b.input_ids)
        assert b.targets()[-1] == -100
    with pytest.raises(ValueError, match=f"row 0: {len(full.examples[0])} tokens > max_seq_length 12"):
        tokenize_dataset(rows, tok, max_seq_length=limit, truncate=False)


def test_examples_left_without_answer_are_dropped(caplog):
    tok = make_tokenizer()
    prompt_len = int(np.argmax(tokenize_dataset(CHAT, tok).examples[0].trained))
    with caplog.at_level(logging.WARNING, logger="jaxsloth.data.tokenization"):
        data = tokenize_dataset(CHAT, tok, max_seq_length=prompt_len)
    assert data.num_dropped == 1 and data.row_index.tolist() == [1]
    assert "dropped 1 of 2 examples" in caplog.text
    with pytest.raises(ValueError, match="none of the 2 examples has a trained token"):
        tokenize_dataset(CHAT, tok, max_seq_length=4)


def test_bad_options():
    with pytest.raises(ValueError, match="unknown dataset format 'csv'"):
        tokenize_dataset(ALPACA, make_tokenizer(), format="csv")
    with pytest.raises(ValueError, match="max_seq_length must be >= 2"):
        tokenize_dataset(ALPACA, make_tokenizer(), max_seq_length=1)
    with pytest.raises(ValueError, match="dataset is empty"):
        tokenize_dataset([], make_tokenizer())
