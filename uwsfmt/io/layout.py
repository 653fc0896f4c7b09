"""Where things live in a UWS store, and how arrays are created (spec sections 3-5).

A UWS store is a Zarr v3 hierarchy:

    zarr.json                         root group; attributes["uws"] = the manifest
    packs/<dtype>                     per-model data, one row per model, one shard per row
    tensors/<node>/mean|left|right    per-tensor shared arrays of subspace tensors
    tensors/<node>/spectrum_left|_right   full eigenvalue spectra
    tensors/<node>/value              shared (bit-identical) tensors
    tensors/<node>/models/<index>     dense tensors whose shape varies between models
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import stat

import crc32c
import numpy as np
import zarr
import zarr.storage
from zarr.abc.store import Store
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype

#: the newest format this uwsfmt writes (spec/uws-1.md section 12); a store is written with the
#: lowest version whose features it uses (:func:`version_for`), so 1.0 readers read what they can
FORMAT_VERSION = "1.3"
FORMAT_MAJOR, FORMAT_MINOR = (int(x) for x in FORMAT_VERSION.split("."))


def version_for(half_means: bool, quantized_coefficients: bool = False, column_scales: bool = False) -> str:
    """The format version a new store declares: 1.3 when a residual has per-column scales (added
    by 1.3), else 1.2 when coefficients are quantized (added by 1.2), else 1.1 when a subspace
    mean is stored in float16 (added by 1.1), else 1.0."""
    return "1.3" if column_scales else "1.2" if quantized_coefficients else "1.1" if half_means else "1.0"

PACKS = "packs"
TENSORS = "tensors"
#: bytes per inner chunk of a pack row: small, so that reading one tensor's slots reads little
#: more than them (random access: on object storage one tensor of a 500-tensor family costs its
#: shard index and one 16 KiB chunk, not the 250 KiB chunk 256 KiB chunks cost), while a whole
#: row is still one shard: uwsfmt reads it with a handful of system calls locally (uwsfmt.shards)
#: and with one GET remotely, whatever the chunk count. Each chunk costs 20 bytes (index entry +
#: checksum): 0.12%. Measured (bench/): 64 KiB -> 4 MiB chunks change the direct row read by
#: < 0.5 ms on an 8 MiB row; zarr-python's generic whole-row decode (remote stores) grows with
#: the chunk count (~19 ms for 64 KiB chunks of an 8 MiB row).
PACK_CHUNK_BYTES = 16 << 10
#: bytes per chunk of the per-tensor arrays (mean, bases).
ARRAY_CHUNK_BYTES = 8 << 20
LOCK_FILE = ".uws.lock"


def pack_path(storage_dtype: str) -> str:
    return f"{PACKS}/{storage_dtype}"


def tensor_node(node: str) -> str:
    return f"{TENSORS}/{node}"


def _compressors(dtype: str) -> list:
    # float data barely compresses (~1.1x) and decoding costs time on every read: checksum only.
    # Integer arrays, the uint8 pack of quantized codes included, get zstd: on 16 KiB frames of
    # codes it gives 1.1-1.3x (4 and 8 bits) and 1.3-1.6x (2 bits, whose codes use 3 of 4
    # levels), nothing on 1-bit codes; the transformer family's default store is 5.5% larger
    # without it (bench/rate_distortion.py)
    if np.dtype(dtype).kind in "biu" and dtype != "uint16":
        return [ZstdCodec(level=3), Crc32cCodec()]
    return [Crc32cCodec()]


def pack_chunk_len(width: int, dtype: str) -> int:
    per = max(1, PACK_CHUNK_BYTES // np.dtype(dtype).itemsize)
    # equal chunks of at most `per`: zarr stores an edge chunk at full size, so a row of
    # per + 1 values split as (per, 1) would cost two full chunks on disk (up to 2x)
    n = max(1, math.ceil(width / per))
    return max(1, math.ceil(width / n))


def create_pack(zstore: Store, storage_dtype: str, n_models: int, width: int) -> zarr.Array:
    """A pack array (n_models, width): one shard per model row, inner chunks of the row."""
    c = pack_chunk_len(width, storage_dtype)
    shard = c * math.ceil(width / c)
    return zarr.create_array(
        zstore,
        name=pack_path(storage_dtype),
        shape=(n_models, width),
        dtype=storage_dtype,
        chunks=(1, c),
        shards=(1, shard),
        compressors=_compressors(storage_dtype),
        filters=None,
        fill_value=0,
        dimension_names=("model", "element"),
        overwrite=True,
    )


def write_array(zstore: Store, path: str, data: np.ndarray, attributes: dict | None = None) -> None:
    """Write a whole per-tensor array (mean, basis, spectrum, shared value) in row chunks,
    replacing whatever was at ``path``."""
    data = np.ascontiguousarray(data)
    if data.ndim == 0:
        data = data.reshape(1)
    row_bytes = max(1, data.itemsize * int(np.prod(data.shape[1:], dtype=np.int64)))
    rows = max(1, min(data.shape[0] or 1, ARRAY_CHUNK_BYTES // row_bytes))
    # equal chunks: a last chunk of a few rows would still be stored (and read) at full size
    rows = -(-(data.shape[0] or 1) // -(-(data.shape[0] or 1) // rows))
    chunks = (rows,) + tuple(max(1, s) for s in data.shape[1:])
    root = _local_root(zstore)
    template = _array_template(str(data.dtype), data.ndim) if root is not None else None
    if template is not None:
        assert root is not None  # a template only for a local store
        _parent_groups(root, path)
        _write_array_files(os.path.join(root, path), template, data, chunks, attributes or {})
        return
    arr = zarr.create_array(
        zstore,
        name=path,
        shape=data.shape,
        dtype=data.dtype,
        chunks=chunks,
        compressors=_compressors(str(data.dtype)),
        filters=None,
        fill_value=0,
        attributes=attributes or {},
        overwrite=True,
    )
    if data.size:
        arr[...] = data


def create_group(zstore: Store, path: str, attributes: dict | None = None) -> None:
    """Create (or replace) an empty group at ``path`` with ``attributes``."""
    root = _local_root(zstore)
    if root is None or not path:
        zarr.open_group(zstore, path=path, mode="w", attributes=attributes or {})
        return
    _parent_groups(root, path)
    folder = os.path.join(root, path)
    _clear(folder)
    os.makedirs(folder)
    _put(os.path.join(folder, "zarr.json"), _group_doc(attributes or {}))


def _group_doc(attributes: dict) -> bytes:
    return json.dumps({"attributes": attributes, "zarr_format": 3, "node_type": "group"}, allow_nan=False).encode()


def _parent_groups(root: str, path: str) -> None:
    """Give every folder above ``path`` that has no zarr.json an empty group's (as zarr does)."""
    parts = path.strip("/").split("/")[:-1]
    for i in range(len(parts) + 1):
        meta = os.path.join(root, *parts[:i], "zarr.json")
        if not os.path.exists(meta):
            os.makedirs(os.path.dirname(meta), exist_ok=True)
            _put(meta, _group_doc({}))


# ---------------------------------------------------------------------------- direct writes
#
# zarr-python spends ~3 ms per array it creates and writes through its synchronous API (event
# loop round trips, an existence check, metadata parsing), against ~0.2 ms for the files
# themselves (measured on 2 cores: 300 arrays of 64x64 float32). A store has 3-4 arrays per
# tensor, so a model with 2,000 small tensors spent 20 of its 31 s build there. For local
# stores and the codec chain of float arrays (bytes, crc32c), uwsfmt therefore writes the
# files itself: the metadata document is zarr's own (from an array zarr creates in memory, once
# per dtype and rank, with shape, chunk shape and attributes filled in), each chunk is the
# little-endian bytes of the chunk (the edge chunk padded with the fill value 0, as zarr
# stores it) followed by their CRC32C, little-endian (Zarr v3 "crc32c" codec). Every chunk is
# written, even one equal to the fill value (zarr would skip it; readers treat both the same,
# and a chunk of -0.0 keeps its sign). Anything else (compressed integer arrays, other stores)
# goes through zarr. tests/test_layout.py checks the files against zarr's for every dtype.

_TEMPLATES: dict[tuple[str, int], dict | None] = {}


def _local_root(zstore) -> str | None:
    """The folder of a writable zarr LocalStore, else None."""
    if isinstance(zstore, zarr.storage.LocalStore) and not zstore.read_only:
        return str(zstore.root)
    return None


def _array_template(dtype: str, ndim: int) -> dict | None:
    """zarr's metadata document for an array of ``dtype`` and rank ``ndim`` as write_array
    creates it, or None where the codecs are not (bytes, crc32c)."""
    key = (dtype, ndim)
    if key not in _TEMPLATES:
        doc = None
        codecs = _compressors(dtype)
        if len(codecs) == 1 and isinstance(codecs[0], Crc32cCodec):
            arr = zarr.create_array(zarr.storage.MemoryStore(), shape=(1,) * ndim, dtype=dtype, chunks=(1,) * ndim,
                                    compressors=codecs, filters=None, fill_value=0)
            doc = json.loads(arr.metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes())
            names = [c.get("name") for c in doc.get("codecs", [])]
            endian = doc["codecs"][0].get("configuration", {}).get("endian") if names else None
            if names != ["bytes", "crc32c"] or endian not in ("little", None) or doc.get("chunk_key_encoding") != _KEYS:
                doc = None  # a zarr that lays arrays out differently: let it write them
        _TEMPLATES[key] = doc
    return _TEMPLATES[key]


_KEYS = {"name": "default", "configuration": {"separator": "/"}}


def _write_array_files(folder: str, template: dict, data: np.ndarray, chunks: tuple[int, ...], attributes: dict) -> None:
    # the template's own parts are shared, never changed: the document is serialised at once
    # (a deep copy per array cost 80 us, 0.5 s of a 2,000-tensor build)
    grid_doc = template["chunk_grid"]
    doc = {**template, "shape": list(data.shape), "attributes": attributes,
           "chunk_grid": {**grid_doc, "configuration": {**grid_doc["configuration"], "chunk_shape": list(chunks)}}}
    _clear(folder)
    os.makedirs(folder)
    _put(os.path.join(folder, "zarr.json"), json.dumps(doc, allow_nan=False).encode())
    if not data.size:
        return
    little = data.dtype.newbyteorder("<")
    made = {folder}  # the chunk folders below it are new: one mkdir each
    grid = [range(-(-s // c)) for s, c in zip(data.shape, chunks)]
    for idx in itertools.product(*grid):
        block = data[tuple(slice(i * c, (i + 1) * c) for i, c in zip(idx, chunks))]
        if block.shape != chunks:  # edge chunk: stored at full size, padded with the fill value
            full = np.zeros(chunks, dtype=data.dtype)
            full[tuple(slice(0, s) for s in block.shape)] = block
            block = full
        raw = memoryview(np.ascontiguousarray(block, dtype=little)).cast("B")  # type: ignore[arg-type]  # numpy stubs: no __buffer__ < 3.12
        parts = ["c", *map(str, idx[:-1])]
        for i in range(1, len(parts) + 1):
            sub = os.path.join(folder, *parts[:i])
            if sub not in made:
                os.mkdir(sub)
                made.add(sub)
        parent = os.path.join(folder, *parts)
        _put(os.path.join(parent, str(idx[-1])), raw, crc32c.crc32c(raw).to_bytes(4, "little"))


def _clear(folder: str) -> None:
    """Remove what a node at ``folder`` held (zarr's overwrite), keeping nothing stale."""
    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(folder)
    else:
        os.remove(folder)


def _put(path: str, *parts) -> None:
    """Write a file (its folder exists). Not atomic on its own: a store's arrays are only
    referenced once the manifest naming them is committed, after every write finished (a
    build writes into a folder renamed into place at the end; ``append`` commits last)."""
    with open(path, "wb") as f:
        for part in parts:
            f.write(part)
