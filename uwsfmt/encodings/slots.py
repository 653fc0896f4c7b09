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


def check_slot(what: str, field: str, s: dict | None, pack: str, length: int, problems: list[str]) -> None:
    """Note in ``problems`` where slot ``s`` (named ``field`` of ``what``) does not hold ``length``
    values of pack ``pack`` (a declared shape or dtype its storage cannot hold, spec §3.4 / §4).

    >>> check_slot("tensor 'w'", "data", {"pack": "float32", "offset": 0, "length": 4}, "uint16", 4, found := [])
    >>> found
    ["tensor 'w': data is in pack 'float32', values of this kind are stored in pack 'uint16'"]
    """
    if not isinstance(s, dict):
        problems.append(f"{what}: {field} is missing")
        return
    if s.get("length") != length:
        problems.append(f"{what}: {field} holds {s.get('length')} values, the declared shape needs {length}")
    elif length and s.get("pack") != pack:
        problems.append(f"{what}: {field} is in pack {s.get('pack')!r}, values of this kind are stored in pack {pack!r}")
