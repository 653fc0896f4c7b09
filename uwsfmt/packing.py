"""Directory store <-> single zip file (Zarr's zip store: readable in place, entries stored)."""

from __future__ import annotations

import os
import shutil
import uuid
import zipfile

from uwsfmt.errors import FormatError, StoreError, StoreExistsError
from uwsfmt.io.layout import LOCK_FILE
from uwsfmt.reader.store import open_reader as open_store


def pack(store_dir: str, out_zip: str, *, overwrite: bool = False) -> str:
    """Zip a directory store (entries stored uncompressed so chunks can be read in place).

    >>> pack("family.uws", "family.uws.zip")  # doctest: +SKIP
    """

    open_store(store_dir).close()  # refuse to pack something that is not a committed store
    if os.path.exists(out_zip) and not overwrite:
        raise StoreExistsError(f"{out_zip}: already exists; pass overwrite=True (CLI: --overwrite)")
    tmp = f"{out_zip}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
            # zarr.json first: readers find the manifest without scanning the archive
            z.write(os.path.join(store_dir, "zarr.json"), "zarr.json")
            for root, dirs, files in os.walk(store_dir):
                dirs.sort()
                for f in sorted(files):
                    full = os.path.join(root, f)
                    rel = os.path.relpath(full, store_dir).replace(os.sep, "/")
                    if rel in ("zarr.json", LOCK_FILE) or f.endswith(".partial"):  # .partial: a killed writer's temp file
                        continue
                    z.write(full, rel)
        os.replace(tmp, out_zip)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return out_zip


def unpack(zip_path: str, out_dir: str, *, overwrite: bool = False) -> str:
    """Extract a zipped store into a directory store, refusing entries that escape it."""
    if os.path.exists(out_dir) and not overwrite:
        raise StoreExistsError(f"{out_dir}: already exists; pass overwrite=True (CLI: --overwrite)")
    if not zipfile.is_zipfile(zip_path):
        raise FormatError(f"{zip_path}: not a zip file")
    parent = os.path.dirname(os.path.abspath(out_dir))
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.unpack-{uuid.uuid4().hex[:8]}")
    try:
        with zipfile.ZipFile(zip_path) as z:
            for info in z.infolist():
                name = info.filename
                parts = name.split("/")
                if name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts[:-1]) or parts[-1] in (".", ".."):
                    raise FormatError(f"{zip_path}: entry {name!r} would be written outside the store; refusing to unpack")
                if info.is_dir():
                    continue
                dest = os.path.join(tmp, *parts)
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                with z.open(info) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst)

        open_store(tmp).close()
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


__all__ = ["pack", "unpack", "StoreError"]
