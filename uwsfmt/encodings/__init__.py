"""The per-tensor encodings of a UWS store; one module each.

Each module knows how to turn one model's tensor into its per-model slots (``encode``)
and back (``decode``). The builder decides which encoding a tensor gets.
"""

from . import dense, residual, shared, subspace

ENCODINGS = {"subspace": subspace, "shared": shared, "dense": dense}

__all__ = ["ENCODINGS", "dense", "residual", "shared", "subspace"]
