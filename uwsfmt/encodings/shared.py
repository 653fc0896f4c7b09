"""Shared: a tensor bit-identical in every model, stored once at ``tensors/<node>/value``."""

from __future__ import annotations

from typing import Any

import torch

from uwsfmt.encodings.base import Encoding, ReadContext, register
from uwsfmt.format import dtypes


class Shared(Encoding):
    """One stored value for every model; readers cache it on the device."""

    name = "shared"
    shared_value = True

    def slots(self, e: dict) -> list[dict]:
        return []

    def value(self, reader: Any, e: dict, device: torch.device) -> torch.Tensor:
        """The stored value (cached by the reader; callers must not modify it)."""
        def make() -> torch.Tensor:
            raw = reader.read_array(e["data"]["path"], e["shape"] or [1])
            return dtypes.from_storage(raw, e["dtype"]).reshape(e["shape"]).to(device)

        return reader.cached(("shared", e["name"], str(device)), make)

    def stored_fit(self, reader: Any, e: dict, device: torch.device) -> torch.Tensor:
        raw = reader.read_array(e["data"]["path"], e["shape"] or [1])
        return dtypes.from_storage(raw, e["dtype"]).reshape(e["shape"])

    def read(self, ctx: ReadContext, entries: list[dict]) -> dict[str, torch.Tensor]:
        out = {}
        for e in entries:
            v = self.value(ctx.reader, e, ctx.device)
            out[e["name"]] = v if ctx.wants(e["name"]) else v.clone()  # the cached value is never handed out
        return out


SHARED = register(Shared())
