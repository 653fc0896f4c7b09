"""Escaping of arbitrary tensor names into Zarr node names (spec section "Node names").

Readers never need this: the manifest records every node path. Writers use it so that
names such as ``../../etc`` or ``a/b`` can never become paths outside their group.
"""

from __future__ import annotations

import hashlib
import string

_SAFE = set(string.ascii_letters + string.digits + "-_.")
MAX_NODE_LEN = 120
#: longest tensor name or model id a store holds (spec section 13)
MAX_NAME_CHARS = 4096


def check_string(s: str, what: str, *, empty_ok: bool = False) -> list[str]:
    """Problems that keep ``s`` from being a tensor name or model id (not a string, empty where
    that is not allowed, too long, not UTF-8 encodable)."""
    if not isinstance(s, str) or not (s or empty_ok):
        return [f"{what} {s!r} is empty or not a string; model ids must be non-empty strings"]
    out = []
    if len(s) > MAX_NAME_CHARS:
        out.append(f"{what} {s[:60]!r}... is {len(s)} characters long; the format allows at most {MAX_NAME_CHARS}")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        out.append(f"{what} {s[:60]!r} is not valid Unicode text (it holds a lone surrogate); rename it")
    return out


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
    for i, b in enumerate(name.encode("utf-8", "surrogatepass")):
        c = chr(b)
        if c in _SAFE and not (i == 0 and c in "._"):
            out.append(c)
        else:
            out.append(f"%{b:02X}")
    node = "".join(out) or "%"
    if len(node) > MAX_NODE_LEN:
        digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:16]
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
