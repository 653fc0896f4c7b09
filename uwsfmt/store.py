"""A UWS store on Zarr: open, read models and tensors, append, commit.

The manifest (root ``zarr.json`` attribute ``uws``) is the committed state: which models and
tensors exist and where their values are. Writers add data first and replace the manifest
last, atomically, so a crash leaves the previous committed state readable.
"""

from __future__ import annotations

import contextlib
import fnmatch
import itertools
import json
import math
import os
import threading
import zipfile
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import zarr
from zarr.storage import LocalStore, ZipStore

from . import compat, declared, dtypes, layout, shards
from .encodings import dense as dense_enc
from .encodings import exception as exception_enc
from .encodings import lora as lora_enc
from .encodings import residual as residual_enc
from .encodings import subspace
from .encodings.slots import take
from .errors import ConfigError, ConflictError, FormatError, NotFoundError, StoreError, UWSError, VersionError

#: a manifest larger than this is refused on open (hostile stores must not exhaust memory)
MAX_MANIFEST_BYTES = 256 << 20
#: an array's zarr.json larger than this is refused before parsing
MAX_ARRAY_METADATA_BYTES = 1 << 20
#: a chunk (or a shard's index) that would decode to more bytes than this is refused before reading
MAX_CHUNK_BYTES = 1 << 32
#: codecs a UWS array may use (spec section 2.1); anything else is refused before any data is decoded
ALLOWED_CODECS = frozenset({"bytes", "crc32c", "zstd", "sharding_indexed"})
#: storage dtypes (spec section 4)
STORAGE_DTYPES = frozenset({"float64", "float32", "float16", "uint16", "uint8", "int64", "int32", "int16", "int8", "bool"})
#: temporary folders of builds in progress (or killed) are named ``.<name>.uws-building-<hex>``
BUILDING_MARK = ".uws-building-"
#: the name a store replaced by ``convert(overwrite=True)`` has while it is deleted
REPLACED_MARK = ".uws-replaced-"

ModelRef = str | int


def _device(device: str | torch.device | None, default: str = "cpu") -> torch.device:
    """The torch device ``device`` names (``default`` when None), checked: a name torch does not
    know, or a GPU it cannot see, is a clear ConfigError rather than torch's own assertion."""
    if device is None:
        device = default
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"device {device!r} is not a torch device; use 'cpu' or 'cuda' (or 'cuda:N')") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError(f"device {device!r}: torch {torch.__version__} sees no CUDA GPU on this machine; use 'cpu' "
                              "(or install a CUDA build of torch where there is a GPU)")
        if dev.index is not None and dev.index >= n:
            raise ConfigError(f"device {device!r}: torch sees {n} CUDA GPU(s), cuda:0 to cuda:{n - 1}")
    return dev


def default_device() -> str:
    """"cuda" when torch sees a GPU, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _open_zarr_store(path: str, mode: str):
    if os.path.isdir(path):
        return LocalStore(path, read_only=(mode == "r"))
    if os.path.isfile(path) and zipfile.is_zipfile(path):
        if mode != "r":
            raise StoreError(
                f"{path}: a zipped store is read-only; run `uwsfmt unpack {path} DIR` to get a "
                "directory store you can append to"
            )
        return ZipStore(path, mode="r")
    if not os.path.exists(path):
        raise StoreError(f"{path}: no such store (expected a UWS store directory or .zip file)")
    raise FormatError(f"{path}: not a UWS store (neither a directory nor a zip file)")


def _json_size(zstore, path: str, key: str = "zarr.json", zf: zipfile.ZipFile | None = None) -> int | None:
    """Size in bytes of the metadata document ``key`` (None when absent), read before parsing it;
    ``zf``: the store's archive when it is already open."""
    if isinstance(zstore, LocalStore):
        p = os.path.join(path, *key.split("/"))
        return os.path.getsize(p) if os.path.isfile(p) else None
    try:
        if zf is not None:
            return zf.getinfo(key).file_size
        with zipfile.ZipFile(path) as z:
            return z.getinfo(key).file_size
    except KeyError:
        return None


def _root_json_size(zstore, path: str) -> int | None:
    return _json_size(zstore, path)


def _interrupted_hint(path: str) -> str:
    base = os.path.basename(os.path.normpath(path))
    if BUILDING_MARK in base:
        return (" This folder is the temporary build of an interrupted `uwsfmt convert`; run the conversion "
                "again (it removes such leftovers) or delete the folder.")
    if REPLACED_MARK in base:
        return (" This folder is a store replaced by `uwsfmt convert --overwrite`, which was interrupted while "
                "deleting it; the new store is in place. Delete the folder (the next convert to that path does).")
    return ""


def read_manifest(zstore, path: str) -> dict:
    """Load and check the manifest: size limit, JSON, format version, schema."""
    size = _root_json_size(zstore, path)
    if size is None:
        raise FormatError(f"{path}: not a UWS store: no zarr.json at its root.{_interrupted_hint(path)}")
    if size > MAX_MANIFEST_BYTES:
        raise FormatError(
            f"{path}: zarr.json is {size} bytes, above the {MAX_MANIFEST_BYTES}-byte limit; "
            "refusing to parse it (the store is damaged or hostile)"
        )
    try:
        root = zarr.open_group(zstore, mode="r", zarr_format=3)
        attrs = dict(root.attrs)
    except Exception as e:  # zarr raises many types for a broken hierarchy (RecursionError, MemoryError too)
        raise FormatError(f"{path}: the root zarr.json is not a readable Zarr v3 group ({_short(e)})") from None
    m = attrs.get("uws")
    if not isinstance(m, dict):
        raise FormatError(f"{path}: a Zarr group but not a UWS store (no 'uws' attribute in zarr.json)")
    check_version(m.get("format_version"), path)
    # before the schema: a store still being built (or whose build was killed) lacks required fields
    if m.get("state") != "complete":
        raise FormatError(
            f"{path}: the store is marked {m.get('state')!r}, not 'complete': a conversion was "
            f"interrupted or is still running.{_interrupted_hint(path) or ' Delete it and run the conversion again.'}"
        )
    from .schema import validate_manifest

    validate_manifest(m, path)
    return m


def _short(e: BaseException, limit: int = 300) -> str:
    msg = f"{type(e).__name__}: {e}" if not isinstance(e, (OSError, ValueError)) else str(e)
    return msg if len(msg) <= limit else msg[:limit] + "..."


def _codec_names(codecs) -> Iterable[str]:
    for c in codecs or ():
        name = c.get("name") if isinstance(c, dict) else None
        yield str(name)
        conf = c.get("configuration") if isinstance(c, dict) else None
        if name == "sharding_indexed" and isinstance(conf, dict):
            yield from _codec_names(conf.get("codecs"))
            yield from _codec_names(conf.get("index_codecs"))


def check_array_metadata(arr, where: str) -> None:
    """Refuse arrays outside the format before any chunk is decoded: other data types or codecs
    (a pickle-based codec must never run), or chunks too large to allocate."""
    meta = arr.metadata.to_dict()
    dtype = str(arr.dtype)
    if dtype not in STORAGE_DTYPES:
        raise FormatError(f"{where} has data type {dtype}, not one the UWS format allows ({', '.join(sorted(STORAGE_DTYPES))})")
    bad = [n for n in _codec_names(meta.get("codecs")) if n not in ALLOWED_CODECS]
    if bad:
        raise FormatError(f"{where} uses codec {bad[0]!r}; UWS arrays may only use {', '.join(sorted(ALLOWED_CODECS))}. "
                          "Refusing to decode it (the store is damaged or hostile)")
    grid = meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape") or list(arr.shape)
    inner = grid
    for c in meta.get("codecs") or ():
        if c.get("name") == "sharding_indexed":
            inner = c["configuration"]["chunk_shape"]
            per_shard = math.prod(max(1, -(-int(g) // max(1, int(i)))) for g, i in zip(grid, inner))
            if per_shard * 16 > MAX_CHUNK_BYTES:
                raise FormatError(f"{where}: a shard of {per_shard} chunks is too large an index to read; the store is damaged or hostile")
    nbytes = math.prod(int(x) for x in inner) * np.dtype(dtype).itemsize
    if nbytes > MAX_CHUNK_BYTES:
        raise FormatError(f"{where}: chunks of {list(inner)} decode to {nbytes} bytes, above the {MAX_CHUNK_BYTES}-byte "
                          "limit; the store is damaged or hostile")


def check_version(v: Any, path: str) -> tuple[int, int]:
    if not isinstance(v, str) or v.count(".") != 1:
        raise FormatError(f"{path}: format_version {v!r} is not of the form 'MAJOR.MINOR'")
    try:
        major, minor = (int(x) for x in v.split("."))
    except ValueError:
        raise FormatError(f"{path}: format_version {v!r} is not of the form 'MAJOR.MINOR'") from None
    if major != layout.FORMAT_MAJOR:
        raise VersionError(
            f"{path}: UWS format {v} is not readable by this uwsfmt (it reads "
            f"{layout.FORMAT_MAJOR}.x). Install a uwsfmt release that supports format {major}.x."
        )
    return major, minor


class Store:
    """An open UWS store. Opening reads only the manifest; arrays are read on demand.

    >>> store = uwsfmt.open("family.uws")  # doctest: +SKIP
    >>> sd = store.state_dict("model-003", device="cuda")  # doctest: +SKIP
    """

    def __init__(self, path: str, zstore, manifest: dict):
        self.path = path
        self._zstore = zstore
        self.manifest = manifest
        self._index_cache()
        self._arrays: dict[str, Any] = {}
        self._cache: dict[tuple, Any] = {}
        self._row_readers: dict[str, Any] = {}
        self._chunked: dict[str, shards.ChunkedReader | None] = {}
        self._zip: zipfile.ZipFile | None = None
        self._lock = threading.Lock()
        self._local = threading.local()  # per-thread reusable row buffers

    # ------------------------------------------------------------------ metadata
    def _index_cache(self) -> None:
        m = self.manifest
        self._model_index = {e["id"]: i for i, e in enumerate(m["models"])}
        self._tensor_index = {e["name"]: i for i, e in enumerate(m["tensors"])}
        # LoRA modules are one entry each; their factor tensors are found by name too
        self._lora_index = {n: i for i, e in enumerate(m["tensors"]) if e.get("lora") for n in lora_enc.factor_names(e)}
        self._unknown = compat.entry_problems(m)  # values of a later 1.y: only those tensors are refused (§12)
        self._mismatched = declared.entry_problems(m)  # shapes / dtypes their slots cannot hold: refused when read

    @property
    def format_version(self) -> str:
        return self.manifest["format_version"]

    @property
    def model_ids(self) -> list[str]:
        return [e["id"] for e in self.manifest["models"]]

    @property
    def tensor_names(self) -> list[str]:
        return [e["name"] for e in self.manifest["tensors"]]

    @property
    def n_models(self) -> int:
        return len(self.manifest["models"])

    def model_index(self, model: ModelRef) -> int:
        if isinstance(model, (int, np.integer)) and not isinstance(model, bool):
            if not 0 <= int(model) < self.n_models:
                raise NotFoundError(f"{self.path}: model index {model} out of range (store has {self.n_models} models)")
            return int(model)
        try:
            return self._model_index[model]
        except KeyError:
            near = fnmatch.filter(self.model_ids, f"*{model}*")[:5]
            hint = f" Did you mean: {', '.join(near)}?" if near else f" Known ids: {', '.join(self.model_ids[:8])}{'...' if self.n_models > 8 else ''}"
            raise NotFoundError(f"{self.path}: no model {model!r}.{hint}") from None

    def tensor_entry(self, name: str) -> dict:
        try:
            i = self._tensor_index[name] if name in self._tensor_index else self._lora_index[name]
            return self.manifest["tensors"][i]
        except KeyError:
            raise NotFoundError(f"{self.path}: no tensor {name!r} (store has {len(self._tensor_index)} tensors)") from None

    def model_entry(self, model: ModelRef) -> dict:
        return self.manifest["models"][self.model_index(model)]

    # ------------------------------------------------------------------ arrays
    def _array(self, path: str):
        a = self._arrays.get(path)
        if a is None:
            zf = self._zipfile() if type(self._zstore) is ZipStore else None  # one archive, not one per array
            size = _json_size(self._zstore, self.path, f"{path}/zarr.json", zf)
            if size is None:
                raise FormatError(f"{self.path}: array {path!r} named by the manifest is missing (no {path}/zarr.json); the store is damaged")
            if size > MAX_ARRAY_METADATA_BYTES:
                raise FormatError(f"{self.path}: {path}/zarr.json is {size} bytes, above the {MAX_ARRAY_METADATA_BYTES}-byte "
                                  "limit for array metadata; refusing to parse it (the store is damaged or hostile)")
            try:
                a = zarr.open_array(self._zstore, path=path, mode="r", zarr_format=3)
            except Exception as e:
                raise FormatError(f"{self.path}: array {path!r} named by the manifest cannot be opened ({_short(e)}); the store is damaged") from None
            check_array_metadata(a, f"{self.path}: array {path!r}")
            self._arrays[path] = a
        return a

    def _zipfile(self) -> zipfile.ZipFile:
        """The store's archive, opened once (its directory parsed once, not per array)."""
        with self._lock:
            if self._zip is None:
                self._zip = zipfile.ZipFile(self.path)
            return self._zip

    def _chunked_reader(self, path: str) -> shards.ChunkedReader | None:
        """The direct reader of the array at ``path`` (None: read it with zarr-python)."""
        if path not in self._chunked:
            reader = None
            if type(self._zstore) in (LocalStore, ZipStore):
                zf = self._zipfile() if type(self._zstore) is ZipStore else None
                folder = path if zf else os.path.join(self.path, *path.split("/"))
                doc = shards.read_doc(f"{path}/zarr.json" if zf else os.path.join(folder, "zarr.json"), MAX_ARRAY_METADATA_BYTES, zf)
                if doc is None:
                    raise FormatError(f"{self.path}: array {path!r} named by the manifest is missing (no {path}/zarr.json); the store is damaged")
                reader = shards.chunked_reader(folder, doc, STORAGE_DTYPES, MAX_CHUNK_BYTES, zf)
            self._chunked[path] = reader
        return self._chunked[path]

    def _storage_dtype(self, path: str) -> np.dtype:
        """The data type of the array at ``path`` (from its metadata; nothing read)."""
        reader = self._chunked_reader(path)
        return reader.dtype if reader is not None else self._array(path).dtype

    def read_array(self, path: str, shape: Iterable[int] | None = None, out: np.ndarray | None = None,
                   most: int | None = None) -> np.ndarray:
        """The whole array at ``path``; ``shape``: what the manifest implies, or ``most``: how many
        values it may hold at most (either checked before anything is allocated or read).
        ``out``: a C-contiguous buffer of the array's shape and storage dtype to read into (used
        when it fits, else a new array is returned)."""
        reader = self._chunked_reader(path)
        arr = self._array(path) if reader is None else None
        have = reader.shape if reader is not None else tuple(arr.shape)
        if shape is not None and have != tuple(shape):
            raise FormatError(f"{self.path}: array {path!r} has shape {list(have)} but the manifest implies "
                              f"{list(shape)}; the store is damaged or was tampered with")
        if most is not None and math.prod(have) > most:
            raise FormatError(f"{self.path}: array {path!r} has shape {list(have)}, more than the {most} values the "
                              "manifest allows it; the store is damaged or was tampered with")
        if reader is not None:
            fits = out is not None and out.dtype == reader.dtype and out.shape == reader.shape and out.flags.c_contiguous
            return reader.read_into(out if fits else np.empty(reader.shape, reader.dtype))
        try:
            return arr[...]
        except Exception as e:
            raise FormatError(f"{self.path}: array {path!r} cannot be read ({_short(e)}); the store is damaged") from None

    def _pack(self, info: dict):
        arr = self._array(info["path"])
        if arr.ndim != 2 or arr.shape[1] != info["width"] or str(arr.dtype) != info["dtype"]:
            raise FormatError(f"{self.path}: pack {info['path']} is {arr.dtype} {list(arr.shape)} but the manifest says "
                              f"{info['dtype']} with {info['width']} elements per row; the store is damaged or was tampered with")
        return arr

    def _row_reader(self, info: dict):
        """Direct shard reader of a pack (None: read it with zarr-python), see :mod:`uwsfmt.shards`."""
        path = info["path"]
        if path not in self._row_readers:
            self._row_readers[path] = shards.row_reader(self._zstore, path, self._pack(info))
        return self._row_readers[path]

    def _row_buffer(self, pack: str, width: int, dtype: np.dtype, device: torch.device) -> list:
        """[host tensor, event]: a row buffer reused from call to call (no allocation, no page
        faults), pinned when rows go to a GPU; the event marks the last async copy out of it."""
        bufs = self._local.__dict__.setdefault("rows", {})
        pin = device.type == "cuda"
        b = bufs.get((pack, pin))
        if b is None or b[0].numel() != width or b[0].numpy().dtype != dtype:
            b = [torch.from_numpy(np.empty(width, dtype=dtype)), None]
            if pin:
                b[0] = b[0].pin_memory()
            bufs[(pack, pin)] = b
        if b[1] is not None:
            b[1].synchronize()  # the previous model's copy to the device must finish before we overwrite
            b[1] = None
        return b

    def _rows(self, index: int, device: torch.device) -> dict[str, torch.Tensor]:
        """One model's pack rows, each read with one call (a handful of storage requests)."""
        rows = {}
        for pack, info in self.manifest["packs"].items():
            arr = self._pack(info)
            if arr.shape[0] <= index:
                raise FormatError(
                    f"{self.path}: pack {info['path']} has {arr.shape[0]} rows but model #{index} is committed; the store is damaged"
                )
            reader = self._row_reader(info)
            if reader is not None:
                b = self._row_buffer(pack, reader.width, reader.dtype, device)
                reader.read_into(index, b[0].numpy())
                if device.type == "cpu":
                    rows[pack] = b[0]
                else:
                    rows[pack] = b[0].to(device, non_blocking=True)
                    if device.type == "cuda":
                        b[1] = torch.cuda.Event()
                        b[1].record()
                continue
            try:
                row = arr[index, :]
            except Exception as e:
                raise FormatError(f"{self.path}: model #{index} cannot be read from {info['path']} ({e}); the store is damaged") from None
            t = torch.from_numpy(np.ascontiguousarray(row))
            rows[pack] = t.to(device, non_blocking=True) if device.type != "cpu" else t
        return rows

    def _shared(self, key: tuple, make) -> Any:
        v = self._cache.get(key)
        if v is None:
            v = make()
            self._cache[key] = v
        return v

    def clear_cache(self) -> None:
        """Drop cached bases and shared tensors (on every device)."""
        self._cache.clear()
        self._arrays.clear()
        self._row_readers.clear()
        self._chunked.clear()

    def _compute_dtype(self, e: dict) -> torch.dtype:
        return torch.float64 if e["dtype"] == "float64" else torch.float32

    def _group_arrays(self, key: tuple, entries: list[dict], device: torch.device):
        """Stacked M / L / R of same-shape subspace tensors, cached on the device."""

        def make():
            cdt = self._compute_dtype(entries[0])
            def stack(field):
                if entries[0].get(field) is None:
                    return None
                # float16 means (format 1.1) stay float16 here: half the bytes cached and read per
                # load; readers convert them exactly as they add them (native kernel, torch's promotion)
                dt = torch.float16 if field == "mean" and cdt == torch.float32 and all(
                    self._storage_dtype(e[field]) == np.float16 for e in entries) else cdt
                # read straight into the stacked host tensor (no per-array allocation and copy)
                out = torch.empty((len(entries), *_implied_shape(entries[0], field)), dtype=dt)
                for e, o in zip(entries, out):
                    view = o.numpy()
                    got = self.read_array(e[field], _implied_shape(e, field), out=view)
                    if got is not view:  # another storage dtype, or read by zarr-python
                        o.copy_(torch.from_numpy(got))
                return out.to(device)
            return stack("mean"), stack("left"), stack("right")

        return self._shared(("group", key, str(device)), make)

    # ------------------------------------------------------------------ reading
    def state_dict(
        self,
        model: ModelRef,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        names: Iterable[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """All (or ``names``) tensors of one model, on ``device``, in the source dtype unless ``dtype``.

        Bases are cached on the device, so the next model costs only its pack rows.
        """
        with _damaged(self, model):
            return self._state_dict(model, device=device, dtype=dtype, names=names)

    def _state_dict(self, model: ModelRef, *, device, dtype, names, into: dict[str, torch.Tensor] | None = None
                    ) -> dict[str, torch.Tensor]:
        dev = _device(device)
        idx = self.model_index(model)
        wanted = None if names is None else list(dict.fromkeys(names))
        entries = self.manifest["tensors"] if wanted is None else list({id(e): e for e in map(self.tensor_entry, wanted)}.values())
        compat.refuse(self.path, self.manifest, idx, (e["name"] for e in entries), self._unknown)
        declared.refuse(self.path, self._mismatched, (e["name"] for e in entries))
        rows = self._rows(idx, dev) if self.manifest["packs"] else {}
        out: dict[str, torch.Tensor] = {}
        groups: dict[tuple, list[dict]] = defaultdict(list)
        lora_entries = [e for e in entries if e.get("lora") is not None]
        for e in entries:
            enc = e["encoding"]
            if e.get("lora") is not None:
                continue  # read as factors below
            if enc == "subspace":
                groups[_group_key(e)].append(e)
            elif enc == "shared":
                value = self._shared(
                    ("shared", e["name"], str(dev)),
                    lambda e=e: dtypes.from_storage(self.read_array(e["data"]["path"], e["shape"] or [1]), e["dtype"]).reshape(e["shape"]).to(dev),
                )
                out[e["name"]] = _place(into, e["name"], value, self.path) if _wants(into, e["name"]) else value.clone()
            elif enc == "dense":
                if e["data"].get("per_model"):
                    out[e["name"]] = dtypes.from_storage(self.read_array(f"{e['node']}/models/{idx}"), e["dtype"]).to(dev)
                else:
                    value = dense_enc.decode(e, rows)
                    out[e["name"]] = _place(into, e["name"], value, self.path) if _wants(into, e["name"]) else value.clone()
            else:
                raise FormatError(f"{self.path}: tensor {e['name']!r} has unknown encoding {enc!r}")
        exceptions = self.manifest["models"][idx].get("exceptions") or ()
        excepted = {x["tensor"] for x in exceptions}
        for key, group in groups.items():
            for e, w in zip(group, self._decode_group(key, group, rows, dev, into, dtype=dtype, exceptions=excepted)):
                out[e["name"]] = w
        for x in exceptions:  # appended models the bases missed
            if x["tensor"] in out:
                e = self.tensor_entry(x["tensor"])
                arrays = {a: self.read_array(f"{x['path']}/{a}") for a in exception_enc.array_names(x)}
                out[x["tensor"]] = exception_enc.decode(x, arrays, out[x["tensor"]], e["shape"], e["dtype"], dev)
        result = {}
        for e in entries:
            if e.get("lora") is not None:
                continue
            t = out[e["name"]]
            if _wants(into, e["name"]):  # the module's own tensor, in the module's dtype
                result[e["name"]] = _place(into, e["name"], t, self.path)
                continue
            want = _returned_dtype(e, dtype)
            result[e["name"]] = t.to(want) if t.dtype != want else t
        if lora_entries:  # LoRA modules come back as factors (scale folded in) under their source names
            factors = lora_enc.read(self, lora_entries, idx, rows, dev, dtype, into=into)
            if wanted is not None:
                keep = set(wanted) | {n for e in lora_entries if e["name"] in wanted for n in lora_enc.factor_names(e)}
                factors = {k: v for k, v in factors.items() if k in keep}
            result.update({k: _place(into, k, v, self.path) if _wants(into, k) else v for k, v in factors.items()})
        if dev.type == "cpu" and rows:  # row buffers are reused by the next call: nothing returned may share them
            reused = {r.untyped_storage().data_ptr() for r in rows.values()}
            for k, v in result.items():
                if v.device.type == "cpu" and v.untyped_storage().data_ptr() in reused:
                    result[k] = v.clone()
        return result

    def _decode_group(self, key: tuple, group: list[dict], rows, dev, into: dict[str, torch.Tensor] | None = None,
                      *, dtype: torch.dtype | None = None, exceptions: set | frozenset = frozenset()) -> list[torch.Tensor]:
        """The group's tensors: in the compute dtype, or, for large ones, possibly already in the
        dtype the caller gets (``into``'s tensor's, else ``dtype`` or the source's) where that is
        bfloat16 / float16 and nothing is added after the rebuild (no residual, not in
        ``exceptions``): then the one rounding of the float32 rebuild happens as it is written."""
        mean, left, right = self._group_arrays(key, group, dev)
        e0 = group[0]
        cdt = self._compute_dtype(e0)
        m, n = e0["view"]
        cshape = e0["coefficients"]["shape"]
        cs = [take(rows, e["coefficients"]).reshape(cshape).to(cdt) for e in group]  # views of the row
        if m * n >= subspace.EXPAND_MIN_ELEMENTS and subspace.rebuilt_shape(left, right, cs[0]) == (m, n):
            # large tensors one by one: straight into the caller's tensors where they can take the
            # result (no full-size temporary: a fresh allocation costs page faults and a pass over
            # memory), else into fresh ones; mean + L C R^T in one pass (the native kernel on the
            # CPU, else one GEMM per tensor); no stacked copy of the coefficients
            def dest(e: dict) -> torch.Tensor:
                half = cdt == torch.float32 and not e.get("residual") and e["name"] not in exceptions
                d = _target(into, e, cdt, dev, half=half) if into is not None else None
                if d is not None:
                    return d
                want = _returned_dtype(e, dtype)
                return torch.empty(e["shape"], dtype=want if half and want in subspace.HALF else cdt, device=dev)

            dests = [dest(e) for e in group]
            views = [d.view(m, n) for d in dests]
            subspace.expand_into([(d, None if mean is None else mean[i], None if left is None else left[i], cs[i],
                                   None if right is None else right[i]) for i, d in enumerate(views)])
            for e, d in zip(group, views):
                if e.get("residual"):
                    d.add_(residual_enc.decode(e["residual"], rows, m, n).to(cdt))
            return dests
        w = c = torch.stack(cs)
        if left is not None:
            w = torch.bmm(left, w)
        if right is not None:
            w = torch.bmm(w, right.transpose(1, 2))
        if mean is not None:
            w = w.add_(mean) if w.shape == mean.shape and w is not c else (w + mean if w.shape == mean.shape else mean.expand(len(group), m, n) + w)
        elif w.shape[1:] != (m, n):
            raise FormatError(f"{self.path}: tensor {e0['name']!r}: coefficients do not match its view {m}x{n}")
        out = []
        for i, e in enumerate(group):
            wi = w[i]
            if e.get("residual"):
                wi = wi + residual_enc.decode(e["residual"], rows, m, n).to(cdt)
            out.append(wi.reshape(e["shape"]))
        return out

    def tensor(
        self, model: ModelRef, name: str, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """One tensor of one model; reads only that tensor's slots, basis and mean."""
        with _damaged(self, model, name):
            return self._tensor(model, name, device=device, dtype=dtype)

    def _tensor(self, model: ModelRef, name: str, *, device, dtype) -> torch.Tensor:
        dev = _device(device)
        e = self.tensor_entry(name)
        idx = self.model_index(model)
        compat.refuse(self.path, self.manifest, idx, [e["name"]], self._unknown)
        declared.refuse(self.path, self._mismatched, [e["name"]])
        if e["name"] != name:  # a LoRA factor (the module's own name gives the dense update)
            sd = self.state_dict(idx, device=dev, dtype=dtype, names=[name])
            if name not in sd:
                raise NotFoundError(f"{self.path}: model {self.model_entry(idx)['id']!r} has no LoRA module {e['name']!r}, so no {name!r}")
            return sd[name]
        if e["encoding"] == "shared" or (e["encoding"] == "dense" and e["data"].get("per_model")) or any(
                x["tensor"] == name for x in self.manifest["models"][idx].get("exceptions") or ()):
            return self.state_dict(idx, device=dev, dtype=dtype, names=[name])[name]
        rows = self._slot_rows(idx, e, dev)
        if e["encoding"] == "dense":
            t = dense_enc.decode(e, rows).clone()
        else:
            t = self._decode_group(_group_key(e) + ("single", name), [e], rows, dev, dtype=dtype)[0]
        want = _returned_dtype(e, dtype)
        return t.to(want)

    def delta(self, model: ModelRef, module: str, *, device: str | torch.device | None = None,
              dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense update s * B @ A of one LoRA module of one adapter, in the adapted weight's layout.

        >>> store.delta("task-3", "base_model.model.fc1")  # doctest: +SKIP
        """
        return lora_enc.delta(self, model, module, device=device, dtype=dtype)

    def _slot_rows(self, idx: int, e: dict, dev) -> dict[str, torch.Tensor]:
        """Sparse pack rows holding only the slots of tensor ``e`` (partial chunk reads)."""
        rows: dict[str, torch.Tensor] = {}
        for s in _slots_of(e):
            if s["length"] == 0:
                continue
            arr = self._pack(self.manifest["packs"][s["pack"]])
            if arr.shape[0] <= idx:
                raise FormatError(f"{self.path}: pack {s['pack']} has {arr.shape[0]} rows but model #{idx} is committed; the store is damaged")
            try:
                vals = torch.from_numpy(np.ascontiguousarray(arr[idx, s["offset"]: s["offset"] + s["length"]]))
            except Exception as e:
                raise FormatError(f"{self.path}: model #{idx} cannot be read from pack {s['pack']} ({_short(e)}); the store is damaged") from None
            full = rows.get(s["pack"])
            if full is None:
                full = torch.zeros(self.manifest["packs"][s["pack"]]["width"], dtype=vals.dtype)
                rows[s["pack"]] = full
            full[s["offset"]: s["offset"] + s["length"]] = vals
        return {k: v.to(dev) for k, v in rows.items()}

    def load_into(self, module: torch.nn.Module, model: ModelRef, *, strict: bool = True) -> torch.nn.Module:
        """Load a model's weights into ``module`` (on the module's device and dtypes).

        Tensors are rebuilt straight into the module's own parameters and buffers where their
        device and dtype allow (no intermediate state dict), else rebuilt and copied in.
        """
        first = next(itertools.chain(module.parameters(), module.buffers()), None)
        dev = first.device if first is not None else torch.device("cpu")
        targets = module.state_dict()  # detached tensors sharing the parameters' storage
        with _damaged(self, model), torch.no_grad():
            sd = self._state_dict(model, device=dev, dtype=None, names=None, into=targets)
        missing = [k for k in targets if k not in sd]
        unexpected = [k for k in sd if k not in targets]
        if strict and (missing or unexpected):
            raise NotFoundError(
                f"{self.path}: model {self.model_entry(model)['id']!r} does not fit the module: "
                f"missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}; pass strict=False to load what matches"
            )
        return module

    # ------------------------------------------------------------------ inspection
    def errors(self, kind: str = "error") -> np.ndarray:
        """(n_models, n_tensors) relative reconstruction errors (NaN where not finite)."""
        rows = [[np.nan if v is None else v for v in m[kind]] for m in self.manifest["models"]]
        return np.asarray(rows, dtype=np.float64).reshape(self.n_models, len(self.manifest["tensors"]))

    def spectrum(self, name: str, side: str | None = None) -> dict:
        """Full eigenvalue spectrum of a subspace tensor, its kept rank and a null baseline.

        The null baseline is the spectrum the same shapes would give with no shared structure:
        the deviations' total energy spread as i.i.d. noise (Marchenko-Pastur expectation).
        """
        from .inspect import null_spectrum

        e = self.tensor_entry(name)
        if e["encoding"] != "subspace":
            raise NotFoundError(f"{self.path}: tensor {name!r} is {e['encoding']}, it has no spectrum")
        sides = [s for s in ("left", "right") if e["spectrum"].get(s)]
        side = side or sides[0]
        vals = self.read_array(e["spectrum"][side], most=math.prod(e["view"])).astype(np.float64)
        k = e["rank"][0 if side == "left" else 1]
        total = vals.sum()
        cum = np.cumsum(vals) / total if total > 0 else np.ones_like(vals)
        m, n = e["view"]
        if e["mode"] == "flat":
            dim, other = m * n, 1
        else:
            dim, other = (m, n) if side == "left" else (n, m)
        samples = self.n_models - (1 if e["center"] == "mean" else 0)
        null = null_spectrum(total, dim, other * max(samples, 1), len(vals))
        return {"side": side, "eigenvalues": vals, "kept": k, "explained": cum, "null": null, "tau": self._tau()}

    def _tau(self) -> float | None:
        """The explained-variance threshold ranks were chosen by (None: fixed rank or an error budget)."""
        b = self.manifest["build"]
        st = b.get("settings") or {}
        if st.get("tau") is not None:
            return st["tau"]
        if all(st.get(k) is None for k in ("rank", "max_error", "max_delta_error")):
            return b.get("default_tau")  # the builder's default applied
        return None

    def summary(self) -> dict:
        from .inspect import summary

        return summary(self)

    def tensor_table(self) -> list[dict]:
        from .inspect import tensor_table

        return tensor_table(self)

    def model_table(self) -> list[dict]:
        from .inspect import model_table

        return model_table(self)

    # ------------------------------------------------------------------ writing
    def append(self, source, *, id: str | None = None, format: str | None = None, progress: bool = False,
               max_error: float | None = None, max_delta_error: float | None = None, device: str | None = None) -> dict:
        """Project a new checkpoint onto the existing bases and commit it as a new model.

        The store's error budget (or ``max_error`` / ``max_delta_error``) holds for it: what the bases miss is fixed
        by per-model exceptions (see ``summary()["refit_suggested"]``). ``device``: where the
        projection runs (default: "cuda" when torch sees a GPU, as for ``convert``).
        """
        from .appending import append

        return append(self, source, id=id, format=format, progress=progress, max_error=max_error,
                      max_delta_error=max_delta_error, device=device)

    def extend(self, sources, *, format: str | None = None, progress: bool = False, max_error: float | None = None,
               max_delta_error: float | None = None, device: str | None = None, cancel=None,
               skip_existing: bool = False) -> list[dict]:
        """Append every checkpoint ``sources`` names (paths, folders, globs, Checkpoint objects or
        ``{model_id: state_dict}``, as for ``convert``) with one commit: all of them become visible
        together, or none does; the means and bases are read once. Their manifest entries.
        ``progress``: True or a callback ``(done, total, model id)``; ``cancel``: a
        ``threading.Event`` that stops before the next model (nothing is committed);
        ``skip_existing``: leave out checkpoints whose id the store already has (else they are
        refused, and nothing is added).

        >>> store = uwsfmt.open("family.uws", mode="a")  # doctest: +SKIP
        >>> [e["id"] for e in store.extend("ft/new/*.safetensors")]  # doctest: +SKIP
        ['task-41', 'task-42']
        """
        from .appending import extend

        return extend(self, sources, format=format, progress=progress, max_error=max_error,
                      max_delta_error=max_delta_error, device=device, cancel=cancel, skip_existing=skip_existing)

    def plan_append(self, sources, *, format: str | None = None, skip_existing: bool = False) -> dict:
        """What ``extend(sources)`` would do, from the checkpoints' headers (nothing written): the
        new model ids, those already here, and every reason it would be refused (``conflicts``)."""
        from .appending import plan_append

        return plan_append(self, sources, format=format, skip_existing=skip_existing)

    def project(self, source, *, format: str | None = None, device: str | None = None) -> dict:
        """Coefficients and errors of an unseen checkpoint, without adding it."""
        from .appending import project

        return project(self, source, format=format, device=device)

    def export(self, model: ModelRef, out: str, *, format: str = "safetensors", **kw) -> str:
        from .export import export

        return export(self, model, out, format=format, **kw)

    def validate(self, *, deep: bool = False, notes: list[str] | None = None) -> list[str]:
        """Problems found (empty: valid); see :func:`uwsfmt.validate`. ``notes`` receives what deep checking could not do."""
        from .validate import validate_store

        return validate_store(self, deep=deep, notes=notes)

    def close(self) -> None:
        self.clear_cache()
        with self._lock:
            if self._zip is not None:
                self._zip.close()
                self._zip = None
        try:
            self._zstore.close()
        except Exception:
            pass

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<uwsfmt.Store {self.path!r}: {self.n_models} models, {len(self.manifest['tensors'])} tensors, format {self.format_version}>"


@contextlib.contextmanager
def _damaged(store: Store, model: ModelRef, name: str | None = None):
    """Turn what a damaged or tampered store makes the decoders raise into a FormatError naming
    the model (and tensor): the manifest passed the schema, so its arrays and slots disagree."""
    try:
        yield
    except UWSError:
        raise
    except torch.cuda.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, IndexError, KeyError, TypeError, AttributeError, MemoryError) as e:
        what = f"model {model!r}" + (f", tensor {name!r}" if name is not None else "")
        raise FormatError(f"{store.path}: {what} cannot be rebuilt ({_short(e)}); the store is damaged or was tampered with "
                          "(run `uwsfmt validate` on it)") from None


def _wants(into: dict[str, torch.Tensor] | None, name: str) -> bool:
    return into is not None and name in into


def _place(into: dict[str, torch.Tensor], name: str, t: torch.Tensor, path: str) -> torch.Tensor:
    """Copy ``t`` into the caller's tensor ``into[name]`` (casting like ``load_state_dict``)."""
    d = into[name]
    if d is t:
        return d
    if tuple(d.shape) != tuple(t.shape):
        raise ConflictError(f"{path}: tensor {name!r} is {list(t.shape)} in the store but {list(d.shape)} in the module; "
                            "load it into a module of the family's architecture")
    d.copy_(t)
    return d


def _target(into: dict[str, torch.Tensor], e: dict, cdt: torch.dtype, dev: torch.device, *, half: bool = False
            ) -> torch.Tensor | None:
    """The caller's tensor for subspace tensor ``e`` when it can receive the rebuild directly: in
    the compute dtype, or (``half``) in bfloat16 / float16, which take the rounded rebuild."""
    d = into.get(e["name"])
    if d is None or not (d.dtype == cdt or (half and d.dtype in subspace.HALF)):
        return None
    if d.device != dev or not d.is_contiguous() or list(d.shape) != list(e["shape"]):
        return None
    return d


def _returned_dtype(e: dict, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a reader returns tensor ``e`` in: ``dtype`` where asked for and the tensor is
    floating point, else its source dtype."""
    return dtype if (dtype is not None and dtypes.is_float(e["dtype"])) else dtypes.torch_dtype(e["dtype"])


def _implied_shape(e: dict, field: str) -> tuple[int, int]:
    """Shape the manifest implies for a subspace tensor's mean / left / right array (spec section 13)."""
    m, n = e["view"]
    kl, kr = e["rank"]
    return {"mean": (m, n), "left": (m, kl), "right": (n, kr)}[field]


def _group_key(e: dict) -> tuple:
    return (e["mode"], tuple(e["view"]), tuple(x or 0 for x in e["rank"]), e.get("mean") is not None, e["dtype"] == "float64")


def _slots_of(e: dict) -> list[dict]:
    if e["encoding"] == "dense":
        return [e["data"]]
    out = [e["coefficients"]]
    r = e.get("residual")
    if r:
        out += [r[k] for k in ("codes", "scales", "values") if k in r]
    return out


def open(path: str | os.PathLike, *, mode: str = "r") -> Store:  # noqa: A001 - mirrors zarr.open
    """Open a UWS store (directory or .zip) lazily: only the manifest is read.

    >>> store = uwsfmt.open("family.uws")  # doctest: +SKIP
    >>> store.model_ids[:2]  # doctest: +SKIP
    ['model-000', 'model-001']
    """
    path = os.fspath(path)
    zstore = _open_zarr_store(path, mode)
    manifest = read_manifest(zstore, path)
    try:
        return Store(path, zstore, manifest)
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # fields the schema leaves open (LoRA records)
        raise FormatError(f"{path}: the manifest cannot be indexed ({_short(e)}); the store is damaged") from None


def dumps_manifest(m: dict) -> str:
    return json.dumps(m, allow_nan=False)
