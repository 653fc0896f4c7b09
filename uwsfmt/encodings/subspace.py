"""Subspace: W_i ~= reshape(M + L @ C_i @ R^T (+ Q_i)), shared M / L / R, per-model C_i.

``fit`` turns the map-reduce statistics of one tensor into the shared arrays; ``encode``
projects one model's tensor onto them. Decoding is batched over same-shape tensors
(:func:`decode_group`); the reader caches the shared arrays on the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from uwsfmt.encodings import coefficients as coef_enc
from uwsfmt.encodings import residual as residual_enc
from uwsfmt.encodings import subspace_entry
from uwsfmt.encodings.base import EncodeContext, Encoding, EntryContext, Expect, ReadContext, register
from uwsfmt.encodings.slots import take
from uwsfmt.errors import FormatError
from uwsfmt.format import dtypes
from uwsfmt.numerics import gram, linalg, native, quantize

#: ``choose(side, eigenvalues, limit)`` -> the rank kept (:meth:`uwsfmt.writer.settings.Settings.choose`)
Chooser = Callable[[str, torch.Tensor, int | None], int]


def resolve_mode(mode: str, m: int, n: int) -> str:
    """'auto' puts the basis on the smaller side: the cheaper Gram (min(m,n)^2)."""
    if mode == "auto":
        return "left" if m <= n else "right"
    if mode not in linalg.MODES:
        raise ValueError(f"unknown mode {mode!r}")
    return mode


@dataclass
class Fit:
    """Shared part of a subspace tensor (float64/float32 on the build device)."""

    mode: str
    center: str
    mean: torch.Tensor | None  # (m, n)
    left: torch.Tensor | None  # (m, kl)
    right: torch.Tensor | None  # (n, kr)
    spectra: dict[str, torch.Tensor] = field(default_factory=dict)  # side -> full eigenvalues
    kept: dict[str, int] = field(default_factory=dict)
    method: dict = field(default_factory=dict)  # how the bases were found (exact Gram or sketch + its check)
    #: per model, pass 2's result found in pass 1 (build._coefficients_from_ritz): (coefficients,
    #: error, delta error), or None; used and dropped by pass 2
    precomputed: list | None = field(default=None, repr=False, compare=False)
    #: side -> the float64 bases ``left`` / ``right`` were rounded from (orthonormal), where
    #: pass 1 keeps them for a later step of the build (LoRA error budgets); dropped after it
    bases64: dict | None = field(default=None, repr=False, compare=False)
    #: side -> the sketch's :class:`uwsfmt.numerics.randomized.SketchResult`, where an error budget picks the
    #: rank later and checks the sketch there (``build._budget_tensor``, ``lora.fit_budget``)
    ritz: dict | None = field(default=None, repr=False, compare=False)

    @property
    def rank(self) -> list[int | None]:
        return [self.kept.get("left"), self.kept.get("right")]

    def explained(self) -> dict[str, float]:
        out = {}
        for side, vals in self.spectra.items():
            k = self.kept[side]
            out[side] = 1.0 if k >= vals.numel() else (float(gram.explained(vals)[k - 1]) if k > 0 else 0.0)
        return out

    def truncate(self, kept: dict[str, int]) -> Fit:
        """The same fit with fewer kept directions (bases are sorted best first)."""
        return Fit(
            self.mode, self.center, self.mean,
            self.left[:, : kept["left"]] if self.left is not None else None,
            self.right[:, : kept["right"]] if self.right is not None else None,
            self.spectra, dict(kept), dict(self.method),
        )


def fit_gram(
    stats: gram.GramStats, *, mode: str, center: str, choose: Chooser
) -> Fit:
    """Eigen-decompose the Gram(s); ``choose(side, eigvals, limit)`` returns the kept rank."""
    mean, gl, gr = stats.center(center)
    f = Fit(mode, center, mean, None, None)
    for side, g in (("left", gl), ("right", gr)):
        if g is None:
            continue
        # in float64 also after float32 products: a float32 eigh would halve its time, but its
        # round-off (~2^-24 * ||G|| per eigenvalue) sits above the products' own
        vals, vecs = gram.eig_desc(g)
        floor = stats.noise_floor(g)  # eigenvalues at or below it are round-off: no direction
        k = choose(side, vals, int((vals > floor).sum()) if floor > 0 else None)
        f.spectra[side] = vals
        f.kept[side] = k
        basis = vecs[:, :k].to(torch.float32)
        if side == "left":
            f.left = basis
        else:
            f.right = basis
    return f


def fit_flat(mean: torch.Tensor | None, basis: torch.Tensor, spectrum: torch.Tensor, choose: Chooser) -> Fit:
    k = choose("left", spectrum, None)
    return Fit("flat", "none" if mean is None else "mean", mean, basis[:, :k].to(torch.float32), None,
               {"left": spectrum}, {"left": k})


def deviation(fit: Fit, w: torch.Tensor, view: tuple[int, int]) -> torch.Tensor:
    """D = W - M in float64, as the matrix view (numel x 1 in flat mode)."""
    d = w.to(device=fit.left.device if fit.left is not None else (fit.right.device if fit.right is not None else w.device),
             dtype=torch.float64).reshape(view)
    if fit.mean is not None:
        d = d - fit.mean.to(device=d.device, dtype=torch.float64).reshape(view)
    return d


def coefficients(fit: Fit, d: torch.Tensor) -> torch.Tensor:
    """C = L^T D R in float32 (absent side = identity)."""
    left = fit.left.to(torch.float64) if fit.left is not None else None
    right = fit.right.to(torch.float64) if fit.right is not None else None
    # round to float32 exactly as stored, so errors are measured on what readers will see
    return linalg.project(d, left, right).to(torch.float32)


def subspace_part(fit: Fit, c: torch.Tensor) -> torch.Tensor:
    """L @ C @ R^T in float64, computed from the float32 values a reader will use."""
    left = fit.left.to(torch.float64) if fit.left is not None else None
    right = fit.right.to(torch.float64) if fit.right is not None else None
    return linalg.expand(c.to(torch.float64), left, right)


@dataclass
class Prepared:
    """A fit's shared arrays in the dtypes pass 2 needs, converted once per tensor (not per model)."""

    device: torch.device
    cdt: torch.dtype  # compute dtype of readers (float64 for float64 tensors, else float32)
    mean: torch.Tensor | None  # in the compute dtype
    left64: torch.Tensor | None
    right64: torch.Tensor | None
    left: torch.Tensor | None  # in the compute dtype
    right: torch.Tensor | None


def prepared(fit: Fit, cdt: torch.dtype) -> Prepared:
    """:class:`Prepared` arrays of ``fit`` for compute dtype ``cdt`` (cached on the fit)."""
    cache = fit.__dict__.setdefault("_prepared", {})
    p = cache.get(cdt)
    if p is None:
        ref = next(t for t in (fit.mean, fit.left, fit.right) if t is not None)

        def cast(t, dt):
            return None if t is None else t.to(dt)

        p = Prepared(ref.device, cdt, cast(fit.mean, cdt), cast(fit.left, torch.float64), cast(fit.right, torch.float64),
                     cast(fit.left, cdt), cast(fit.right, cdt))
        cache[cdt] = p
    return p


def subtract_expansion(p: Prepared, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """D - L @ C @ R^T in place in ``d`` (compute dtype): the part of D the coefficients miss.
    Also for a batch: ``d``, ``c`` and the prepared arrays stacked along a leading dimension."""
    w = c.to(p.cdt)
    sub_product = d.baddbmm_ if d.dim() == 3 else d.addmm_
    if p.left is not None and p.right is not None:
        return sub_product(p.left @ w, p.right.mT, alpha=-1)
    if p.left is not None:
        return sub_product(p.left, w, alpha=-1)
    if p.right is not None:
        return sub_product(w, p.right.mT, alpha=-1)
    return d.sub_(w.reshape(d.shape))


def rebuild(p: Prepared, c: torch.Tensor, view: tuple[int, int]) -> torch.Tensor:
    """M + L @ C @ R^T in the compute dtype, the way :meth:`uwsfmt.Store.state_dict`
    computes it (:func:`expand_into` from :data:`EXPAND_MIN_ELEMENTS` values, else the product
    then the mean), so that errors measured on it are the errors readers see."""
    w = c.to(p.cdt)
    if view[0] * view[1] >= EXPAND_MIN_ELEMENTS and rebuilt_shape(p.left, p.right, w) == tuple(view):
        out = torch.empty(view, dtype=p.cdt, device=p.device)
        expand_into([(out, None if p.mean is None else p.mean.reshape(view), p.left, w, p.right)])
        return out
    if p.left is not None:
        w = p.left @ w
    if p.right is not None:
        w = w @ p.right.T
    if p.mean is not None:
        fresh = p.left is not None or p.right is not None
        if w.shape == view:
            w = w.add_(p.mean.reshape(view)) if fresh else w + p.mean.reshape(view)
        else:
            w = p.mean.reshape(view) + w
    return w


#: output dtypes :func:`expand_into` may write from float32 parts (rounded as ``Tensor.to`` does)
HALF = (torch.bfloat16, torch.float16)

#: subspace tensors from this many values are rebuilt one by one by :func:`expand_into` (straight
#: into a caller's tensor when there is one); smaller ones in stacked batches (one bmm per group)
EXPAND_MIN_ELEMENTS = 1 << 16


def rebuilt_shape(left: torch.Tensor | None, right: torch.Tensor | None, c: torch.Tensor) -> tuple[int, int]:
    """(rows, columns) of L C R^T for coefficients ``c`` (absent side = identity)."""
    return (left.shape[-2] if left is not None else c.shape[-2], right.shape[-2] if right is not None else c.shape[-1])


def expand_into(items: list[tuple]) -> None:
    """``out = mean + left @ c @ right^T`` (None parts skipped) for each ``(out, mean, left, c,
    right[, residual])``, ``out`` of the product's shape, all in one dtype on one device, except that ``out``
    may be in a lower precision (:data:`HALF`) than float32 parts: it then gets the float32
    result cast, exactly as ``Tensor.to`` casts it; and ``mean`` may be float16 (a format 1.1
    mean), added as its exact float32 value.

    On the CPU with float32 parts all of them go through the fused kernel of :mod:`uwsfmt.native`
    in one call (one pass over memory per tensor, split between torch's threads, the rounding to
    half precision done as it writes); otherwise one BLAS GEMM writes each ``out`` (after a copy
    of the mean: on the CPU ~2x faster than ``torch.addmm(M, a, b, out=out)``), into a temporary
    where ``out`` is in half precision. Both compute the product, then add the mean, then the
    ``residual`` where one is given (:data:`uwsfmt.numerics.native.Residual`: packed codes, scales,
    bits, axis; the kernel adds it row block by row block while they are in cache)."""
    products = []
    for out, mean, left, c, right, *rest in items:
        res = rest[0] if rest else None
        if left is not None and right is not None:
            a, b = left @ c, right.T
        elif left is not None:
            a, b = left, c
        elif right is not None:
            a, b = c, right.T
        else:
            if res is not None:
                out.copy_(_with_residual(c + mean if mean is not None else c.clone(), res))
            elif mean is not None and out.dtype != c.dtype:
                out.copy_(c + mean)  # one rounding, of the float32 sum
            else:
                out.copy_(c)
                if mean is not None:
                    out.add_(mean)
            continue
        products.append((out, mean, a, b, res))
    if not products:
        return
    if products[0][0].device.type == "cpu" and native.expand([(o, m, a.contiguous(), b.contiguous(), r) for o, m, a, b, r in products]):
        return
    for out, mean, a, b, res in products:
        dest = out if out.dtype == a.dtype else torch.empty(out.shape, dtype=a.dtype, device=out.device)
        if mean is None:
            torch.mm(a, b, out=dest)
        else:
            dest.copy_(mean)
            dest.addmm_(a, b)
        if res is not None:
            _with_residual(dest, res)
        if dest is not out:
            out.copy_(dest)


def _with_residual(x: torch.Tensor, res: tuple) -> torch.Tensor:
    """``x += Q`` in x's dtype, Q the dequantized residual ``res`` (codes, scales, bits, axis)."""
    codes, scales, bits, axis = res
    return x.add_(quantize.dequantize_view(codes, scales, (x.shape[0], x.shape[1]), bits, axis).to(x.dtype))


def implied_shape(e: dict, field: str) -> tuple[int, int]:
    """Shape the manifest implies for a subspace tensor's mean / left / right array (spec section 13)."""
    m, n = e["view"]
    kl, kr = e["rank"]
    return {"mean": (m, n), "left": (m, kl), "right": (n, kr)}[field]


def batch_key(e: dict) -> tuple:
    return (e["mode"], tuple(e["view"]), tuple(x or 0 for x in e["rank"]), e.get("mean") is not None, e["dtype"] == "float64")


def decode_group(ctx: ReadContext, key: tuple, group: list[dict]) -> list[torch.Tensor]:
    """The group's tensors: in the compute dtype, or, for large ones, possibly already in the
    dtype the caller gets (``into``'s tensor's, else ``dtype`` or the source's) where that is
    bfloat16 / float16 and nothing is added after the rebuild (no residual, not in
    ``exceptions``): then the one rounding of the float32 rebuild happens as it is written."""
    rows, dev, into = ctx.rows, ctx.device, ctx.into
    mean, left, right = ctx.reader.group_arrays(key, group, dev)
    e0 = group[0]
    cdt = ctx.reader.compute_dtype(e0)
    m, n = e0["view"]
    cshape = e0["coefficients"]["shape"]
    cs = [coef_enc.decode(e["coefficients"], rows).reshape(cshape).to(cdt) for e in group]  # float32: views of the row
    if m * n >= EXPAND_MIN_ELEMENTS and rebuilt_shape(left, right, cs[0]) == (m, n):
        # large tensors one by one: straight into the caller's tensors where they can take the
        # result (no full-size temporary: a fresh allocation costs page faults and a pass over
        # memory), else into fresh ones; mean + L C R^T in one pass (the native kernel on the
        # CPU, else one GEMM per tensor); no stacked copy of the coefficients
        def dest(e: dict) -> torch.Tensor:
            half = cdt == torch.float32 and not e.get("residual") and e["name"] not in ctx.excepted
            d = _target(into, e, cdt, dev, half=half) if into is not None else None
            if d is not None:
                return d
            want = ctx.returned_dtype(e)
            return torch.empty(e["shape"], dtype=want if half and want in HALF else cdt, device=dev)

        dests = [dest(e) for e in group]
        views = [d.view(m, n) for d in dests]

        def fused(e: dict) -> tuple | None:  # a quantized residual, added in the same pass
            r = e.get("residual")
            if not r or r["bits"] == 16:
                return None
            return take(rows, r["codes"]), take(rows, r["scales"]), r["bits"], residual_enc.axis(r)

        expand_into([(d, None if mean is None else mean[i], None if left is None else left[i], cs[i],
                      None if right is None else right[i], fused(e)) for i, (e, d) in enumerate(zip(group, views))])
        for e, d in zip(group, views):
            if e.get("residual") and e["residual"]["bits"] == 16:
                d.add_(residual_enc.decode(e["residual"], rows, m, n).to(cdt))
        return dests
    w = c = torch.stack(cs)
    if left is not None:
        w = torch.bmm(left, w)
    if right is not None:
        w = torch.bmm(w, right.transpose(1, 2))
    if mean is not None:
        w = w.add_(mean) if w.shape == mean.shape and w is not c else (w + mean if w.shape == mean.shape else mean.expand(len(group), m, n) + w)
    elif w.shape[1:] != (m, n):
        raise FormatError(f"{ctx.reader.path}: tensor {e0['name']!r}: coefficients do not match its view {m}x{n}")
    out = []
    for i, e in enumerate(group):
        wi = w[i]
        if e.get("residual"):
            wi = wi + residual_enc.decode(e["residual"], rows, m, n).to(cdt)
        out.append(wi.reshape(e["shape"]))
    return out

def _target(into: dict[str, torch.Tensor], e: dict, cdt: torch.dtype, dev: torch.device, *, half: bool = False
            ) -> torch.Tensor | None:
    """The caller's tensor for subspace tensor ``e`` when it can receive the rebuild directly: in
    the compute dtype, or (``half``) in bfloat16 / float16, which take the rounded rebuild."""
    d = into.get(e["name"])
    if d is None or not (d.dtype == cdt or (half and d.dtype in HALF)):
        return None
    if d.device != dev or not d.is_contiguous() or list(d.shape) != list(e["shape"]):
        return None
    return d


#: below this relative error :func:`project_model` measures the error on the reader's own rebuild;
#: above it, the reader's rounding cannot move the error by more than ~1e-7 relative, and the
#: cheaper difference (W - M) - L C R^T is used
EXACT_REBUILD_BELOW = 1e-4


def project_model(e: dict, fit: Fit, w: torch.Tensor, rows: dict[str, np.ndarray], keep: dict | None = None
                  ) -> tuple[float, float | None]:
    """Project one model's tensor, fill its slots; return (error, delta error) of what a reader
    rebuilds (compute dtype, then the source dtype). ``keep`` receives that rebuild (float64, before
    the cast) under "rebuilt", and "error" (absolute), "wn" = ||W||, "dn" = ||W - M|| (error budgets).

    Everything is done in the compute dtype readers use (float32; float64 for float64 tensors):
    D = W - M, the coefficients C = L^T D R (stored as float32 anyway). Norms are summed in
    float64 (:func:`uwsfmt.numerics.linalg.sq_norm`). The error is measured one of two ways:

    - the difference E = D - L C R^T, in place in D: 9 passes over memory. A reader returns
      fl(M + L C R^T), which differs from W - E by its rounding (at most half an ulp of W per
      value); with the error ||E|| >= :data:`EXACT_REBUILD_BELOW` ||W||, that moves the error by
      less than ~u^2 / (2 * 1e-8) ~ 2e-7 relative (u = 2^-24, float32), and the rounding is
      uncorrelated with E. Used when the source dtype is the compute dtype and neither an error
      budget (which needs the rebuild) nor a residual is involved.
    - otherwise (small errors, float16/bfloat16 sources whose cast back rounds by ~1e-3, budgets,
      residuals): the rebuild exactly as the reader does it (same dtype, same order of
      operations, then the cast), compared with W: 14 passes.
    """
    view = tuple(e["view"])
    prep = prepared(fit, torch.float64 if e["dtype"] == "float64" else torch.float32)
    want = dtypes.torch_dtype(e["dtype"])
    with linalg.no_tf32():
        w = w.to(prep.device).reshape(view)
        wc = w if w.dtype == prep.cdt else w.to(prep.cdt)
        d = wc.sub(prep.mean.reshape(view)) if prep.mean is not None else wc
        c = linalg.project(d, prep.left, prep.right).to(torch.float32)
        sl = e["coefficients"]
        if coef_enc.quantized(sl):  # the reader's C is the dequantized one: errors and residual follow it
            values, c = coef_enc.encode(sl, c)
            coef_enc.write(sl, values, rows)
        elif sl["length"]:  # rank 0: an empty slot, whose pack may not exist
            rows[sl["pack"]][sl["offset"]: sl["offset"] + c.numel()] = c.cpu().numpy().reshape(-1)
        dn = math.sqrt(linalg.sq_norm(d)) if prep.mean is not None else None
        wn = math.sqrt(linalg.sq_norm(wc))
        err = None
        if keep is None and not e.get("residual") and want == prep.cdt:
            err = math.sqrt(linalg.sq_norm(subtract_expansion(prep, c, d if d is not wc else d.clone())))
            if not err >= EXACT_REBUILD_BELOW * wn:  # small (or NaN): measure it on the reader's rebuild
                err = None
        del d
        if err is None:
            r = rebuild(prep, c, view)  # compute dtype, exactly as the reader
            if e.get("residual"):
                values, back = residual_enc.encode(e["residual"], (wc - r).to(torch.float32))
                residual_enc.write(e["residual"], values, rows)
                r.add_(back.to(prep.cdt))
            out = r if want == prep.cdt else r.to(want).to(prep.cdt)
            err = math.sqrt(linalg.sq_norm(out.sub_(wc) if out is not r else out - wc))
            if keep is not None:
                keep.update(rebuilt=r.to(torch.float64), error=err, wn=wn, dn=dn)
    rel = err / wn if wn > 0 else (0.0 if err == 0 else float("inf"))
    drel = None if dn is None else (err / dn if dn > 0 else (0.0 if err == 0 else float("inf")))
    return rel, drel


class Subspace(Encoding):
    """Shared mean and bases, per-model coefficients (and an optional quantized residual)."""

    name = "subspace"
    projects = True

    def encode(self, ctx: EncodeContext, e: dict, w: torch.Tensor) -> tuple[float | None, float | None]:
        keep: dict | None = {} if ctx.corrections is not None else None  # an error budget: the caller checks the rebuild
        with linalg.threads_for(w.numel()):
            rel, drel = project_model(e, ctx.fits[e["name"]], w, ctx.rows, keep)
        if keep is not None:
            ctx.rebuilt[e["name"]] = keep
        return rel, drel

    def slots(self, e: dict) -> list[dict]:
        out = coef_enc.slots(e["coefficients"])
        r = e.get("residual")
        if r:
            out += [r[k] for k in ("codes", "scales", "values") if k in r]
        return out

    def stored_fit(self, reader: Any, e: dict, device: torch.device) -> Fit:
        cdt = torch.float64 if e["dtype"] == "float64" else torch.float32

        def arr(field: str) -> torch.Tensor | None:  # the shape the manifest implies is checked before reading
            p = e.get(field)
            return None if p is None else torch.from_numpy(reader.read_array(p, implied_shape(e, field))).to(device, cdt)

        kept = {"left": e["rank"][0], "right": e["rank"][1]}
        return Fit(e["mode"], e["center"], arr("mean"), arr("left"), arr("right"), {}, kept)

    def read(self, ctx: ReadContext, entries: list[dict]) -> dict[str, torch.Tensor]:
        groups: dict[tuple, list[dict]] = {}
        for e in entries:
            key = batch_key(e) + (("single", e["name"]) if ctx.single else ())
            groups.setdefault(key, []).append(e)
        out = {}
        for key, group in groups.items():
            for e, w in zip(group, decode_group(ctx, key, group)):
                out[e["name"]] = w
        return out

    takes_exceptions = True

    def write_entry(self, e: dict, fit: Fit, ctx: EntryContext) -> None:
        subspace_entry.write_entry(e, fit, ctx)

    def unknown_value(self, e: dict) -> str | None:
        return subspace_entry.unknown_value(e)

    def check_declared(self, e: dict, what: str, problems: list[str]) -> None:
        subspace_entry.check_declared(e, what, problems)

    def check_stored(self, store: Any, e: dict, what: str, problems: list[str], expect: Expect, tol: float) -> None:
        subspace_entry.check_stored(store, e, what, problems, expect, tol)


SUBSPACE = register(Subspace())
