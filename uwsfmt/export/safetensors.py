"""Export to one safetensors file: original names, shapes and dtypes."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from safetensors.torch import save_file

from uwsfmt.export.registry import exporter, store_name

if TYPE_CHECKING:
    from uwsfmt.reader.store import ModelRef, StoreReader


@exporter("safetensors")
def export_safetensors(store: StoreReader, model: ModelRef, out: str, **_: Any) -> str:
    """Write one model with its original names, shapes and dtypes."""
    sd = store.state_dict(model)
    entry = store.model_entry(model)
    meta = {"uwsfmt.store": store_name(store), "uwsfmt.model": entry["id"],
            "uwsfmt.max_error": json.dumps(max([e for e in entry["error"] if e is not None], default=0.0))}
    save_file({k: v.contiguous() for k, v in sd.items()}, out, metadata=meta)
    return out
