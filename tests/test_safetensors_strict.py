"""The safetensors reader accepts exactly what the safetensors library accepts, with one clear error otherwise.

The reference is the ``safetensors`` package itself (torch frontend, which knows every dtype): a fuzzer mutates
small valid files (truncations, header byte edits, offset/shape/dtype edits, header-length edits) and every result
must either be rejected by both readers, our error naming the file, or be loaded by both with the same bytes.
"""

import json
import random
import struct

import numpy as np
import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as st_load

from converters.safetensors_io import _DTYPES, SafetensorsError, SafetensorsFile, save_file

_TORCH_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint64: "U64",
    torch.uint32: "U32",
    torch.uint16: "U16",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _write(path, header, data: bytes, header_bytes: bytes | None = None):
    raw = header_bytes if header_bytes is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _ours(path):
    """{key: (dtype name, shape, bytes)} as our reader loads it."""
    f = SafetensorsFile(path)
    names = {v: k for k, v in _DTYPES.items()}
    return {k: (names[f[k].dtype], tuple(f[k].shape), f[k].tobytes()) for k in f}


def _theirs(path):
    """The same, as the safetensors library loads it."""
    out = {}
    for k, t in st_load(str(path)).items():
        out[k] = (_TORCH_NAMES[t.dtype], tuple(t.shape), t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return out


def _f32(n, base=0.0):
    return (np.arange(n, dtype=np.float32) + base).tobytes()


def test_tensors_sharing_one_byte_range_are_rejected(tmp_path):
    header = {
        "a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]},
        "b": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]},
    }
    path = _write(tmp_path / "shared.safetensors", header, _f32(3))
    with pytest.raises(SafetensorError):
        st_load(str(path))
    with pytest.raises(SafetensorsError, match=r"shared\.safetensors.*'b'.*overlaps"):
        SafetensorsFile(path)


def test_partly_overlapping_tensors_are_rejected(tmp_path):
    header = {
        "a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]},
        "b": {"dtype": "F32", "shape": [3], "data_offsets": [8, 20]},
    }
    path = _write(tmp_path / "m.safetensors", header, _f32(5))
    with pytest.raises(SafetensorsError, match=r"m\.safetensors.*'b'.*overlaps"):
        SafetensorsFile(path)


def test_gap_between_tensors_is_rejected(tmp_path):
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]},
    }
    path = _write(tmp_path / "m.safetensors", header, _f32(5))
    with pytest.raises(SafetensorsError, match=r"m\.safetensors.*'b'.*unused"):
        SafetensorsFile(path)


def test_trailing_bytes_are_rejected(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    path = _write(tmp_path / "m.safetensors", header, _f32(3))
    with pytest.raises(SafetensorsError, match=r"m\.safetensors.*4 bytes after the last tensor"):
        SafetensorsFile(path)


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"dtype": "F31", "shape": [2], "data_offsets": [0, 8]}, "dtype 'F31'"),
        ({"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}, "corrupt header entry"),
        ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, "corrupt header entry"),
        ({"dtype": "F32", "shape": [2], "data_offsets": ["0", 8]}, "corrupt header entry"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 8]}, "corrupt header entry"),
        ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, "needs 12"),
        ({"dtype": "F32", "shape": [2]}, "corrupt header entry"),
    ],
)
def test_bad_entries_name_file_and_tensor(tmp_path, entry, message):
    path = _write(tmp_path / "m.safetensors", {"w": entry}, _f32(2))
    with pytest.raises(SafetensorError):
        st_load(str(path))
    with pytest.raises(SafetensorsError, match=rf"m\.safetensors.*'w'.*{message}|m\.safetensors.*{message}.*'w'"):
        SafetensorsFile(path)


@pytest.mark.parametrize(
    "header_bytes, message",
    [
        (b'{"__metadata__": {"n": 1}}', "__metadata__"),
        (b'{"__metadata__": ["x"]}', "__metadata__"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"a": \xff}', "not valid JSON"),
        (b'{"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}} x', "not valid JSON"),
    ],
)
def test_bad_headers_name_file(tmp_path, header_bytes, message):
    path = _write(tmp_path / "m.safetensors", None, b"", header_bytes=header_bytes)
    with pytest.raises(SafetensorError):
        st_load(str(path))
    with pytest.raises(SafetensorsError, match=rf"m\.safetensors.*{message}"):
        SafetensorsFile(path)


def test_metadata_and_empty_files_load_like_the_library(tmp_path):
    for header in (
        {"__metadata__": None},
        {"__metadata__": {"format": "pt"}, "e": {"dtype": "BF16", "shape": [0, 4], "data_offsets": [0, 0]}},
    ):
        path = _write(tmp_path / "m.safetensors", header, b"")
        assert _ours(path) == _theirs(path)
    assert SafetensorsFile(path).metadata == {"format": "pt"}


def test_oversized_header_length_is_rejected(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    with pytest.raises(SafetensorsError, match=r"m\.safetensors.*header length"):
        SafetensorsFile(path)


def _valid_file(rng: random.Random, path):
    tensors = {}
    for i in range(rng.randint(1, 4)):
        dtype = rng.choice([np.float32, np.float16, np.int32, np.uint8, np.int64, np.int8])
        shape = tuple(rng.randint(0, 3) for _ in range(rng.randint(0, 2)))
        tensors[f"t{i}"] = (np.arange(int(np.prod(shape)), dtype=np.int64) * 7 + i).astype(dtype).reshape(shape)
    save_file(tensors, path, metadata={"note": "x"} if rng.random() < 0.5 else None)
    return path.read_bytes()


def _mutate(rng: random.Random, data: bytes) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    header, body = data[8 : 8 + n], data[8 + n :]
    kind = rng.randrange(5)
    if kind == 0:  # truncation anywhere
        return data[: rng.randrange(len(data))]
    if kind == 1:  # a random byte of the header changed
        b = bytearray(header)
        b[rng.randrange(len(b))] = (
            rng.choice(b'0123456789[]{},:"- \x00\xffFUIB') if rng.random() < 0.8 else rng.randrange(256)
        )
        return data[:8] + bytes(b) + body
    if kind == 2:  # the header-length field changed
        return struct.pack("<Q", max(0, n + rng.randint(-16, 16))) + data[8:]
    if kind == 3:  # data bytes added or removed at the end
        return data + bytes(rng.randint(1, 8)) if rng.random() < 0.5 else data[: len(data) - rng.randint(1, 8)]
    h = json.loads(header)  # a structured edit of one tensor's entry
    keys = [k for k in h if k != "__metadata__"]
    e = h[rng.choice(keys)]
    field = rng.choice(["offset", "offset", "shape", "dtype", "copy"])
    if field == "offset":
        e["data_offsets"][rng.randrange(2)] += rng.choice([-8, -4, -2, -1, 1, 2, 4, 8])
    elif field == "shape":
        if e["shape"] and rng.random() < 0.7:
            e["shape"][rng.randrange(len(e["shape"]))] += rng.choice([-1, 1])
        else:
            e["shape"] = list(reversed(e["shape"])) + [1]
    elif field == "dtype":
        e["dtype"] = rng.choice(["F32", "F16", "BF16", "I32", "U8", "I64", "U16", "F8_E4M3", "X9"])
    else:  # a second tensor aliasing another's bytes
        h["alias"] = dict(e)
    raw = json.dumps(h).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def test_fuzzed_files_are_rejected_clearly_or_read_like_the_library(tmp_path):
    rng = random.Random(1234)
    path = tmp_path / "fuzz.safetensors"
    counts = {"both accept": 0, "both reject": 0}
    for case in range(400):
        base = _valid_file(rng, path)
        path.write_bytes(_mutate(rng, base))
        try:
            theirs = _theirs(path)
        except Exception:
            theirs = None
        try:
            ours = _ours(path)
        except SafetensorsError as e:
            assert str(path) in str(e), f"case {case}: error does not name the file: {e}"
            assert theirs is None, f"case {case}: the library reads this file but we reject it: {e}"
            counts["both reject"] += 1
            continue
        assert theirs is not None, f"case {case}: the library rejects this file but we load it: {ours}"
        assert ours == theirs, f"case {case}: loaded differently from the library"
        counts["both accept"] += 1
    assert min(counts.values()) >= 15, counts  # the fuzzer exercises both outcomes
