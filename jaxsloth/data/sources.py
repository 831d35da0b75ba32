"""Reading records (dict rows): files of any format the `datasets` library reads, dataset folders and Hub ids
(through `datasets.load_dataset`, so its Arrow cache is reused), lists of dicts, and `datasets` objects."""

import codecs
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

Record = dict[str, Any]

_JSONL_SUFFIXES = (".jsonl", ".jsonlines", ".ndjson")
_JSON_SUFFIXES = (".json",)
_PARQUET_SUFFIXES = (".parquet", ".pq")
# Data files by suffix -> the `datasets` builder that reads them.
DATA_FILE_BUILDERS = {
    **dict.fromkeys(_JSONL_SUFFIXES + _JSON_SUFFIXES, "json"),
    **dict.fromkeys(_PARQUET_SUFFIXES, "parquet"),
    ".csv": "csv",
    ".tsv": "csv",
    ".arrow": "arrow",
    ".txt": "text",
}
_TEXT_BUILDERS = ("json", "csv", "text")


def load_records(source: str | os.PathLike | Iterable[Mapping[str, Any]], **where: Any) -> list[Record]:
    """Load a dataset as a list of dict rows (the whole dataset in memory; see `open_dataset`).

    source: anything `open_dataset` accepts (where: its split/name); a list of dicts, or any object iterating
    dict rows. A `DatasetDict` must be indexed by split first.

    Raises ValueError for an empty dataset, an unknown file type or malformed JSON (with the line number),
    TypeError for a row that is not a mapping (with the row number).
    """
    data = open_dataset(source, **where)
    if isinstance(data, list):
        return data
    return _check_rows(list(data), _describe(source))


def open_dataset(
    source: Any, *, split: str = "train", name: str | None = None, streaming: bool = False
) -> "list[Record] | Any":
    """The rows of `source`, as a list of dicts or a `datasets.Dataset` / `datasets.IterableDataset`.

    source: a data file (.jsonl/.json/.parquet/.csv/.tsv/.arrow/.txt); a folder `datasets.load_dataset` reads
    (data files, a Hub-style dataset repository) or one written by `Dataset.save_to_disk`; a Hub dataset id
    ("org/name", honouring HF_HUB_OFFLINE, HF_TOKEN and the datasets cache); a `datasets.Dataset`,
    `IterableDataset` or `DatasetDict` (then `split` is taken); a list of dicts or any iterable of them.
    split, name: the split and configuration of a folder, Hub id or DatasetDict (files have one split).
    streaming: give a `datasets.IterableDataset` read lazily, in order, for files, folders and Hub ids.

    Files and folders come back as datasets memory-mapped from the `datasets` cache, so tokenizing them with
    `datasets.map` is cached too; lists stay lists. Errors are one line naming the file, line or id.
    """
    if isinstance(source, str | os.PathLike):
        return _open_path(os.fspath(source), split, name, streaming)
    kind = type(source).__name__
    if kind in ("Dataset", "IterableDataset") and hasattr(source, "column_names"):
        if kind == "Dataset" and len(source) == 0:
            raise ValueError(f"dataset is empty: {kind}")
        return source
    if isinstance(source, Mapping):
        if kind in ("DatasetDict", "IterableDatasetDict"):
            if split not in source:
                raise ValueError(f"the {kind} has no split {split!r}; its splits: {sorted(source)}")
            return open_dataset(source[split])
        # Any other mapping of splits is ambiguous: the user must choose the split.
        raise TypeError(
            f"got a mapping with keys {sorted(map(str, source))[:8]}; pass one split, e.g. dataset['train']"
        )
    if isinstance(source, Iterable):
        return _check_rows(list(source), kind)
    raise TypeError(f"cannot read records from a {kind}; give a path, a list or a Dataset")


def _describe(source: Any) -> str:
    return os.fspath(source) if isinstance(source, str | os.PathLike) else type(source).__name__


def _check_rows(rows: list[Any], name: str) -> list[Record]:
    if not rows:
        raise ValueError(f"dataset is empty: {name}")
    records = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"row {i} of {name} is a {type(row).__name__}, expected a dict of fields")
        records.append(dict(row))
    return records


def _open_path(name: str, split: str, config: str | None, streaming: bool):
    path = Path(name).expanduser()
    if path.is_file():
        return _open_file(path, streaming)
    if path.is_dir():
        return _open_dir(path, split, config, streaming)
    from jaxsloth.hub import looks_like_repo_id

    if path.suffix.lower() in DATA_FILE_BUILDERS or not looks_like_repo_id(name):
        raise ValueError(f"dataset file not found: {name!r}")
    return _open_hub(name, split, config, streaming)


def _open_file(path: Path, streaming: bool):
    suffix = path.suffix.lower()
    builder = DATA_FILE_BUILDERS.get(suffix)
    if builder is None:
        known = ", ".join(DATA_FILE_BUILDERS)
        raise ValueError(f"unknown dataset file type {suffix!r} for {str(path)!r}; expected one of {known}")
    if builder in _TEXT_BUILDERS:
        _check_utf8(path)
    options = {}
    if suffix in _JSON_SUFFIXES:
        # One JSON document (else JSON Lines): validate it with line-numbered errors; an object keeps its
        # records in "data".
        rows = _read_json(path)
        if not rows:
            raise ValueError(f"dataset is empty: {path}")
        if path.read_text(encoding="utf-8").lstrip().startswith("{") and not _is_json_lines(path):
            options["field"] = "data"
    if builder == "parquet":
        import pyarrow.parquet as pq

        if pq.ParquetFile(path).metadata.num_rows == 0:  # datasets' reader fails on it with no clear word
            raise ValueError(f"dataset is empty: {path}")
    if suffix == ".tsv":
        options["delimiter"] = "\t"
    import datasets

    try:
        data = datasets.load_dataset(builder, data_files=str(path), split="train", streaming=streaming, **options)
    except Exception as e:
        if builder == "json":
            # datasets says only "an error occurred"; our own reader names the line (or copes with the odd file).
            rows = _read_json_file(path)
            return _check_rows(rows, str(path))
        if _is_empty_split(e):
            raise ValueError(f"dataset is empty: {path}") from None
        raise ValueError(f"{str(path)!r}: cannot be read as {builder} ({_first_line(e)})") from None
    if not streaming and len(data) == 0:
        raise ValueError(f"dataset is empty: {path}")
    return data


def _open_dir(path: Path, split: str, config: str | None, streaming: bool):
    import datasets

    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        data = datasets.load_from_disk(str(path))  # written by save_to_disk
        if isinstance(data, Mapping):
            data = open_dataset(data, split=split)
        return data.to_iterable_dataset() if streaming else data
    try:
        return datasets.load_dataset(str(path), config, split=split, streaming=streaming)
    except datasets.data_files.EmptyDatasetError:
        known = ", ".join(DATA_FILE_BUILDERS)
        raise ValueError(
            f"{str(path)!r} is a directory with no data files; give a data file ({known}) or a dataset folder"
        ) from None
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"dataset folder {str(path)!r}: {_first_line(e)}") from None


def _open_hub(repo_id: str, split: str, config: str | None, streaming: bool):
    import datasets

    try:
        return datasets.load_dataset(repo_id, config, split=split, streaming=streaming)
    except datasets.exceptions.DatasetNotFoundError as e:
        raise FileNotFoundError(
            f"dataset {repo_id!r}: no such file or folder, and not found on the Hugging Face Hub ({_first_line(e)})"
        ) from None
    except (ConnectionError, OSError) as e:
        raise FileNotFoundError(
            f"dataset {repo_id!r}: no such file or folder, and not loadable from the Hub or its cache "
            f"({_first_line(e)})"
        ) from None
    except ValueError as e:  # an unknown split or configuration
        raise ValueError(f"dataset {repo_id!r}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    while e.__cause__ is not None and type(e).__name__ == "DatasetGenerationError":
        e = e.__cause__  # "an error occurred while generating the dataset": the cause says which
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def _is_empty_split(e: BaseException) -> bool:
    return "corresponds to no data" in str(e)


def _check_utf8(path: Path, chunk: int = 1 << 22) -> None:
    """Raise ValueError naming the line of the first byte that is not UTF-8 (read in chunks: any size works).

    Arrow's readers would otherwise carry the bad bytes into string columns and fail much later."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    lines = 1
    with path.open("rb") as f:
        while block := f.read(chunk):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                line = lines + block.count(b"\n", 0, max(e.start, 0))
                raise ValueError(
                    f"{str(path)!r} line {line}: not UTF-8 text ({e.reason} at byte {e.object[e.start : e.start + 1]!r}); "
                    "re-save the file as UTF-8"
                ) from None
            lines += block.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise ValueError(f"{str(path)!r} line {lines}: not UTF-8 text (truncated character at the end)") from None


def _is_json_lines(path: Path) -> bool:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return True
    return False


def _read_json_file(path: Path) -> list[Any]:
    return _read_jsonl(path) if path.suffix.lower() in _JSONL_SUFFIXES else _read_json(path)


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
