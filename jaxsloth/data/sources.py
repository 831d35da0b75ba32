"""Reading records (dict rows) from JSONL, JSON and Parquet files, lists, or `datasets.Dataset` objects."""

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

Record = dict[str, Any]

_JSONL_SUFFIXES = (".jsonl", ".jsonlines", ".ndjson")
_JSON_SUFFIXES = (".json",)
_PARQUET_SUFFIXES = (".parquet", ".pq")


def load_records(source: str | os.PathLike | Iterable[Mapping[str, Any]]) -> list[Record]:
    """Load a dataset as a list of dict rows.

    source: a path to a `.jsonl`, `.json` (a list of records or {"data": [...]}) or `.parquet` file; a list
    of dicts; or any object iterating dict rows, like a Hugging Face `datasets.Dataset` (duck-typed, so the
    `datasets` package is never imported here). A `DatasetDict` must be indexed by split first.

    Raises ValueError for an empty dataset, an unknown file type or malformed JSON (with the line number),
    TypeError for a row that is not a mapping (with the row number).
    """
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"dataset file not found: {str(path)!r}")
        rows = _read_file(path)
        name = str(path)
    elif isinstance(source, Mapping):
        # A DatasetDict (or any split mapping) is ambiguous: the user must choose the split.
        raise TypeError(
            f"got a mapping with keys {sorted(map(str, source))[:8]}; pass one split, e.g. dataset['train']"
        )
    elif isinstance(source, Iterable):
        rows = list(source)
        name = type(source).__name__
    else:
        raise TypeError(f"cannot read records from a {type(source).__name__}; give a path, a list or a Dataset")
    if not rows:
        raise ValueError(f"dataset is empty: {name}")
    records = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"row {i} of {name} is a {type(row).__name__}, expected a dict of fields")
        records.append(dict(row))
    return records


def _read_file(path: Path) -> list[Any]:
    suffix = path.suffix.lower()
    if suffix in _JSONL_SUFFIXES:
        return _read_jsonl(path)
    if suffix in _JSON_SUFFIXES:
        return _read_json(path)
    if suffix in _PARQUET_SUFFIXES:
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    known = _JSONL_SUFFIXES + _JSON_SUFFIXES + _PARQUET_SUFFIXES
    raise ValueError(f"unknown dataset file type {suffix!r} for {str(path)!r}; expected one of {known}")


def _read_jsonl(path: Path) -> list[Any]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{str(path)!r} line {line_no}: invalid JSON ({e.msg})") from None
    return rows


def _read_json(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        # Many ".json" datasets are really JSON Lines; read them as such rather than failing.
        if e.msg == "Extra data":
            return _read_jsonl(path)
        raise ValueError(f"{str(path)!r} line {e.lineno}: invalid JSON ({e.msg})") from None
    if isinstance(data, Mapping):
        if "data" not in data or not isinstance(data["data"], list):
            raise ValueError(f"{str(path)!r}: a JSON object must hold its records in a 'data' list")
        return data["data"]
    if not isinstance(data, list):
        raise ValueError(f"{str(path)!r}: expected a list of records, got a {type(data).__name__}")
    return data
