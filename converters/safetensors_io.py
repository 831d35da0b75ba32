"""A small, strict safetensors reader/writer on numpy memory maps.

Our own so that bf16 works through ml_dtypes (numpy has no bfloat16), a file is never read whole (tensors are
views of a memory map, copied one at a time), and a corrupt or truncated file gets an error naming the file and the
problem instead of a traceback from deep inside a library.

The reader accepts exactly what the ``safetensors`` library accepts (its header validation, restated): a header
length under 100 MB that fits the file, a UTF-8 JSON object, ``__metadata__`` a string -> string map (or null),
and per tensor a known dtype, a shape of non-negative integers and two integer offsets whose span is exactly the
shape's byte size. Sorted by offset, the tensors must tile the data section: no overlap (two tensors reading one
byte range would silently share weights), no gap and no trailing bytes.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100_000_000  # the safetensors library's limit


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read; the message names the file and what is wrong."""


def _is_index(v: object) -> bool:
    return type(v) is int and v >= 0  # bool is not an int here; floats and strings are rejected as serde does


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"key {dup!r} appears twice")
    return dict(pairs)


class SafetensorsFile(Mapping):
    """Read-only mapping key -> numpy view into a memory map of one safetensors file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"safetensors file not found: {self.path}")
        size = self.path.stat().st_size
        if size < 8:
            raise SafetensorsError(f"{self.path}: truncated: {size} bytes, too short for a safetensors header")
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > _MAX_HEADER or 8 + n > size:
                raise SafetensorsError(
                    f"{self.path}: corrupt or truncated: header length {n} bytes but the file has {size} bytes"
                )
            raw = f.read(n)
        header = self._parse_header(raw)
        self._data_start = 8 + n
        self._entries = self._check_entries(header, size - self._data_start)
        self._mmap = None

    def _fail(self, what: str) -> SafetensorsError:
        return SafetensorsError(f"{self.path}: {what}")

    def _parse_header(self, raw: bytes) -> dict:
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise self._fail(f"corrupt header (not valid JSON): {e}") from None
        if not isinstance(header, dict):
            raise self._fail("corrupt header (not a JSON object)")
        meta = header.pop("__metadata__", None)
        if meta is None:
            meta = {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise self._fail(f"corrupt header: __metadata__ must map strings to strings, got {meta!r:.200}")
        self.metadata = meta
        return header

    def _check_entries(self, header: dict, data_len: int) -> dict[str, tuple[np.dtype, tuple[int, ...], int, int]]:
        entries = {}
        for key, info in header.items():
            bad = self._fail(f"corrupt header entry for tensor {key!r}: {info!r:.200}")
            if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
                raise bad
            dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            if not isinstance(dtype, str) or not isinstance(shape, list) or not all(map(_is_index, shape)):
                raise bad
            if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_index, offsets)):
                raise bad
            if dtype not in _DTYPES:
                raise self._fail(f"tensor {key!r} has dtype {dtype!r}; known: {', '.join(_DTYPES)}")
            start, end = offsets
            expected = _DTYPES[dtype].itemsize
            for s in shape:
                expected *= s
            if end < start or end - start != expected:
                raise self._fail(
                    f"tensor {key!r} spans bytes [{start}, {end}) but shape {tuple(shape)} of {dtype} needs {expected}"
                )
            entries[key] = (_DTYPES[dtype], tuple(shape), start, end)
        covered = 0
        for key, (_, _, start, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
            if start != covered:
                what = (
                    "overlaps the tensor before it" if start < covered else f"leaves bytes [{covered}, {start}) unused"
                )
                raise self._fail(f"corrupt: tensor {key!r} at bytes [{start}, {end}) of the data section {what}")
            if end > data_len:
                raise self._fail(
                    f"truncated: tensor {key!r} ends at byte {end} of the data section, which has only {data_len} bytes"
                )
            covered = end
        if covered != data_len:
            raise self._fail(f"corrupt: {data_len - covered} bytes after the last tensor belong to no tensor")
        return entries

    def _map(self) -> np.memmap:
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._mmap

    def __getitem__(self, key: str) -> np.ndarray:
        dtype, shape, start, end = self._entries[key]
        buf = self._map()[self._data_start + start : self._data_start + end]
        return buf.view(dtype).reshape(shape)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Writes a safetensors file atomically (temp file + rename: a crash never leaves half a file)."""
    path = Path(path)
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    arrays = []
    for key in sorted(tensors):
        a = np.ascontiguousarray(tensors[key])
        if a.dtype not in _NAMES:
            raise TypeError(f"tensor {key!r}: dtype {a.dtype} cannot be stored in safetensors")
        header[key] = {
            "dtype": _NAMES[a.dtype],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
        arrays.append(a)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for a in arrays:
            f.write(a.tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
