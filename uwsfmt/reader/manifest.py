"""Opening a store: its Zarr store object, the manifest read and checked (size, schema, version), array metadata checks."""

from __future__ import annotations

import json
import math
import os
import zipfile
from collections.abc import Iterable
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore, ZipStore

from uwsfmt.errors import FormatError, StoreError, VersionError
from uwsfmt.format.schema import validate_manifest
from uwsfmt.io import layout, remote

#: a manifest larger than this is refused on open (hostile stores must not exhaust memory)
MAX_MANIFEST_BYTES = 256 << 20


#: an array's zarr.json larger than this is refused before parsing
MAX_ARRAY_METADATA_BYTES = 1 << 20


#: a chunk (or a shard's index) that would decode to more bytes than this is refused before reading
MAX_CHUNK_BYTES = 1 << 32


#: codecs a UWS array may use (spec section 2.1); anything else is refused before any data is decoded
ALLOWED_CODECS = frozenset({"bytes", "crc32c", "zstd", "sharding_indexed"})


#: storage dtypes (spec section 4)
STORAGE_DTYPES = frozenset({"float64", "float32", "float16", "uint16", "uint8", "int64", "int32", "int16", "int8", "bool"})


#: temporary folders of builds in progress (or killed) are named ``.<name>.uws-building-<hex>``
BUILDING_MARK = ".uws-building-"


#: the name a store replaced by ``convert(overwrite=True)`` has while it is deleted
REPLACED_MARK = ".uws-replaced-"


def open_zarr_store(path: str, mode: str, storage_options: dict | None = None) -> Store:
    """The zarr store object of the UWS store at ``path``: a directory, a .zip file, or a URL
    (``s3://``, ``gs://``, ``https://``, any fsspec URL; ``storage_options`` go to fsspec)."""
    if remote.is_url(path):
        return remote.open_store(path, mode, storage_options)
    path = remote.local_path(path)
    if os.path.isdir(path):
        return LocalStore(path, read_only=(mode == "r"))
    if os.path.isfile(path) and zipfile.is_zipfile(path):
        if mode != "r":
            raise StoreError(
                f"{path}: a zipped store is read-only; run `uwsfmt unpack {path} DIR` to get a "
                "directory store you can append to"
            )
        return ZipStore(path, mode="r")
    if not os.path.exists(path):
        raise StoreError(f"{path}: no such store (expected a UWS store directory or .zip file)")
    raise FormatError(f"{path}: not a UWS store (neither a directory nor a zip file)")


def json_size(zstore: Store, path: str, key: str = "zarr.json", zf: zipfile.ZipFile | None = None) -> int | None:
    """Size in bytes of the metadata document ``key`` (None when absent), read before parsing it;
    ``zf``: the store's archive when it is already open."""
    if isinstance(zstore, LocalStore):
        p = os.path.join(str(zstore.root), *key.split("/"))
        return os.path.getsize(p) if os.path.isfile(p) else None
    if isinstance(zstore, FsspecStore):
        return remote.size(zstore, key)
    if not isinstance(zstore, ZipStore):  # any other zarr store object
        try:
            return int(sync(zstore.getsize(key)))
        except FileNotFoundError:
            return None
    try:
        if zf is not None:
            return zf.getinfo(key).file_size
        with zipfile.ZipFile(path) as z:
            return z.getinfo(key).file_size
    except KeyError:
        return None


def _root_json_size(zstore, path: str) -> int | None:
    return json_size(zstore, path)


def _interrupted_hint(path: str) -> str:
    base = os.path.basename(os.path.normpath(path))
    if BUILDING_MARK in base:
        return (" This folder is the temporary build of an interrupted `uwsfmt convert`; run the conversion "
                "again (it removes such leftovers) or delete the folder.")
    if REPLACED_MARK in base:
        return (" This folder is a store replaced by `uwsfmt convert --overwrite`, which was interrupted while "
                "deleting it; the new store is in place. Delete the folder (the next convert to that path does).")
    return ""


def read_manifest(zstore: Store, path: str) -> dict:
    """Load and check the manifest: size limit, JSON, format version, schema."""
    size = _root_json_size(zstore, path)
    if size is None:
        hint = _interrupted_hint(path)
        if isinstance(zstore, FsspecStore):
            hint = (" A convert to this URL is uploading it, or was killed (converting again removes the leftovers)."
                    if remote.size(zstore, remote.BUILDING_OBJECT) is not None else " Check the URL (bucket and prefix).")
        raise FormatError(f"{path}: not a UWS store: no zarr.json at its root.{hint}")
    if size > MAX_MANIFEST_BYTES:
        raise FormatError(
            f"{path}: zarr.json is {size} bytes, above the {MAX_MANIFEST_BYTES}-byte limit; "
            "refusing to parse it (the store is damaged or hostile)"
        )
    try:
        root = zarr.open_group(zstore, mode="r", zarr_format=3)
        attrs = dict(root.attrs)
    except Exception as e:  # zarr raises many types for a broken hierarchy (RecursionError, MemoryError too)
        raise FormatError(f"{path}: the root zarr.json is not a readable Zarr v3 group ({short(e)})") from e
    m = attrs.get("uws")
    if not isinstance(m, dict):
        raise FormatError(f"{path}: a Zarr group but not a UWS store (no 'uws' attribute in zarr.json)")
    check_version(m.get("format_version"), path)
    # before the schema: a store still being built (or whose build was killed) lacks required fields
    if m.get("state") != "complete":
        raise FormatError(
            f"{path}: the store is marked {m.get('state')!r}, not 'complete': a conversion was "
            f"interrupted or is still running.{_interrupted_hint(path) or ' Delete it and run the conversion again.'}"
        )

    validate_manifest(m, path)
    return m


def short(e: BaseException, limit: int = 300) -> str:
    msg = f"{type(e).__name__}: {e}" if not isinstance(e, (OSError, ValueError)) else str(e)
    return msg if len(msg) <= limit else msg[:limit] + "..."


def _codec_names(codecs) -> Iterable[str]:
    for c in codecs or ():
        name = c.get("name") if isinstance(c, dict) else None
        yield str(name)
        conf = c.get("configuration") if isinstance(c, dict) else None
        if name == "sharding_indexed" and isinstance(conf, dict):
            yield from _codec_names(conf.get("codecs"))
            yield from _codec_names(conf.get("index_codecs"))


def check_array_metadata(arr, where: str) -> None:
    """Refuse arrays outside the format before any chunk is decoded: other data types or codecs
    (a pickle-based codec must never run), or chunks too large to allocate."""
    meta = arr.metadata.to_dict()
    dtype = str(arr.dtype)
    if dtype not in STORAGE_DTYPES:
        raise FormatError(f"{where} has data type {dtype}, not one the UWS format allows ({', '.join(sorted(STORAGE_DTYPES))})")
    bad = [n for n in _codec_names(meta.get("codecs")) if n not in ALLOWED_CODECS]
    if bad:
        raise FormatError(f"{where} uses codec {bad[0]!r}; UWS arrays may only use {', '.join(sorted(ALLOWED_CODECS))}. "
                          "Refusing to decode it (the store is damaged or hostile)")
    grid = meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape") or list(arr.shape)
    inner = grid
    for c in meta.get("codecs") or ():
        if c.get("name") == "sharding_indexed":
            inner = c["configuration"]["chunk_shape"]
            per_shard = math.prod(max(1, -(-int(g) // max(1, int(i)))) for g, i in zip(grid, inner))
            if per_shard * 16 > MAX_CHUNK_BYTES:
                raise FormatError(f"{where}: a shard of {per_shard} chunks is too large an index to read; the store is damaged or hostile")
    nbytes = math.prod(int(x) for x in inner) * np.dtype(dtype).itemsize
    if nbytes > MAX_CHUNK_BYTES:
        raise FormatError(f"{where}: chunks of {list(inner)} decode to {nbytes} bytes, above the {MAX_CHUNK_BYTES}-byte "
                          "limit; the store is damaged or hostile")


def check_version(v: Any, path: str) -> tuple[int, int]:
    if not isinstance(v, str) or v.count(".") != 1:
        raise FormatError(f"{path}: format_version {v!r} is not of the form 'MAJOR.MINOR'")
    try:
        major, minor = (int(x) for x in v.split("."))
    except ValueError as e:
        raise FormatError(f"{path}: format_version {v!r} is not of the form 'MAJOR.MINOR'") from e
    if major != layout.FORMAT_MAJOR:
        raise VersionError(
            f"{path}: UWS format {v} is not readable by this uwsfmt (it reads "
            f"{layout.FORMAT_MAJOR}.x). Install a uwsfmt release that supports format {major}.x."
        )
    return major, minor


def dumps_manifest(m: dict) -> str:
    return json.dumps(m, allow_nan=False)
