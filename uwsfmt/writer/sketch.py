"""Randomised sketch of a tensor across the family: candidate bases without the full Gram."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence

import torch

from uwsfmt.encodings import subspace
from uwsfmt.io import overlap
from uwsfmt.numerics import gram, linalg, randomized
from uwsfmt.sources import Checkpoint
from uwsfmt.writer.holdings import Holdings, can_keep_coefficients, coefficients_from_ritz
from uwsfmt.writer.means import stored_mean
from uwsfmt.writer.plan import TensorPlan
from uwsfmt.writer.progress import Progress
from uwsfmt.writer.settings import READ_AHEAD_MIN_BYTES, SKETCH_PROBES, Settings, gram_compute_dtype


def sketch_test_matrices(s: Settings, mode: str, m: int, n: int, dev: torch.device,
                          target: int | None = None) -> dict[str, torch.Tensor] | None:
    """Gaussian test matrices per basis side for basis="sketch", or None where the exact Gram is
    used: the setting asks for it, or the sketch would be nearly as wide as the Gram itself.
    ``target``: directions to look for (default: the rank, else max_rank, else
    :data:`uwsfmt.numerics.randomized.SKETCH_RANK`; under an error budget, the candidates it picks from, SKETCH_RANK at first)."""
    if s.basis != "sketch" or mode == "flat":
        return None
    if target is None:
        target = s.rank if s.rank is not None else (s.max_rank if s.max_rank is not None else randomized.SKETCH_RANK)
        if s.error_budget is not None and s.rank is None:
            target = min(target, randomized.SKETCH_RANK)
    width = target + s.sketch_oversample
    out = {}
    for i, side in enumerate(("left", "right")):
        if mode in (side, "both"):
            dim = m if side == "left" else n
            if width + SKETCH_PROBES > dim // 2:
                return None
            out[side] = randomized.sketch_test_matrix(dim, width, s.seed, dev, salt=10 + i)
    return out


def read_tensors(cks: list[Checkpoint], name: str, dev: torch.device, kept: Sequence[torch.Tensor] = ()) -> Iterator[torch.Tensor]:
    """Every model's copy of tensor ``name`` in order, each read while the caller works on the
    previous one where that pays (:mod:`uwsfmt.overlap`); ``kept``: the first models' copies,
    already read (the first model's, or an earlier sweep's)."""
    kept = list(kept) or [cks[0].get(name)]
    first = kept[0]

    def read(i: int) -> torch.Tensor:
        if len(kept) <= i + 1 < len(cks):
            cks[i + 1].prefetch(name)  # the kernel reads the next one from disk meanwhile
        return kept[i] if i < len(kept) else cks[i].get(name)

    big = first.numel() * first.element_size() >= READ_AHEAD_MIN_BYTES
    return overlap.read_ahead([functools.partial(read, i) for i in range(len(cks))], enabled=big and overlap.useful(dev))


def _sweep(cks: list[Checkpoint], name: str, dev: torch.device, stats, prog: Progress, kept: Sequence[torch.Tensor] = ()):
    """One more pass over every model's copy of tensor ``name`` into ``stats`` (``kept``: the
    first models' copies, as an earlier sweep read them)."""
    for w in read_tensors(cks, name, dev, kept=kept):
        prog.step(name, 0)  # cancellation point
        stats.add(w.to(dev))
    return stats


def fit_sketch(tp: TensorPlan, cks: list[Checkpoint], s: Settings, dev: torch.device, sk: randomized.GramSketch, mode: str,
                prog: Progress, hold: Holdings | None = None, kept: Sequence[torch.Tensor] = ()) -> subspace.Fit:
    """Bases from a randomised range finder: orthonormalise the sketch G X, refine with
    ``sketch_power - 1`` power sweeps, then a last sweep gives G Q (exact energies of the found
    directions, Rayleigh-Ritz) and G P for fresh probes P (the a-posteriori check). Falls back to
    the exact Gram when the check fails or tau is not met within the sketched directions.

    The last sweep's deltas are taken against the mean readers use (centring "mean"; the base
    for "base"), so that where ``hold`` has room it also keeps what pass 2 would compute for a
    one-sided tensor: every model's coefficients and error (:func:`coefficients_from_ritz`)."""
    assert tp.shape is not None  # a tensor of varying shape is dense
    m, n = linalg.matrix_view(tp.shape)
    mean, ys, total = sk.products(s.center)
    qs = {side: linalg.orthonormal_columns(y) for side, y in ys.items()}
    for _ in range(s.sketch_power - 1):
        refine = _sweep(cks, tp.name, dev, randomized.GramSketch(m, n, qs, sk.reference_c, sums=False), prog, kept)
        qs = {side: linalg.orthonormal_columns(y) for side, y in refine.products(s.center, sums=sk)[1].items()}
    probes = {}
    for i, (side, q) in enumerate(qs.items()):
        p = randomized.sketch_test_matrix(q.shape[0], SKETCH_PROBES, s.seed, dev, salt=20 + i)
        probes[side] = p - q @ (q.T @ p)  # the probes' parts outside span(Q)
    held = 0
    if can_keep_coefficients(tp, s, mode) and hold is not None:
        t = next(iter(qs.values())).shape[1]
        held = len(cks) * t * max(m, n) * torch.finfo(sk.cdt).bits // 8
        held = held if hold.take(held) else 0
    spread = math.sqrt(total / len(cks))  # root-mean-square deviation from the centre (for stored_mean)
    if s.center == "mean":
        # the mean as readers get it (stored by stored_mean, computed in the compute dtype), and the
        # family's exact mean minus it (its rounding) for the centring
        mean_c, offset = sk.family_mean()
        mean = stored_mean(mean_c, tp.dtype, s, spread)
        centre = mean.to(sk.cdt)
        if centre is not mean_c:  # stored in another dtype than computed: its rounding too
            offset = offset + (mean_c - centre)
        ritz = randomized.GramRitz(m, n, qs, probes, centre, keep=held > 0, mean_offset=offset)
        del mean_c
    else:
        centre = sk.reference_c
        if s.center == "base":  # the base as readers get it (float16 where stored_mean keeps it): the sweep's centre
            mean = stored_mean(sk.reference_c, tp.dtype, s, spread)
            centre = mean.to(sk.cdt)
        ritz = randomized.GramRitz(m, n, qs, probes, centre, keep=held > 0)
    try:
        last = _sweep(cks, tp.name, dev, ritz, prog, kept).centred(s.center, sk)
    except BaseException:
        if held:
            assert hold is not None  # held: taken from it
            hold.release(held)
        raise
    fit = subspace.Fit(mode, s.center, mean, None, None,
                       method={"method": "sketch", "columns": {}, "power_sweeps": s.sketch_power, "check": {}})
    coords = {}
    for side, q in qs.items():
        t = q.shape[1]
        res = randomized.ritz_from_h(q, last[side][0], probes[side], last[side][1], total)
        spectrum = res.spectrum()
        k = s.choose(side, spectrum, t)
        check = res.check(k, s.sketch_tolerance)
        why = None
        if s.error_budget is not None:  # candidates: the well-found directions; budget_tensor checks the rank it picks
            k = min(k, t - s.sketch_oversample)
            fit.ritz = (fit.ritz or {}) | {side: res}
        elif s.rank is None and k > t - s.sketch_oversample:
            why = f"{side}: tau needs more than the {t - s.sketch_oversample} directions sketched"
        elif not check["ok"]:
            why = f"{side}: a-posteriori check failed (a missed direction could lower the error by more than {s.sketch_tolerance:.0%})"
        if why:
            ritz.kept.clear()
            if held:
                assert hold is not None
                hold.release(held)
            exact = _sweep(cks, tp.name, dev, gram.GramStats.empty(
                m, n, left=mode in ("left", "both"), right=mode in ("right", "both"), reference=sk.reference,
                compute=gram_compute_dtype(tp.dtype, m * n, s)), prog, kept)
            fit = subspace.fit_gram(exact, mode=mode, center=s.center, choose=s.choose)
            fit.method = {"method": "exact", "sketch_rejected": why}
            return fit
        fit.spectra[side] = spectrum
        fit.kept[side] = k
        fit.method["columns"][side] = t
        fit.method["check"][side] = check
        basis = res.vectors[:, :k].to(torch.float32)
        assert res.coords is not None  # ritz_from_h gives them
        coords[side] = res.coords[:, :k]
        if side == "left":
            fit.left = basis
        else:
            fit.right = basis
    if held:
        fit.precomputed = coefficients_from_ritz(fit, ritz.kept, coords)
        ritz.kept.clear()
        assert hold is not None
        hold.release(held - sum(c.numel() * c.element_size() for c, _, _ in filter(None, fit.precomputed)))
    return fit
