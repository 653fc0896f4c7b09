"""Single ``.safetensors`` files, read lazily (header first, one tensor at a time)."""

from __future__ import annotations

import io
import json
import math
import os
import struct
import threading

import torch

from uwsfmt.errors import SourceError
from uwsfmt.format.dtypes import torch_dtype
from uwsfmt.sources.base import Checkpoint, Format, TensorInfo
from uwsfmt.sources.registry import register_format

ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}
MAX_HEADER = 100 * 1024 * 1024


#: recently parsed headers: (path, inode, size, mtime, ctime) -> header. Format detection and the
#: checkpoint itself read each header (2,000 tensors: ~20 ms to parse and check) up to 3 times
_HEADERS: dict[tuple, dict] = {}
_HEADERS_KEPT = 64
_HEADERS_LOCK = threading.Lock()


def read_header(path: str) -> dict:
    """Parse and check a safetensors header without reading tensor data (the same dict again while
    the file is unchanged: callers must not modify it)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise SourceError(f"{path}: cannot read the file ({e.strerror or e})") from e
    key = (os.path.abspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    header = _HEADERS.get(key)
    if header is None:
        header = _parse_header(path)
        with _HEADERS_LOCK:
            while len(_HEADERS) >= _HEADERS_KEPT:
                del _HEADERS[next(iter(_HEADERS))]
            _HEADERS[key] = header
    return header


def _parse_header(path: str) -> dict:
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
            raw = f.read(n)
    except OSError as e:
        raise SourceError(f"{path}: cannot read the file ({e.strerror or e})") from e
    return check_header(raw, n, size, path)


def check_header(raw: bytes, n: int, size: int, path: str) -> dict:
    """Parse and check the JSON header ``raw`` (``n`` bytes) of a safetensors file of ``size`` bytes."""
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise SourceError(f"{path}: corrupt safetensors header ({type(e).__name__}: {str(e)[:200]}); re-export the checkpoint") from e
    if not isinstance(header, dict):
        raise SourceError(f"{path}: corrupt safetensors header (not a JSON object)")
    end = 0
    for k, v in header.items():
        if k == "__metadata__":
            if not isinstance(v, dict) or not all(isinstance(x, str) for x in v.values()):
                raise SourceError(f"{path}: corrupt safetensors header: __metadata__ must map strings to strings")
            continue
        problem = _entry_problem(v)
        if problem:
            raise SourceError(f"{path}: corrupt safetensors header entry for tensor {k!r}: {problem}; re-export the checkpoint")
        end = max(end, v["data_offsets"][1])
    if end + 8 + n > size:
        raise SourceError(f"{path}: truncated safetensors file (tensor data ends past the end of the file)")
    return header


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
             "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _entry_problem(v) -> str | None:
    """What is wrong with one tensor's header entry (None: nothing)."""
    if not isinstance(v, dict):
        return "not a JSON object"
    dtype, shape, offsets = v.get("dtype"), v.get("shape"), v.get("data_offsets")
    if not isinstance(dtype, str):
        return f"dtype {dtype!r} is not a string"
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        return f"shape {shape!r} is not a list of non-negative integers"
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets) or offsets[0] > offsets[1]:
        return f"data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end"
    if dtype in _ITEMSIZE:
        numel = 1
        for d in shape:
            numel *= d
        if offsets[1] - offsets[0] != numel * _ITEMSIZE[dtype]:
            return f"its {offsets[1] - offsets[0]} bytes do not hold shape {shape} of {dtype} ({numel * _ITEMSIZE[dtype]} bytes)"
    return None


def infos_of(header: dict, path: str) -> dict[str, TensorInfo]:
    """The tensors a checked safetensors header describes."""
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        if v["dtype"] not in ST_DTYPES:
            raise SourceError(f"{path}: tensor {k!r} has unsupported dtype {v['dtype']}")
        out[k] = TensorInfo(k, tuple(int(s) for s in v["shape"]), ST_DTYPES[v["dtype"]])
    return out


class SafetensorsCheckpoint(Checkpoint):
    format = "safetensors"
    path: str

    def __init__(self, path: str, id: str):
        super().__init__(id, path)
        self._header = read_header(path)
        with open(path, "rb") as f:
            self._data_start = 8 + struct.unpack("<Q", f.read(8))[0]
        self._file: io.FileIO | None = None  # opened on the first read, kept until close()

    def infos(self) -> dict[str, TensorInfo]:
        return infos_of(self._header, self.path)

    def metadata(self) -> dict:
        return dict(self._header.get("__metadata__") or {})

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read with one ``pread`` into memory of its own. Not a view of a memory map:
        the mapped pages of every source would stay resident (and count in the process's RSS) until
        the build ends, so a build's memory would grow with the number of models."""
        v = self._header.get(name) if name != "__metadata__" else None
        if v is None:
            raise SourceError(f"{self.path}: cannot read tensor {name!r}: the file has no such tensor")
        if v["dtype"] not in ST_DTYPES:
            raise SourceError(f"{self.path}: tensor {name!r} has unsupported dtype {v['dtype']}")
        dtype = torch_dtype(ST_DTYPES[v["dtype"]])
        shape = [int(x) for x in v["shape"]]
        start, end = (int(x) for x in v["data_offsets"])
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - start != nbytes or start < 0:
            raise SourceError(f"{self.path}: corrupt safetensors header: tensor {name!r} ({v['dtype']} {shape}) has "
                              f"{end - start} bytes of data, not {nbytes}; re-export the checkpoint")
        buf = torch.empty(nbytes, dtype=torch.uint8)
        try:
            if self._file is None:
                self._file = open_data(self.path)
            got = os.preadv(self._file.fileno(), [buf.numpy()], self._data_start + start) if nbytes else 0  # type: ignore[list-item]  # numpy stubs: no __buffer__ < 3.12
        except OSError as e:
            raise SourceError(f"{self.path}: cannot read tensor {name!r}: {e}") from e
        if got != nbytes:
            raise SourceError(f"{self.path}: truncated safetensors file (tensor {name!r} ends past the end of the file)")
        return buf.view(dtype).reshape(shape)

    def prefetch(self, name: str) -> None:
        """``posix_fadvise(WILLNEED)`` on the tensor's bytes: the kernel reads them from disk in
        the background (no thread, no CPU taken from the compute), so that the coming ``get``
        finds them in the page cache."""
        v = self._header.get(name) if name != "__metadata__" else None
        if not isinstance(v, dict) or not hasattr(os, "posix_fadvise"):
            return
        try:
            if self._file is None:
                self._file = open_data(self.path)
            start, end = (int(x) for x in v["data_offsets"])
            os.posix_fadvise(self._file.fileno(), self._data_start + start, end - start, os.POSIX_FADV_WILLNEED)
        except (OSError, ValueError, TypeError):
            pass

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def open_data(path: str) -> io.FileIO:
    """The file a checkpoint's tensors are read from (one per checkpoint, unbuffered)."""
    return open(path, "rb", buffering=0)


def _detect(path: str) -> bool:
    return os.path.isfile(path) and path.endswith(".safetensors")


register_format(Format("safetensors", _detect, lambda p, i: SafetensorsCheckpoint(p, i), priority=10,
                       description="a single .safetensors file", extensions=(".safetensors",)))
