"""Store -> files people load: safetensors (other formats register here)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

from safetensors.torch import save_file

from .errors import ConfigError, StoreExistsError

EXPORTERS: dict[str, Callable] = {}


def exporter(name: str):
    def deco(fn):
        EXPORTERS[name] = fn
        return fn
    return deco


@exporter("safetensors")
def export_safetensors(store, model, out: str, **_) -> str:
    """Write one model with its original names, shapes and dtypes."""
    sd = store.state_dict(model)
    entry = store.model_entry(model)
    meta = {"uwsfmt.store": os.path.abspath(store.path), "uwsfmt.model": entry["id"],
            "uwsfmt.max_error": json.dumps(max([e for e in entry["error"] if e is not None], default=0.0))}
    save_file({k: v.contiguous() for k, v in sd.items()}, out, metadata=meta)
    return out


def export(store, model, out: str, *, format: str = "safetensors", overwrite: bool = False, **kw) -> str:
    """Export one model of ``store`` to ``out`` in ``format``.

    >>> store.export("model-001", "model-001.safetensors")  # doctest: +SKIP
    """
    if format not in EXPORTERS:
        raise ConfigError(f"unknown export format {format!r}; available: {', '.join(sorted(EXPORTERS))}")
    if os.path.exists(out) and not overwrite:
        raise StoreExistsError(f"{out}: already exists; choose another path or pass overwrite=True (CLI: --overwrite)")
    store.model_index(model)  # clear error for an unknown model before any file is made
    return EXPORTERS[format](store, model, out, **kw)


from . import export_lora  # noqa: E402,F401  (registers the peft and kohya exporters)
