"""Logical dtypes (what a tensor is) and storage dtypes (what Zarr holds).

Zarr has no bfloat16 and no float8: those are stored as their raw bits in an unsigned
integer array of the same width, with the logical dtype recorded in the manifest.
"""

from __future__ import annotations

import numpy as np
import torch

from uwsfmt.errors import SourceError

# logical name -> (torch dtype, storage numpy dtype name)
_TABLE: dict[str, tuple[torch.dtype, str]] = {
    "float64": (torch.float64, "float64"),
    "float32": (torch.float32, "float32"),
    "float16": (torch.float16, "float16"),
    "bfloat16": (torch.bfloat16, "uint16"),
    "float8_e4m3fn": (torch.float8_e4m3fn, "uint8"),
    "float8_e5m2": (torch.float8_e5m2, "uint8"),
    "int64": (torch.int64, "int64"),
    "int32": (torch.int32, "int32"),
    "int16": (torch.int16, "int16"),
    "int8": (torch.int8, "int8"),
    "uint8": (torch.uint8, "uint8"),
    "bool": (torch.bool, "bool"),
}
_BY_TORCH = {v[0]: k for k, v in _TABLE.items()}
LOGICAL_DTYPES = tuple(_TABLE)
FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")


def name_of(dtype: torch.dtype) -> str:
    """Logical dtype name of a torch dtype, e.g. ``name_of(torch.bfloat16) == 'bfloat16'``."""
    try:
        return _BY_TORCH[dtype]
    except KeyError as e:
        raise SourceError(
            f"dtype {dtype} is not supported by the UWS format; supported: {', '.join(LOGICAL_DTYPES)}"
        ) from e


def torch_dtype(name: str) -> torch.dtype:
    return _TABLE[name][0]


def storage_dtype(name: str) -> str:
    """numpy dtype name used to store a tensor of logical dtype ``name``."""
    return _TABLE[name][1]


#: logical dtypes a tensor may be computed in (the subspace encoding, ``correct`` exceptions; spec §4);
#: every other dtype (integers, bool, float8) is stored exactly: dense, shared or ``replace``
COMPUTED = ("float64", "float32", "float16", "bfloat16")


def is_float(name: str) -> bool:
    return name in FLOAT_DTYPES


def to_storage(t: torch.Tensor) -> np.ndarray:
    """Bit-exact numpy view of a CPU tensor in its storage dtype."""
    t = t.detach().contiguous().cpu()
    logical = name_of(t.dtype)
    store = storage_dtype(logical)
    if logical in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        t = t.view(torch.uint16 if store == "uint16" else torch.uint8)
    return t.numpy()


def from_storage(a: np.ndarray, logical: str) -> torch.Tensor:
    """Inverse of :func:`to_storage`: numpy storage array -> torch tensor of the logical dtype."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if logical in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        t = t.view(torch_dtype(logical))
    return t
