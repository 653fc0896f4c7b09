"""Error budgets: per tensor, the encoding with the fewest bytes whose error meets the budget.

The budget E bounds the relative Frobenius error ||W_i - W_hat_i|| / ||W_i|| of every tensor of
every model (the same number the model table records). For one tensor the candidates are
(mode, rank k, residual bits b): mode left / right / both (two-sided core) or flat, k in
0, 1, 2, 4, ..., K, b in none / 2 / 4 / 8 / 16, plus ``dense`` (exact, always feasible). Their
bytes are known from shapes alone; their errors are measured in one sweep over the models
(the map step :meth:`ErrorSweep.add`), on what a reader will rebuild: float32 bases and
coefficients, the quantized residual, the compute dtype and the final cast to the source dtype.
The smallest candidate whose worst model meets ``E - slack`` wins.

>>> import torch
>>> from uwsfmt.encodings.subspace import Fit
>>> g = torch.Generator().manual_seed(0)
>>> ws = [torch.ones(16, 64) + 0.01 * torch.randn(16, 64, generator=g) for _ in range(5)]
>>> mean = torch.stack(ws).mean(0)
>>> fit = Fit("left", "mean", mean, torch.eye(16)[:, :2], None, {"left": torch.ones(16)}, {"left": 2})
>>> sweep = ErrorSweep(fit, candidates(fit, bits=(None, 8)), "float32", (16, 64))
>>> for w in ws:
...     sweep.add(w)
>>> pick(sweep, n_models=5, budget=Budget(max_error=0.05)).encoding
'subspace'
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch

from uwsfmt.encodings import coefficients as coef_enc
from uwsfmt.encodings import subspace
from uwsfmt.encodings.subspace import Fit, resolve_mode
from uwsfmt.errors import BudgetError
from uwsfmt.format import dtypes
from uwsfmt.numerics import linalg, quantize

#: residual options tried when ``residual_bits`` is not fixed (None = no residual)
BITS: tuple[int | None, ...] = (None, 1, 2, 4, 8, 16)
#: coefficient storage an error budget tries when ``coefficient_bits`` is "auto": measured on the
#: trained MLP family (24 fine-tunes, max_delta_error 0.3), these three give the same bytes as all
#: five schemes (6.49x vs 6.45x) at 40% of the sweep time; float32 alone: 5.88x
AUTO_COEFFICIENTS: tuple[str, ...] = ("float32", "8", "8/4/2")
#: largest rank a budgeted build tries when ``max_rank`` is not given (bounds the sweep's cost)
MAX_CANDIDATE_RANK = 256
#: in ``mode='auto'`` both sides' Grams are accumulated (so left, right and two-sided candidates
#: compete) when the larger side is at most this; beyond it only the cheaper side is fitted
BOTH_SIDES_LIMIT = 1024
#: bytes a shared per-tensor array costs beyond its values (its zarr.json)
ARRAY_OVERHEAD = 512
#: with a budget, float tensors from this many values on (vectors included) compete; smaller
#: ones stay dense (their bytes are known to be dominated by metadata). ``min_numel`` overrides.
MIN_NUMEL = 32


def slack(dtype: str) -> float:
    """Margin kept below the budget for a reader's own rounding (its GEMMs run in the compute
    dtype, this module's emulation rounds once from float64)."""
    return 1e-13 if dtype == "float64" else 2e-6


def gram_mode(mode: str, m: int, n: int) -> str:
    """Which Gram(s) pass 1 accumulates in a budgeted build."""

    if mode == "auto" and max(m, n) <= BOTH_SIDES_LIMIT:
        return "both" if min(m, n) > 1 else ("right" if m == 1 else "left")  # a vector: PCA across models
    return resolve_mode(mode, m, n)


def candidate_ranks(cap: int) -> list[int]:
    """0, 1, 2, 4, ... below ``cap``, and ``cap`` itself.

    >>> candidate_ranks(12)
    [0, 1, 2, 4, 8, 12]
    """
    out, k = [0], 1
    while k < cap:
        out.append(k)
        k *= 2
    if cap > 0:
        out.append(cap)
    return out


@dataclass(frozen=True)
class Candidate:
    mode: str  # left | right | both | flat
    rank: int
    bits: int | None  # residual bits; None = no residual
    coef: str = "float32"  # how the coefficients are stored (encodings.coefficients.SCHEMES)

    def describe(self) -> str:
        res = "" if self.bits is None else (" + float16 residual" if self.bits == 16 else f" + int{self.bits} residual")
        coef = "" if self.coef == "float32" or self.rank == 0 else f" ({coef_enc.describe(self.coef)} coefficients)"
        return f"{self.mode} rank {self.rank}{coef}{res}"


def candidates(fit: Fit, *, bits: Sequence[int | None] = BITS, fixed_rank: bool = False, modes: tuple[str, ...] | None = None,
               coefs: Sequence[str] = coef_enc.SCHEMES, view: tuple[int, int] | None = None) -> list[Candidate]:
    """Every (mode, rank, coefficient storage, bits) the fit allows. A fit of mode 'both' from a
    widened auto build offers left-only, right-only and two-sided candidates (``modes`` restricts
    them). Rank 0 and flat mode keep float32 coefficients (none, or one value per direction).

    Given the matrix ``view``, quantized coefficients are offered only where float32 ones would
    be at least :data:`COEFFICIENT_SHARE` of a model's bytes (else quantizing them saves little
    and only adds error), which keeps the sweep near the size it has without them."""
    kl = fit.left.shape[1] if fit.left is not None else 0
    kr = fit.right.shape[1] if fit.right is not None else 0
    if fit.mode == "flat":
        sides = {"flat": kl}
    elif fit.mode == "both":
        sides = {"left": kl, "right": kr, "both": min(kl, kr)}
    else:
        sides = {fit.mode: kl if fit.mode == "left" else kr}
    if modes is not None:
        sides = {m: k for m, k in sides.items() if m in modes}
    out: list[Candidate] = []
    for mode, cap in sides.items():
        ranks = [cap] if fixed_rank else candidate_ranks(cap)
        for k in ranks:
            if k == 0 and out and any(c.rank == 0 for c in out):
                continue  # rank 0 is the same store in every mode
            for b in bits:
                for coef in coefs if k > 0 and mode != "flat" else ("float32",):
                    if coef != "float32" and view is not None and not _coefficients_matter(mode, k, b, view):
                        continue
                    out.append(Candidate(mode, k, b, coef))
    return out


#: share of a model's bytes float32 coefficients must have for quantized ones to be tried
COEFFICIENT_SHARE = 0.1


def _coefficients_matter(mode: str, k: int, bits: int | None, view: tuple[int, int]) -> bool:
    m, n = view
    coef = 4 * {"left": k * n, "right": m * k, "both": k * k}.get(mode, k * n)
    res = 0 if bits is None else quantize.residual_nbytes(m, n, bits)
    return coef >= COEFFICIENT_SHARE * (coef + res)


def candidate_fit(fit: Fit, c: Candidate) -> Fit:
    """The shared arrays a candidate keeps: the first ``rank`` directions of its side(s)."""
    use_left = c.mode in ("left", "both", "flat")
    use_right = c.mode in ("right", "both")
    left = cast(torch.Tensor, fit.left)[:, : c.rank] if use_left else None  # a candidate's sides are its fit's
    right = cast(torch.Tensor, fit.right)[:, : c.rank] if use_right else None
    spectra = {s: v for s, v in fit.spectra.items() if (s == "left" and use_left) or (s == "right" and use_right)}
    kept = {s: c.rank for s in spectra}
    return Fit(c.mode, fit.center, fit.mean, left, right, spectra, kept)


def tensor_bytes(c: Candidate, view: tuple[int, int], n_models: int, *, mean_bytes: int, spectrum_len: int = 0) -> int:
    """Bytes a subspace tensor takes: shared arrays once, coefficients and residual per model."""
    m, n = view
    k = c.rank
    basis = {"left": m * k, "flat": m * k, "right": n * k, "both": (m + n) * k}[c.mode] * 4
    coef = coef_enc.nbytes({"left": (k, n), "flat": (k, n), "right": (m, k), "both": (k, k)}[c.mode], c.mode, c.coef)
    res = 0 if c.bits is None else quantize.residual_nbytes(m, n, c.bits)
    arrays = (mean_bytes > 0) + (1 if c.mode != "both" else 2) + (1 if spectrum_len else 0)
    shared = mean_bytes + basis + 8 * spectrum_len + ARRAY_OVERHEAD * arrays
    return shared + n_models * (coef + res)


def dense_bytes(shape: Sequence[int], dtype: str, n_models: int) -> int:
    numel = int(np.prod(shape, dtype=np.int64))
    return n_models * numel * np.dtype(dtypes.storage_dtype(dtype)).itemsize


def as_read(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """``x`` (float64) rounded as a reader returns it: compute dtype, then the source dtype."""
    cdt = torch.float64 if dtype == "float64" else torch.float32
    t = x.to(cdt)
    want = dtypes.torch_dtype(dtype)
    if want != cdt:
        t = t.to(want)
    return t.to(torch.float64)


def read_error(w64: torch.Tensor, recon64: torch.Tensor, dtype: str, wn: float | None = None) -> float:
    """Relative error of what a reader returns for ``recon64`` against the original ``w64``."""
    err = float(torch.linalg.vector_norm(as_read(recon64, dtype) - w64))
    wn = float(torch.linalg.vector_norm(w64)) if wn is None else wn
    return ratio(err, wn)


def finite(x: float | None) -> float | None:
    """``x`` as a JSON-safe float: None where it is missing or not finite."""
    return float(x) if x is not None and np.isfinite(x) else None


def ratio(err: float, norm: float | None) -> float:
    if norm is None:
        return math.nan
    if norm == 0.0:
        return 0.0 if err == 0.0 else math.inf
    return err / norm


@dataclass(frozen=True)
class Budget:
    """The error budget of a build, per tensor and model (either or both bounds).

    ``max_error`` bounds ||W - W_hat|| / ||W|| (the ``error`` the model table records);
    ``max_delta_error`` bounds ||W - W_hat|| / ||W - M||, the share of the model's own deviation
    from the family centre M that is lost (its ``delta_error``): scale-free, so one number
    means the same for a norm weight near 1 and a matrix a fine-tune barely moved.

    >>> Budget(max_error=0.01).allowed(wn=2.0, dn=0.1, dtype="float64") < 0.02
    True
    """

    max_error: float | None = None
    max_delta_error: float | None = None

    def __post_init__(self):
        if self.max_error is None and self.max_delta_error is None:
            raise ValueError("a Budget needs max_error or max_delta_error")

    def allowed(self, wn: float, dn: float | None, dtype: str) -> float:
        """Largest absolute error ||W - W_hat|| one model's tensor may have (negative: none)."""
        lim = math.inf
        if self.max_error is not None:
            lim = min(lim, self.max_error * wn)
        if self.max_delta_error is not None:
            lim = min(lim, self.max_delta_error * (wn if dn is None else dn))
        return lim - slack(dtype) * wn

    def describe(self) -> str:
        parts = []
        if self.max_error is not None:
            parts.append(f"max_error={self.max_error:g}")
        if self.max_delta_error is not None:
            parts.append(f"max_delta_error={self.max_delta_error:g}")
        return ", ".join(parts)

    @property
    def exact(self) -> bool:
        return self.max_error == 0 or self.max_delta_error == 0


class ErrorSweep:
    """Per-model errors of every candidate of one tensor (one model per :meth:`add`).

    Each candidate is rebuilt exactly as pass 2 encodes it and a reader decodes it
    (:func:`uwsfmt.encodings.subspace.rebuild` in the compute dtype, the residual of that, the
    cast to the source dtype), so the chosen candidate's errors are the ones the store records.
    Only the absolute errors and each model's norms are kept (n_models x n_candidates floats).
    Given the ``budget``, a candidate that breaks it for one model is not evaluated on the next
    ones (it cannot win); its worst error is then over the models seen until then.
    """

    def __init__(self, fit: Fit, cands: list[Candidate], dtype: str, view: tuple[int, int], budget: Budget | None = None):
        self.fit, self.cands, self.dtype, self.view, self.budget = fit, cands, dtype, (view[0], view[1]), budget
        self.alive = [True] * len(cands)  # with a budget: candidates no model has broken it for yet
        self.cdt = torch.float64 if dtype == "float64" else torch.float32
        self.want = dtypes.torch_dtype(dtype)
        self.rows: list[list[float]] = []
        self.norms: list[tuple[float, float | None]] = []  # (||W||, ||W - M|| or None without a centre)
        self._groups: dict[tuple[str, int], tuple[subspace.Prepared, list[int]]] = {}
        for j, c in enumerate(cands):
            key = (c.mode, c.rank)
            if key not in self._groups:
                self._groups[key] = (subspace.prepared(candidate_fit(fit, Candidate(c.mode, c.rank, None)), self.cdt), [])
            self._groups[key][1].append(j)
        some = next(iter(self._groups.values()))[0] if self._groups else None
        self.device = some.device if some is not None else torch.device("cpu")
        self.mean = some.mean if some is not None else None

    def add(self, w: torch.Tensor) -> None:
        # small tensors single-threaded: the sweep is hundreds of small ops per model, and an
        # intra-op thread pool costs more than it gives there (and stalls on a busy machine)
        with linalg.no_tf32(), linalg.threads_for(self.view[0] * self.view[1]):
            # the same arithmetic as pass 2 (uwsfmt.writer.encode._encode_subspace), so that its errors agree
            w = w.to(self.device).reshape(self.view)
            wc = w if w.dtype == self.cdt else w.to(self.cdt)
            d = wc - self.mean.reshape(self.view) if self.mean is not None else wc
            norms = (math.sqrt(linalg.sq_norm(wc)), math.sqrt(linalg.sq_norm(d)) if self.mean is not None else None)
            limit = self.budget.allowed(*norms, self.dtype) if self.budget is not None else math.inf
            errs = [math.nan] * len(self.cands)
            for (_, _), (prep, idx) in self._groups.items():
                idx = [j for j in idx if self.alive[j]]
                if not idx:
                    continue  # every candidate of this rank already broke the budget: skip the projection
                c = linalg.project(d, prep.left, prep.right).to(torch.float32)
                rebuilt: dict[str, tuple[torch.Tensor, list]] = {}  # coefficient storage -> (rebuild, [residual])
                for j in idx:
                    cand = self.cands[j]
                    if cand.coef not in rebuilt:
                        rebuilt[cand.coef] = (subspace.rebuild(prep, coef_enc.fake(c, cand.mode, cand.coef), self.view), [None])
                    r, res_box = rebuilt[cand.coef]
                    bits = cand.bits
                    out = r
                    if bits is not None:
                        if res_box[0] is None:
                            res_box[0] = (wc - r).to(torch.float32)
                        res = res_box[0]
                        if bits == 16:
                            back = res.half().float()
                        elif quantize.scale_axis(*self.view, bits):  # per-column scales: quantize R^T's rows
                            if len(res_box) == 1:
                                res_box.append(res.T.contiguous())  # once for every bit width
                            back = quantize.fake_quantize_rows(res_box[1], bits).T
                        else:
                            back = quantize.fake_quantize_rows(res, bits)
                        out = r + back.to(self.cdt)
                    if self.want != self.cdt:
                        out = out.to(self.want).to(self.cdt)
                    errs[j] = math.sqrt(linalg.sq_norm(out - wc))
                    if not errs[j] <= limit:
                        self.alive[j] = False
            self.norms.append(norms)
        self.rows.append(errs)

    def absolute(self) -> np.ndarray:
        """(n_models, n_candidates) absolute errors ||W - W_hat||."""
        return np.asarray(self.rows, dtype=np.float64).reshape(len(self.rows), len(self.cands))

    def errors(self, kind: str = "error") -> np.ndarray:
        """(n_models, n_candidates) relative errors: vs ||W|| (``error``) or ||W - M|| (``delta_error``)."""
        a = self.absolute()
        col = 0 if kind == "error" else 1
        norms = [n[col] if n[col] is not None else n[0] for n in self.norms]
        return np.array([[ratio(e, nm) for e in row] for row, nm in zip(a, norms)]).reshape(a.shape)


@dataclass
class Choice:
    """What the budget picked for one tensor, and what the alternatives would have cost."""

    encoding: str  # subspace | dense
    candidate: Candidate | None
    bytes: int
    dense_bytes: int
    error: float  # worst model's error (0 for dense)
    delta_error: float  # worst model's delta error
    budget: Budget
    #: the rate-distortion curve of this tensor: (mode, rank, bits, bytes, worst error, worst
    #: delta error), thinned to points 20% apart in the budgeted error, so a reader can tell what
    #: another budget would have cost
    frontier: list[tuple]
    #: the coefficient storage of each frontier point (None: dense)
    frontier_coefficients: list[str | None] | None = None

    def record(self) -> dict:
        """The manifest's ``budget`` entry of the tensor."""
        c = self.candidate
        return {
            "max_error": self.budget.max_error,
            "max_delta_error": self.budget.max_delta_error,
            "error": finite(self.error),
            "delta_error": finite(self.delta_error),
            "mode": c.mode if c else None,
            "rank": c.rank if c else None,
            "residual_bits": c.bits if c else None,
            "coefficient_bits": c.coef if c else None,
            "bytes": int(self.bytes),
            "dense_bytes": int(self.dense_bytes),
            "frontier": [list(p) for p in self.frontier],
            **({"frontier_coefficients": list(self.frontier_coefficients)} if self.frontier_coefficients else {}),
        }

    def reason(self) -> str:
        if self.encoding == "dense":
            return f"error budget ({self.budget.describe()}): nothing smaller than dense meets it"
        assert self.candidate is not None  # subspace
        return f"error budget ({self.budget.describe()}): {self.candidate.describe()}"


def _spectrum_len(fit: Fit, c: Candidate) -> int:
    sides = {"left": ("left",), "flat": ("left",), "right": ("right",), "both": ("left", "right")}[c.mode]
    return sum(int(fit.spectra[s].numel()) for s in sides if s in fit.spectra)


def candidate_bytes(fit: Fit, c: Candidate, view: tuple[int, int], n_models: int) -> int:
    """:func:`tensor_bytes` of candidate ``c`` of ``fit`` (its mean as stored: float16 means take 2 bytes)."""
    mean_bytes = 0 if fit.mean is None else view[0] * view[1] * fit.mean.element_size()
    return tensor_bytes(c, view, n_models, mean_bytes=mean_bytes, spectrum_len=_spectrum_len(fit, c))


def g4(x: float) -> float | None:
    return float(f"{x:.4g}") if np.isfinite(x) else None


def pick(sweep: ErrorSweep, *, n_models: int, budget: Budget, shape: Sequence[int] | None = None) -> Choice:
    """The candidate with the fewest bytes whose every model meets ``budget``; else dense."""
    fit, view, dtype = sweep.fit, sweep.view, sweep.dtype
    shape = shape or view
    ncand = len(sweep.cands)
    if sweep.rows:
        absolute = sweep.absolute()
        allowed = np.array([budget.allowed(wn, dn, dtype) for wn, dn in sweep.norms])[:, None]
        ok = np.all(np.isfinite(absolute) & (absolute <= allowed), axis=0)
        worst = np.nanmax(np.where(np.isinf(absolute), np.inf, sweep.errors("error")), axis=0)
        worst_d = np.nanmax(np.where(np.isinf(absolute), np.inf, sweep.errors("delta_error")), axis=0)
    else:
        ok, worst, worst_d = np.ones(ncand, bool), np.zeros(ncand), np.zeros(ncand)
    sizes = [candidate_bytes(fit, c, view, n_models) for c in sweep.cands]
    dense = dense_bytes(shape, dtype, n_models)
    j: int | None  # a candidate's index (None: dense, in the frontier)
    best = None
    for j in range(ncand):
        if ok[j] and sizes[j] < dense and (best is None or (sizes[j], worst[j]) < (sizes[best], worst[best])):
            best = j
    primary = worst_d if budget.max_delta_error is not None else worst
    points = sorted([(sizes[j], float(primary[j]), j) for j in range(ncand)] + [(dense, 0.0, None)],
                    key=lambda p: (p[0], p[1]))
    frontier: list[tuple]  # dense's point and candidates' points
    frontier, floor = [], math.inf
    frontier_coefs: list[str | None] = []  # each frontier point's coefficient storage (a parallel list: 1.0 readers' schema fixes the points' length)
    for by, e, j in points:  # bytes up, error down; a point counts when it cuts the error by 20%
        if e < 0.8 * floor or (e < floor and j is None):
            floor = e
            if j is None:
                frontier.append(("dense", None, None, by, 0.0, 0.0))
                frontier_coefs.append(None)
            else:
                c = sweep.cands[j]
                frontier.append((c.mode, c.rank, c.bits, by, g4(worst[j]), g4(worst_d[j])))
                frontier_coefs.append(c.coef)
    if best is None:
        return Choice("dense", None, dense, dense, 0.0, 0.0, budget, frontier, frontier_coefs)
    return Choice("subspace", sweep.cands[best], sizes[best], dense, float(worst[best]), float(worst_d[best]), budget, frontier,
                  frontier_coefs)


def choose(fit: Fit, tensors: Iterable[torch.Tensor], *, name: str, shape: Sequence[int], dtype: str, n_models: int, budget: Budget,
           residual_bits: int | None = None, fixed_rank: bool = False, mode: str = "auto", forced: bool = False,
           coefficient_bits: str = "auto") -> tuple[Choice, Fit | None]:
    """Sweep the models of one tensor (``tensors``: each model's copy, in order) and pick its
    encoding. Returns the choice and the fit to store (None when dense wins).

    ``residual_bits`` / ``fixed_rank`` / ``mode`` are the user's overrides; ``forced``: the tensor
    must stay a subspace tensor (an ``encodings`` override), so a budget it cannot meet is an error.
    """
    m, n = linalg.matrix_view(tuple(shape))
    view = (m * n, 1) if fit.mode == "flat" else (m, n)
    bits = BITS if residual_bits is None else (residual_bits,)
    coefs = AUTO_COEFFICIENTS if coefficient_bits == "auto" else (coefficient_bits,)
    cands = candidates(fit, bits=bits, fixed_rank=fixed_rank, modes=None if mode == "auto" else (mode,), coefs=coefs, view=view)
    dense = dense_bytes(shape, dtype, n_models)  # a candidate at least as large as dense never wins: not swept
    cands = [c for c in cands if candidate_bytes(fit, c, view, n_models) < dense]
    sweep = ErrorSweep(fit, cands, dtype, view, budget)
    for w in tensors:
        sweep.add(w)
    choice = pick(sweep, n_models=n_models, budget=budget, shape=shape)
    if choice.encoding == "dense":
        if forced:

            best = min((p[4] for p in choice.frontier if p[4] is not None and p[4] > 0), default=math.nan)
            raise BudgetError(
                f"tensor {name!r} is forced to the subspace encoding, but no rank and residual meets {budget.describe()} "
                f"(smallest error it reaches: {best:.3g}); raise the budget, or let it be dense (drop the encodings override)"
                + (". A budget of 0 means exact bits, which only dense or shared storage gives" if budget.exact else "")
            )
        return choice, None
    assert choice.candidate is not None  # subspace
    return choice, candidate_fit(fit, choice.candidate)
