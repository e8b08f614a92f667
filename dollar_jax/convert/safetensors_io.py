"""A streaming safetensors reader: headers first (names, shapes, dtypes, no data), then one tensor at a time.

Written against the file format (8-byte little-endian header length, JSON header, raw little-endian data)
rather than through torch, so that conversion needs no torch and bfloat16 tensors arrive as
`ml_dtypes.bfloat16` arrays without a float32 detour. Each tensor is read with one `readinto` into a
fresh array: nothing is memory-mapped, so the resident set stays near one copy of the destination.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Iterable

import ml_dtypes
import numpy as np

DTYPES = {
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
INDEX_SUFFIX = ".safetensors.index.json"


class SafetensorsError(ValueError):
    """A safetensors file or index is malformed, truncated or inconsistent."""


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    name: str
    file: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int


def read_header(path: str) -> dict[str, TensorEntry]:
    """Entries of one .safetensors file, checked against the file's size (truncation is an error)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SafetensorsError(f"{path}: too short to be a safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise SafetensorsError(f"{path}: header length {header_len} exceeds the file size {size}")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{path}: corrupt header ({e})") from e
    data_start = 8 + header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        dtype = DTYPES[info["dtype"]]
        shape = tuple(int(s) for s in info["shape"])
        begin, end = (int(x) for x in info["data_offsets"])
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != expected:
            raise SafetensorsError(f"{path}: tensor {name!r} spans {end - begin} bytes, its shape needs {expected}")
        if data_start + end > size:
            raise SafetensorsError(
                f"{path}: truncated: tensor {name!r} ends at byte {data_start + end} but the file has {size}"
            )
        entries[name] = TensorEntry(name, path, dtype, shape, data_start + begin, end - begin)
    return entries


def find_files(folder: str) -> list[str]:
    """The safetensors files of a model folder: those named by an index if there is one, else all of them."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} is not a directory")
    indexes = sorted(f for f in os.listdir(folder) if f.endswith(INDEX_SUFFIX))
    if len(indexes) > 1:
        raise SafetensorsError(f"{folder}: several safetensors indexes {indexes}; keep one")
    if indexes:
        with open(os.path.join(folder, indexes[0])) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise SafetensorsError(f"{folder}/{indexes[0]}: no 'weight_map'")
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not os.path.exists(os.path.join(folder, name))]
        if missing:
            raise SafetensorsError(f"{folder}: shards named by {indexes[0]} are missing: {missing}")
        return [os.path.join(folder, name) for name in files]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .safetensors files")
    return [os.path.join(folder, name) for name in files]


def read_headers(files: Iterable[str]) -> dict[str, TensorEntry]:
    entries: dict[str, TensorEntry] = {}
    for path in files:
        for name, entry in read_header(path).items():
            if name in entries:
                raise SafetensorsError(f"tensor {name!r} appears in both {entries[name].file} and {path}")
            entries[name] = entry
    return entries


def read_tensor(entry: TensorEntry) -> np.ndarray:
    out = np.empty(entry.shape, entry.dtype)
    with open(entry.file, "rb") as f:
        f.seek(entry.offset)
        n = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
    if n != entry.nbytes:
        raise SafetensorsError(f"{entry.file}: short read for {entry.name!r} ({n} of {entry.nbytes} bytes)")
    return out


def write_file(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file (used by tests and the converter benchmark to make synthetic checkpoints)."""
    names = {v: k for k, v in DTYPES.items()}
    header, offset = {}, 0
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        header[name] = {"dtype": names[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for array in tensors.values():
            f.write(np.ascontiguousarray(array).tobytes())
