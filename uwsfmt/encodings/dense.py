"""Dense: a tensor stored per model as-is (exact bits), in a pack slot or, when its shape
varies between models, as an array of its own per model."""

from __future__ import annotations

import numpy as np
import torch

from .. import dtypes
from .slots import put, take


def encode(entry: dict, w: torch.Tensor, rows: dict[str, np.ndarray]) -> None:
    put(rows, entry["data"], dtypes.to_storage(w))


def decode(entry: dict, rows: dict[str, torch.Tensor]) -> torch.Tensor:
    raw = take(rows, entry["data"])
    t = raw.view(dtypes.torch_dtype(entry["dtype"])) if entry["dtype"] in ("bfloat16", "float8_e4m3fn", "float8_e5m2") else raw
    return t.reshape(entry["shape"])
