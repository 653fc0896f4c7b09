"""Shared: a tensor bit-identical in every model, stored once at ``tensors/<node>/value``."""

from __future__ import annotations

import math
from typing import Any

import torch

from uwsfmt.encodings import budget
from uwsfmt.encodings import exception as exception_enc
from uwsfmt.encodings.base import EncodeContext, Encoding, EntryContext, Expect, ReadContext, register
from uwsfmt.errors import ConflictError
from uwsfmt.format import dtypes

#: bytes compared before the rest in :func:`same_bits`
SAME_BITS_HEAD = 4096


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` hold the same bits (what makes a tensor shared)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    x, y = a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    # fine-tunes almost always differ in their first values: a full-size pass only for likely twins
    head = min(x.numel(), SAME_BITS_HEAD)
    return torch.equal(x[:head], y[:head]) and torch.equal(x[head:], y[head:])


class Shared(Encoding):
    """One stored value for every model; readers cache it on the device."""

    name = "shared"
    shared_value = True

    def write_entry(self, e: dict, fit: torch.Tensor, ctx: EntryContext) -> None:
        """The value (``fit``) written once, at ``<node>/value``."""
        ctx.write(f"{ctx.node}/value", dtypes.to_storage(fit))
        e["data"] = {"path": f"{ctx.node}/value"}
        e["encoding"] = "shared"

    def slots(self, e: dict) -> list[dict]:
        return []

    def encode(self, ctx: EncodeContext, e: dict, w: torch.Tensor) -> tuple[float | None, float | None]:
        name, value = e["name"], ctx.fits[e["name"]]
        if same_bits(w, value):
            return 0.0, 0.0
        if ctx.error_budget is not None and ctx.corrections is not None:  # an appended model that differs: an exception
            before = budget.read_error(w.to(torch.float64), value.to(torch.float64), e["dtype"]) if w.is_floating_point() else math.inf
            ctx.corrections[name] = fix = exception_enc.correct(w, value, e["dtype"], ctx.error_budget, before)
            return fix.error, None
        raise ConflictError(
            f"{ctx.where}: tensor {name!r} of model {ctx.model_id!r} differs from the store's shared copy; "
            "a shared tensor must be bit-identical in every model. Rebuild the store with this model included "
            f"(or with --encoding '{name}=dense')."
        )

    def value(self, reader, e: dict, device: torch.device) -> torch.Tensor:
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

    takes_exceptions = True

    def check_declared(self, e: dict, what: str, problems: list[str]) -> None:
        if e["shape"] is None:
            problems.append(f"{what}: a shared tensor needs a shape")

    def check_stored(self, store: Any, e: dict, what: str, problems: list[str], expect: Expect, tol: float) -> None:
        expect(e["data"]["path"], e["shape"] or [1], dtypes.storage_dtype(e["dtype"]), what)  # 0-D: stored as [1]


SHARED = register(Shared())
