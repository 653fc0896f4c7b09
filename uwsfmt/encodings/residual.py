"""Residual: a per-model correction Q_i on top of the subspace term, quantized per row or column.

bits 2/4/8: symmetric codes with one float32 scale per row of the matrix view (see
:func:`uwsfmt.numerics.quantize.quantize_rows`), or, where the view is taller than wide
(``axis`` 1, format 1.3), one per column, the codes then in row-major order of Q^T; bit 1: the
sign times the row's (column's) scale (BitDelta with per-row scales); bits 16: the residual
itself in float16.
"""

from __future__ import annotations

import numpy as np
import torch

from uwsfmt.encodings.slots import PackLayout, put, take
from uwsfmt.numerics import quantize

#: residual bit widths (spec §6.4): codes of 1, 2, 4 or 8 bits with scales, or float16 values
BITS = (1, 2, 4, 8, 16)
#: axes a residual's scales may run along: rows (0), or columns (1, format 1.3)
AXES = (0, 1)


def plan(layout: PackLayout, m: int, n: int, bits: int) -> dict:
    if bits == 16:
        return {"bits": 16, "values": layout.add("float16", m * n)}
    nbytes = (m * n * bits + 7) // 8
    axis = quantize.scale_axis(m, n, bits)
    spec = {"bits": bits, "codes": layout.add("uint8", nbytes), "scales": layout.add("float32", n if axis else m)}
    if axis:
        spec["axis"] = 1  # absent means 0: stores without column scales stay readable by 1.0-1.2 readers
    return spec


def axis(spec: dict) -> int:
    """The axis of ``spec``'s scales: 0 (per row; absent) or 1 (per column, format 1.3)."""
    return int(spec.get("axis", 0))


def uses_column_scales(spec: dict | None) -> bool:
    """Whether a residual record needs format 1.3 (per-column scales)."""
    return spec is not None and axis(spec) == 1


def encode(spec: dict, r: torch.Tensor) -> tuple[dict[str, np.ndarray], torch.Tensor]:
    """Quantize residual ``r`` (m x n): (pack values by slot name, dequantized residual)."""
    bits = spec["bits"]
    if bits == 16:
        v = r.to(torch.float16)
        return {"values": v.cpu().numpy()}, v.to(r.dtype)
    ax = axis(spec)
    codes, scales = quantize.quantize_view(r, bits, ax)
    back = quantize.dequantize_view(codes, scales, (r.shape[0], r.shape[1]), bits, ax).to(r.dtype)
    return {"codes": codes.cpu().numpy(), "scales": scales.cpu().numpy()}, back


def write(spec: dict, values: dict[str, np.ndarray], rows: dict[str, np.ndarray]) -> None:
    for key, v in values.items():
        put(rows, spec[key], v)


def decode(spec: dict, rows: dict[str, torch.Tensor], m: int, n: int) -> torch.Tensor:
    if spec["bits"] == 16:
        return take(rows, spec["values"]).to(torch.float32).reshape(m, n)
    return quantize.dequantize_view(take(rows, spec["codes"]), take(rows, spec["scales"]), (m, n), spec["bits"], axis(spec))
