"""Data through the datasets library: file formats, dataset folders, Hub ids (offline), Dataset objects, the
tokenization cache, and the one-line errors a data file can cause."""

import json

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxsloth.data import load_records, open_dataset, tokenize_dataset
from jaxsloth.data import tokenization as tokenization_module
from tests.test_data_tokenizer import make_tokenizer

ROWS = [
    {"instruction": "add two and two", "input": "", "output": "four"},
    {"instruction": "describe", "input": "the cat", "output": "it sat on the mat"},
    {"instruction": "say hi", "input": "to Bob", "output": "hi Bob"},
]
CHAT = [
    {"messages": [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "how are you?"}]},
    {"messages": [{"role": "user", "content": "what is two plus two?"}, {"role": "assistant", "content": "four"}]},
]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """A private datasets cache, and no Hub: everything here is read from disk."""
    cache = tmp_path / "datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def same_examples(a, b):
    assert len(a) == len(b) and a.format == b.format
    for x, y in zip(a.examples, b.examples, strict=True):
        np.testing.assert_array_equal(x.input_ids, y.input_ids)
        np.testing.assert_array_equal(x.trained, y.trained)
    np.testing.assert_array_equal(a.row_index, b.row_index)


def test_every_file_format_gives_the_same_rows(tmp_path):
    table = pa.Table.from_pylist(ROWS)
    pq.write_table(table, tmp_path / "d.parquet")
    (tmp_path / "d.csv").write_text(
        "instruction,input,output\n" + "".join(f'"{r["instruction"]}","{r["input"]}","{r["output"]}"\n' for r in ROWS)
    )
    (tmp_path / "d.tsv").write_text(
        "instruction\tinput\toutput\n" + "".join(f"{r['instruction']}\t{r['input']}\t{r['output']}\n" for r in ROWS)
    )
    datasets.Dataset.from_list(ROWS).to_parquet(tmp_path / "unused.parquet")
    with pa.OSFile(str(tmp_path / "d.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    for name in ("d.parquet", "d.arrow"):
        assert load_records(tmp_path / name) == ROWS, name
    for name in ("d.csv", "d.tsv"):  # CSV has no empty string: an empty field reads as missing
        assert load_records(tmp_path / name) == [{**r, "input": r["input"] or None} for r in ROWS], name
    (tmp_path / "d.txt").write_text("the cat sat\non the mat\n")
    assert load_records(tmp_path / "d.txt") == [{"text": "the cat sat"}, {"text": "on the mat"}]


def test_files_are_tokenized_through_datasets_like_lists(tmp_path):
    tok = make_tokenizer()
    path = write_jsonl(tmp_path / "chat.jsonl", CHAT)
    assert isinstance(open_dataset(path), datasets.Dataset)
    same_examples(tokenize_dataset(path, tok), tokenize_dataset(CHAT, tok))
    same_examples(tokenize_dataset(datasets.Dataset.from_list(ROWS), tok), tokenize_dataset(ROWS, tok))


def test_tokenization_is_cached_on_disk(tmp_path, monkeypatch):
    tok = make_tokenizer()
    path = write_jsonl(tmp_path / "alpaca.jsonl", ROWS * 4)
    calls = []
    encode = tokenization_module._encode
    monkeypatch.setattr(tokenization_module, "_encode", lambda *a: calls.append(1) or encode(*a))
    first = tokenize_dataset(path, tok)
    assert calls, "the first run tokenizes"
    calls.clear()
    same_examples(tokenize_dataset(path, make_tokenizer()), first)  # a fresh but identical tokenizer
    assert not calls, "the second run must read the cached tokens"
    tokenize_dataset(path, tok, train_on_inputs=True)
    assert calls, "other settings are another cache entry"
    calls.clear()
    other = make_tokenizer(chat_template=None)
    other.add_tokens(["mat"])
    tokenize_dataset(path, other)
    assert calls, "another tokenizer is another cache entry"


def test_num_proc_gives_the_same_examples(tmp_path):
    tok = make_tokenizer()
    path = write_jsonl(tmp_path / "chat.jsonl", CHAT * 3)
    same_examples(tokenize_dataset(path, tok, num_proc=2), tokenize_dataset(CHAT * 3, tok))


def test_dataset_folder_laid_out_like_a_hub_repo(tmp_path):
    repo = tmp_path / "org_set"
    (repo / "data").mkdir(parents=True)
    write_jsonl(repo / "data" / "train-00000-of-00001.jsonl", ROWS)
    write_jsonl(repo / "data" / "test-00000-of-00001.jsonl", ROWS[:1])
    assert load_records(repo) == ROWS
    assert load_records(repo, split="test") == ROWS[:1]
    with pytest.raises(ValueError, match=r'dataset folder .*org_set.*"validation"'):
        load_records(repo, split="validation")
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(saved)
    assert load_records(saved) == ROWS


def test_hub_id_goes_to_load_dataset_with_split_and_config(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    write_jsonl(repo / "train.jsonl", ROWS)
    seen = []
    real = datasets.load_dataset

    def hub(path, name=None, **kwargs):
        seen.append((path, name, kwargs["split"], kwargs["streaming"]))
        return real(str(repo), split=kwargs["split"], streaming=kwargs["streaming"])

    monkeypatch.setattr(datasets, "load_dataset", hub)
    assert load_records("yahma/alpaca-cleaned", name="default") == ROWS
    assert seen == [("yahma/alpaca-cleaned", "default", "train", False)]
    assert list(open_dataset("yahma/alpaca-cleaned", streaming=True)) == ROWS


def test_hub_id_not_cached_offline_is_one_line():
    with pytest.raises(FileNotFoundError) as e:
        load_records("nobody-here/no-such-set")
    assert "'nobody-here/no-such-set'" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="dataset file not found: 'missing.jsonl'"):
        load_records("missing.jsonl")  # a file name is never taken for a Hub id


def test_dataset_dict_and_iterable_objects():
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])})
    assert load_records(dd, split="test") == ROWS[:1]
    with pytest.raises(ValueError, match=r"no split 'dev'; its splits: \['test', 'train'\]"):
        open_dataset(dd, split="dev")
    stream = datasets.Dataset.from_list(ROWS).to_iterable_dataset()
    assert open_dataset(stream) is stream


# --- one-line errors naming the file and row / line -----------------------------------------------------------


def test_non_utf8_names_file_and_line(tmp_path):
    for suffix in (".jsonl", ".csv", ".txt"):
        path = tmp_path / f"latin1{suffix}"
        path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
        with pytest.raises(ValueError, match=rf"latin1\{suffix}' line 2: not UTF-8"):
            load_records(path)


def test_directory_without_data_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="'.*empty' is a directory with no data files"):
        load_records(tmp_path / "empty")


def test_unknown_format_names_columns_and_formats(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError) as e:
        tokenize_dataset(path, make_tokenizer())
    message = str(e.value)
    assert "['answer', 'question']" in message and "prompt'+'completion" in message and "alpaca" in message
    assert "dataset_text_field" in message and "\n" not in message


STRICT = (
    "{% for m in messages %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
)


def test_strict_template_rejection_names_file_and_row(tmp_path):
    bad = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [*CHAT, bad])
    with pytest.raises(ValueError) as e:
        tokenize_dataset(path, make_tokenizer(STRICT))
    message = str(e.value)
    assert message.startswith(f"{path} row 2: the chat template rejects this conversation")
    assert "roles must alternate" in message and "\n" not in message


def test_missing_field_in_a_file_names_file_and_row(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [ROWS[0], {"instruction": "no output", "output": None}])
    with pytest.raises(ValueError, match=r"a\.jsonl row 1: missing field 'output'"):
        tokenize_dataset(path, make_tokenizer())
