"""Paths from the browser -> paths on disk, never outside the server's root.

Every path a request names is relative to the Jupyter server's root (as the file browser shows
it). It is refused when it is absolute, when it (or a symlink on the way) leads out of the root,
or when it names a hidden file and the server hides those. Globs and folders given as sources are
expanded here, so that every file the library will read has been checked.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable

from uwsfmt import UWSError

#: a folder given as a source is scanned for symlinks leading out of the root up to this many entries
SCAN_LIMIT = 20_000


class PathRefused(UWSError):
    """A request named a path the server will not touch (outside the root, absolute, hidden)."""


class BadRequest(UWSError):
    """A request is malformed (missing or mistyped field)."""


def _inside(root: str, real: str) -> bool:
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def resolve(root: str, rel: object, *, what: str = "path", allow_hidden: bool = False, must_exist: bool = False) -> str:
    """The absolute, symlink-free path of ``rel`` (relative to ``root``); PathRefused when it leaves the root.

    >>> import tempfile; r = tempfile.mkdtemp()
    >>> resolve(r, "a/b.uws") == os.path.join(os.path.realpath(r), "a", "b.uws")
    True
    >>> resolve(r, "../etc/passwd")
    Traceback (most recent call last):
    ...
    jupyter_ext.server.paths.PathRefused: ../etc/passwd: the path leads outside the server's root; give a path inside it
    """
    if not isinstance(rel, str) or not rel.strip():
        raise BadRequest(f"{what}: expected a path relative to the server's root (a non-empty string), got {rel!r}")
    if "\x00" in rel:
        raise BadRequest(f"{what}: the path contains a NUL character")
    rel_s = rel.strip()
    if os.path.isabs(rel_s) or rel_s.startswith("~") or (len(rel_s) > 1 and rel_s[1] == ":"):
        raise PathRefused(f"{rel_s}: absolute paths are refused; give the path relative to the server's root, "
                          "as the file browser shows it")
    root_real = os.path.realpath(root)
    real = os.path.realpath(os.path.join(root_real, rel_s))
    if not _inside(root_real, real):
        raise PathRefused(f"{rel_s}: the path leads outside the server's root; give a path inside it")
    if not allow_hidden:
        parts = os.path.relpath(real, root_real).split(os.sep)
        if any(p.startswith(".") and p not in (".", "..") for p in parts):
            raise PathRefused(f"{rel_s}: hidden files and folders are refused (the server hides them; "
                              "start it with --ContentsManager.allow_hidden=True to allow them)")
    if must_exist and not os.path.exists(real):
        raise FileNotFoundError(2, "No such file or directory", rel_s)
    return real


def relative(root: str, path: str) -> str:
    """``path`` as the file browser names it (relative to ``root``, forward slashes).

    >>> relative("/srv/root", "/srv/root/a/b.uws")
    'a/b.uws'
    """
    rel = os.path.relpath(os.path.realpath(path), os.path.realpath(root))
    return "" if rel == "." else rel.replace(os.sep, "/")


def _check_tree(root_real: str, folder: str, shown: str) -> None:
    """Refuse a folder when a symlink in it leads outside the root (HF caches link weights elsewhere)."""
    n = 0
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for name in dirnames + filenames:
            n += 1
            if n > SCAN_LIMIT:
                return
            p = os.path.join(dirpath, name)
            if os.path.islink(p) and not _inside(root_real, os.path.realpath(p)):
                raise PathRefused(f"{shown}: {os.path.relpath(p, folder)} is a symlink leading outside the server's root; "
                                  "copy the file into the root instead")


def sources(root: str, items: object, *, allow_hidden: bool = False) -> list[str]:
    """Checked absolute paths for the sources a request names (files, folders, globs; relative to ``root``).

    A glob is expanded here (each match checked); a folder is passed on when nothing in it links out.
    """
    if isinstance(items, str):
        items = [items]
    if not isinstance(items, Iterable) or isinstance(items, dict):
        raise BadRequest(f"sources: expected a list of paths relative to the server's root, got {type(items).__name__}")
    items = list(items)
    if not items:
        raise BadRequest("sources: give at least one checkpoint file, folder or glob")
    root_real = os.path.realpath(root)
    out: list[str] = []
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise BadRequest(f"sources: every source must be a non-empty path string, got {item!r}")
        if any(ch in item for ch in "*?["):
            resolve(root, item.replace("*", "x").replace("?", "x").replace("[", "x"), what="sources",
                    allow_hidden=allow_hidden)  # the pattern itself stays inside
            hits = sorted(glob.glob(os.path.join(root_real, item.strip())))
            if not hits:
                raise FileNotFoundError(2, "the pattern matches no file", item)
            for h in hits:
                out.append(resolve(root, os.path.relpath(h, root_real), what="sources", allow_hidden=allow_hidden))
        else:
            out.append(resolve(root, item, what="sources", allow_hidden=allow_hidden, must_exist=True))
    for p in out:
        if os.path.isdir(p):
            _check_tree(root_real, p, relative(root, p))
    return out
