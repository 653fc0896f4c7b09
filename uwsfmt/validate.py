"""Check a store against the spec: schema, arrays, shapes, orthonormal bases, committed state."""

from __future__ import annotations

import numpy as np
import torch

from . import dtypes
from .errors import FormatError, UWSError


def _expect(store, path: str, shape: tuple | None, dtype: str | None, problems: list[str], what: str):
    try:
        arr = store._array(path)
    except FormatError as e:
        problems.append(f"{what}: {e}")
        return None
    if shape is not None and tuple(arr.shape) != tuple(shape):
        problems.append(f"{what}: array {path} has shape {list(arr.shape)}, the manifest implies {list(shape)}")
    if dtype is not None and str(arr.dtype) != dtype:
        problems.append(f"{what}: array {path} has dtype {arr.dtype}, expected {dtype}")
    return arr


def validate_store(store, *, deep: bool = False, tol: float = 1e-3) -> list[str]:
    """Return a list of problems (empty when the store is valid). ``deep`` reads every model."""
    problems: list[str] = []
    m = store.manifest
    n = store.n_models
    for p, info in m["packs"].items():
        arr = _expect(store, info["path"], None, p, problems, f"pack {p}")
        if arr is not None:
            if arr.shape[1] != info["width"]:
                problems.append(f"pack {p}: width {arr.shape[1]} != manifest width {info['width']}")
            if arr.shape[0] < n:
                problems.append(f"pack {p}: {arr.shape[0]} rows for {n} committed models")
    for e in m["tensors"]:
        what = f"tensor {e['name']!r}"
        enc = e["encoding"]
        if enc == "shared":
            _expect(store, e["data"]["path"], e["shape"], dtypes.storage_dtype(e["dtype"]), problems, what)
        elif enc == "dense" and e["data"].get("per_model"):
            for i in range(n):
                _expect(store, f"{e['node']}/models/{i}", None, dtypes.storage_dtype(e["dtype"]), problems, what)
        elif enc == "subspace":
            mv, nv = e["view"]
            if int(np.prod(e["shape"], dtype=np.int64)) != mv * nv:
                problems.append(f"{what}: view {e['view']} does not hold shape {e['shape']}")
            cdt = "float64" if e["dtype"] == "float64" else "float32"
            if e["mean"]:
                _expect(store, e["mean"], (mv, nv), cdt, problems, what)
            kl, kr = e["rank"]
            r = kl if e["left"] else mv
            c = kr if e["right"] else nv
            if list(e["coefficients"]["shape"]) != [r, c] or e["coefficients"]["length"] != r * c:
                problems.append(f"{what}: coefficient slot {e['coefficients']} does not match ranks {e['rank']} and view {e['view']}")
            for side, dim, k in (("left", mv, kl), ("right", nv, kr)):
                if not e[side]:
                    continue
                arr = _expect(store, e[side], (dim, k), "float32", problems, what)
                if arr is not None and k:
                    b = torch.from_numpy(arr[...]).double()
                    dev = float((b.T @ b - torch.eye(k, dtype=torch.float64)).abs().max())
                    if dev > tol:
                        problems.append(f"{what}: {side} basis is not orthonormal (max |B^T B - I| = {dev:.2e})")
            for side, path in e["spectrum"].items():
                arr = _expect(store, path, None, "float64", problems, what)
                if arr is not None and arr.ndim != 1:
                    problems.append(f"{what}: spectrum {path} is not 1-D")
    if deep and not problems:
        problems += _deep(store)
    return problems


def _deep(store) -> list[str]:
    """Read every model back; check finiteness and shapes (errors are recomputed in build.verify)."""
    out = []
    for i, mid in enumerate(store.model_ids):
        try:
            sd = store.state_dict(i)
        except UWSError as e:
            out.append(f"model {mid!r}: {e}")
            continue
        for e in store.manifest["tensors"]:
            t = sd[e["name"]]
            if e["shape"] is not None and list(t.shape) != e["shape"]:
                out.append(f"model {mid!r}, tensor {e['name']!r}: shape {list(t.shape)} != {e['shape']}")
            if t.is_floating_point() and e["encoding"] == "subspace" and not bool(torch.isfinite(t).all()):
                out.append(f"model {mid!r}, tensor {e['name']!r}: reconstruction has NaN/Inf")
    return out


def validate(path: str, *, deep: bool = False) -> list[str]:
    """Open and validate a store; raises FormatError for stores that cannot even be opened."""
    from .store import open as open_store

    with open_store(path) as store:
        return validate_store(store, deep=deep)
