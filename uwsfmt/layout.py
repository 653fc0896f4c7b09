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

import math

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

FORMAT_VERSION = "1.0"
FORMAT_MAJOR = 1
FORMAT_MINOR = 0

PACKS = "packs"
TENSORS = "tensors"
#: bytes per inner chunk of a pack row: small, so that reading one tensor's slots reads little
#: more than them (random access), while a whole row is still one shard file: uwsfmt reads it
#: with a handful of system calls whatever the chunk count (uwsfmt.shards). Measured
#: (bench/): 64 KiB -> 4 MiB chunks change the direct row read by < 0.5 ms on an 8 MiB row, but
#: zarr-python's generic read from ~3 ms (4 MiB) to ~8 ms (256 KiB) to ~19 ms (64 KiB).
PACK_CHUNK_BYTES = 256 << 10
#: bytes per chunk of the per-tensor arrays (mean, bases).
ARRAY_CHUNK_BYTES = 8 << 20
LOCK_FILE = ".uws.lock"


def pack_path(storage_dtype: str) -> str:
    return f"{PACKS}/{storage_dtype}"


def tensor_node(node: str) -> str:
    return f"{TENSORS}/{node}"


def _compressors(dtype: str) -> list:
    # float data barely compresses (~1.1x) and decoding costs time on every read: checksum only.
    if np.dtype(dtype).kind in "biu" and dtype != "uint16":
        return [ZstdCodec(level=3), Crc32cCodec()]
    return [Crc32cCodec()]


def pack_chunk_len(width: int, dtype: str) -> int:
    per = max(1, PACK_CHUNK_BYTES // np.dtype(dtype).itemsize)
    # equal chunks of at most `per`: zarr stores an edge chunk at full size, so a row of
    # per + 1 values split as (per, 1) would cost two full chunks on disk (up to 2x)
    n = max(1, math.ceil(width / per))
    return max(1, math.ceil(width / n))


def create_pack(zstore, storage_dtype: str, n_models: int, width: int):
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


def write_array(zstore, path: str, data: np.ndarray, attributes: dict | None = None):
    """Write a whole per-tensor array (mean, basis, spectrum, shared value) in row chunks."""
    data = np.ascontiguousarray(data)
    if data.ndim == 0:
        data = data.reshape(1)
    row_bytes = max(1, data.itemsize * int(np.prod(data.shape[1:], dtype=np.int64)))
    rows = max(1, min(data.shape[0] or 1, ARRAY_CHUNK_BYTES // row_bytes))
    # equal chunks: a last chunk of a few rows would still be stored (and read) at full size
    rows = -(-(data.shape[0] or 1) // -(-(data.shape[0] or 1) // rows))
    chunks = (rows,) + tuple(max(1, s) for s in data.shape[1:])
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
    return arr
