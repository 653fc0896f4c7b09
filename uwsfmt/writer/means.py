"""The family mean (or base) a subspace tensor is centred on, and the dtype it is stored in."""

from __future__ import annotations

import math

import torch

from uwsfmt.encodings import subspace
from uwsfmt.errors import ConflictError
from uwsfmt.numerics import linalg
from uwsfmt.sources import Checkpoint
from uwsfmt.writer.plan import FamilyPlan, headers_of
from uwsfmt.writer.settings import HALF_MEAN_RTOL, Settings


def check_base(fam: FamilyPlan, base: Checkpoint) -> None:
    """Every tensor decomposed around the base must be in it with the same shape: report all misses at once."""
    have = headers_of(base, "the base checkpoint's headers")
    problems = []
    for tp in fam.tensors:
        if tp.encoding != "subspace" or tp.shape is None:
            continue
        got = have.get(tp.name)
        if got is None:
            problems.append(f"tensor {tp.name!r} is not in the base")
        elif tuple(got.shape) != tuple(tp.shape):
            problems.append(f"tensor {tp.name!r} is {list(tp.shape)} in the family but {list(got.shape)} in the base")
    if problems:
        raise ConflictError(f"{base.path or base.id}: not the base these models were fine-tuned from:", problems)


def mean_dtype_for(logical: str) -> torch.dtype:
    return torch.float64 if logical == "float64" else torch.float32


def stored_mean(mean: torch.Tensor, logical: str, s: Settings, spread: float | None = None) -> torch.Tensor:
    """The centre M as the store keeps it (and readers get it back): float16 where ``s.mean_dtype``
    asks for it (:data:`MEAN_DTYPES`) and the rounding keeps every value finite and moves M by at
    most :data:`HALF_MEAN_RTOL` of ||M||, else the compute dtype. Under an error budget the
    rounding must also stay within a tenth of the smallest allowance it can be compared with
    before the fit (``max_error`` x ||M||; ``max_delta_error`` x ``spread``, the root-mean-square
    of the models' deviations ||W_i - M||, where the caller knows it): it then adds at most ~0.5%
    to an error at the budget, and a budget of 0 keeps the compute dtype. Everything downstream
    (coefficients, residuals, recorded errors) is computed against the M returned here, so the
    recorded errors stay the ones readers get back."""
    if mean.dtype == torch.float16:
        return mean
    b = s.error_budget
    half = s.mean_dtype == "float16" or (s.mean_dtype == "auto" and (logical in ("float16", "bfloat16") or b is not None))
    if half:
        h = mean.to(torch.float16)
        if bool(torch.isfinite(h).all()):
            size = math.sqrt(linalg.sq_norm(mean))
            moved = math.sqrt(linalg.sq_norm(mean - h.to(mean.dtype)))
            allowed = HALF_MEAN_RTOL * size
            if b is not None and b.max_error is not None:
                allowed = min(allowed, 0.1 * b.max_error * size)
            if b is not None and b.max_delta_error is not None:
                allowed = min(allowed, 0.1 * b.max_delta_error * spread) if spread is not None else -1.0
            if moved <= allowed:
                return h
    return mean.to(mean_dtype_for(logical))


def rms_spread(fit: subspace.Fit, n_models: int) -> float | None:
    """Root-mean-square of the models' deviations from the fit's centre: the trace of a full
    spectrum (the exact Gram's eigenvalues) over the models; None where the spectrum is partial."""
    if fit.method and fit.method.get("method") == "sketch":
        return None
    for vals in (fit.spectra or {}).values():
        return math.sqrt(max(float(vals.sum()), 0.0) / max(n_models, 1))
    return None
