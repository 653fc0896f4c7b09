"""Dense: a tensor stored per model as-is (exact bits), in a pack slot or, when its shape
varies between models, as an array of its own per model."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from uwsfmt.encodings.base import EncodeContext, Encoding, EntryContext, Expect, ReadContext, register
from uwsfmt.encodings.slots import check_slot, put, take
from uwsfmt.format import dtypes


def encode(entry: dict, w: torch.Tensor, rows: dict[str, np.ndarray]) -> None:
    put(rows, entry["data"], dtypes.to_storage(w))


def decode(entry: dict, rows: dict[str, torch.Tensor]) -> torch.Tensor:
    raw = take(rows, entry["data"])
    t = raw.view(dtypes.torch_dtype(entry["dtype"])) if entry["dtype"] in ("bfloat16", "float8_e4m3fn", "float8_e5m2") else raw
    return t.reshape(entry["shape"])


class Dense(Encoding):
    """Stored per model as-is: a pack slot, or (shape varying between models) an array per model."""

    name = "dense"
    keeps_fit = False

    def write_entry(self, e: dict, fit: None, ctx: EntryContext) -> None:
        """A pack slot of the tensor's storage dtype; for a shape that varies between models, an array per model."""
        if ctx.shape is None:
            e["data"] = {"per_model": True}
        else:
            e["data"] = ctx.packs.add(dtypes.storage_dtype(ctx.dtype), math.prod(ctx.shape))
        e["encoding"] = "dense"

    def slots(self, e: dict) -> list[dict]:
        return [] if e["data"].get("per_model") else [e["data"]]

    def encode(self, ctx: EncodeContext, e: dict, w: torch.Tensor) -> tuple[float | None, float | None]:
        if e["data"].get("per_model"):
            ctx.per_model[e["name"]] = w
        else:
            encode(e, w, ctx.rows)
        return 0.0, 0.0

    def shape_may_vary(self, e: dict) -> bool:
        return bool(e["data"].get("per_model"))

    def read(self, ctx: ReadContext, entries: list[dict]) -> dict[str, torch.Tensor]:
        out = {}
        for e in entries:
            if e["data"].get("per_model"):
                raw = ctx.reader.read_array(f"{e['node']}/models/{ctx.idx}")
                out[e["name"]] = dtypes.from_storage(raw, e["dtype"]).to(ctx.device)
            else:
                value = decode(e, ctx.rows)
                out[e["name"]] = value if ctx.wants(e["name"]) else value.clone()  # the rows are reused: a copy
        return out

    def check_declared(self, e: dict, what: str, problems: list[str]) -> None:
        if e["data"].get("per_model"):
            return
        if e["shape"] is None:
            problems.append(f"{what}: a dense tensor in a pack slot needs a shape (null is for per-model arrays)")
            return
        check_slot(what, "data", e["data"], dtypes.storage_dtype(e["dtype"]), math.prod(int(x) for x in e["shape"]), problems)

    def check_stored(self, store: Any, e: dict, what: str, problems: list[str], expect: Expect, tol: float) -> None:
        if e["data"].get("per_model"):
            for i in range(store.n_models):
                expect(f"{e['node']}/models/{i}", None, dtypes.storage_dtype(e["dtype"]), what)


DENSE = register(Dense())
