"""Forward compatibility within format 1.x (spec §12): the values of the manifest's open fields
that this reader knows, and which tensors a store's unknown values make unreadable.

A later 1.y MAY add values of ``encoding``, exception ``kind`` and residual / correction ``bits``.
The schema accepts any such value, so that one new value does not make a whole store unreadable;
a reader refuses to rebuild only the tensors that use one, naming them. A store whose declared
version this reader implements (1.0 - 1.3) and that still uses an unknown value is invalid:
``validate`` reports it as a problem; for a newer minor version it is a note (a newer uwsfmt
reads those tensors).
"""

from __future__ import annotations

from collections.abc import Iterable

from uwsfmt.encodings import for_entry, format_names
from uwsfmt.encodings import residual as residual_enc
from uwsfmt.errors import FormatError
from uwsfmt.format import dtypes
from uwsfmt.io import layout

#: the exception kinds format 1.3 defines (spec §6.6); encodings: the registry's (:func:`format_names`)
EXCEPTION_KINDS = ("correct", "replace")
#: bit widths of residuals and ``correct`` exceptions (spec §6.4, §6.6)
BITS = residual_enc.BITS
#: logical dtypes a tensor may be computed in (§4); every other dtype is stored exactly
COMPUTED_DTYPES = dtypes.COMPUTED


def entry_problem(e: dict) -> str | None:
    """Why this reader cannot rebuild tensor-table entry ``e`` (an unknown value), or None: an
    encoding the registry does not know, or a value of the encoding's open fields it does not
    (:meth:`~uwsfmt.encodings.base.Encoding.unknown_value`).

    >>> entry_problem({"encoding": "hologram"})
    "encoding 'hologram'"
    """
    enc = e.get("encoding")
    if enc not in format_names():
        return f"encoding {enc!r}"
    return for_entry(e).unknown_value(e)


def exception_problem(x: dict) -> str | None:
    """Why this reader cannot apply model exception ``x`` (an unknown kind or bit width), or None.

    >>> exception_problem({"kind": "correct", "bits": 3})
    'a correct exception of 3 bits'
    """
    kind = x.get("kind")
    if kind not in EXCEPTION_KINDS:
        return f"an exception of kind {kind!r}"
    if kind == "correct" and x.get("bits") not in BITS:
        return f"a correct exception of {x.get('bits')!r} bits"
    return None


def entry_problems(manifest: dict) -> dict[str, str]:
    """{tensor name: why} for the tensor-table entries this reader cannot rebuild in any model.

    >>> entry_problems({"tensors": [{"name": "w", "encoding": "hologram"}]})
    {'w': "encoding 'hologram'"}
    """
    return {e["name"]: why for e in manifest["tensors"] if (why := entry_problem(e))}


def unreadable(manifest: dict, model: int | None = None, entries: dict[str, str] | None = None) -> dict[str, str]:
    """{tensor name: why} for the tensors this reader cannot rebuild: for every model, or, with
    ``model``, for that one (its own exceptions included). ``entries``: :func:`entry_problems`,
    when the caller keeps it.

    >>> unreadable({"tensors": [{"name": "w", "encoding": "dense"}], "models": []})
    {}
    """
    out = dict(entry_problems(manifest) if entries is None else entries)
    models = manifest["models"] if model is None else [manifest["models"][model]]
    for mod in models:
        for x in mod.get("exceptions") or ():
            why = exception_problem(x)
            if why and x["tensor"] not in out:
                out[x["tensor"]] = why if model is not None else f"{why} (model {mod['id']!r})"
    return out


def is_newer(manifest: dict) -> bool:
    """Whether the store declares a minor version newer than this reader implements."""
    try:
        return int(str(manifest["format_version"]).split(".")[1]) > layout.FORMAT_MINOR
    except (KeyError, IndexError, ValueError):
        return False


def refuse(path: str, manifest: dict, model: int, names: Iterable[str], entries: dict[str, str] | None = None) -> None:
    """Raise :class:`FormatError` if any of ``names`` (tensor names) of ``model`` uses a value this
    reader does not know, naming them and what to do; the other tensors stay readable.
    ``entries``: :func:`entry_problems`, when the caller keeps it.

    >>> refuse("s.uws", {"format_version": "1.1", "tensors": [], "models": [{"id": "a"}]}, 0, [])
    """
    if entries is not None and not entries and not manifest["models"][model].get("exceptions"):
        return  # the common case, without a pass over the tensor table
    bad = unreadable(manifest, model, entries)
    hit = [n for n in names if n in bad]
    if not hit:
        return
    listed = "; ".join(f"{n!r} uses {bad[n]}" for n in hit[:5]) + (f" (and {len(hit) - 5} more)" if len(hit) > 5 else "")
    if is_newer(manifest):
        fix = (f"the store declares format {manifest['format_version']}, newer than this uwsfmt reads fully "
               f"({layout.FORMAT_VERSION}): install a newer uwsfmt")
    else:
        fix = (f"format {manifest['format_version']} defines no such value, so the store is damaged or was written by a "
               "non-conforming writer")
    raise FormatError(f"{path}: model {manifest['models'][model]['id']!r} cannot be rebuilt: tensor {listed}; {fix}. "
                      "The other tensors can still be read (pass names=[...])")
