"""Data sources (JSONL, JSON, Parquet, lists, Dataset-like objects) and format detection."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxsloth.data import detect_format, load_records

ROWS = [
    {"instruction": "add 2 and 3", "input": "", "output": "5"},
    {"instruction": "name a colour", "input": "warm", "output": "red"},
    {"instruction": "say hi", "input": "to Bob", "output": "hi Bob"},
]


class FakeDataset:
    """Quacks like a `datasets.Dataset`: column_names, len, and iteration over dict rows."""

    def __init__(self, rows):
        self._rows = rows
        self.column_names = list(rows[0]) if rows else []

    def __len__(self):
        return len(self._rows)

    def __iter__(self):
        return (dict(r) for r in self._rows)


def test_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    assert load_records(path) == ROWS
    assert load_records(str(path)) == ROWS


def test_json_list_and_data_object(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(ROWS))
    b.write_text(json.dumps({"data": ROWS, "version": 1}))
    assert load_records(a) == ROWS
    assert load_records(b) == ROWS


def test_json_file_holding_json_lines(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("\n".join(json.dumps(r) for r in ROWS))
    assert load_records(path) == ROWS


def test_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert load_records(path) == ROWS


def test_dataset_like_object_and_list():
    assert load_records(FakeDataset(ROWS)) == ROWS
    assert load_records(ROWS) == ROWS


def test_split_mapping_rejected():
    with pytest.raises(TypeError, match=r"dataset\['train'\]"):
        load_records({"train": FakeDataset(ROWS)})


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_empty_file(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    if suffix == ".parquet":
        pq.write_table(pa.table({"text": pa.array([], pa.string())}), path)
    else:
        path.write_text("[]" if suffix == ".json" else "\n")
    with pytest.raises(ValueError, match="dataset is empty"):
        load_records(path)


def test_empty_dataset_object():
    with pytest.raises(ValueError, match="dataset is empty: FakeDataset"):
        load_records(FakeDataset([]))


def test_bad_inputs(tmp_path):
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(ValueError, match="line 2: invalid JSON"):
        load_records(bad_line)
    with pytest.raises(TypeError, match="row 1 of list is a str"):
        load_records([{"text": "a"}, "b"])
    other = tmp_path / "d.xlsx"
    other.write_text("text\na\n")
    with pytest.raises(ValueError, match="unknown dataset file type '.xlsx'"):
        load_records(other)
    with pytest.raises(ValueError, match="not found"):
        load_records(tmp_path / "missing.jsonl")
    obj = tmp_path / "o.json"
    obj.write_text(json.dumps({"rows": ROWS}))
    with pytest.raises(ValueError, match="'data' list"):
        load_records(obj)


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"text": "x"}, "text"),
        ({"instruction": "i", "input": "", "output": "o"}, "alpaca"),
        ({"instruction": "i", "output": "o", "text": "t"}, "alpaca"),
        ({"messages": []}, "messages"),
        ({"conversations": [], "text": "t"}, "messages"),
    ],
)
def test_detect_format(row, expected):
    assert detect_format(row) == expected


def test_detect_format_unknown_names_keys():
    with pytest.raises(ValueError, match=r"\['prompt', 'response'\]"):
        detect_format({"prompt": "p", "response": "r"})
