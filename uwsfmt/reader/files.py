"""Reading a model folder's kept small files (spec section 15), checked against their SHA-256."""

from __future__ import annotations

import hashlib

from uwsfmt.errors import FormatError, NotFoundError
from uwsfmt.format.files import blob_path, safe_name


def folder_record(store, model) -> dict | None:
    """The ``folder`` record of one model of ``store`` (None: not from a folder)."""
    return store.model_entry(model).get("folder")


def file_names(store, model) -> list[str]:
    """Names of the files kept for one model.

    >>> uwsfmt.open("family.uws").file_names("ft2")  # doctest: +SKIP
    ['chat_template.jinja', 'config.json', 'generation_config.json', 'model.safetensors.index.json', ...]
    """
    rec = folder_record(store, model) or {}
    return sorted((rec.get("files") or {}).keys())


def read_file(store, model, name: str) -> bytes:
    """The bytes of file ``name`` kept for one model, checked against its SHA-256.

    >>> cfg = json.loads(uwsfmt.open("family.uws").read_file("ft2", "config.json"))  # doctest: +SKIP
    """
    rec = folder_record(store, model) or {}
    files = rec.get("files") or {}
    if name not in files:
        mid = store.model_entry(model)["id"]
        have = ", ".join(sorted(files)) or "none"
        raise NotFoundError(f"{store.path}: model {mid!r} has no kept file {name!r} (kept: {have})")
    f = files[name]
    if not safe_name(name) or f.get("path") != blob_path(str(f.get("sha256"))):
        raise FormatError(f"{store.path}: the record of file {name!r} is malformed (name or path); the store is damaged "
                          "or was tampered with")
    data = store.read_array(f["path"], (int(f["size"]),)).tobytes()
    if hashlib.sha256(data).hexdigest() != f["sha256"]:
        raise FormatError(f"{store.path}: file {name!r} ({f['path']}) does not match its SHA-256; the store is damaged")
    return data


def problems(store) -> list[str]:
    """What is wrong with the kept files' records and arrays (each distinct file is read once
    and checked against its SHA-256: they are small)."""
    out = []
    checked: set[str] = set()
    for m in store.manifest["models"]:
        rec = m.get("folder")
        if rec is None:
            continue
        where = f"model {m['id']!r}"
        names = list(rec.get("files") or {}) + list(rec.get("skipped") or ()) + list((rec.get("weights") or {}).get("shards") or ())
        out += [f"{where}: file name {n!r} is not one plain file name" for n in names if not safe_name(n)]
        for name, f in (rec.get("files") or {}).items():
            if f.get("path") != blob_path(f.get("sha256", "")):
                out.append(f"{where}: file {name!r} is at {f.get('path')!r}, not at {blob_path(f.get('sha256', ''))!r}")
            elif f["path"] not in checked and safe_name(name):
                checked.add(f["path"])
                try:
                    read_file(store, m["id"], name)
                except (FormatError, NotFoundError) as e:
                    out.append(f"{where}: file {name!r}: {e}")
    return out
