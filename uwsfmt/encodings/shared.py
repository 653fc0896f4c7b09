"""Shared: a tensor bit-identical in every model, stored once at ``tensors/<node>/value``."""

from __future__ import annotations
