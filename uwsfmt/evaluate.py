"""Functional checks: the user's own metric on each original model and on its reconstruction.

Weight error is a proxy; what matters is behaviour. :func:`evaluate` runs an evaluation
callable (task accuracy, loss, a perplexity...) on both versions of every model, so an error
budget can be chosen by what it does to the metric.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch

from uwsfmt.errors import ConfigError, NotFoundError, SourceError
from uwsfmt.reader.store import StoreReader
from uwsfmt.reader.store import open_reader as open_store
from uwsfmt.sources import Checkpoint, discover, open_checkpoint
from uwsfmt.sources.provenance import resolve as resolve_source
from uwsfmt.sources.registry import Sources

StateDict = dict[str, torch.Tensor]


def _caller(fn: Callable) -> Callable[[str, StateDict], float]:
    """``fn(model_id, state_dict)``, or ``fn(state_dict)`` when it takes one argument."""
    if not callable(fn):
        raise ConfigError(f"evaluate needs a callable fn(model_id, state_dict) -> float, not {type(fn).__name__}")
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
        one = len(params) == 1 and not any(p.kind == p.VAR_POSITIONAL for p in inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature
        one = False
    return (lambda mid, sd: fn(sd)) if one else fn


def _as_state_dict(src: Any, mid: str) -> StateDict:
    if isinstance(src, Mapping):
        return dict(src)
    ck = src if isinstance(src, Checkpoint) else open_checkpoint(os.fspath(src), id=mid)
    try:
        return {name: ck.get(name) for name in ck.infos()}
    finally:
        if ck is not src:
            ck.close()


def _originals(store, sources, source_root=None) -> dict[str, Any]:
    """model id -> state dict, Checkpoint or path of the original (models without one are left out)."""
    if sources is None:  # the files the store was built from, if they are still there and unchanged
        out = {}
        for m in store.manifest["models"]:
            src = m.get("source") or {}
            path = resolve_source(src, source_root)
            if not path or not os.path.exists(path):
                continue
            ck = open_checkpoint(path, id=m["id"])
            want = src.get("sha256")
            if want and ck.fingerprint().get("sha256") not in (None, want):
                ck.close()
                raise SourceError(f"{path}: the source of model {m['id']!r} changed since it was stored; "
                                  "pass the originals explicitly (sources=...)")
            out[m["id"]] = ck
        return out
    if isinstance(sources, Mapping):
        return dict(sources)
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    return {ck.id: ck for ck in discover(list(sources) if isinstance(sources, Iterable) else [sources])}


def evaluate(
    store: StoreReader | str | os.PathLike,
    fn: Callable[..., float],
    sources: Mapping[str, StateDict | str | os.PathLike | Checkpoint] | Sources | None = None,
    *,
    models: Iterable[str] | None = None,
    device: str | torch.device | None = None,
    source_root: str | os.PathLike | None = None,
) -> dict[str, dict[str, float | None]]:
    """Metric of every model's original and reconstruction: ``{id: {original, reconstructed, delta}}``.

    ``fn(model_id, state_dict) -> float`` (or ``fn(state_dict)``) scores one model, e.g. the
    accuracy of a module loaded with the state dict on the model's task. ``sources``: the
    originals as ``{model_id: state_dict | path | Checkpoint}`` or paths/folders/globs matched by
    model id; by default the files the store was built from (checked against their recorded
    sha256). Models whose original is not available get ``original = delta = None``.
    ``delta`` = reconstructed - original.

    >>> fam = uwsfmt.testing.families.trained_family(n_tasks=3)  # doctest: +SKIP
    >>> store = uwsfmt.convert(fam.state_dicts, "fam.uws", max_error=0.05)  # doctest: +SKIP
    >>> res = uwsfmt.evaluate(store, fam.evaluate, sources=fam.state_dicts)  # doctest: +SKIP
    >>> res["task-000"]  # doctest: +SKIP
    {'original': 97.6, 'reconstructed': 97.4, 'delta': -0.2}
    """

    st = store if isinstance(store, StoreReader) else open_store(store)
    call = _caller(fn)
    ids = list(models) if models is not None else st.model_ids
    for mid in ids:
        st.model_index(mid)  # NotFoundError with suggestions
    originals = _originals(st, sources, source_root)
    unknown = [k for k in originals if k not in st.model_ids] if sources is not None and isinstance(sources, Mapping) else []
    if unknown:
        raise NotFoundError(f"{st.path}: sources name models the store does not hold: {', '.join(map(str, unknown[:5]))}")
    out: dict[str, dict[str, float | None]] = {}
    try:
        for mid in ids:
            rec = float(call(mid, st.state_dict(mid, device=device)))
            orig = None
            if mid in originals:
                sd = _as_state_dict(originals[mid], mid)
                if device is not None:
                    sd = {k: v.to(device) for k, v in sd.items()}
                orig = float(call(mid, sd))
            out[mid] = {"original": orig, "reconstructed": rec, "delta": None if orig is None else rec - orig}
    finally:
        if sources is None or not isinstance(sources, Mapping):
            for ck in originals.values():
                if isinstance(ck, Checkpoint):
                    ck.close()
    return out


def summarize(results: dict[str, dict[str, float | None]]) -> dict[str, float | None]:
    """Means over models and the worst drop of an :func:`evaluate` result.

    >>> summarize({"a": {"original": 90.0, "reconstructed": 89.0, "delta": -1.0}})
    {'original': 90.0, 'reconstructed': 89.0, 'delta': -1.0, 'worst_delta': -1.0}
    """
    def mean(key):
        vals = [r[key] for r in results.values() if r[key] is not None]
        return float(np.mean(vals)) if vals else None

    deltas = [r["delta"] for r in results.values() if r["delta"] is not None]
    return {"original": mean("original"), "reconstructed": mean("reconstructed"), "delta": mean("delta"),
            "worst_delta": float(min(deltas)) if deltas else None}
