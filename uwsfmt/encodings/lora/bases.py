"""Bases for LoRA modules: exact (from the factors or the product Grams), sketched, or chosen by an error budget."""

from __future__ import annotations

import math

import numpy as np
import torch

from uwsfmt.encodings import budget as budget_mod
from uwsfmt.encodings import subspace
from uwsfmt.encodings.lora.cores import factor_matrices, read_back
from uwsfmt.encodings.lora.planning import ModulePlan
from uwsfmt.encodings.lora.stats import ProductGramSketch, ProductGramStats
from uwsfmt.errors import BudgetError, SourceError
from uwsfmt.format import dtypes
from uwsfmt.numerics import gram, linalg, randomized
from uwsfmt.sources.base import Checkpoint

#: adapters whose factors one sweep adds together (:meth:`ProductGramSketch.add_many`), and the
#: most bytes of factors it holds for them
SWEEP_BATCH = 16


SWEEP_BATCH_BYTES = 32 << 20


def _sweep(stats, cks: list[Checkpoint], mp, out: int, inp: int, prog, step: bool):
    """Every adapter's factors of module ``mp`` into ``stats`` (exact Grams or sketches),
    consecutive adapters of one rank and dtype added together (:func:`_runs`)."""
    for run in _runs(cks, mp, out, inp, prog, step):
        if run is None:
            stats.add_zero()
        else:
            stats.add_many(*run)
    return stats


def _runs(cks: list[Checkpoint], mp, out: int, inp: int, prog=None, step: bool = False):
    """The adapters' factors of module ``mp`` in runs: consecutive adapters of one rank and
    dtypes stacked, up to :data:`SWEEP_BATCH` adapters and :data:`SWEEP_BATCH_BYTES` of
    factors, as (A n x r x in, B n x out x r, [scale per adapter]); None for each adapter
    that lacks the module (yielded in order; a run ends before it only when shapes differ)."""
    run: list[tuple[torch.Tensor, torch.Tensor, float]] = []

    def stacked():
        got = torch.stack([x[0] for x in run]), torch.stack([x[1] for x in run]), [x[2] for x in run]
        run.clear()
        return got

    for got in _module_factors(cks, mp, out, inp, prog, step):
        if got is None:
            yield None
            continue
        a, b, scale = got
        if run and (a.shape != run[0][0].shape or a.dtype != run[0][0].dtype or b.dtype != run[0][1].dtype
                    or len(run) >= SWEEP_BATCH
                    or (len(run) + 1) * (a.numel() * a.element_size() + b.numel() * b.element_size()) > SWEEP_BATCH_BYTES):
            yield stacked()
        run.append((a, b, scale))
    if run:
        yield stacked()


def _module_factors(cks: list[Checkpoint], mp, out: int, inp: int, prog=None, step: bool = False):
    """Each adapter's (A, B, scale) of module ``mp`` (None where it lacks the module), NaN/Inf refused."""
    for ck in cks:
        pair = ck.lora_pairs().get(mp.module)
        if pair is None:
            yield None
        else:
            a, b = factor_matrices(ck, pair, out, inp)
            # a sum is NaN/Inf when a value is (one pass, no mask); only then (or when a large sum overflows) look closer
            if not math.isfinite(float(a.sum()) + float(b.sum())) and not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise SourceError(f"{ck.path or ck.id}: LoRA module {mp.module!r} of {ck.id!r} contains NaN or Inf values; fix the adapter")
            yield a, b, pair.scale
        if prog is not None:
            prog.step(mp.module, 1 if step else 0)


def _fit_factored(mp, cks: list[Checkpoint], s, dev: torch.device, prog, step: bool) -> subspace.Fit:
    """The exact bases of a module whose adapters span few directions (sum of ranks R well
    below its sides), without its out x out and in x in Grams: with B_cat = [B_1 ... B_N] = Q T
    (QR, out x R), the left Gram sum_i s_i^2 B_i (A_i A_i^T) B_i^T = Q (T M T^T) Q^T, M the
    block diagonal of the s_i^2 A_i A_i^T, so its eigenvectors are Q V from the R x R
    eigenproblem T M T^T = V diag(vals) V^T (likewise on the right, with the A_i^T and the
    B_i^T B_i). Same spectrum (zero beyond R), more accurate (B is not squared); 4096 wide with
    R = 512 it replaces two 4096 x 4096 Grams and their eigendecompositions by two QRs of
    4096 x 512 per module."""
    out, inp = linalg.matrix_view(mp.shape)
    f64 = torch.float64
    a_s, b_s, scales = [], [], []
    for got in _module_factors(cks, mp, out, inp, prog, step):
        if got is not None:
            a, b, scale = got
            a_s.append(a.to(dev, f64))
            b_s.append(b.to(dev, f64))
            scales.append(float(scale))
    fit = subspace.Fit("both", "none", None, None, None)
    cap = sum(x.shape[0] for x in a_s)
    sides = (("left", out, torch.cat(b_s, 1), [s2 * (a @ a.T) for a, s2 in zip(a_s, (x * x for x in scales))]),
             ("right", inp, torch.cat(a_s, 0).T, [s2 * (b.T @ b) for b, s2 in zip(b_s, (x * x for x in scales))]))
    for side, dim, stacked, blocks in sides:
        q, t = torch.linalg.qr(stacked)
        tm = torch.cat([t[:, j: j + m.shape[0]] @ m for j, m in zip(np.cumsum([0] + [m.shape[0] for m in blocks[:-1]]), blocks)], 1)
        vals, v = gram.eig_desc(tm @ t.T)
        vals = torch.cat([vals, vals.new_zeros(dim - vals.numel())])  # the Gram's spectrum: zero beyond R
        k = s.choose(side, vals, cap)
        fit.spectra[side], fit.kept[side] = vals, k
        vecs = q @ v[:, :k]
        setattr(fit, side, vecs.to(torch.float32))
        if getattr(s, "error_budget", None) is not None:
            fit.bases64 = (fit.bases64 or {}) | {side: vecs}
    return fit


#: the exact bases of a module come from its factors (:func:`_fit_factored`) when the adapters'
#: ranks add up to at most this share of its smaller side; else from its product Grams. Measured
#: (``bench/lora_exact.py``, 4096 wide, rank 16, 2 cores): factors / Grams 0.28x at a share of
#: 0.5, 0.58x at 0.75, 1.15x at 0.94
FACTORED_SHARE = 0.8


def _fit_sketch(tp, cks: list[Checkpoint], s, dev: torch.device, prog, target: int | None = None,
                step: bool = True) -> tuple[subspace.Fit | None, bool]:
    """basis="sketch" for a module: randomised range finder on each product Gram, checked
    a-posteriori like plain tensors (see :func:`uwsfmt.writer.sketch.fit_sketch`).
    Returns (fit, swept): fit None means "use the exact Grams"; swept, whether progress was counted.

    Under an error budget the fit keeps ``target`` candidate directions per side (the Ritz
    vectors, float64 in ``bases64``) and no check is made here: :func:`fit_budget` checks the
    ranks it picks (``ritz``: each side's :class:`uwsfmt.numerics.randomized.SketchResult`)."""
    mp: ModulePlan = tp.lora
    out, inp = linalg.matrix_view(mp.shape)
    cap = sum(mp.ranks.values())
    budgeted = getattr(s, "error_budget", None) is not None
    if target is None:
        target = s.rank if s.rank is not None else (s.max_rank if s.max_rank is not None else randomized.SKETCH_RANK)
    width = min(target, cap) + s.sketch_oversample
    if width >= cap or width + randomized.SKETCH_PROBES > min(out, inp) // 2:
        return None, False  # the exact Grams cost about as much
    xs = {side: randomized.sketch_test_matrix(dim, width, s.seed, dev, salt=30 + i) for i, (side, dim) in enumerate((("left", out), ("right", inp)))}
    sk = _sweep(ProductGramSketch(xs), cks, mp, out, inp, prog, step)
    qs = {side: linalg.orthonormal_columns(y) for side, y in sk.y.items()}
    for _ in range(s.sketch_power - 1):
        qs = {side: linalg.orthonormal_columns(y) for side, y in _sweep(ProductGramSketch(qs, energy=False), cks, mp, out, inp, prog, False).y.items()}
    probes = {side: randomized.sketch_test_matrix(q.shape[0], randomized.SKETCH_PROBES, s.seed, dev, salt=40 + i) for i, (side, q) in enumerate(qs.items())}
    last = _sweep(ProductGramSketch({side: torch.cat([q, probes[side]], 1) for side, q in qs.items()}, energy=False), cks, mp, out, inp, prog, False)
    f = subspace.Fit("both", "none", None, None, None, method={"method": "sketch", "columns": {}, "power_sweeps": s.sketch_power, "check": {}})
    for side, q in qs.items():
        t = q.shape[1]
        g = last.y[side]
        res = randomized.sketch_ritz(q, g[:, :t], probes[side], g[:, t:], sk.sq_norm)
        spectrum = res.spectrum()
        k = s.choose(side, spectrum, min(cap, t))
        if budgeted:  # every well-found direction is a candidate; fit_budget checks the ranks it picks
            k = min(k, t - s.sketch_oversample)
            f.spectra[side], f.kept[side], f.method["columns"][side] = spectrum, k, t
            f.bases64 = (f.bases64 or {}) | {side: res.vectors[:, :k].contiguous()}
            f.ritz = (f.ritz or {}) | {side: res}
            setattr(f, side, res.vectors[:, :k].to(torch.float32))
            continue
        check = res.check(k, s.sketch_tolerance)
        if (s.rank is None and k > t - s.sketch_oversample) or not check["ok"]:
            return None, True
        f.spectra[side], f.kept[side] = spectrum, k
        f.method["columns"][side], f.method["check"][side] = t, check
        setattr(f, side, res.vectors[:, :k].to(torch.float32))
    return f, True


def fit(tp, cks: list[Checkpoint], s, dev: torch.device, prog) -> subspace.Fit:
    """Pass 1 for one module (no error budget, see :func:`fit_budgeted`): the sketch where
    asked for and it holds, else the exact bases."""
    swept = False
    if getattr(s, "basis", "exact") == "sketch":
        with linalg.no_tf32():
            f, swept = _fit_sketch(tp, cks, s, dev, prog)
        if f is not None:
            return f
    return _fit_exact(tp, cks, s, dev, prog, not swept,
                      "tau not met within the sketch, or the a-posteriori check failed" if swept else None)


def _fit_exact(tp, cks: list[Checkpoint], s, dev: torch.device, prog, step: bool, rejected: str | None) -> subspace.Fit:
    """The exact bases of one module: from its factors (:func:`_fit_factored`) where the
    adapters span few directions, else from its product Grams streamed in float64.
    ``rejected``: why a sketch was not used (recorded), None when none was tried."""
    mp: ModulePlan = tp.lora
    out, inp = linalg.matrix_view(mp.shape)
    cap = sum(mp.ranks.values())  # the products span at most sum of ranks directions per side
    with linalg.no_tf32():
        if cap <= FACTORED_SHARE * min(out, inp):
            f = _fit_factored(mp, cks, s, dev, prog, step)
        else:
            st = _sweep(ProductGramStats.empty(out, inp, device=dev), cks, mp, out, inp, prog, step)
            f = subspace.Fit("both", "none", None, None, None)
            for side, g in (("left", st.left), ("right", st.right)):
                vals, vecs = gram.eig_desc(g)
                k = s.choose(side, vals, cap)
                f.spectra[side] = vals
                f.kept[side] = k
                setattr(f, side, vecs[:, :k].to(torch.float32))
                if getattr(s, "error_budget", None) is not None:
                    f.bases64 = (f.bases64 or {}) | {side: vecs[:, :k].clone()}  # not a view of every eigenvector
    if rejected is not None:
        f.method = {"method": "exact", "sketch_rejected": rejected}
    return f


def fit_budgeted(tp, cks: list[Checkpoint], s, dev: torch.device, prog) -> tuple[subspace.Fit, dict]:
    """Pass 1 for one module under an error budget: its bases, cut to the cheapest ranks at
    which every adapter meets the budget, and the manifest's ``budget`` record (:func:`fit_budget`).

    basis="sketch": the candidates are a sketch's Ritz vectors, :data:`uwsfmt.numerics.randomized.SKETCH_RANK`
    per side at first, 4x more (up to ``max_rank``) while the budget is not met within them or
    only with every candidate of a side.
    The errors the ranks are picked by are exact for those bases; the sketch only decides how
    close to the fewest bytes they are, so the ranks picked are checked a-posteriori
    (``sketch_tolerance``, as for tau) and the exact bases are used when the check fails, when
    ``max_rank`` sketched directions do not meet the budget, or when the sketch would cost about
    as much as they do (the adapters span few directions). 4096 wide, 256 adapters of rank 16:
    ~1.4 s per module, build included, instead of ~15 s (``bench/budget_sketch.py``).
    """

    mp: ModulePlan = tp.lora
    swept, rejected = False, None
    if getattr(s, "basis", "exact") == "sketch":
        most = min(budget_mod.MAX_CANDIDATE_RANK if s.max_rank is None else s.max_rank, sum(mp.ranks.values()))
        target = min(randomized.SKETCH_RANK, most)
        while True:
            with linalg.no_tf32():
                f, now = _fit_sketch(tp, cks, s, dev, prog, target, step=not swept)
            swept = swept or now
            if f is None:
                break
            record, rejected, more = fit_budget(tp, f, cks, s, dev, final=False, widen=target < most)
            if record is not None:
                return f, record
            if target >= most or not more:
                break
            target = min(4 * target, most)
    f = _fit_exact(tp, cks, s, dev, prog, not swept, rejected)
    record, _, _ = fit_budget(tp, f, cks, s, dev)
    assert record is not None  # final: a budget not met raises
    return f, record


def fit_budget(tp, fit: subspace.Fit, cks: list[Checkpoint], s, dev: torch.device,
               final: bool = True, widen: bool = False) -> tuple[dict | None, str | None, bool]:
    """Error-budget mode for one module: cut ``fit`` (pass 1's bases, every candidate direction)
    to the ranks (kl, kr) with the fewest bytes at which every adapter, as a reader gets it back,
    is within ``s.error_budget``; return (the manifest's ``budget`` record of the module, None, False).

    One sweep gives every pair of ranks' error at once: with pass 1's float64 bases
    (``fit.bases64``: orthonormal, best first, rounded to float32 for the store), the
    two-sided projection loses ||X||^2 - ||C[:kl, :kr]||^2 of X = s B A, C = Q_L^T X Q_R (r x r
    and k x r products only; the two sides' spans differ, so kl and kr are chosen together). The
    stored bases are float32 and a reader's factors are cast to the source dtype, so the pair
    found is checked with pass 2's own error (:func:`read_back`) and raised until every adapter
    meets the budget; a budget no ranks meet (below the factors' rounding, or beyond
    ``max_rank`` directions) is a :class:`BudgetError` naming the module and adapter.

    Not ``final`` (``fit`` is a sketch's, with its ``ritz``): (None, why, more) instead of the
    error, or when the sketch's a-posteriori check fails at the ranks picked; ``more``: more
    candidate directions could meet the budget, or (``widen``) meet it with fewer bytes (the
    ranks picked use every candidate on a side).
    """

    mp: ModulePlan = tp.lora
    out, inp = linalg.matrix_view(mp.shape)
    bud = s.error_budget
    f = torch.float64
    assert fit.left is not None and fit.right is not None  # LoRA fits are two-sided
    cap_l, cap_r = fit.left.shape[1], fit.right.shape[1]
    held = [(ck, pair) for ck in cks if (pair := ck.lora_pairs().get(mp.module)) is not None]
    spanned = sum(mp.ranks.values())

    def runs():  # the held adapters' factors in float64 runs (see _runs), with their scales
        for run in _runs(cks, mp, out, inp):
            if run is not None:
                a, b, scales = run
                yield a.to(dev, f), b.to(dev, f), torch.tensor([float(x) for x in scales], dtype=f, device=dev)

    worst = np.zeros((cap_l + 1, cap_r + 1))  # worst adapter's relative error at (kl, kr)
    fits_all = np.ones((cap_l + 1, cap_r + 1), dtype=bool)
    norms, allowed = [], []
    with linalg.no_tf32():
        assert fit.bases64 is not None  # kept by pass 1 under an error budget
        ql, qr = fit.bases64["left"], fit.bases64["right"]  # pass 1's float64 bases: orthonormal, nested
        fit.bases64 = None
        for a, b, sc in runs():
            c = sc[:, None, None] * ((ql.mT @ b) @ (a @ qr))
            kept = torch.nn.functional.pad(torch.cumsum(torch.cumsum(c * c, 1), 2), (1, 0, 1, 0))  # ||C[:kl, :kr]||^2
            x2 = sc * sc * torch.sum((a @ a.mT) * (b.mT @ b), dim=(1, 2))
            lost = (x2[:, None, None] - kept).clamp_min(0).sqrt().cpu().numpy()
            wn = x2.sqrt().cpu().numpy()
            lim = np.array([bud.allowed(float(w), float(w), tp.dtype) for w in wn])
            norms += wn.tolist()
            allowed += lim.tolist()
            fits_all &= (lost <= lim[:, None, None]).all(0)
            if (wn > 0).any():
                np.maximum(worst, (lost[wn > 0] / wn[wn > 0, None, None]).max(0), out=worst)
    kl_grid, kr_grid = np.meshgrid(np.arange(cap_l + 1), np.arange(cap_r + 1), indexing="ij")
    # bytes at (kl, kr): bases, spectra and cores, as budget.tensor_bytes counts them
    sizes = (4 * (out * kl_grid + inp * kr_grid) + 4 * len(cks) * kl_grid * kr_grid
             + 8 * (fit.spectra["left"].numel() + fit.spectra["right"].numel()) + 2 * budget_mod.ARRAY_OVERHEAD)
    if fits_all.any():
        flat = np.lexsort((worst.ravel(), np.where(fits_all, sizes, np.iinfo(np.int64).max).ravel()))[0]
        kl, kr = (int(x) for x in np.unravel_index(flat, fits_all.shape))
    elif not final:
        return None, f"budget not met within the {cap_l} x {cap_r} sketched directions", True
    else:
        kl, kr = cap_l, cap_r

    def read_errors(kl: int, kr: int) -> list[float]:
        assert fit.left is not None and fit.right is not None
        left, right = fit.left[:, :kl].to(f), fit.right[:, :kr].to(f)
        errs = []
        for a, b, sc in runs():
            errs += read_back(left, right, a, b, sc, min(kl, kr, a.shape[1]), tp.dtype)[2].sqrt().tolist()
        return errs

    while True:
        got = read_errors(kl, kr)
        bad = [j for j, (g, lim) in enumerate(zip(got, allowed)) if not g <= lim]
        if not bad:
            break
        if (kl, kr) == (cap_l, cap_r):
            if not final:
                return None, f"budget not met within the {cap_l} x {cap_r} sketched directions, read back", True
            j = max(bad, key=lambda j: got[j] / max(norms[j], 1e-300))
            err = got[j] / norms[j] if norms[j] > 0 else math.inf
            capped = max(cap_l, cap_r) < spanned and max(cap_l, cap_r) == (s.max_rank or budget_mod.MAX_CANDIDATE_RANK)
            why = (f"keeping all {max(cap_l, cap_r)} candidate directions (the adapters span up to {spanned})" if capped else
                   f"keeping every direction the adapters span: the {tp.dtype} factors a reader gets back round by about that much")
            raise BudgetError(
                f"LoRA module {mp.module!r}: the error budget ({bud.describe()}) cannot be met; adapter {held[j][0].id!r} "
                f"comes back with relative error {err:.3g} even {why}. Raise the budget to at least {err:.2g}"
                + (", or raise --max-rank" if capped else "")
                + ", or convert with --lora-mode factors (A and B stored as ordinary tensors, held to the budget one by one)")
        kl, kr = min(cap_l, kl + max(1, kl // 4)), min(cap_r, kr + max(1, kr // 4))
    if widen and (kl == cap_l or kr == cap_r):
        return None, f"budget met at ranks ({kl}, {kr}), every sketched direction on a side", True
    if fit.ritz:  # a sketch's candidates: are these ranks' directions near the best ones?
        checks = {side: fit.ritz[side].check(k, s.sketch_tolerance) for side, k in (("left", kl), ("right", kr))}
        if not all(c["ok"] for c in checks.values()):
            return None, (f"a-posteriori check failed at ranks ({kl}, {kr}) (a missed direction could lower "
                          f"the error by more than {s.sketch_tolerance:.0%})"), False
        fit.method["check"], fit.ritz = checks, None
    fit.left, fit.right = fit.left[:, :kl].contiguous(), fit.right[:, :kr].contiguous()
    fit.kept = {"left": kl, "right": kr}
    frontier = []
    order = np.lexsort((worst.ravel(), sizes.ravel()))  # fewest bytes first
    by_size = worst.ravel()[order]
    at, floor = 0, math.inf
    while at < len(order):  # a pair counts when it cuts the worst error by 20% (predicted, before rounding)
        hits = np.flatnonzero(by_size[at:] < 0.8 * floor)
        if not hits.size:
            break
        at += int(hits[0])
        floor = w = float(by_size[at])
        i, j = (int(x) for x in np.unravel_index(order[at], worst.shape))
        frontier.append(["both", [i, j], None, int(sizes[i, j]), budget_mod.g4(w), budget_mod.g4(w)])
        at += 1
    rel = max((g / w if w > 0 else 0.0 for g, w in zip(got, norms)), default=0.0)
    itemsize = dtypes.torch_dtype(tp.dtype).itemsize
    return {
        "max_error": bud.max_error, "max_delta_error": bud.max_delta_error,
        "error": rel, "delta_error": rel, "mode": "both", "rank": kl if kl == kr else None, "ranks": [kl, kr],
        "residual_bits": None, "bytes": int(sizes[kl, kr]),
        "dense_bytes": int(sum((out + inp) * r * itemsize for r in mp.ranks.values())),  # the adapters' own factors
        "frontier": frontier,
    }, None, False
