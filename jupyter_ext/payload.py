"""What the views receive: library results turned into JSON-safe, compact payloads.

Pure functions, no widgets: numpy scalars become Python numbers, NaN/Inf become None (JSON has
neither), and the per-model x per-tensor error matrix travels as one float32 binary buffer
instead of a nested JSON list.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from uwsfmt.report import leading_above

#: the heatmap is max-pooled down to at most this many rows and columns
HEATMAP_MAX_CELLS = 1024


def jsonable(x: Any) -> Any:
    """Recursively convert ``x`` into what JSON can carry (NaN/Inf -> None).

    >>> jsonable({"a": np.float32(1.5), "b": (1, float("nan")), "c": np.arange(2)})
    {'a': 1.5, 'b': [1, None], 'c': [0, 1]}
    """
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        v = float(x)
        return v if math.isfinite(v) else None
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in x]
    if isinstance(x, (_dt.datetime, _dt.date)):
        return x.isoformat()
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if hasattr(x, "tolist"):  # torch tensors and other array-likes
        return jsonable(x.tolist())
    return str(x)


def _pool_max(a: np.ndarray, axis: int, limit: int) -> tuple[np.ndarray, int]:
    """Max-pool ``a`` along ``axis`` so that it has at most ``limit`` entries there."""
    n = a.shape[axis]
    if n <= limit:
        return a, 1
    block = math.ceil(n / limit)
    pad = block * math.ceil(n / block) - n
    if pad:
        widths = [(0, 0), (0, 0)]
        widths[axis] = (0, pad)
        a = np.pad(a, widths, constant_values=np.nan)
    if axis == 0:
        a = a.reshape(-1, block, a.shape[1])
        pooled = np.nanmax(np.where(np.isnan(a), -np.inf, a), axis=1)
    else:
        a = a.reshape(a.shape[0], -1, block)
        pooled = np.nanmax(np.where(np.isnan(a), -np.inf, a), axis=2)
    pooled = np.where(np.isneginf(pooled), np.nan, pooled)
    return pooled, block


def heatmap(errors: np.ndarray, max_cells: int = HEATMAP_MAX_CELLS) -> tuple[bytes, dict]:
    """The (n_models, n_tensors) error matrix as float32 bytes plus its geometry.

    Large matrices are max-pooled (a cell shows the worst error of its block), so that a family
    of thousands of models still costs at most ``max_cells**2`` floats on the wire.

    >>> data, meta = heatmap(np.array([[0.1, 0.2], [0.3, np.nan]]))
    >>> meta["rows"], meta["cols"], len(data)
    (2, 2, 16)
    """
    e = np.asarray(errors, dtype=np.float64)
    if e.ndim != 2:
        e = e.reshape(0, 0)
    n_models, n_tensors = e.shape
    e = np.where(np.isfinite(e), e, np.nan)
    with np.errstate(all="ignore"):
        e, row_block = _pool_max(e, 0, max_cells)
        e, col_block = _pool_max(e, 1, max_cells)
    finite = e[np.isfinite(e)]
    positive = finite[finite > 0]
    meta = {
        "rows": int(e.shape[0]), "cols": int(e.shape[1]),
        "row_block": row_block, "col_block": col_block,
        "n_models": int(n_models), "n_tensors": int(n_tensors),
        "min": float(finite.min()) if finite.size else None,
        "max": float(finite.max()) if finite.size else None,
        "min_positive": float(positive.min()) if positive.size else None,
    }
    return np.ascontiguousarray(e, dtype="<f4").tobytes(), meta


def spectrum(name: str, sp: Mapping[str, Any]) -> dict:
    """A spectrum from :meth:`Store.spectrum` as the view draws it."""
    vals = np.asarray(sp.get("eigenvalues", []), dtype=np.float64)
    null = sp.get("null")
    null = np.asarray(null, dtype=np.float64) if null is not None else None
    explained = sp.get("explained")
    if explained is None:
        total = vals.sum()
        explained = np.cumsum(vals) / total if total > 0 else np.ones_like(vals)
    kept = sp.get("kept")
    out = {
        "name": name,
        "side": sp.get("side"),
        "eigenvalues": jsonable(vals),
        "null": jsonable(null) if null is not None else None,
        "explained": jsonable(np.asarray(explained, dtype=np.float64)),
        "kept": jsonable(kept),
        "tau": jsonable(sp.get("tau")),
        "n_above_null": leading_above(vals, null) if null is not None else None,
    }
    k = kept if isinstance(kept, (int, np.integer)) else None
    out["explained_at_kept"] = (
        float(np.asarray(explained)[k - 1]) if k and 0 < k <= len(explained) else (0.0 if k == 0 else None)
    )
    return out


def store_view(store: Any) -> tuple[dict, bytes]:
    """What an inspector shows on opening a store (metadata only, no spectra): summary, tensor and
    model tables, heatmap geometry; plus the heatmap itself as float32 bytes (see :func:`heatmap`).
    The notebook widget and the JupyterLab panel both take it from here.

    >>> view, data = store_view(uwsfmt.open("family.uws"))  # doctest: +SKIP
    >>> sorted(view)  # doctest: +SKIP
    ['heatmap', 'models', 'summary', 'tensors']
    """
    summary, tensors, models, errors = store.summary(), store.tensor_table(), store.model_table(), store.errors()
    data, meta = heatmap(errors)
    return {"summary": jsonable(summary), "tensors": jsonable(tensors), "models": jsonable(models), "heatmap": meta}, data


def export_formats(store: Any, model_id: str | None = None) -> list[str]:
    """The formats a model of ``store`` can be exported to: the store's own answer where it has one
    (``Store.export_formats``), else safetensors, plus peft and kohya for a store of LoRA adapters.

    >>> class Plain:
    ...     manifest = {"tensors": [{"name": "w", "encoding": "subspace"}]}
    >>> export_formats(Plain())
    ['safetensors']
    """
    ask = getattr(store, "export_formats", None)
    if callable(ask) and model_id is not None:
        return [str(f) for f in ask(model_id)]
    if callable(ask) and getattr(store, "model_ids", None):  # the store's: every format some model offers (hf, peft...)
        seen: dict[str, None] = {}
        for mid in store.model_ids:
            seen.update(dict.fromkeys(str(f) for f in ask(mid)))
        return list(seen)
    tensors = (getattr(store, "manifest", None) or {}).get("tensors") or []
    lora = any(isinstance(e, Mapping) and e.get("lora") is not None for e in tensors)
    return ["safetensors", "peft", "kohya"] if lora else ["safetensors"]
