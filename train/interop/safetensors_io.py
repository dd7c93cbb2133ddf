"""Safetensors files read and written one tensor at a time.

The format is an 8-byte little-endian header length, a JSON header {name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}, then the tensors' bytes. Reading hands out one
tensor at a time, each read into its own buffer (no memory map whose pages would stay resident), so a
model never sits in host memory twice; writing computes
the header from shapes and streams each tensor as it is produced. A checkpoint split over several
files has an index, model.safetensors.index.json, whose "weight_map" names the file of each tensor.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import ml_dtypes
import numpy as np

from plutao.train.config.errors import UserError

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "I64": np.int64,
          "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"


class File:
    """One safetensors file: its header, and each tensor as a view of the memory-mapped bytes."""

    def __init__(self, path: Path):
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise UserError(f"{path} is truncated (no safetensors header); download or copy it again")
                (n,) = struct.unpack("<Q", raw)
                if n > min(size - 8, 100 << 20):
                    raise UserError(f"{path} is not a safetensors file (its header length {n} exceeds the file); "
                                    "download or copy it again")
                header = json.loads(f.read(n))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {path} as safetensors ({e}); download or copy it again") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self.header = header
        self.start = 8 + n
        end = max((h["data_offsets"][1] for h in header.values()), default=0)
        if self.start + end > size:
            raise UserError(f"{path} is truncated: its header describes {self.start + end:,} bytes but the file has "
                            f"{size:,}; download or copy it again")

    def names(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        """The tensor, read from the file into a new array."""
        h = self.header[name]
        if h["dtype"] not in DTYPES:
            raise UserError(f"{self.path}: tensor {name} has dtype {h['dtype']}, which plutao does not read")
        begin, end = h["data_offsets"]
        out = np.empty(h["shape"], DTYPES[h["dtype"]])
        if out.nbytes != end - begin:
            raise UserError(f"{self.path}: tensor {name} has {end - begin} bytes for shape {h['shape']} {h['dtype']}; "
                            "the file is corrupt")
        with open(self.path, "rb") as f:
            f.seek(self.start + begin)
            if f.readinto(out.reshape(-1).view(np.uint8)) != out.nbytes:
                raise UserError(f"{self.path} is truncated inside tensor {name}; download or copy it again")
        return out


class Checkpoint:
    """The tensors of a Hugging Face checkpoint directory: model.safetensors, or the files its index names."""

    def __init__(self, directory: Path):
        index = directory / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, KeyError, json.JSONDecodeError) as e:
                raise UserError(f"cannot read {index} ({e}); it must hold a \"weight_map\" of tensor → file") from None
            files = {f: File(directory / f) for f in sorted(set(weight_map.values())) if self._exists(directory / f)}
            self.where = {name: files[f] for name, f in weight_map.items()}
            for name, file in self.where.items():
                if name not in file.header:
                    raise UserError(f"{index} puts {name} in {file.path.name}, which does not hold it; the index "
                                    "and the files do not belong together")
        elif (directory / SINGLE).is_file():
            file = File(directory / SINGLE)
            self.where = {name: file for name in file.names()}
        else:
            found = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt*"))
            hint = (f" (it has {found[0]}: pickled PyTorch weights are not read; save the model with "
                    "safe_serialization=True)") if found else ""
            raise UserError(f"{directory} has neither {SINGLE} nor {INDEX}{hint}")

    @staticmethod
    def _exists(path: Path) -> bool:
        if not path.is_file():
            raise UserError(f"{path} is named by the checkpoint's index but missing; copy the whole checkpoint")
        return True

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def names(self) -> list[str]:
        return list(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.where[name].shape(name)

    def get(self, name: str) -> np.ndarray:
        return self.where[name].get(name)

    def nbytes(self) -> int:
        return sum(int(np.prod(f.header[n]["shape"], dtype=np.int64)) * np.dtype(DTYPES[f.header[n]["dtype"]]).itemsize
                   for n, f in self.where.items())


def write(path: Path, tensors: Iterable[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]],
          metadata: dict[str, str] | None = None) -> None:
    """Write tensors given as (name, shape, dtype, make) to `path`, calling each `make()` only when its
    bytes are written (one tensor in memory at a time); written to a temporary name, then renamed."""
    tensors = list(tensors)
    header, offset = {}, 0
    for name, shape, dtype, _ in tensors:
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # (the data starts 8-byte aligned)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype, make in tensors:
            array = np.ascontiguousarray(make(), dtype=dtype)
            if array.shape != tuple(shape):
                raise AssertionError(f"{name}: made {array.shape}, declared {shape}")
            f.write(array.reshape(-1).view(np.uint8))  # (no copy of the bytes)
            del array
    os.replace(tmp, path)
