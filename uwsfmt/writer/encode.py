"""Pass 2: one model's tensors -> coefficients, residuals and exceptions (its pack rows)."""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch
from zarr.abc.store import Store

from uwsfmt import encodings
from uwsfmt.encodings import budget, subspace
from uwsfmt.encodings import exception as exception_enc
from uwsfmt.encodings import lora as lora_enc
from uwsfmt.encodings.base import EncodeContext
from uwsfmt.errors import BudgetError, ConflictError
from uwsfmt.io import layout, overlap
from uwsfmt.numerics import linalg
from uwsfmt.sources import Checkpoint
from uwsfmt.writer.holdings import Holdings
from uwsfmt.writer.plan import check_finite, nonfinite_error, projected_nonfinite_error
from uwsfmt.writer.settings import BATCH_MAX_NUMEL, BATCH_MAX_VALUES, EXACT_REBUILD_BELOW


def _batch_key(e: dict, fit, info, budgeted: bool) -> tuple | None:
    """Key under which pass 2 encodes ``e`` together with others of its kind, or None.

    Small subspace tensors whose error takes the cheap path (:func:`_encode_subspace`: source in
    the compute dtype, no residual, no budget) are batched when they share view, mode, rank,
    dtype and centring: one stacked GEMM per group instead of Python work per tensor and model."""
    if budgeted or e["encoding"] != "subspace" or e.get("lora") is not None or e.get("residual") or "bits" in e["coefficients"]:
        return None
    if e["dtype"] not in ("float32", "float64") or info is None or info.dtype != e["dtype"]:
        return None
    m, n = e["view"]
    if m * n > BATCH_MAX_NUMEL or tuple(info.shape) != tuple(e["shape"]) or not isinstance(fit, subspace.Fit):
        return None
    return (tuple(e["view"]), e["mode"], tuple(x or 0 for x in e["rank"]), e["dtype"], fit.mean is not None)


def _batch_plans(entries: list[dict], fits: dict[str, Any], infos: dict, budgeted: bool) -> list[list[dict]]:
    """Groups (of 2 or more, at most :data:`BATCH_MAX_VALUES` values each) of entries that pass 2
    encodes together, in the order of ``entries``."""
    groups: dict[tuple, list[dict]] = {}
    for e in entries:
        key = _batch_key(e, fits.get(e["name"]), infos.get(e["name"]), budgeted)
        if key is not None:
            groups.setdefault(key, []).append(e)
    out: list[list[dict]] = []
    for key, members in groups.items():
        per = max(1, BATCH_MAX_VALUES // (key[0][0] * key[0][1]))
        out.extend(members[i: i + per] for i in range(0, len(members), per))
    return [g for g in out if len(g) > 1]


def _stacked(group: list[dict], fits: dict[str, Any], cache: dict) -> subspace.Prepared:
    """The group's means and bases stacked (G, ...), in the dtypes of :func:`subspace.prepared`
    (cached for the next models)."""
    key = tuple(e["name"] for e in group)
    st = cache.get(key)
    if st is None:
        view = tuple(group[0]["view"])
        ps = [subspace.prepared(fits[e["name"]], _compute_dtype(e["dtype"])) for e in group]

        def stack(field, shape=None):
            parts = [getattr(p, field) for p in ps]
            return None if parts[0] is None else torch.stack([t.reshape(shape) if shape else t for t in parts])

        p0 = ps[0]
        st = subspace.Prepared(p0.device, p0.cdt, stack("mean", view), None, None, stack("left"), stack("right"))
        cache[key] = st
    return st


def _encode_batch(group: list[dict], ws: list[torch.Tensor], st: subspace.Prepared, rows: dict[str, np.ndarray]
                  ) -> list[tuple[float, float | None] | None]:
    """:func:`_encode_subspace` (cheap error path) for a group of same-kind tensors of one model:
    (relative error, delta error) per member, or None where that member needs the exact
    rebuild (an error below :data:`EXACT_REBUILD_BELOW`, or NaN): the caller encodes it alone."""
    view = tuple(group[0]["view"])
    g = len(group)
    with linalg.no_tf32(), linalg.threads_for(g * view[0] * view[1]):
        w = torch.stack([x.to(st.device).reshape(view) for x in ws])
        if w.dtype != st.cdt:
            w = w.to(st.cdt)
        wn = torch.linalg.vector_norm(w.reshape(g, -1), dim=1, dtype=torch.float64)
        d = w.sub_(st.mean) if st.mean is not None else w  # w is a fresh stack: in place
        dn = torch.linalg.vector_norm(d.reshape(g, -1), dim=1, dtype=torch.float64) if st.mean is not None else None
        c = linalg.project(d, st.left, st.right).to(torch.float32)
        subspace.subtract_expansion(st, c, d)
        err = torch.linalg.vector_norm(d.reshape(g, -1), dim=1, dtype=torch.float64)
    flat = c.reshape(g, -1).cpu().numpy()
    wn, err = wn.tolist(), err.tolist()
    dn = None if dn is None else dn.tolist()
    out: list[tuple[float, float | None] | None] = []
    for i, e in enumerate(group):
        sl = e["coefficients"]
        rows[sl["pack"]][sl["offset"]: sl["offset"] + flat.shape[1]] = flat[i]
        if not err[i] >= EXACT_REBUILD_BELOW * wn[i]:
            out.append(None)
            continue
        rel = err[i] / wn[i] if wn[i] > 0 else (0.0 if err[i] == 0 else float("inf"))
        drel = None if dn is None else (err[i] / dn[i] if dn[i] > 0 else (0.0 if err[i] == 0 else float("inf")))
        out.append((rel, drel))
    return out


def _compute_dtype(logical: str) -> torch.dtype:
    return torch.float64 if logical == "float64" else torch.float32


def _finite_or_none(x: float | None) -> float | None:
    return x if (x is not None and np.isfinite(x)) else None


def encode_model(
    entries: list[dict], fits: dict[str, Any], ck: Checkpoint, widths: dict[str, int], *, allow_nonfinite: bool, store_path: str,
    error_budget: budget.Budget | None = None, corrections: dict | None = None, read_ahead: bool = False,
    stacks: dict | None = None, index: int | None = None, hold: Holdings | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor], list, list]:
    """One model -> (pack rows, per-model dense arrays, errors, delta errors).

    With an ``error_budget``, a tensor the store cannot hold within it (a subspace
    tensor whose projection misses the budget, a shared tensor this model differs in) gets a
    per-model exception (:func:`uwsfmt.encodings.exception.correct`) in ``corrections[name]``; its error
    is then the corrected one.

    Small subspace tensors of one kind are encoded in batches (:func:`_batch_plans`); ``stacks``
    keeps their stacked means and bases from one model to the next (a dict the caller keeps).

    ``index``: the model's position in the build; a fit holding this model's result from pass 1
    (:func:`coefficients_from_ritz`) is used as is, without reading the tensor, and dropped
    (its bytes given back to ``hold``).
    """
    rows = {p: np.zeros(w, dtype=p) for p, w in widths.items()}
    per_model: dict[str, torch.Tensor] = {}
    ctx = EncodeContext(ck.id, ck.path or ck.id, rows, fits, per_model, error_budget, corrections if error_budget is not None else None)
    errs, derrs = [], []
    infos = ck.infos()
    done = {}  # name -> this model's (coefficients, error, delta error) found in pass 1
    for e in entries:
        fit = fits.get(e["name"])
        pre = getattr(fit, "precomputed", None) if index is not None else None
        if pre is not None and e["encoding"] == "subspace" and pre[index] is not None and "bits" not in e["coefficients"]:
            done[e["name"]] = pre[index]
            pre[index] = None
            c = done[e["name"]][0]
            if hold is not None:
                hold.release(c.numel() * c.element_size())
    entries_left = [e for e in entries if e["name"] not in done] if done else entries
    # read each tensor while the previous one is encoded; not with LoRA entries, whose encoder
    # reads the same checkpoint itself (no two reads of one checkpoint at once)
    budgeted = error_budget is not None and corrections is not None
    lora_entries = [e for e in entries if e.get("lora") is not None]
    batches = _batch_plans(entries_left, fits, infos, budgeted) if not lora_entries else []
    batch_of = {e["name"]: b for b in batches for e in b}
    batched: dict[str, tuple] = {}  # name -> (result or None, w) once its batch ran
    stacks = {} if stacks is None else stacks
    names = [e["name"] for e in entries_left if e["name"] in infos and e["name"] not in batch_of]
    pos = {nm: i for i, nm in enumerate(names)}
    for nm in names[:2]:
        ck.prefetch(nm)
    ahead = None if not read_ahead or lora_entries else overlap.read_ahead([functools.partial(ck.get, nm) for nm in names])
    lora_errors = dict(zip((e["name"] for e in lora_entries), lora_enc.encode(lora_entries, fits, ck, rows, stacks))) if lora_entries else {}
    if budgeted and lora_entries:
        assert error_budget is not None  # budgeted
        _check_lora_budget(lora_entries, lora_errors, ck, error_budget)
    for e in entries:
        name = e["name"]
        if e.get("lora") is not None:
            rel, _ = lora_errors[name]
            errs.append(_finite_or_none(rel))
            derrs.append(_finite_or_none(rel))
            continue
        if name not in infos:
            raise ConflictError(f"{ck.path or ck.id}: model {ck.id!r} lacks tensor {name!r} that the store {store_path} holds")
        info = infos[name]
        if info.dtype != e["dtype"]:
            raise ConflictError(f"{ck.path or ck.id}: tensor {name!r} is {info.dtype} but the store holds it as {e['dtype']}")
        encoding = encodings.for_entry(e, store_path)
        if not encoding.shape_may_vary(e) and tuple(info.shape) != tuple(e["shape"]):
            raise ConflictError(
                f"{ck.path or ck.id}: tensor {name!r} has shape {list(info.shape)} but the store holds {e['shape']}"
            )
        if name in done:
            c, rel, drel = done.pop(name)
            sl = e["coefficients"]
            rows[sl["pack"]][sl["offset"]: sl["offset"] + c.numel()] = c.cpu().numpy().reshape(-1)
            errs.append(_finite_or_none(rel))
            derrs.append(_finite_or_none(drel))
            continue
        group = batch_of.get(name)
        if group is not None:  # read the batch's tensors of this model, encode them together
            if name not in batched:
                ws = [ck.get(x["name"]) for x in group]
                for x, res, wx in zip(group, _encode_batch(group, ws, _stacked(group, fits, stacks), rows), ws):
                    batched[x["name"]] = (res, wx)
            res, w = batched.pop(name)
            if res is not None:
                rel, drel = res
                if not math.isfinite(rel) and not check_finite(w, name, ck):
                    raise nonfinite_error(name, ck) if not allow_nonfinite else projected_nonfinite_error(name, ck)
                errs.append(_finite_or_none(rel))
                derrs.append(_finite_or_none(drel))
                continue
        else:
            at = pos.get(name, -1) if ahead is None else -1
            if 0 <= at < len(names) - 2:
                ck.prefetch(names[at + 2])  # the kernel reads two tensors ahead while this one is encoded
            w = ck.get(name) if ahead is None else next(ahead)
        if not encoding.projects and not allow_nonfinite and not check_finite(w, name, ck):
            raise nonfinite_error(name, ck)
        rel, drel = encoding.encode(ctx, e, w)
        if encoding.projects and rel is not None and not math.isfinite(rel) and not check_finite(w, name, ck):  # NaN/Inf in W make the error NaN or Inf: one pass saved
            raise nonfinite_error(name, ck) if not allow_nonfinite else projected_nonfinite_error(name, ck)
        keep = ctx.rebuilt.pop(name, None)  # under a budget: what the bases miss becomes a per-model exception
        if keep is not None:
            assert error_budget is not None and corrections is not None and rel is not None  # keep is only made under a budget
            if not exception_enc.meets(error_budget, keep["error"], keep["wn"], keep["dn"], e["dtype"]):
                corrections[name] = fix = exception_enc.correct(w, keep["rebuilt"], e["dtype"], error_budget, rel, keep["dn"])
                rel, drel = fix.error, fix.delta_error
        errs.append(_finite_or_none(rel))
        derrs.append(_finite_or_none(drel))
    return rows, per_model, errs, derrs


def _check_lora_budget(entries: list[dict], errors: dict[str, tuple[float, int]], ck: Checkpoint, error_budget: budget.Budget) -> None:
    """Refuse a model whose LoRA modules come back over the budget: unlike other tensors, a LoRA
    module has no per-model exception, so the store's promise holds only if the model stays out."""
    # relative errors: the allowed absolute error of a unit update (for an update, W - M is W)
    over = [(e["name"], errors[e["name"]][0]) for e in entries if not errors[e["name"]][0] <= error_budget.allowed(1.0, 1.0, e["dtype"])]
    if over:
        worst = max(over, key=lambda x: x[1])
        raise BudgetError(
            f"{ck.path or ck.id}: adapter {ck.id!r} comes back from the store's bases over the error budget "
            f"({error_budget.describe()}) in {len(over)} LoRA module(s), worst {worst[0]!r} at {worst[1]:.3g}; "
            "a LoRA module has no per-model exception, so it was not added (the store is unchanged). Rebuild the "
            "store with this adapter among its sources (uwsfmt convert), or append it with a looser budget (--max-error)")


def write_exceptions(zstore: Store, entries: list[dict], idx: int, fixes: dict) -> list[dict]:
    """Write each correction's arrays under ``<node>/extra/<idx>``; return the model-table records."""
    nodes = {e["name"]: e["node"] for e in entries}
    out = []
    for name, fix in fixes.items():
        where = f"{nodes[name]}/extra/{idx}"
        layout.create_group(zstore, where)
        for key, arr in fix.arrays.items():
            layout.write_array(zstore, f"{where}/{key}", np.asarray(arr))
        out.append(fix.record(name, where))
    return out
