"""Reading a store's arrays: metadata checked before parsing, whole arrays, pack rows into reused
buffers, remote stores' shared arrays fetched many at a time. :class:`StoreArrays` is the part of
:class:`~uwsfmt.reader.store.StoreReader` that touches storage; the reader decodes what it returns.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
import threading
import zipfile
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import zarr
from zarr.storage import LocalStore, ZipStore

from uwsfmt.errors import FormatError
from uwsfmt.io import shards
from uwsfmt.reader.manifest import (
    MAX_ARRAY_METADATA_BYTES,
    MAX_CHUNK_BYTES,
    STORAGE_DTYPES,
    check_array_metadata,
    json_size,
    short,
)

#: requests in flight at once when a remote store's shared arrays are fetched
REMOTE_CONCURRENCY = 32


@dataclasses.dataclass
class _Failed:
    """A prefetched array that could not be read: its error, raised where the array is used."""

    error: FormatError



class StoreArrays:
    """The arrays of the store at ``path`` (``zstore``: its zarr store object; ``manifest``: its
    committed state), opened once each and read on demand."""

    def __init__(self, path: str, zstore, manifest: dict):
        self.path = path
        self._zstore = zstore
        self.manifest = manifest
        self._arrays: dict[str, Any] = {}
        self._row_readers: dict[str, Any] = {}
        self._chunked: dict[str, shards.ChunkedReader | None] = {}
        self._zip: zipfile.ZipFile | None = None
        self._lock = threading.Lock()
        self._local = threading.local()  # per-thread reusable row buffers
        self._seen: set[str] = set()  # remote stores: shared arrays fetched (or prefetched) once
        self._fetched: dict[str, Any] = {}  # prefetched arrays, each taken once by read_array

    def drop_handles(self, fetched: bool = False) -> None:
        """Forget the opened arrays and readers (the manifest changed); ``fetched``: prefetched values too."""
        self._arrays.clear()
        self._row_readers.clear()
        self._chunked.clear()
        if fetched:
            self._seen.clear()
            self._fetched.clear()

    def array(self, path: str):
        a = self._arrays.get(path)
        if a is None:
            zf = self._zipfile() if type(self._zstore) is ZipStore else None  # one archive, not one per array
            size = json_size(self._zstore, self.path, f"{path}/zarr.json", zf)
            if size is None:
                raise FormatError(f"{self.path}: array {path!r} named by the manifest is missing (no {path}/zarr.json); the store is damaged")
            if size > MAX_ARRAY_METADATA_BYTES:
                raise FormatError(f"{self.path}: {path}/zarr.json is {size} bytes, above the {MAX_ARRAY_METADATA_BYTES}-byte "
                                  "limit for array metadata; refusing to parse it (the store is damaged or hostile)")
            try:
                a = zarr.open_array(self._zstore, path=path, mode="r", zarr_format=3)
            except Exception as e:
                raise FormatError(f"{self.path}: array {path!r} named by the manifest cannot be opened ({short(e)}); the store is damaged") from e
            check_array_metadata(a, f"{self.path}: array {path!r}")
            self._arrays[path] = a
        return a

    def _zipfile(self) -> zipfile.ZipFile:
        """The store's archive, opened once (its directory parsed once, not per array)."""
        with self._lock:
            if self._zip is None:
                self._zip = zipfile.ZipFile(self.path)
            return self._zip

    def _chunked_reader(self, path: str) -> shards.ChunkedReader | None:
        """The direct reader of the array at ``path`` (None: read it with zarr-python)."""
        if path not in self._chunked:
            reader = None
            if type(self._zstore) in (LocalStore, ZipStore):
                zf = self._zipfile() if type(self._zstore) is ZipStore else None
                folder = path if zf else os.path.join(self.path, *path.split("/"))
                doc = shards.read_doc(f"{path}/zarr.json" if zf else os.path.join(folder, "zarr.json"), MAX_ARRAY_METADATA_BYTES, zf)
                if doc is None:
                    raise FormatError(f"{self.path}: array {path!r} named by the manifest is missing (no {path}/zarr.json); the store is damaged")
                reader = shards.chunked_reader(folder, doc, STORAGE_DTYPES, MAX_CHUNK_BYTES, zf)
            self._chunked[path] = reader
        return self._chunked[path]

    def storage_dtype(self, path: str) -> np.dtype:
        """The data type of the array at ``path`` (from its metadata; nothing read)."""
        reader = self._chunked_reader(path)
        return reader.dtype if reader is not None else self.array(path).dtype

    def prefetch(self, entries: list[dict]) -> None:
        """On a remote store, fetch the shared arrays (means, bases, shared values) of ``entries``
        not read yet, many requests at a time: read one by one, a model's first read would wait
        for one round trip per array (thousands for a large family). The next reads take them
        from memory once (:meth:`read_array`); local stores read them as they go."""
        if isinstance(self._zstore, (LocalStore, ZipStore)):
            return
        paths = []
        for e in entries:
            for field in ("mean", "left", "right"):
                if isinstance(e.get(field), str):
                    paths.append(e[field])
            if e.get("encoding") == "shared" and isinstance(e.get("data"), dict) and isinstance(e["data"].get("path"), str):
                paths.append(e["data"]["path"])
        with self._lock:
            paths = [p for p in dict.fromkeys(paths) if p not in self._seen]
            self._seen.update(paths)
        if len(paths) < 2:
            return
        with concurrent.futures.ThreadPoolExecutor(min(REMOTE_CONCURRENCY, len(paths)), thread_name_prefix="uwsfmt-fetch") as ex:
            for p, a in zip(paths, ex.map(self._fetch, paths)):
                self._fetched[p] = a

    def _fetch(self, path: str) -> np.ndarray | _Failed:
        try:
            return self.read_array(path)
        except FormatError as e:
            return _Failed(e)  # raised where the array is used, by the reader that needs it

    def read_array(self, path: str, shape: Iterable[int] | None = None, out: np.ndarray | None = None,
                   most: int | None = None) -> np.ndarray:
        """The whole array at ``path``; ``shape``: what the manifest implies, or ``most``: how many
        values it may hold at most (either checked before anything is allocated or read).
        ``out``: a C-contiguous buffer of the array's shape and storage dtype to read into (used
        when it fits, else a new array is returned)."""
        got = self._fetched.pop(path, None)
        if got is not None:
            if isinstance(got, _Failed):
                raise got.error
            if shape is not None and got.shape != tuple(shape):
                raise FormatError(f"{self.path}: array {path!r} has shape {list(got.shape)} but the manifest implies "
                                  f"{list(shape)}; the store is damaged or was tampered with")
            if most is not None and got.size > most:
                raise FormatError(f"{self.path}: array {path!r} has shape {list(got.shape)}, more than the {most} values the "
                                  "manifest allows it; the store is damaged or was tampered with")
            return got
        reader = self._chunked_reader(path)
        arr = self.array(path) if reader is None else None
        have = reader.shape if reader is not None else tuple(arr.shape)  # type: ignore[union-attr]  # arr is set when reader is None
        if shape is not None and have != tuple(shape):
            raise FormatError(f"{self.path}: array {path!r} has shape {list(have)} but the manifest implies "
                              f"{list(shape)}; the store is damaged or was tampered with")
        if most is not None and math.prod(have) > most:
            raise FormatError(f"{self.path}: array {path!r} has shape {list(have)}, more than the {most} values the "
                              "manifest allows it; the store is damaged or was tampered with")
        if reader is not None:
            fits = out is not None and out.dtype == reader.dtype and out.shape == reader.shape and out.flags.c_contiguous
            return reader.read_into(out if fits and out is not None else np.empty(reader.shape, reader.dtype))
        assert arr is not None  # no direct reader: zarr's array
        try:
            return arr[...]
        except Exception as e:
            raise FormatError(f"{self.path}: array {path!r} cannot be read ({short(e)}); the store is damaged") from e

    def pack_array(self, info: dict):
        arr = self.array(info["path"])
        if arr.ndim != 2 or arr.shape[1] != info["width"] or str(arr.dtype) != info["dtype"]:
            raise FormatError(f"{self.path}: pack {info['path']} is {arr.dtype} {list(arr.shape)} but the manifest says "
                              f"{info['dtype']} with {info['width']} elements per row; the store is damaged or was tampered with")
        return arr

    def _row_reader(self, info: dict):
        """Direct shard reader of a pack (None: read it with zarr-python), see :mod:`uwsfmt.shards`."""
        path = info["path"]
        if path not in self._row_readers:
            self._row_readers[path] = shards.row_reader(self._zstore, path, self.pack_array(info))
        return self._row_readers[path]

    def _row_buffer(self, pack: str, width: int, dtype: np.dtype, device: torch.device) -> list:
        """[host tensor, event]: a row buffer reused from call to call (no allocation, no page
        faults), pinned when rows go to a GPU; the event marks the last async copy out of it."""
        bufs = self._local.__dict__.setdefault("rows", {})
        pin = device.type == "cuda"
        b = bufs.get((pack, pin))
        if b is None or b[0].numel() != width or b[0].numpy().dtype != dtype:
            b = [torch.from_numpy(np.empty(width, dtype=dtype)), None]
            if pin:
                b[0] = b[0].pin_memory()
            bufs[(pack, pin)] = b
        if b[1] is not None:
            b[1].synchronize()  # the previous model's copy to the device must finish before we overwrite
            b[1] = None
        return b

    def model_rows(self, index: int, device: torch.device) -> dict[str, torch.Tensor]:
        """One model's pack rows, each read with one call (a handful of storage requests)."""
        rows = {}
        for pack, info in self.manifest["packs"].items():
            arr = self.pack_array(info)
            if arr.shape[0] <= index:
                raise FormatError(
                    f"{self.path}: pack {info['path']} has {arr.shape[0]} rows but model #{index} is committed; the store is damaged"
                )
            reader = self._row_reader(info)
            if reader is not None:
                b = self._row_buffer(pack, reader.width, reader.dtype, device)
                reader.read_into(index, b[0].numpy())
                if device.type == "cpu":
                    rows[pack] = b[0]
                else:
                    rows[pack] = b[0].to(device, non_blocking=True)
                    if device.type == "cuda":
                        b[1] = torch.cuda.Event()
                        b[1].record()
                continue
            try:
                row = arr[index, :]
            except Exception as e:
                raise FormatError(f"{self.path}: model #{index} cannot be read from {info['path']} ({e}); the store is damaged") from e
            t = torch.from_numpy(np.ascontiguousarray(row))
            rows[pack] = t.to(device, non_blocking=True) if device.type != "cpu" else t
        return rows
