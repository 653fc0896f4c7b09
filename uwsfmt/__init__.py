"""uwsfmt: families of neural-network checkpoints as shared bases + per-model coefficients.

>>> import uwsfmt
>>> store = uwsfmt.convert(["a.safetensors", "b.safetensors"], "family.uws")  # doctest: +SKIP
>>> sd = store.state_dict("a")  # doctest: +SKIP
"""

__version__ = "0.1.0"

from . import sources  # noqa: E402,F401  (registers the checkpoint formats)
from .build import Cancelled, convert, plan  # noqa: E402
from .errors import (  # noqa: E402
    BudgetError,
    ConfigError,
    ConflictError,
    FormatError,
    LockError,
    NotFoundError,
    SourceError,
    StoreError,
    StoreExistsError,
    UWSError,
    VersionError,
)
from .evaluate import evaluate  # noqa: E402
from .packing import pack, unpack  # noqa: E402
from .store import Store, open  # noqa: E402,A004
from .validate import validate  # noqa: E402


def _with_store(store, mode: str, call):
    """``call(st)`` on ``store`` (a path, opened and closed here, or an open Store)."""
    if isinstance(store, Store):
        return call(store)
    with open(store, mode=mode) as st:
        return call(st)


def append(store, source, *, id=None, format=None, progress=False, max_error=None, max_delta_error=None, device=None):
    """Add a model to a store (path or open Store) by projection onto its bases."""
    return _with_store(store, "w", lambda st: st.append(source, id=id, format=format, progress=progress, max_error=max_error,
                                                         max_delta_error=max_delta_error, device=device))


def extend(store, sources, *, format=None, progress=False, max_error=None, max_delta_error=None, device=None,  # noqa: F811 (the parameter, as in convert)
           skip_existing=False):
    """Add every checkpoint ``sources`` names to a store (path or open Store), with one commit."""
    return _with_store(store, "w", lambda st: st.extend(sources, format=format, progress=progress, max_error=max_error,
                                                         max_delta_error=max_delta_error, device=device,
                                                         skip_existing=skip_existing))


def project(store, source, *, format=None, device=None):
    """Coefficients and errors of ``source`` against ``store``'s bases; nothing is written."""
    return _with_store(store, "r", lambda st: st.project(source, format=format, device=device))


def export(store, model, out, *, format="safetensors", **kw):
    """Export one model of a store to a file or folder."""
    st = open(store) if not isinstance(store, Store) else store
    return st.export(model, out, format=format, **kw)


__all__ = [
    "BudgetError", "Cancelled", "ConfigError", "ConflictError", "FormatError", "LockError", "NotFoundError",
    "SourceError", "Store", "StoreError", "StoreExistsError", "UWSError", "VersionError",
    "append", "convert", "evaluate", "export", "extend", "open", "pack", "plan", "project", "unpack", "validate",
]
