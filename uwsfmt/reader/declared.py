"""Declared shapes and dtypes against their storage (spec §3.4, §3.5, §4, §6, §13): every shape and
logical dtype the manifest declares must fit the slots and arrays that hold the values.

The schema checks each field alone; this checks that they agree: a dense tensor whose slot holds
128 values cannot declare shape ``[2**30, 2**20]``, a bfloat16 tensor's slot must be in pack
``uint16``, a 4-bit residual over a (16, 32) view needs 256 code bytes and 16 scales, and so on.
:func:`uwsfmt.validate` reports each disagreement, naming the tensor (and model) and the field.
"""

from __future__ import annotations

import math

from uwsfmt.encodings import coefficients as coef_enc
from uwsfmt.errors import FormatError
from uwsfmt.format import dtypes
from uwsfmt.reader import compat


def _prod(shape) -> int:
    return math.prod(int(x) for x in shape)


def _slot(what: str, field: str, s: dict | None, pack: str, length: int, problems: list[str]) -> None:
    if not isinstance(s, dict):
        problems.append(f"{what}: {field} is missing")
        return
    if s.get("length") != length:
        problems.append(f"{what}: {field} holds {s.get('length')} values, the declared shape needs {length}")
    elif length and s.get("pack") != pack:
        problems.append(f"{what}: {field} is in pack {s.get('pack')!r}, values of this kind are stored in pack {pack!r}")


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
        what = f"tensor {e['name']!r}"
        enc, dt, shape = e["encoding"], e["dtype"], e["shape"]
        storage = dtypes.storage_dtype(dt)
        if enc == "dense" and not e["data"].get("per_model"):
            if shape is None:
                problems.append(f"{what}: a dense tensor in a pack slot needs a shape (null is for per-model arrays)")
                continue
            _slot(what, "data", e["data"], storage, _prod(shape), problems)
        elif enc == "shared" and shape is None:
            problems.append(f"{what}: a shared tensor needs a shape")
        elif enc == "subspace":
            _check_subspace(e, what, problems)


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


def _check_subspace(e: dict, what: str, problems: list[str]) -> None:
    if e["dtype"] not in compat.COMPUTED_DTYPES:
        problems.append(f"{what}: logical dtype {e['dtype']} cannot be a subspace tensor (only "
                        f"{', '.join(compat.COMPUTED_DTYPES)} are computed; others are stored exactly, §4)")
    m, n = e["view"]
    if _prod(e["shape"]) != m * n:
        return  # reported by the caller (view vs shape)
    kl, kr = e["rank"]
    for side, k in (("left", kl), ("right", kr)):
        if (e[side] is None) != (k is None):
            problems.append(f"{what}: {side} is {'absent' if e[side] is None else 'present'} but rank[{side == 'right':d}] is {k!r}")
    res = e.get("residual")
    if res:
        if res["bits"] == 16:
            _slot(what, "residual values", res.get("values"), "float16", m * n, problems)
        else:
            _slot(what, "residual codes", res.get("codes"), "uint8", -(-m * n * res["bits"] // 8), problems)
            column = res.get("axis", 0) == 1  # format 1.3: one scale per column, only where the view is taller than wide
            if column and not m > n:
                problems.append(f"{what}: residual axis 1 (per-column scales) needs a view taller than wide, not {m}x{n}")
            _slot(what, "residual scales", res.get("scales"), "float32", n if column else m, problems)
    c = e["coefficients"]
    if coef_enc.quantized(c):
        try:
            coef_enc.check(c, what)
        except FormatError as err:
            problems.append(str(err))
    elif c.get("length") and c.get("pack") != "float32":
        problems.append(f"{what}: coefficients are in pack {c.get('pack')!r}; unquantized coefficients are float32 (§6.3)")
    rec = e.get("lora")
    if isinstance(rec, dict) and isinstance(rec.get("a_tail"), list):
        if list(e["shape"]) != [m] + list(rec["a_tail"]) or _prod(rec["a_tail"]) != n:
            problems.append(f"{what}: a LoRA module of shape {e['shape']} and view {e['view']} needs shape "
                            f"[out] + a_tail = {[m] + list(rec['a_tail'])} and view (out, prod(a_tail)) (§6.7)")


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
            if e["encoding"] not in ("subspace", "shared"):
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
