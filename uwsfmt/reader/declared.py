"""Declared shapes and dtypes against their storage (spec §3.4, §3.5, §4, §6, §13): every shape and
logical dtype the manifest declares must fit the slots and arrays that hold the values.

The schema checks each field alone; this checks that they agree: a dense tensor whose slot holds
128 values cannot declare shape ``[2**30, 2**20]``, a bfloat16 tensor's slot must be in pack
``uint16``, a 4-bit residual over a (16, 32) view needs 256 code bytes and 16 scales, and so on.
:func:`uwsfmt.validate` reports each disagreement, naming the tensor (and model) and the field.
"""

from __future__ import annotations

import math

from uwsfmt.encodings import for_entry
from uwsfmt.errors import FormatError
from uwsfmt.format import dtypes
from uwsfmt.reader import compat


def _prod(shape) -> int:
    return math.prod(int(x) for x in shape)


def check_entries(manifest: dict, problems: list[str]) -> None:
    """Each tensor-table entry's declared shape and dtype against its own slots and fields
    (entries this reader cannot rebuild, :mod:`uwsfmt.compat`, are left to the caller).

    >>> problems = []
    >>> check_entries({"tensors": [{"name": "w", "dtype": "float32", "shape": [2**30, 2**20], "encoding": "dense",
    ...                              "data": {"pack": "float32", "offset": 0, "length": 128}}], "models": []}, problems)
    >>> problems[0].startswith("tensor 'w': data holds 128 values")
    True
    """
    for e in manifest["tensors"]:
        if compat.entry_problem(e):
            continue
        for_entry(e).check_declared(e, f"tensor {e['name']!r}", problems)


def entry_problems(manifest: dict) -> dict[str, str]:
    """{tensor name: the first disagreement} for the entries :func:`check_entries` finds wrong.

    >>> entry_problems({"tensors": [], "models": []})
    {}
    """
    out: dict[str, str] = {}
    for e in manifest["tensors"]:
        found: list[str] = []
        try:
            check_entries({"tensors": [e], "models": []}, found)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:  # fields the schema leaves open
            found.append(f"tensor {e.get('name')!r}: malformed entry ({type(err).__name__}: {err})")
        if found:
            out[e["name"]] = found[0]
    return out


def refuse(path: str, problems: dict[str, str], names) -> None:
    """Raise :class:`FormatError` for the first of ``names`` whose entry disagrees with its storage
    (``problems``: :func:`entry_problems`); the other tensors stay readable.

    >>> refuse("s.uws", {}, ["w"])
    """
    if not problems:
        return
    for n in names:
        if n in problems:
            raise FormatError(f"{path}: {problems[n]}; the store is damaged or was tampered with (run `uwsfmt validate` "
                              "on it). The other tensors can still be read (pass names=[...])")


def check_exceptions(store, problems: list[str]) -> None:
    """Each model's exceptions against the tensor they apply to and the arrays that hold them:
    a ``replace`` value has the tensor's storage dtype and shape, a ``correct`` one the tensor's
    matrix view and codes / scales / values of the sizes its ``bits`` imply.

    >>> check_exceptions(uwsfmt.open("family.uws"), problems := [])  # doctest: +SKIP
    """
    m = store.manifest
    by_name = {e["name"]: e for e in m["tensors"]}
    for mod in m["models"]:
        for x in mod.get("exceptions") or ():
            what = f"model {mod['id']!r}, exception on tensor {x['tensor']!r}"
            e = by_name.get(x["tensor"])
            if e is None or compat.exception_problem(x) or compat.entry_problem(e):
                continue
            if not for_entry(e).takes_exceptions:
                problems.append(f"{what}: the tensor is {e['encoding']}; exceptions apply to subspace and shared tensors only (§6.6)")
                continue
            shape = e["shape"]
            if x["kind"] == "replace":
                _array(store, f"{x['path']}/value", [shape or [1]], dtypes.storage_dtype(e["dtype"]), what, problems)
                continue
            if e["dtype"] not in compat.COMPUTED_DTYPES:
                problems.append(f"{what}: a correct exception on a {e['dtype']} tensor; only "
                                f"{', '.join(compat.COMPUTED_DTYPES)} tensors are computed (use kind 'replace', §6.6)")
            rows, cols = x["view"]
            if rows * cols != _prod(shape):
                problems.append(f"{what}: view {x['view']} does not hold the tensor's shape {shape}")
                continue
            if x["bits"] == 16:
                _array(store, f"{x['path']}/values", [[rows, cols]], "float16", what, problems)
            else:
                _array(store, f"{x['path']}/codes", [[-(-rows * cols * x["bits"] // 8)]], "uint8", what, problems)
                _array(store, f"{x['path']}/scales", [[rows]], "float32", what, problems)


def _array(store, path: str, shapes: list[list[int]], dtype: str, what: str, problems: list[str]) -> None:
    try:
        arr = store.array(path)
    except FormatError as err:
        problems.append(f"{what}: {err}")
        return
    if [int(s) for s in arr.shape] not in [[int(s) for s in x] for x in shapes]:
        problems.append(f"{what}: array {path} has shape {list(arr.shape)}, the manifest implies {list(shapes[0])}")
    if str(arr.dtype) != dtype:
        problems.append(f"{what}: array {path} has dtype {arr.dtype}, the manifest implies {dtype}")
