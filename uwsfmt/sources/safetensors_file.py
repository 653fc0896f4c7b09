"""Single ``.safetensors`` files, read lazily (header first, one tensor at a time)."""

from __future__ import annotations

import json
import os
import struct

import torch
from safetensors import safe_open

from ..errors import SourceError
from .base import Checkpoint, Format, TensorInfo
from .registry import register_format

_ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}
MAX_HEADER = 100 * 1024 * 1024


def read_header(path: str) -> dict:
    """Parse and check a safetensors header without reading tensor data."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise SourceError(f"{path}: truncated safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or n + 8 > size:
                raise SourceError(
                    f"{path}: not a valid safetensors file (header length {n} does not fit the "
                    f"file of {size} bytes); the file is truncated or not safetensors"
                )
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceError(f"{path}: corrupt safetensors header ({e}); re-export the checkpoint") from None
    if not isinstance(header, dict):
        raise SourceError(f"{path}: corrupt safetensors header (not a JSON object)")
    end = 0
    for k, v in header.items():
        if k == "__metadata__":
            continue
        if not isinstance(v, dict) or "dtype" not in v or "shape" not in v or "data_offsets" not in v:
            raise SourceError(f"{path}: corrupt safetensors header entry for tensor {k!r}")
        end = max(end, int(v["data_offsets"][1]))
    if end + 8 + n > size:
        raise SourceError(f"{path}: truncated safetensors file (tensor data ends past the end of the file)")
    return header


class SafetensorsCheckpoint(Checkpoint):
    format = "safetensors"

    def __init__(self, path: str, id: str):
        super().__init__(id, path)
        self._header = read_header(path)
        self._handle = None

    def infos(self) -> dict[str, TensorInfo]:
        out = {}
        for k, v in self._header.items():
            if k == "__metadata__":
                continue
            if v["dtype"] not in _ST_DTYPES:
                raise SourceError(f"{self.path}: tensor {k!r} has unsupported dtype {v['dtype']}")
            out[k] = TensorInfo(k, tuple(int(s) for s in v["shape"]), _ST_DTYPES[v["dtype"]])
        return out

    def metadata(self) -> dict:
        return dict(self._header.get("__metadata__") or {})

    def get(self, name: str) -> torch.Tensor:
        if self._handle is None:
            try:
                self._handle = safe_open(self.path, framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types
                raise SourceError(f"{self.path}: cannot open safetensors file: {e}") from None
        try:
            return self._handle.get_tensor(name)
        except Exception as e:
            raise SourceError(f"{self.path}: cannot read tensor {name!r}: {e}") from None

    def close(self) -> None:
        self._handle = None


def _detect(path: str) -> bool:
    return os.path.isfile(path) and path.endswith(".safetensors")


register_format(Format("safetensors", _detect, lambda p, i: SafetensorsCheckpoint(p, i), priority=10,
                       description="a single .safetensors file", extensions=(".safetensors",)))
