"""The per-tensor encodings of a UWS store; one module each, registered by name.

Each module defines an :class:`~uwsfmt.encodings.base.Encoding` (which pack slots a model's
values take, how a reader gets a model's tensors back) and registers it; everything else asks
the registry (:func:`for_entry`). Residuals and exceptions are parts of entries, not encodings.
"""

from uwsfmt.encodings import dense, lora, shared, subspace  # noqa: F401  (register the encodings)
from uwsfmt.encodings.base import REGISTRY, Encoding, ReadContext, by_encoding, for_entry, format_names, kind_of, register

__all__ = ["REGISTRY", "Encoding", "ReadContext", "by_encoding", "for_entry", "format_names", "kind_of", "register"]
