"""Check a store against the spec: schema, arrays, shapes, orthonormal bases, committed state."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from uwsfmt.encodings import for_entry
from uwsfmt.encodings.exception import array_names
from uwsfmt.encodings.lora import factor_matrices
from uwsfmt.errors import FormatError, UWSError
from uwsfmt.io import layout
from uwsfmt.reader import compat, declared
from uwsfmt.reader.files import problems as file_problems
from uwsfmt.reader.manifest import BUILDING_MARK, REPLACED_MARK
from uwsfmt.reader.store import open_reader as open_store
from uwsfmt.sources import formats, open_checkpoint
from uwsfmt.sources.provenance import resolve as resolve_source


def _expect(store, path: str, shape: Sequence[int] | None, dtype: str | None, problems: list[str], what: str):
    try:
        arr = store.array(path)
    except FormatError as e:
        problems.append(f"{what}: {e}")
        return None
    if shape is not None and tuple(arr.shape) != tuple(shape):
        problems.append(f"{what}: array {path} has shape {list(arr.shape)}, the manifest implies {list(shape)}")
    if dtype is not None and str(arr.dtype) not in dtype.split("|"):
        problems.append(f"{what}: array {path} has dtype {arr.dtype}, expected {dtype.replace('|', ' or ')}")
    return arr


def validate_store(store, *, deep: bool = False, tol: float = 1e-3, notes: list[str] | None = None,
                   source_root: str | os.PathLike | None = None) -> list[str]:
    """Return a list of problems (empty when the store is valid).

    ``deep`` also reads every array and rebuilds every model (each chunk's crc32c is checked on
    read) and, where a model's recorded source file is still there with the recorded sha256,
    recomputes each tensor's relative error against it and compares with the recorded value.
    What deep checking could not do (sources unavailable) goes to ``notes``. Sources are found
    under ``source_root`` by their recorded relative path or name (see :mod:`uwsfmt.sources.provenance`).
    """
    problems: list[str] = []
    notes = notes if notes is not None else []
    try:
        _check_store(store, tol, problems)
        declared.check_entries(store.manifest, problems)  # declared shapes / dtypes vs their slots and arrays
        declared.check_exceptions(store, problems)
        _unknown_values(store.manifest, problems, notes)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:  # fields the schema leaves open
        problems.append(f"the manifest cannot be checked ({type(e).__name__}: {e}); the store is damaged")
    problems += file_problems(store)  # model folder files: records, arrays, sha256
    if deep and not problems:
        problems += _deep(store, notes, source_root)
    return problems


def _unknown_values(m: dict, problems: list[str], notes: list[str]) -> None:
    """Values of the open fields this uwsfmt does not know (§12): in a store of a newer minor
    version, a note (a newer uwsfmt reads those tensors; the others are checked); in a store of a
    version this uwsfmt implements, a problem."""
    for name, why in compat.unreadable(m).items():
        if compat.is_newer(m):
            notes.append(f"tensor {name!r} uses {why}, from format {m['format_version']} (this uwsfmt reads "
                         f"{layout.FORMAT_VERSION} fully): not checked; install a newer uwsfmt to read it")
        else:
            problems.append(f"tensor {name!r} uses {why}, which format {m['format_version']} does not define; "
                            "the store is damaged or was written by a non-conforming writer")


def _check_store(store, tol: float, problems: list[str]) -> None:
    m = store.manifest
    n = store.n_models
    for p, info in m["packs"].items():
        arr = _expect(store, info["path"], None, p, problems, f"pack {p}")
        if arr is not None and arr.ndim != 2:
            problems.append(f"pack {p}: array {info['path']} is {arr.ndim}-D, packs are 2-D (model, element)")
        elif arr is not None:
            if arr.shape[1] != info["width"]:
                problems.append(f"pack {p}: width {arr.shape[1]} != manifest width {info['width']}")
            if arr.shape[0] < n:
                problems.append(f"pack {p}: {arr.shape[0]} rows for {n} committed models")

    def expect(path: str, shape: Sequence[int] | None, dtype: str | None, what: str):
        return _expect(store, path, shape, dtype, problems, what)

    for e in m["tensors"]:  # each encoding checks the arrays its entries name (encodings/*.check_stored)
        if not compat.entry_problem(e):  # else reported by _unknown_values
            for_entry(e).check_stored(store, e, f"tensor {e['name']!r}", problems, expect, tol)

    for mod in m["models"]:
        for x in mod.get("exceptions") or ():
            if compat.exception_problem(x):
                continue  # reported by _unknown_values
            for a in array_names(x):
                _expect(store, f"{x['path']}/{a}", None, None, problems, f"model {mod['id']!r}, exception of tensor {x['tensor']!r}")


#: recomputed and recorded relative errors agree within this (relative) plus an absolute 1e-6
ERROR_RTOL = 1e-3


def _deep(store, notes: list[str], source_root: str | os.PathLike | None = None) -> list[str]:
    """Read everything back; recompute errors against the sources where they are at hand."""
    out = []
    for e in store.manifest["tensors"]:  # spectra are not read by state_dict: read them for their checksums
        for path in (e.get("spectrum") or {}).values():
            try:
                store.read_array(path)
            except UWSError as err:
                out.append(f"tensor {e['name']!r}: {err}")
    for i, mid in enumerate(store.model_ids):
        unknown = compat.unreadable(store.manifest, i)  # a newer 1.y's tensors: the others are checked
        try:
            sd = store.state_dict(i, names=[e["name"] for e in store.manifest["tensors"] if e["name"] not in unknown])
        except UWSError as err:
            out.append(f"model {mid!r}: {err}")
            continue
        for e in store.manifest["tensors"]:
            if e["name"] in unknown:
                continue
            if e.get("lora") is not None:  # read back as factors; check that they chain to the view
                a, b = sd.get(e["lora"]["a"]), sd.get(e["lora"]["b"])
                if a is not None and b is not None and (b.shape[0], a.reshape(a.shape[0], -1).shape[1]) != tuple(e["view"]):
                    out.append(f"model {mid!r}, LoRA module {e['name']!r}: factors {list(b.shape)} x {list(a.shape)} do not give {e['view']}")
                continue
            t = sd[e["name"]]
            if e["shape"] is not None and list(t.shape) != e["shape"]:
                out.append(f"model {mid!r}, tensor {e['name']!r}: shape {list(t.shape)} != {e['shape']}")
            if t.is_floating_point() and e["encoding"] == "subspace" and not bool(torch.isfinite(t).all()):
                out.append(f"model {mid!r}, tensor {e['name']!r}: reconstruction has NaN/Inf")
        ck, why = _source(store, i, source_root)
        if ck is None:
            notes.append(f"model {mid!r}: source unavailable ({why}): checked readback only")
            continue
        try:
            found = _recompute(store, i, sd, ck)
        except UWSError as e:
            notes.append(f"model {mid!r}: source unreadable ({e}): checked readback only")
            continue
        finally:
            ck.close()
        out += found
        notes.append(f"model {mid!r}: errors recomputed against {ck.path}" + (" (MISMATCH)" if found else ": match"))
    return out


def _source(store, i: int, source_root: str | os.PathLike | None = None):
    """The model's source checkpoint when it is still there unchanged (size, then sha256), else (None, why)."""

    rec = store.manifest["models"][i].get("source") or {}
    path, fmt = resolve_source(rec, source_root), rec.get("format")
    if not rec.get("path") and not rec.get("name"):
        return None, "built from an in-memory state dict"
    if not path:
        return None, f"source {rec.get('name')!r} recorded without its location: pass source_root (CLI: --source-root)"
    if not rec.get("sha256"):
        return None, "no sha256 recorded"
    if not os.path.exists(path):
        return None, f"{path} not found"
    if not (os.path.isfile(path) or os.path.isdir(path)) or (
            os.path.isdir(path) and any(not (x.is_file() or x.is_dir()) for x in os.scandir(path))):
        return None, f"{path} is not a regular file or folder of files"  # a FIFO or device could block or never end
    try:
        ck = open_checkpoint(path, format=fmt if fmt in formats() else None, id=store.model_ids[i])
        files = ck.files()
        if not files or not all(os.path.isfile(f) for f in files):
            return None, f"{path} is not a regular file or folder of files"
        if rec.get("size") is not None and sum(os.path.getsize(f) for f in files) != rec["size"]:
            return None, f"{path} changed since the build (size differs)"
        if ck.fingerprint().get("sha256") != rec["sha256"]:
            return None, f"{path} changed since the build (sha256 differs)"
    except (UWSError, OSError) as e:
        return None, f"{path} unreadable: {e}"
    return ck, ""


def _recompute(store, i: int, sd: dict, ck) -> list[str]:
    """Each tensor's relative error ||W_hat - W|| / ||W|| of the rebuilt model ``sd`` against its
    source ``ck``, compared with the error recorded at build time."""

    m = store.manifest
    mid = m["models"][i]["id"]
    recorded = m["models"][i]["error"]
    infos, pairs = ck.infos(), ck.lora_pairs()
    out = []
    unknown = compat.unreadable(m, i)
    for t, e in enumerate(m["tensors"]):
        want = recorded[t]
        if want is None or e["name"] in unknown:
            continue  # not finite at build time / not readable by this uwsfmt: nothing to compare
        if e.get("lora") is not None:
            pair = pairs.get(e["name"])
            a_hat, b_hat = sd.get(e["lora"]["a"]), sd.get(e["lora"]["b"])
            if pair is None:
                continue
            out_dim, inp = e["view"]
            a, b = factor_matrices(ck, pair, out_dim, inp)
            got: float | None = _lora_error(a, b, float(pair.scale), a_hat, b_hat, out_dim)
        else:
            if e["name"] not in infos:
                out.append(f"model {mid!r}, tensor {e['name']!r}: not in its source {ck.path}")
                continue
            got = relative_error(sd[e["name"]], ck.get(e["name"]))
        if got is None:
            continue
        if not abs(got - want) <= 1e-6 + ERROR_RTOL * max(got, want):
            out.append(f"model {mid!r}, tensor {e['name']!r}: relative error against the source is {got:.6g}, "
                       f"the store records {want:.6g}; the store's data does not rebuild what was written")
    return out


def relative_error(w_hat: torch.Tensor, w: torch.Tensor) -> float | None:
    """||w_hat - w|| / ||w|| in float64 (0 when bit-identical; None when not finite)."""
    if w_hat.shape == w.shape and w_hat.dtype == w.dtype:
        if torch.equal(w_hat.reshape(-1).view(torch.uint8), w.reshape(-1).view(torch.uint8)):
            return 0.0
    if w_hat.shape != w.shape:
        return float("inf")
    a, b = w_hat.to(torch.float64), w.to(torch.float64)
    err, norm = float(torch.linalg.vector_norm(a - b)), float(torch.linalg.vector_norm(b))
    if not (np.isfinite(err) and np.isfinite(norm)):
        return None
    return err / norm if norm > 0 else (0.0 if err == 0 else float("inf"))


def _lora_error(a, b, s: float, a_hat, b_hat, out_dim: int) -> float:
    """||B'A' - s B A|| / ||s B A|| from r x r products (the store's factors carry the scale)."""
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    x2 = s * s * float(torch.sum((a64 @ a64.T) * (b64.T @ b64)))
    if a_hat is None or b_hat is None:
        y2 = xy = 0.0
    else:
        aa = a_hat.to(torch.float64).reshape(a_hat.shape[0], -1)
        bb = b_hat.to(torch.float64).reshape(out_dim, -1)
        y2 = float(torch.sum((aa @ aa.T) * (bb.T @ bb)))
        xy = s * float(torch.sum((b64.T @ bb) * (a64 @ aa.T)))
    err2 = max(x2 - 2 * xy + y2, 0.0)
    if x2 <= 0.0:
        return 0.0 if err2 <= 0.0 else float("inf")
    return float(np.sqrt(err2 / x2))


def validate(path: str, *, deep: bool = False, notes: list[str] | None = None,
             source_root: str | os.PathLike | None = None) -> list[str]:
    """Open and validate a store; raises FormatError for stores that cannot even be opened.

    >>> uwsfmt.validate("family.uws", deep=True)  # doctest: +SKIP
    []
    """

    with open_store(path) as store:
        problems = validate_store(store, deep=deep, notes=notes, source_root=source_root)
    base = os.path.basename(os.path.normpath(path))
    if BUILDING_MARK in base and notes is not None:
        notes.append(f"{path} is the temporary folder of a `uwsfmt convert` killed after its commit but before moving it "
                     "into place; it holds a complete store (rename it, or run the convert again, which removes it)")
    if REPLACED_MARK in base and notes is not None:
        notes.append(f"{path} is the store a `uwsfmt convert --overwrite` replaced, killed while deleting it; the new "
                     "store is in place (delete this folder, or run the convert again, which removes it)")
    return problems
