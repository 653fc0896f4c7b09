"""Escaping of arbitrary tensor names into Zarr node names (spec section "Node names").

Readers never need this: the manifest records every node path. Writers use it so that
names such as ``../../etc`` or ``a/b`` can never become paths outside their group.
"""

from __future__ import annotations

import hashlib
import string

_SAFE = set(string.ascii_letters + string.digits + "-_.")
MAX_NODE_LEN = 120


def escape(name: str) -> str:
    """Escape ``name`` into a safe, readable Zarr node name.

    Bytes outside ``[A-Za-z0-9._-]`` of the UTF-8 encoding become ``%XX``; a leading ``.``
    or ``_`` is escaped too (so ``.``, ``..`` and Zarr's reserved ``__`` prefix cannot occur).
    Names longer than 120 characters after escaping are cut to 100 and suffixed with ``~``
    and 16 hex digits of their SHA-256.

    >>> escape("blocks.0/attn.qkv")
    'blocks.0%2Fattn.qkv'
    >>> escape("..")
    '%2E.'
    """
    out = []
    for i, b in enumerate(name.encode("utf-8")):
        c = chr(b)
        if c in _SAFE and not (i == 0 and c in "._"):
            out.append(c)
        else:
            out.append(f"%{b:02X}")
    node = "".join(out) or "%"
    if len(node) > MAX_NODE_LEN:
        digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:16]
        node = node[:100] + "~" + digest
    return node


def unique_nodes(names: list[str]) -> list[str]:
    """Escaped node names for ``names``, unique even on case-insensitive file systems."""
    seen: dict[str, int] = {}
    nodes = []
    for name in names:
        node = escape(name)
        key = node.lower()
        if key in seen:
            seen[key] += 1
            node = f"{node}~{seen[key]}"
            key = node.lower()
        seen.setdefault(key, 0)
        nodes.append(node)
    return nodes
