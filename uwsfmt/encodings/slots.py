"""Slots: where a tensor's per-model values sit inside a model's pack rows."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def slot(pack: str, offset: int, length: int, **extra: Any) -> dict:
    return {"pack": pack, "offset": int(offset), "length": int(length), **extra}


def take(rows: dict[str, torch.Tensor], s: dict) -> torch.Tensor:
    """The values of slot ``s`` from a model's pack rows (a view, no copy)."""
    if s["length"] == 0:  # rank 0: no pack row may exist at all
        return torch.empty(0, dtype=torch.float32)
    return rows[s["pack"]][s["offset"]: s["offset"] + s["length"]]


class PackLayout:
    """Assigns slots in per-dtype packs while a build plans its tensors."""

    def __init__(self) -> None:
        self.widths: dict[str, int] = {}

    def add(self, pack: str, length: int, **extra: Any) -> dict:
        off = self.widths.get(pack, 0)
        self.widths[pack] = off + int(length)
        return slot(pack, off, length, **extra)


def put(rows: dict[str, np.ndarray], s: dict, values: np.ndarray) -> None:
    """Write ``values`` (already in the pack's dtype) into slot ``s`` of model rows."""
    rows[s["pack"]][s["offset"]: s["offset"] + s["length"]] = values.reshape(-1)
