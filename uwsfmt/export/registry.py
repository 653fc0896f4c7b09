"""The exporters' registry: ``@exporter(name)`` registers one; :func:`export` dispatches to it."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from uwsfmt.errors import ConfigError, StoreExistsError

if TYPE_CHECKING:
    pass

F = TypeVar("F", bound=Callable)

EXPORTERS: dict[str, Callable] = {}


def exporter(name: str) -> Callable[[F], F]:
    def deco(fn: F) -> F:
        EXPORTERS[name] = fn
        return fn
    return deco


def store_name(store) -> str:
    """What exported files record as their store: its name, never its path (exports are shared).

    >>> class S: path = "/home/me/stores/family.uws/"
    >>> store_name(S())
    'family.uws'
    """
    return os.path.basename(os.path.normpath(os.fspath(store.path)))


#: formats that write one file, and the extension it gets where the given name has none
FILE_EXTENSIONS = {"safetensors": ".safetensors", "kohya": ".safetensors"}


def export(store, model, out: str, *, format: str = "safetensors", overwrite: bool = False, **kw) -> str:
    """Export one model of ``store`` to ``out`` in ``format``; the path written.

    Single-file formats (safetensors, kohya) get ``.safetensors`` appended to a name without
    an extension. ``format="hf"`` writes a Hugging Face model folder (see :mod:`uwsfmt.export.hf`).

    >>> store.export("model-001", "model-001.safetensors")  # doctest: +SKIP
    """
    if format not in EXPORTERS:
        raise ConfigError(f"unknown export format {format!r}; available: {', '.join(sorted(EXPORTERS))}")
    out = os.fspath(out)
    ext = FILE_EXTENSIONS.get(format)
    if ext is not None and not os.path.splitext(os.path.basename(out))[1]:
        out += ext  # `export STORE m -o m` writes m.safetensors, which tools recognise
    if ext is not None and os.path.isdir(out):
        raise ConfigError(f"{out}: is a folder; the {format} export writes one file: name the file (e.g. "
                          f"{os.path.join(out, 'model' + ext)})")
    if os.path.exists(out) and not overwrite:
        raise StoreExistsError(f"{out}: already exists; choose another path or pass overwrite=True (CLI: --overwrite)")
    store.model_index(model)  # clear error for an unknown model before any file is made
    return EXPORTERS[format](store, model, out, overwrite=overwrite, **kw)

