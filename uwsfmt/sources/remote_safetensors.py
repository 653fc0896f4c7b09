"""``.safetensors`` files on object storage or a web server (``s3://``, ``gs://``, ``https://``,
any fsspec URL), read in place: the header first (two ranged reads), then each tensor with one
ranged read as the build asks for it. Nothing is downloaded to local disk; the sha256 the
manifest records is taken by streaming the object once. Credentials: as for remote stores (the
environment, fsspec's configuration), never recorded."""

from __future__ import annotations

import hashlib
import math
import struct

import fsspec
import torch

from uwsfmt.errors import SourceError
from uwsfmt.format.dtypes import torch_dtype
from uwsfmt.io import remote
from uwsfmt.sources.base import Checkpoint, Format, TensorInfo
from uwsfmt.sources.registry import register_format
from uwsfmt.sources.safetensors_file import MAX_HEADER, ST_DTYPES, check_header, infos_of

#: bytes per read when the sha256 of a remote source is taken
HASH_BLOCK = 8 << 20


class RemoteSafetensorsCheckpoint(Checkpoint):
    format = "safetensors"
    path: str

    def __init__(self, url: str, id: str):
        super().__init__(id, url)
        where = remote.redact(url)
        try:
            self._fs, self._key = fsspec.core.url_to_fs(url)
            size = int(self._fs.size(self._key))
            (n,) = struct.unpack("<Q", self._fs.cat_file(self._key, start=0, end=8))
            if n > MAX_HEADER or n + 8 > size:
                raise SourceError(f"{where}: not a valid safetensors file (header length {n} does not fit the "
                                  f"file of {size} bytes); the file is truncated or not safetensors")
            self._header = check_header(self._fs.cat_file(self._key, start=8, end=8 + n), n, size, where)
        except (OSError, struct.error, ValueError) as e:
            raise SourceError(f"{where}: cannot read the checkpoint ({remote.reason(e)})") from e
        except ImportError as e:
            raise SourceError(f"{where}: reading {remote.scheme(url)}:// needs its fsspec package "
                              "(pip install 'uwsfmt[remote]')") from e
        self._size = size
        self._data_start = 8 + n

    def infos(self) -> dict[str, TensorInfo]:
        return infos_of(self._header, self.path)

    def metadata(self) -> dict:
        return dict(self._header.get("__metadata__") or {})

    def get(self, name: str) -> torch.Tensor:
        v = self._header.get(name) if name != "__metadata__" else None
        if v is None or v["dtype"] not in ST_DTYPES:
            raise SourceError(f"{remote.redact(self.path)}: cannot read tensor {name!r}: no such tensor of a supported dtype")
        dtype = torch_dtype(ST_DTYPES[v["dtype"]])
        shape = [int(x) for x in v["shape"]]
        start, end = (int(x) for x in v["data_offsets"])
        if not end - start:
            return torch.empty(shape, dtype=dtype)
        try:
            raw = self._fs.cat_file(self._key, start=self._data_start + start, end=self._data_start + end)
        except OSError as e:
            raise SourceError(f"{remote.redact(self.path)}: cannot read tensor {name!r} ({remote.reason(e)})") from e
        if len(raw) != end - start or len(raw) != math.prod(shape) * torch.empty((), dtype=dtype).element_size():
            raise SourceError(f"{remote.redact(self.path)}: truncated safetensors file (tensor {name!r})")
        return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)

    def fingerprint(self) -> dict:
        if self._fingerprint is None:
            h = hashlib.sha256()
            try:
                with self._fs.open(self._key, "rb", block_size=HASH_BLOCK) as f:
                    while block := f.read(HASH_BLOCK):
                        h.update(block)
            except OSError as e:
                raise SourceError(f"{remote.redact(self.path)}: cannot read the checkpoint ({remote.reason(e)})") from e
            self._fingerprint = {"sha256": h.hexdigest(), "size": self._size}
        return self._fingerprint


def _detect(path: str) -> bool:
    return remote.is_url(path) and path.split("?")[0].endswith(".safetensors")


register_format(Format("safetensors-url", _detect, lambda p, i: RemoteSafetensorsCheckpoint(p, i), priority=20,
                       description="a .safetensors file at a URL (s3://, gs://, https://, any fsspec URL), read in place",
                       extensions=(".safetensors",)))
