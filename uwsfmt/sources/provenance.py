"""Where a model came from, recorded without leaking the author's directory layout.

A model's ``source`` record (spec section 3.6) names its checkpoint (``name``: the file or folder
name), its format, sha256 and size. Absolute paths are never recorded: a store is shared, and
it must not carry its author's home directory along. Where the user names a ``source_root``
at build time, ``path`` records the checkpoint's location relative to it (``/``-separated), so
that :func:`uwsfmt.evaluate` and ``validate --deep`` can find the originals again under the same
(or another machine's) root.

Stores written before this rule may hold absolute paths: :func:`resolve` still follows them.
"""

from __future__ import annotations

import os
import posixpath

from uwsfmt.errors import ConfigError
from uwsfmt.sources.base import Checkpoint


def check_root(source_root: str | os.PathLike | None) -> str | None:
    """``source_root`` as an absolute path, checked to be a folder (None stays None).

    >>> check_root(None) is None
    True
    """
    if source_root is None:
        return None
    root = os.path.abspath(os.fspath(source_root))
    if not os.path.isdir(root):
        raise ConfigError(f"source root {os.fspath(source_root)!r} is not a folder; name the folder your sources live under")
    return root


def relative_path(path: str, root: str) -> str:
    """``path`` relative to ``root``, ``/``-separated; a ConfigError where it is not under ``root``.

    >>> relative_path("/data/ft/a.safetensors", "/data")
    'ft/a.safetensors'
    """
    rel = os.path.relpath(os.path.abspath(path), root)
    if rel == os.curdir or rel == os.pardir or rel.startswith(os.pardir + os.sep) or os.path.isabs(rel):
        raise ConfigError(f"source {path!r} is not inside the source root {root!r}; choose a root that holds every "
                          "source, or leave source_root out (CLI: --source-root) to record names only")
    return rel.replace(os.sep, "/")


def source_record(ck: Checkpoint, source_root: str | None = None) -> dict:
    """The manifest's ``source`` record of checkpoint ``ck``: ``{"name", "format", "sha256",
    "size"}``, plus ``"path"`` relative to ``source_root`` where one is given (in-memory
    checkpoints: ``{"path": None, "format", "sha256", "size"}``).

    >>> from uwsfmt.sources import StateDictCheckpoint
    >>> import torch
    >>> source_record(StateDictCheckpoint("m0", {"w": torch.zeros(2)}))["path"] is None
    True
    """
    fp = ck.fingerprint()
    if not ck.path:  # in memory: nothing to name (``path`` null, as stores have always recorded it)
        return {"path": None, "format": ck.format, "sha256": fp.get("sha256"), "size": fp.get("size")}
    rec: dict = {"name": os.path.basename(os.path.normpath(ck.path)), "format": ck.format,
                 "sha256": fp.get("sha256"), "size": fp.get("size")}
    if source_root is not None:
        rec["path"] = relative_path(ck.path, source_root)
    return rec


def _safe_relative(p: str) -> bool:
    """A recorded relative path a reader may join to a root: no absolute path, no ``..``."""
    if not p or p.startswith("/") or "\\" in p or "\x00" in p:
        return False
    return all(seg not in ("", ".", "..") for seg in posixpath.normpath(p).split("/")) and ".." not in p.split("/")


def resolve(rec: dict | None, source_root: str | os.PathLike | None = None) -> str | None:
    """Where the source a ``source`` record describes should be on this machine, or None.

    A relative ``path`` (or, without one, the ``name``) is looked up under ``source_root``; an
    absolute ``path`` (stores written before paths were made relative) is used as it is.
    Recorded names that would leave the root (``..``, absolute) are ignored.

    >>> resolve({"name": "a.safetensors", "path": "ft/a.safetensors"}, "/data")
    '/data/ft/a.safetensors'
    >>> resolve({"name": "a.safetensors"}) is None
    True
    """
    rec = rec or {}
    path, name = rec.get("path"), rec.get("name")
    if isinstance(path, str) and os.path.isabs(path):
        return path  # an old store's absolute path
    if source_root is None:
        return None
    for rel in (path, name):
        if isinstance(rel, str) and _safe_relative(rel):
            return os.path.join(os.fspath(source_root), *rel.split("/"))
    return None
