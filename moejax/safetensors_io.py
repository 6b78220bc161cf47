"""Streaming, validating reads of Hugging Face safetensors checkpoints (single file or sharded with an index).

The header of every shard is parsed and checked against the file size up front, so a truncated or
corrupt file fails before any weight is loaded, with the file and tensor named. Tensors are then
read one at a time through a read-only memory map (bfloat16 via ml_dtypes); nothing is unpickled.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from moejax.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}


class _Shard:
    """One safetensors file: its parsed header and a lazily opened memory map."""

    def __init__(self, path: Path):
        self.path = path
        if not path.is_file():
            raise CheckpointError(f"{path}: file not found")
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated or not a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(
                    f"{path}: header claims {n} bytes but the file has {size}; the file is truncated or corrupt")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
        for key, info in header.items():
            dtype = DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {info.get('dtype')!r}")
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
            if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
                raise CheckpointError(f"{path}: tensor {key!r} has {end - begin} bytes for shape {shape} "
                                      f"{info['dtype']}; the header is corrupt")
            if self.data_start + end > size:
                raise CheckpointError(
                    f"{path}: truncated: tensor {key!r} needs bytes up to {self.data_start + end} "
                    f"but the file has {size}")
            self.entries[key] = (dtype, shape, begin)

    def read(self, key: str) -> np.ndarray:
        """A read-only view of the tensor through its own memory map, unmapped once the view is dropped,
        so tensors read one after another do not accumulate in the process's resident memory."""
        dtype, shape, begin = self.entries[key]
        count = int(np.prod(shape, dtype=np.int64))
        if count == 0:
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.data_start + begin,
                         shape=(count * dtype.itemsize,)).view(dtype).reshape(shape)


class SafetensorsCheckpoint:
    """All tensors of a checkpoint directory, by key; `read` returns one tensor at a time."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX_NAME
        single = self.directory / SINGLE_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.directory / f).is_file()]
            if missing:
                raise CheckpointError(f"{index}: lists shard(s) {missing} that are missing from {self.directory}")
            shards = {f: _Shard(self.directory / f) for f in files}
            self.key_shard = {}
            for key, f in weight_map.items():
                if key not in shards[f].entries:
                    raise CheckpointError(f"{index}: maps {key!r} to {f}, but that shard has no such tensor")
                self.key_shard[key] = shards[f]
        elif single.is_file():
            shard = _Shard(single)
            self.key_shard = dict.fromkeys(shard.entries, shard)
        else:
            found = sorted(p.name for p in self.directory.glob("*.bin")) if self.directory.is_dir() else []
            hint = (f" It holds {found}: pickle checkpoints are never read; re-save with save_pretrained."
                    if found else "")
            raise CheckpointError(f"{self.directory}: no {SINGLE_NAME} or {INDEX_NAME}.{hint}")

    def keys(self) -> set[str]:
        return set(self.key_shard)

    def __contains__(self, key: str) -> bool:
        return key in self.key_shard

    def where(self, key: str) -> Path:
        return self.key_shard[key].path

    def shape(self, key: str) -> tuple[int, ...]:
        return self.key_shard[key].entries[key][1]

    def read(self, key: str, expected_shape: tuple[int, ...]) -> np.ndarray:
        """The tensor `key` (a read-only view of the file), checked against `expected_shape`."""
        if key not in self.key_shard:
            raise CheckpointError(f"{self.directory}: missing tensor {key!r}; expected shape {tuple(expected_shape)}")
        shape = self.shape(key)
        if shape != tuple(expected_shape):
            raise CheckpointError(
                f"{self.where(key)}: tensor {str(key)!r} has shape {shape}, expected {tuple(expected_shape)}")
        return self.key_shard[key].read(key)


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray]) -> int:
    """Writes one safetensors file (header, then each tensor's bytes in order); returns the data bytes."""
    names = {dtype: name for name, dtype in DTYPES.items()}
    header, offset = {}, 0
    for key, array in tensors.items():
        size = array.nbytes
        header[key] = {"dtype": names[array.dtype], "shape": list(array.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for array in tensors.values():
            f.write(np.ascontiguousarray(array).tobytes())
    return offset
