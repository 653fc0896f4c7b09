"""One append's work per new model, shared by the append in one process
(:mod:`uwsfmt.writer.append`) and on a Dask cluster (:mod:`uwsfmt.writer.distributed`): what a
new model is encoded against, making room for its row, encoding it and writing its files."""

from __future__ import annotations

from typing import Any

import torch
import zarr

from uwsfmt import encodings
from uwsfmt.encodings import budget
from uwsfmt.encodings import lora as lora_enc
from uwsfmt.errors import StoreError, os_reason
from uwsfmt.format import dtypes
from uwsfmt.io import layout, shards
from uwsfmt.reader.store import StoreReader
from uwsfmt.sources import Checkpoint
from uwsfmt.writer.build import utc_now
from uwsfmt.writer.encode import encode_model, write_exceptions


def fits_from_store(store: StoreReader, dev: torch.device) -> dict[str, Any]:
    """What each tensor of a new model is encoded against (its encoding's stored shared part)."""
    fits: dict[str, Any] = {}
    store.prefetch(store.manifest["tensors"])  # a remote store's bases: many requests at a time
    for e in store.manifest["tensors"]:
        fit = encodings.for_entry(e, store.path).stored_fit(store, e, dev)
        if fit is not None:
            fits[e["name"]] = fit
    return fits


def grow_packs(zstore: Any, current: dict, rows: int) -> None:
    """Make room for ``rows`` model rows in every pack array (before any row is written: the new
    rows stay uncommitted until the manifest names their models)."""
    for info in current["packs"].values():
        arr = zarr.open_array(zstore, path=info["path"], mode="r+")
        if arr.shape[0] < rows:
            arr.resize((rows, arr.shape[1]))


class Appending:
    """One append's fixed inputs (the manifest as read under the lock, the pack widths, the error
    budget): what encoding and writing one new model needs, here or on a Dask worker."""

    def __init__(self, store_path: str, current: dict, widths: dict[str, int], error_budget: budget.Budget | None):
        self.store_path, self.current, self.widths, self.error_budget = store_path, current, widths, error_budget

    def fits(self, zstore: Any, dev: torch.device) -> dict[str, Any]:
        return fits_from_store(StoreReader(self.store_path, zstore, self.current), dev)

    def encode_and_write(self, zstore: Any, fits: dict[str, Any], ck: Checkpoint, idx: int) -> dict:
        """Encode ``ck`` as model ``idx`` and write its row, per-model arrays and exceptions (new
        files only; the manifest, replaced last, commits them); its manifest entry (``source``: None)."""
        current = self.current
        fixes: dict = {}
        rows, per_model, errs, derrs = encode_model(current["tensors"], fits, ck, self.widths,
                                                    allow_nonfinite=bool(current["build"]["settings"].get("allow_nonfinite")),
                                                    store_path=self.store_path, error_budget=self.error_budget, corrections=fixes)
        entry = {"id": ck.id, "added": utc_now(), "source": None, "error": errs, "delta_error": derrs,
                 **lora_enc.model_record(current["tensors"], ck)}
        try:
            for p, info in current["packs"].items():
                shards.write_row(zstore, zarr.open_array(zstore, path=info["path"], mode="r+"), idx, rows[p])
            for e in current["tensors"]:
                if e["name"] in per_model:
                    layout.write_array(zstore, f"{e['node']}/models/{idx}", dtypes.to_storage(per_model[e["name"]]))
            if fixes:
                entry["exceptions"] = write_exceptions(zstore, current["tensors"], idx, fixes)
        except OSError as e:
            raise StoreError(f"{self.store_path}: could not write model {ck.id!r} ({os_reason(e)}); the store keeps its "
                             f"previous committed state ({len(current['models'])} models)") from e
        return entry
