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
#: elements per inner chunk of a pack row: small enough for random access to one tensor,
#: large enough that reading a whole model is a handful of requests.
PACK_CHUNK_BYTES = 4 << 20
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
    return max(1, min(width, per))


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
