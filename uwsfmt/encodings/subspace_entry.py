"""A subspace tensor's manifest entry (spec §6): what a build writes into it (:func:`write_entry`)
and what a reader checks of it (values it knows, declared shapes against slots, stored arrays
against the manifest). The :class:`~uwsfmt.encodings.subspace.Subspace` encoding's
``write_entry`` / ``unknown_value`` / ``check_declared`` / ``check_stored`` are these functions.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from uwsfmt.encodings import coefficients as coef_enc
from uwsfmt.encodings import residual as residual_enc
from uwsfmt.encodings.base import EntryContext, Expect, version_minor
from uwsfmt.encodings.slots import check_slot
from uwsfmt.errors import FormatError
from uwsfmt.format import dtypes
from uwsfmt.numerics import linalg


def _prod(shape) -> int:
    return math.prod(int(x) for x in shape)


def write_entry(e: dict, fit: Any, ctx: EntryContext) -> None:
    """Write a subspace tensor's shared arrays (mean, bases, spectra; ``fit``: a subspace Fit) and
    fill its entry: view, mode, centring, ranks, explained variance, coefficient and residual slots."""
    assert ctx.shape is not None  # a tensor of varying shape is dense
    m, n = linalg.matrix_view(ctx.shape)
    view = (m * n, 1) if fit.mode == "flat" else (m, n)
    npath, write = ctx.node, ctx.write
    e.update(view=list(view), mode=fit.mode, center=fit.center)
    if fit.mean is not None:
        write(f"{npath}/mean", fit.mean.reshape(view).cpu().numpy())
        e["mean"] = f"{npath}/mean"
    else:
        e["mean"] = None
    e["left"] = e["right"] = None
    if fit.left is not None:
        write(f"{npath}/left", fit.left.cpu().numpy())
        e["left"] = f"{npath}/left"
    if fit.right is not None:
        write(f"{npath}/right", fit.right.cpu().numpy())
        e["right"] = f"{npath}/right"
    e["spectrum"] = {}
    for side, vals in fit.spectra.items():
        write(f"{npath}/spectrum_{side}", vals.cpu().numpy().astype(np.float64))
        e["spectrum"][side] = f"{npath}/spectrum_{side}"
    e["rank"] = fit.rank
    if fit.method:
        e["basis"] = fit.method
    ex = fit.explained()
    e["explained_variance"] = {k: float(v) for k, v in ex.items()}
    e["energy"] = float(next(iter(fit.spectra.values())).sum()) if fit.spectra else 0.0
    r = fit.left.shape[1] if fit.left is not None else view[0]
    c = fit.right.shape[1] if fit.right is not None else view[1]
    e["coefficients"] = coef_enc.plan(ctx.packs, (r, c), ctx.coefficient_scheme, fit.mode)
    e["residual"] = residual_enc.plan(ctx.packs, view[0], view[1], ctx.residual_bits) if ctx.residual_bits else None
    e["encoding"] = "subspace"


def unknown_value(e: dict) -> str | None:
    """A residual bit width or axis, or coefficient run bits, that format 1.3 does not define (§12).

    >>> unknown_value({"residual": {"bits": 3}, "coefficients": {}})
    'residual bits 3'
    """
    res = e.get("residual")
    if isinstance(res, dict) and res.get("bits") not in residual_enc.BITS:
        return f"residual bits {res.get('bits')!r}"
    if isinstance(res, dict) and res.get("axis", 0) not in residual_enc.AXES:
        return f"residual axis {res.get('axis')!r}"
    runs = (e.get("coefficients") or {}).get("bits")
    if isinstance(runs, list) and any(not isinstance(r, list) or len(r) != 2 or r[1] not in coef_enc.RUN_BITS for r in runs):
        return f"coefficient bits {runs!r}"
    return None


def check_declared(e: dict, what: str, problems: list[str]) -> None:
    """Dtype, view, ranks, residual and coefficient slots, LoRA record of entry ``e`` against each other."""
    if e["dtype"] not in dtypes.COMPUTED:
        problems.append(f"{what}: logical dtype {e['dtype']} cannot be a subspace tensor (only "
                        f"{', '.join(dtypes.COMPUTED)} are computed; others are stored exactly, §4)")
    m, n = e["view"]
    if _prod(e["shape"]) != m * n:
        return  # reported by check_stored (view vs shape)
    kl, kr = e["rank"]
    for side, k in (("left", kl), ("right", kr)):
        if (e[side] is None) != (k is None):
            problems.append(f"{what}: {side} is {'absent' if e[side] is None else 'present'} but rank[{side == 'right':d}] is {k!r}")
    res = e.get("residual")
    if res:
        if res["bits"] == 16:
            check_slot(what, "residual values", res.get("values"), "float16", m * n, problems)
        else:
            check_slot(what, "residual codes", res.get("codes"), "uint8", -(-m * n * res["bits"] // 8), problems)
            column = res.get("axis", 0) == 1  # format 1.3: one scale per column, only where the view is taller than wide
            if column and not m > n:
                problems.append(f"{what}: residual axis 1 (per-column scales) needs a view taller than wide, not {m}x{n}")
            check_slot(what, "residual scales", res.get("scales"), "float32", n if column else m, problems)
    c = e["coefficients"]
    if coef_enc.quantized(c):
        try:
            coef_enc.check(c, what)
        except FormatError as err:
            problems.append(str(err))
    elif c.get("length") and c.get("pack") != "float32":
        problems.append(f"{what}: coefficients are in pack {c.get('pack')!r}; unquantized coefficients are float32 (§6.3)")
    rec = e.get("lora")
    if isinstance(rec, dict) and isinstance(rec.get("a_tail"), list):
        if list(e["shape"]) != [m] + list(rec["a_tail"]) or _prod(rec["a_tail"]) != n:
            problems.append(f"{what}: a LoRA module of shape {e['shape']} and view {e['view']} needs shape "
                            f"[out] + a_tail = {[m] + list(rec['a_tail'])} and view (out, prod(a_tail)) (§6.7)")


def check_stored(store: Any, e: dict, what: str, problems: list[str], expect: Expect, tol: float) -> None:
    """The mean, bases and spectra entry ``e`` names, coefficient slot sizes, orthonormal bases
    (within ``tol``), and the format version each stored feature needs."""
    version = store.manifest["format_version"]
    minor = version_minor(store.manifest)
    mv, nv = e["view"]
    if _prod(e["shape"]) != mv * nv:
        problems.append(f"{what}: view {e['view']} does not hold shape {e['shape']}")
    cdt = "float64" if e["dtype"] == "float64" else "float32"
    if e["mean"]:  # the compute dtype, or float16 (format 1.1)
        arr = expect(e["mean"], (mv, nv), f"{cdt}|float16", what)
        if arr is not None and str(arr.dtype) == "float16" and minor < 1:
            problems.append(f"{what}: mean {e['mean']} is float16, which format {version} does not allow "
                            "(float16 means came with format 1.1)")
    kl, kr = e["rank"]
    r = kl if e["left"] else mv
    c = kr if e["right"] else nv
    quantized = coef_enc.quantized(e["coefficients"])
    if list(e["coefficients"]["shape"]) != [r, c] or (not quantized and e["coefficients"]["length"] != r * c):
        problems.append(f"{what}: coefficient slot {e['coefficients']} does not match ranks {e['rank']} and view {e['view']}")
    if quantized and minor < 2:
        problems.append(f"{what}: quantized coefficients, which format {version} does not allow "
                        "(they came with format 1.2)")
    if residual_enc.uses_column_scales(e.get("residual")) and minor < 3:
        problems.append(f"{what}: a residual with per-column scales (axis 1), which format {version} "
                        "does not allow (they came with format 1.3)")
    for side, dim, k in (("left", mv, kl), ("right", nv, kr)):
        if not e[side]:
            continue
        arr = expect(e[side], (dim, k), "float32", what)
        if arr is not None and k and tuple(arr.shape) == (dim, k):
            try:
                b = torch.from_numpy(store.read_array(e[side])).double()
            except FormatError as err:
                problems.append(f"{what}: {err}")
                continue
            dev = float((b.T @ b - torch.eye(k, dtype=torch.float64)).abs().max())
            if dev > tol:
                problems.append(f"{what}: {side} basis is not orthonormal (max |B^T B - I| = {dev:.2e})")
    for side, path in e["spectrum"].items():
        arr = expect(path, None, "float64", what)
        if arr is not None and arr.ndim != 1:
            problems.append(f"{what}: spectrum {path} is not 1-D")
