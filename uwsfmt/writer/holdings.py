"""Memory the statistics pass may keep for the coefficients pass (coefficients from Ritz vectors, source tensors)."""

from __future__ import annotations

import math
import threading
from typing import cast

import torch

from uwsfmt.encodings import subspace
from uwsfmt.writer.plan import TensorPlan
from uwsfmt.writer.settings import EXACT_REBUILD_BELOW, NORM_ERROR_MIN_RATIO, Settings

#: pass 1 keeps pass-2 results (coefficients) of sketched tensors up to this many bytes in all
KEEP_COEFFICIENTS_BYTES = 128 << 20


#: a sketched tensor's later sweeps reuse the first sweep's copies of the first models' tensors
#: up to this many bytes (then read the rest again, from the page cache): a fixed amount, so the
#: build's memory does not grow with the number of models
KEEP_SOURCES_BYTES = 64 << 20


class Holdings:
    """Bytes pass 1 may still keep for pass 2 (thread-safe; :data:`KEEP_COEFFICIENTS_BYTES`)."""

    def __init__(self, limit: int | None = None):
        self.left = KEEP_COEFFICIENTS_BYTES if limit is None else limit
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> bool:
        with self._lock:
            if nbytes > self.left:
                return False
            self.left -= nbytes
            return True

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.left += nbytes


def can_keep_coefficients(tp: TensorPlan, s: Settings, mode: str) -> bool:
    """Whether the sketch's last sweep can stand in for pass 2 of ``tp``: a one-sided basis, the
    mean or the base subtracted, the source already in the compute dtype (no cast to round back),
    no error budget and no residual (both need the rebuild itself)."""
    return (mode in ("left", "right") and s.center in ("mean", "base") and tp.dtype in ("float32", "float64")
            and s.error_budget is None and not s.residual_bits)


def coefficients_from_ritz(fit: subspace.Fit, kept: list, coords: dict[str, torch.Tensor]) -> list:
    """Every model's (coefficients, error, delta error) from the last sketch sweep, or None for a
    model whose error pass 2 must measure on the rebuild.

    The sweep kept Z_i = Q^T D_i (D_i = W_i - M, M the readers' mean) with ||D_i||^2 and
    ||W_i||^2. With the basis L = Q V (V: ``coords``), C_i = V^T Z_i (float64, then stored as
    float32: C_s), and the error of what readers rebuild, ||D_i - L C_s||^2 = ||D_i||^2 -
    2 <C_s, L^T D_i> + C_s^T (L^T L) C_s, with L the stored float32 basis (so its rounding and
    that of C_s are accounted for). The difference loses ||D_i||^2's rounding (~1e-9 relative,
    :func:`uwsfmt.numerics.linalg.sq_norm`) relative to the error's square, so it is used only when that
    is at least :data:`NORM_ERROR_MIN_RATIO` of ||D_i||^2, and, as pass 2 does, when the error is
    at least :data:`EXACT_REBUILD_BELOW` of ||W_i|| (the reader's own rounding)."""
    side = "left" if fit.left is not None else "right"
    basis = cast(torch.Tensor, fit.left if side == "left" else fit.right).to(torch.float64)  # one-sided: that side's
    gram = basis.T @ basis
    v = coords[side]
    out: list[tuple[torch.Tensor, float, float] | None] = []
    for zs, dsq, wsq in kept:
        z = zs[side].to(torch.float64)
        c64 = (z @ v).T if side == "left" else z @ v  # k x n (left), m x k (right): as linalg.project
        cs = c64.to(torch.float32)
        c = cs.to(torch.float64)
        quad = float((c * (gram @ c)).sum()) if side == "left" else float((c * (c @ gram)).sum())
        esq = dsq - 2.0 * float((c * c64).sum()) + quad
        wn, dn = math.sqrt(wsq), math.sqrt(dsq)
        if not (math.isfinite(esq) and esq >= NORM_ERROR_MIN_RATIO * dsq and math.sqrt(esq) >= EXACT_REBUILD_BELOW * wn):
            out.append(None)
            continue
        err = math.sqrt(esq)
        out.append((cs.contiguous(), err / wn if wn > 0 else float("inf"), err / dn if dn > 0 else float("inf")))
    return out
