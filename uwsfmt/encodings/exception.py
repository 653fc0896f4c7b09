"""Exceptions: per-model fixes of appended models that the store's bases cannot hold within its
error budget. A model-table entry ``{"tensor", "kind", "path", ...}`` points at a group
``tensors/<node>/extra/<model index>`` holding

- kind ``correct``: a correction added (in the compute dtype, before the cast to the source
  dtype) to what the tensor's own encoding rebuilds, quantized like a residual over the matrix
  view ``view``: ``codes`` (uint8) + ``scales`` (float32) for 2/4/8 bits, or ``values`` (float16);
- kind ``replace``: ``value``, the model's tensor itself (exact bits, storage dtype).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from uwsfmt.format import dtypes
from uwsfmt.numerics import quantize

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
