"""A small, strict safetensors reader/writer on numpy memory maps.

Our own so that bf16 works through ml_dtypes (numpy has no bfloat16), a file is never read whole (tensors are
views of a memory map, copied one at a time), and a corrupt or truncated file gets an error naming the file and the
problem instead of a traceback from deep inside a library.
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
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read; the message names the file and what is wrong."""


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
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{self.path}: corrupt header (not valid JSON): {e}") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: corrupt header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        data_len = size - self._data_start
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for key, info in header.items():
            try:
                dtype = _DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                start, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise SafetensorsError(f"{self.path}: corrupt header entry for tensor {key!r}: {info!r}") from None
            expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if end - start != expected or start < 0:
                raise SafetensorsError(
                    f"{self.path}: tensor {key!r} claims {end - start} bytes but shape {shape} of {info['dtype']} "
                    f"needs {expected}"
                )
            if end > data_len:
                raise SafetensorsError(
                    f"{self.path}: truncated: tensor {key!r} ends at byte {end} of the data section, which has "
                    f"only {data_len} bytes"
                )
            self._entries[key] = (dtype, shape, start, end)
        self._mmap = None

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
