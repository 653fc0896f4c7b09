"""Exceptions: per-model fixes of appended models that the store's bases cannot hold within its
error budget. A model-table entry ``{"tensor", "kind", "path", ...}`` points at a group
``tensors/<node>/extra/<model index>`` holding

- kind ``correct``: a correction added (in the compute dtype, before the cast to the source
  dtype) to what the tensor's own encoding rebuilds, quantized like a residual over the matrix
  view ``view``: ``codes`` (uint8) + ``scales`` (float32) for 2/4/8 bits, or ``values`` (float16);
- kind ``replace``: ``value``, the model's tensor itself (exact bits, storage dtype).

Writing one: :func:`correct` picks the cheapest exception that brings a model within the error
budget (appends, and pass 2 where the budget's emulation and the encoding disagree by rounding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from uwsfmt.encodings import residual as residual_enc
from uwsfmt.encodings.budget import Budget, as_read, finite, ratio
from uwsfmt.format import dtypes
from uwsfmt.numerics import linalg, quantize

ARRAYS = {"replace": ("value",), "correct16": ("values",), "correct": ("codes", "scales")}


def array_names(x: dict) -> tuple[str, ...]:
    if x["kind"] == "replace":
        return ARRAYS["replace"]
    return ARRAYS["correct16"] if x.get("bits") == 16 else ARRAYS["correct"]


def decode(x: dict, arrays: dict[str, np.ndarray], current: torch.Tensor | None, shape: Sequence[int], dtype: str,
           device: torch.device) -> torch.Tensor:
    """The tensor a reader returns under exception ``x`` (``current``: its value before it)."""
    if x["kind"] == "replace":
        return dtypes.from_storage(arrays["value"], dtype).reshape(shape).to(device)
    m, n = x["view"]
    cdt = torch.float64 if dtype == "float64" else torch.float32
    if x["bits"] == 16:
        corr = torch.from_numpy(np.ascontiguousarray(arrays["values"])).to(device, torch.float32).reshape(m, n)
    else:
        codes = torch.from_numpy(np.ascontiguousarray(arrays["codes"])).to(device)
        scales = torch.from_numpy(np.ascontiguousarray(arrays["scales"])).to(device)
        corr = quantize.dequantize_rows(codes, scales, (m, n), x["bits"])
    assert current is not None  # a correction applies to the value before it
    return (current.to(device, cdt).reshape(m, n) + corr.to(cdt)).reshape(shape)


@dataclass
class Correction:
    """A per-model exception: a correction added to what the store rebuilds, or a replacement."""

    kind: str  # correct | replace
    bits: int | None
    view: tuple[int, int]
    arrays: dict[str, np.ndarray]
    error_before: float
    error: float
    delta_error: float | None

    def record(self, tensor: str, path: str) -> dict:
        out = {"tensor": tensor, "kind": self.kind, "path": path, "view": list(self.view),
               "error_before": finite(self.error_before), "error": finite(self.error)}
        if self.kind == "correct":
            out["bits"] = self.bits
        return out


def meets(budget: Budget, err_abs: float, wn: float, dn: float | None, dtype: str) -> bool:
    """Whether one model's tensor with absolute error ``err_abs`` is within ``budget``."""
    return err_abs <= budget.allowed(wn, dn, dtype)


def correct(w: torch.Tensor, rebuilt: torch.Tensor, dtype: str, budget: Budget, error_before: float,
            dn: float | None = None) -> Correction:
    """The cheapest per-model exception that brings ``rebuilt`` (what a reader computes, before
    the cast to ``dtype``) within ``budget`` of ``w``: a correction quantized to 1/2/4/8 bits or
    float16, else the tensor itself (exact). ``dn``: the model's ||W - M|| (delta budgets)."""
    shape = tuple(w.shape)
    m, n = linalg.matrix_view(shape)
    if dtypes.is_float(dtype) and not dtype.startswith("float8"):
        with linalg.no_tf32():
            w64 = w.to(torch.float64).reshape(m, n)
            base = rebuilt.to(device=w64.device, dtype=torch.float64).reshape(m, n)  # rebuilt may sit on the build device
            cdt = torch.float64 if dtype == "float64" else torch.float32
            base = base.to(cdt).to(torch.float64)  # the reader adds the correction in its compute dtype
            r = (w64 - base).to(torch.float32)
            wn = float(torch.linalg.vector_norm(w64))
            limit = budget.allowed(wn, dn, dtype)
            for bits in (1, 2, 4, 8, 16):
                values, back = residual_enc.encode({"bits": bits}, r)
                err = float(torch.linalg.vector_norm(as_read(base + back.to(torch.float64), dtype) - w64))
                if err <= limit:
                    arrays = {"values": values["values"].reshape(m, n)} if bits == 16 else values
                    return Correction("correct", bits, (m, n), arrays, error_before, ratio(err, wn),
                                      None if dn is None else ratio(err, dn))
    return Correction("replace", None, (m, n), {"value": dtypes.to_storage(w)}, error_before, 0.0, 0.0)
