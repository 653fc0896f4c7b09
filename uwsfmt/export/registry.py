"""The exporters' registry: ``@exporter(name)`` registers one; :func:`export` dispatches to it."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from uwsfmt.errors import ConfigError, StoreExistsError

if TYPE_CHECKING:
    from uwsfmt.reader.store import ModelRef, StoreReader

F = TypeVar("F", bound=Callable)

EXPORTERS: dict[str, Callable] = {}


def exporter(name: str) -> Callable[[F], F]:
    def deco(fn: F) -> F:
        EXPORTERS[name] = fn
        return fn
    return deco


def export(store: StoreReader, model: ModelRef, out: str, *, format: str = "safetensors", overwrite: bool = False,
           **kw: Any) -> str:
    """Export one model of ``store`` to ``out`` in ``format``.

    >>> store.export("model-001", "model-001.safetensors")  # doctest: +SKIP
    """
    if format not in EXPORTERS:
        raise ConfigError(f"unknown export format {format!r}; available: {', '.join(sorted(EXPORTERS))}")
    if os.path.exists(out) and not overwrite:
        raise StoreExistsError(f"{out}: already exists; choose another path or pass overwrite=True (CLI: --overwrite)")
    store.model_index(model)  # clear error for an unknown model before any file is made
    return EXPORTERS[format](store, model, out, **kw)

