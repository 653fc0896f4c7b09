"""Pass 1: per-tensor statistics (Gram or sketch) -> mean, basis, rank; error budgets per tensor."""

from __future__ import annotations

import dataclasses
import math
from typing import cast

import torch

from uwsfmt.encodings import budget, subspace
from uwsfmt.encodings.shared import same_bits
from uwsfmt.errors import ConfigError
from uwsfmt.numerics import gram, linalg, randomized
from uwsfmt.sources import Checkpoint
from uwsfmt.writer.holdings import KEEP_SOURCES_BYTES, Holdings
from uwsfmt.writer.means import mean_dtype_for, rms_spread, stored_mean
from uwsfmt.writer.plan import TensorPlan, check_finite, nonfinite_error, override_for
from uwsfmt.writer.progress import Progress
from uwsfmt.writer.settings import BATCH_MAX_NUMEL, BATCH_STATS_BYTES, Settings, gram_compute_dtype
from uwsfmt.writer.sketch import fit_sketch, read_tensors, sketch_test_matrices


def fit_tensor(tp: TensorPlan, cks: list[Checkpoint], s: Settings, dev: torch.device, base: Checkpoint | None, prog: Progress,
                hold: Holdings | None = None, target: int | None = None, count: bool = True):
    """Statistics sweep for one tensor -> (final encoding, Fit or shared value, reason).
    ``hold``: memory pass 1 may keep pass-2 results in (see :func:`coefficients_from_ritz`).
    ``target``: directions a sketch looks for (error budgets, see :func:`budget_tensor`);
    ``count``: whether this sweep counts as the tensor's progress (a refit does not)."""
    assert tp.shape is not None  # a tensor of varying shape is dense
    m, n = linalg.matrix_view(tp.shape)
    mode = budget.gram_mode(s.mode, m, n) if s.error_budget is not None else subspace.resolve_mode(s.mode, m, n)
    first = cks[0].get(tp.name)
    if s.center == "base":
        if base is None:
            raise ConfigError("center='base' needs base=... (the checkpoint the family was fine-tuned from)")
        reference = base.get(tp.name).to(dev)
    else:
        reference = first.to(dev)
    identical = True
    with linalg.no_tf32():
        sketch = sketch_test_matrices(s, mode, m, n, dev, target)
        # the sketch's later sweeps reuse the first models' tensors as read here, up to KEEP_SOURCES_BYTES
        keep = KEEP_SOURCES_BYTES // max(first.numel() * first.element_size(), 1) if sketch and mode != "flat" else 0
        kept: list[torch.Tensor] = []
        st: randomized.GramSketch | gram.GramStats
        if mode == "flat":
            width = min(len(cks), (s.rank or s.max_rank or len(cks)) + s.sketch_oversample)
            sk = randomized.FlatSketch(m * n, max(1, width), reference, seed=s.seed)
        elif sketch:
            st = randomized.GramSketch(m, n, sketch, reference, w_norms=s.center == "none")
        else:
            st = gram.GramStats.empty(m, n, left=mode in ("left", "both"), right=mode in ("right", "both"), reference=reference,
                                      compute=gram_compute_dtype(tp.dtype, m * n, s))
        for i, (ck, w) in enumerate(zip(cks, read_tensors(cks, tp.name, dev, [first]))):
            if i > 0:
                identical = identical and same_bits(w, first)
            sq = (sk if mode == "flat" else st).add(w.to(dev))
            if len(kept) < keep:
                kept.append(w)
            # the statistics' squared norm (of W; of W - reference for the sketch) is NaN/Inf when a value is: no separate pass
            if not (sq is not None and math.isfinite(sq)) and not check_finite(w, tp.name, ck):
                if s.allow_nonfinite:
                    prog.step(tp.name, len(cks) - i if count else 0)
                    return "dense", None, "non-finite values"
                raise nonfinite_error(tp.name, ck)
            if sketch and not math.isfinite(cast(float, sq)):  # finite values whose float32 delta overflows
                raise ConfigError(f"{ck.path or ck.id}: tensor {tp.name!r} has values too large for basis='sketch' (its deltas "
                                  "overflow float32); build with basis='exact'")
            prog.step(tp.name, 1 if count else 0)
        if identical and len(cks) > 1 and override_for(tp.name, s.encodings) != "subspace":
            return "shared", first, "bit-identical in every model"
        if mode == "flat":
            mean, q = sk.range(s.center)
            if mean is not None:
                mean = stored_mean(mean, tp.dtype, s).to(torch.float64)
            proj = torch.stack([q.T @ (cks[i].get(tp.name).to(dev, torch.float64).reshape(-1) - (mean if mean is not None else 0.0))
                                for i in range(len(cks))], dim=1)
            basis, spectrum = randomized.flat_basis(q, proj)
            fit = subspace.fit_flat(mean, basis, spectrum, s.choose)
        elif sketch:
            assert isinstance(st, randomized.GramSketch)
            fit = fit_sketch(tp, cks, s, dev, st, mode, prog, hold, kept)
            del st, kept
        else:
            assert isinstance(st, gram.GramStats)
            fit = subspace.fit_gram(st, mode=mode, center=s.center, choose=s.choose)
            del st
    if fit.mean is not None:
        if fit.method.get("method") == "sketch":  # decided before its last sweep (centrings "mean" and "base")
            fit.mean = fit.mean if fit.mean.dtype == torch.float16 else fit.mean.to(mean_dtype_for(tp.dtype))
        else:
            fit.mean = stored_mean(fit.mean, tp.dtype, s, rms_spread(fit, len(cks)))
    return "subspace", fit, "float matrix"


#: integer dtype of each element size: bit patterns of a batch compared in one pass
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _fit_batch_key(tp: TensorPlan, s: Settings, dev: torch.device) -> tuple | None:
    """Key under which pass 1 gathers the statistics of ``tp`` with others of its kind, or None:
    small float subspace tensors on the exact (float64 product) path, without an error budget."""
    if tp.encoding != "subspace" or tp.shape is None or s.error_budget is not None:
        return None
    if tp.dtype not in ("float16", "bfloat16", "float32", "float64"):
        return None
    m, n = linalg.matrix_view(tp.shape)
    if m * n > BATCH_MAX_NUMEL:
        return None
    ts = tensor_settings(s, tp)
    mode = subspace.resolve_mode(ts.mode, m, n)
    if mode == "flat" or sketch_test_matrices(ts, mode, m, n, dev) is not None:
        return None
    return (tuple(tp.shape), tp.dtype, mode, repr(ts))


def fit_batches(tensors: list[TensorPlan], s: Settings, dev: torch.device) -> dict[str, list[TensorPlan]]:
    """Tensor name -> the batch (2 or more plans) pass 1 fits it with; each batch's stacked
    statistics stay under :data:`BATCH_STATS_BYTES`."""
    groups: dict[tuple, list[TensorPlan]] = {}
    for tp in tensors:
        key = _fit_batch_key(tp, s, dev)
        if key is not None:
            groups.setdefault(key, []).append(tp)
    out: dict[str, list[TensorPlan]] = {}
    for (shape, _, mode, _), members in groups.items():
        m, n = linalg.matrix_view(shape)
        per_tensor = 8 * (3 * m * n + (m * m if mode in ("left", "both") else 0) + (n * n if mode in ("right", "both") else 0))
        per = max(1, BATCH_STATS_BYTES // per_tensor)
        for i in range(0, len(members), per):
            chunk = members[i: i + per]
            if len(chunk) > 1:
                out.update((tp.name, chunk) for tp in chunk)
    return out


def fit_batch(group: list[TensorPlan], cks: list[Checkpoint], s: Settings, dev: torch.device, base: Checkpoint | None,
               prog: Progress) -> dict[str, tuple]:
    """:func:`fit_tensor` for a batch of same-kind small tensors: one read of each model's
    tensors, stacked float64 sums and Grams (one batched GEMM per model and side), then each
    tensor's own eigendecomposition. Name -> (encoding, Fit or shared value, reason)."""
    tp0 = group[0]
    ts = tensor_settings(s, tp0)
    assert tp0.shape is not None  # batches are of tensors of one shape
    m, n = linalg.matrix_view(tp0.shape)
    mode = subspace.resolve_mode(ts.mode, m, n)
    names = [tp.name for tp in group]
    g = len(group)
    if ts.center == "base" and base is None:
        raise ConfigError("center='base' needs base=... (the checkpoint the family was fine-tuned from)")
    out: dict[str, tuple] = {}
    live = list(range(g))  # members still on the subspace path (not dropped as non-finite)
    with linalg.no_tf32(), linalg.threads_for(g * m * n):
        first = torch.stack([cks[0].get(x).to(dev).reshape(m, n) for x in names])
        ref_src = torch.stack([cast(Checkpoint, base).get(x).to(dev).reshape(m, n) for x in names]) if ts.center == "base" else first
        ref = ref_src.to(torch.float64)
        delta_sum = torch.zeros(g, m, n, dtype=torch.float64, device=dev)
        gl = torch.zeros(g, m, m, dtype=torch.float64, device=dev) if mode in ("left", "both") else None
        gr = torch.zeros(g, n, n, dtype=torch.float64, device=dev) if mode in ("right", "both") else None
        sq_sum = torch.zeros(g, dtype=torch.float64, device=dev)
        identical = torch.ones(g, dtype=torch.bool, device=dev)
        bits = _BITS[first.element_size()]  # bit patterns: -0.0 differs from 0.0, NaN payloads count
        first_bits = first.reshape(g, -1).view(bits)
        for i, ck in enumerate(cks):
            w = first if i == 0 else torch.stack([ck.get(x).to(dev).reshape(m, n) for x in names])
            if i > 0:
                identical &= (w.reshape(g, -1).view(bits) == first_bits).all(dim=1)
            sq = torch.linalg.vector_norm(w.reshape(g, -1), dim=1, dtype=torch.float64).square()
            bad = ~torch.isfinite(sq)
            if bool(bad.any()):
                for t in bad.nonzero().flatten().tolist():
                    if t in live and not check_finite(w[t], names[t], ck):
                        if not ts.allow_nonfinite:
                            raise nonfinite_error(names[t], ck)
                        live.remove(t)
                        out[names[t]] = ("dense", None, "non-finite values")
            d = w.to(torch.float64, copy=True).sub_(ref)  # a copy also for float64 (w may be `first`)
            delta_sum += d
            if gl is not None:
                gl.baddbmm_(d, d.transpose(1, 2))
            if gr is not None:
                gr.baddbmm_(d.transpose(1, 2), d)
            sq_sum += sq
            for x in names:
                prog.step(x)
        same = identical.tolist()
        sqs = sq_sum.tolist()
        for t in live:
            name = names[t]
            if same[t] and len(cks) > 1 and override_for(name, ts.encodings) != "subspace":
                # on the CPU, as read (like fit_tensor's): pass 2 compares each model's copy with it
                out[name] = ("shared", first[t].reshape(cast(tuple[int, ...], group[t].shape)).to("cpu", copy=True), "bit-identical in every model")
                continue
            stats = gram.GramStats(count=len(cks), reference=ref[t], delta_sum=delta_sum[t],
                                     left=None if gl is None else gl[t], right=None if gr is None else gr[t], sq_norm=sqs[t])
            fit = subspace.fit_gram(stats, mode=mode, center=ts.center, choose=ts.choose)
            if fit.mean is not None:
                fit.mean = stored_mean(fit.mean, tp0.dtype, ts, rms_spread(fit, len(cks))).clone()
            out[name] = ("subspace", fit, "float matrix")
    return out


def budget_tensor(e: dict, tp: TensorPlan, fit, cks: list[Checkpoint], s: Settings, dev: torch.device, prog: Progress,
                   base: Checkpoint | None = None):
    """Error-budget mode: sweep the models once more and let :mod:`uwsfmt.budget` pick the
    rank, mode and residual bits (or dense). Returns (encoding, fit, reason, settings for it).

    A sketched ``fit`` (basis="sketch": its Ritz vectors are the candidates, ``fit.ritz``) is
    sketched again with 4x the directions (up to ``max_rank``) while the pick is dense, rank 0
    or uses every candidate of a side and more directions could hold more than
    ``sketch_tolerance`` of the energy missed (:func:`_more_directions_matter`); it is replaced
    by the exact Gram's when the a-posteriori check fails at the rank picked. The errors the
    pick is made on are exact for the bases it gets, so the budget holds either way; the sketch
    only decides how close to the fewest bytes."""

    def models():
        for w in read_tensors(cks, tp.name, dev):
            prog.step(tp.name, 0)  # cancellation point
            yield w

    ts = tensor_settings(s, tp)
    assert s.error_budget is not None and tp.shape is not None  # budget mode, a subspace tensor
    most = budget.MAX_CANDIDATE_RANK if s.max_rank is None else s.max_rank
    target = min(randomized.SKETCH_RANK, most)  # looked up here: tests narrow it
    while True:
        widen = bool(fit.ritz) and target < most and s.rank is None
        choice, chosen = budget.choose(
            fit, models(), name=tp.name, shape=tp.shape, dtype=tp.dtype, n_models=len(cks), budget=s.error_budget,
            residual_bits=s.residual_bits, fixed_rank=s.rank is not None or s.tau is not None, mode=s.mode,
            coefficient_bits=s.coefficient_bits,
            forced=override_for(tp.name, s.encodings) == "subspace" and not widen,
        )
        if not fit.ritz:
            break
        c = choice.candidate
        sides = [] if c is None or c.rank == 0 else [x for x in ("left", "right") if c.mode in (x, "both")]
        edge = c is None or c.rank == 0 or any(c.rank >= fit.kept[x] for x in sides)
        if widen and edge and _more_directions_matter(fit, most, s.sketch_tolerance):
            target = min(4 * target, most)  # dense, rank 0 or every candidate of a side: more might do with fewer bytes
            with linalg.threads_for(math.prod(tp.shape)):
                _, fit, _ = fit_tensor(tp, cks, ts, dev, base, prog, target=target, count=False)
            continue
        checks = {x: fit.ritz[x].check(c.rank, s.sketch_tolerance) for x in sides} if c is not None else {}
        if not all(x["ok"] for x in checks.values()):
            assert c is not None  # checks only with a candidate
            why = (f"a-posteriori check failed at rank {c.rank} (a missed direction could lower the error by more "
                   f"than {s.sketch_tolerance:.0%})")
            with linalg.threads_for(math.prod(tp.shape)):
                _, fit, _ = fit_tensor(tp, cks, dataclasses.replace(ts, basis="exact"), dev, base, prog, count=False)
            fit.method = {"method": "exact", "sketch_rejected": why}
            continue
        if chosen is not None:
            chosen.method = fit.method | {"check": checks}
        break
    if chosen is not None and fit.method and not chosen.method:
        chosen.method = fit.method
    e["budget"] = choice.record()
    if chosen is None:
        return "dense", None, choice.reason(), s
    assert choice.candidate is not None  # subspace
    return "subspace", chosen, choice.reason(), dataclasses.replace(s, residual_bits=choice.candidate.bits,
                                                                    coefficient_bits=choice.candidate.coef)


def _more_directions_matter(fit: subspace.Fit, most: int, tolerance: float) -> bool:
    """Whether up to ``most`` candidate directions per side could hold more than ``tolerance`` of
    the energy the ``fit.kept`` candidates miss: the sketch's own directions beyond them hold
    their Ritz values, each one it missed at most the check's estimate of the largest missed
    eigenvalue (``residual_top``)."""
    assert fit.ritz is not None  # a sketch's fit
    for side, res in fit.ritz.items():
        k, t = fit.kept[side], res.values.numel()
        tail = max(res.total - float(res.values[:k].sum()), 0.0)
        if tail <= 1e-12 * res.total:
            continue  # the candidates hold it all (up to rounding): e.g. a vector over fewer models than candidates
        if float(res.values[k:most].sum()) + max(most - t, 0) * res.residual_top > tolerance * tail:
            return True
    return False


def tensor_settings(s: Settings, tp: TensorPlan) -> Settings:
    """Settings for one tensor: a plan may fix its basis side (factor-wise LoRA: B left, A right)."""
    mode = getattr(tp, "mode", None)
    return dataclasses.replace(s, mode=mode) if mode else s
