"""A UWS store on Zarr: open, read models and tensors, append, commit.

The manifest (root ``zarr.json`` attribute ``uws``) is the committed state: which models and
tensors exist and where their values are. Writers add data first and replace the manifest
last, atomically, so a crash leaves the previous committed state readable.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import fnmatch
import itertools
import math
import os
import threading
import zipfile
from collections.abc import Callable, Iterable
from typing import Any, Self, TypeVar, overload

import numpy as np
import torch
import zarr
import zarr.abc.store
from zarr.storage import FsspecStore, LocalStore, ZipStore

from uwsfmt import encodings, report
from uwsfmt.encodings import exception as exception_enc
from uwsfmt.encodings import lora as lora_enc
from uwsfmt.encodings import subspace
from uwsfmt.encodings.base import ReadContext
from uwsfmt.errors import FormatError, NotFoundError, UWSError
from uwsfmt.io import remote, shards
from uwsfmt.numerics.device import resolve_device
from uwsfmt.reader import compat, declared
from uwsfmt.reader.manifest import (
    MAX_ARRAY_METADATA_BYTES,
    MAX_CHUNK_BYTES,
    STORAGE_DTYPES,
    check_array_metadata,
    json_size,
    open_zarr_store,
    read_manifest,
    short,
)

ModelRef = str | int
#: requests in flight at once when a remote store's shared arrays are fetched
REMOTE_CONCURRENCY = 32
#: what names a store: a local path, a URL, or a zarr store object
StoreLike = str | os.PathLike | zarr.abc.store.Store


@dataclasses.dataclass(frozen=True)
class Location:
    """Where an open store can be opened again (to write to it): its URL or path as given (None
    for a zarr store object the caller made) and the fsspec ``storage_options`` it was opened with.
    Kept off the manifest, the summary and every message: a URL may carry credentials."""

    url: str | None
    storage_options: dict | None = None

    @property
    def remote(self) -> bool:
        return remote.is_url(self.url)


class StoreReader:
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
        self.location = Location(path)
        self._seen: set[str] = set()  # remote stores: shared arrays fetched (or prefetched) once
        self._fetched: dict[str, Any] = {}  # prefetched arrays, each taken once by read_array

    # ------------------------------------------------------------------ metadata
    def committed(self, manifest: dict) -> None:
        """Take ``manifest`` as the store's committed state (after an append): indexes rebuilt, array handles dropped."""
        self.manifest = manifest
        self._index_cache()
        self._arrays.clear()
        self._row_readers.clear()
        self._chunked.clear()

    def tensor_position(self, name: str) -> int:
        """The position of tensor ``name`` in the tensor table (and in each model's error lists)."""
        return self._tensor_index[name]

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
        except KeyError as e:
            near = fnmatch.filter(self.model_ids, f"*{model}*")[:5]
            hint = f" Did you mean: {', '.join(near)}?" if near else f" Known ids: {', '.join(self.model_ids[:8])}{'...' if self.n_models > 8 else ''}"
            raise NotFoundError(f"{self.path}: no model {model!r}.{hint}") from e

    def tensor_entry(self, name: str) -> dict:
        try:
            i = self._tensor_index[name] if name in self._tensor_index else self._lora_index[name]
            return self.manifest["tensors"][i]
        except KeyError as e:
            raise NotFoundError(f"{self.path}: no tensor {name!r} (store has {len(self._tensor_index)} tensors)") from e

    def model_entry(self, model: ModelRef) -> dict:
        return self.manifest["models"][self.model_index(model)]

    # ------------------------------------------------------------------ arrays
    def array(self, path: str):
        a = self._arrays.get(path)
        if a is None:
            zf = self._zipfile() if type(self._zstore) is ZipStore else None  # one archive, not one per array
            size = json_size(self._zstore, self.path, f"{path}/zarr.json", zf)
            if size is None:
                raise FormatError(f"{self.path}: array {path!r} named by the manifest is missing (no {path}/zarr.json); the store is damaged")
            if size > MAX_ARRAY_METADATA_BYTES:
                raise FormatError(f"{self.path}: {path}/zarr.json is {size} bytes, above the {MAX_ARRAY_METADATA_BYTES}-byte "
                                  "limit for array metadata; refusing to parse it (the store is damaged or hostile)")
            try:
                a = zarr.open_array(self._zstore, path=path, mode="r", zarr_format=3)
            except Exception as e:
                raise FormatError(f"{self.path}: array {path!r} named by the manifest cannot be opened ({short(e)}); the store is damaged") from e
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
        return reader.dtype if reader is not None else self.array(path).dtype

    def prefetch(self, entries: list[dict]) -> None:
        """On a remote store, fetch the shared arrays (means, bases, shared values) of ``entries``
        not read yet, many requests at a time: read one by one, a model's first read would wait
        for one round trip per array (thousands for a large family). The next reads take them
        from memory once (:meth:`read_array`); local stores read them as they go."""
        if isinstance(self._zstore, (LocalStore, ZipStore)):
            return
        paths = []
        for e in entries:
            for field in ("mean", "left", "right"):
                if isinstance(e.get(field), str):
                    paths.append(e[field])
            if e.get("encoding") == "shared" and isinstance(e.get("data"), dict) and isinstance(e["data"].get("path"), str):
                paths.append(e["data"]["path"])
        with self._lock:
            paths = [p for p in dict.fromkeys(paths) if p not in self._seen]
            self._seen.update(paths)
        if len(paths) < 2:
            return
        with concurrent.futures.ThreadPoolExecutor(min(REMOTE_CONCURRENCY, len(paths)), thread_name_prefix="uwsfmt-fetch") as ex:
            for p, a in zip(paths, ex.map(self._fetch, paths)):
                self._fetched[p] = a

    def _fetch(self, path: str) -> np.ndarray | _Failed:
        try:
            return self.read_array(path)
        except FormatError as e:
            return _Failed(e)  # raised where the array is used, by the reader that needs it

    def read_array(self, path: str, shape: Iterable[int] | None = None, out: np.ndarray | None = None,
                   most: int | None = None) -> np.ndarray:
        """The whole array at ``path``; ``shape``: what the manifest implies, or ``most``: how many
        values it may hold at most (either checked before anything is allocated or read).
        ``out``: a C-contiguous buffer of the array's shape and storage dtype to read into (used
        when it fits, else a new array is returned)."""
        got = self._fetched.pop(path, None)
        if got is not None:
            if isinstance(got, _Failed):
                raise got.error
            if shape is not None and got.shape != tuple(shape):
                raise FormatError(f"{self.path}: array {path!r} has shape {list(got.shape)} but the manifest implies "
                                  f"{list(shape)}; the store is damaged or was tampered with")
            if most is not None and got.size > most:
                raise FormatError(f"{self.path}: array {path!r} has shape {list(got.shape)}, more than the {most} values the "
                                  "manifest allows it; the store is damaged or was tampered with")
            return got
        reader = self._chunked_reader(path)
        arr = self.array(path) if reader is None else None
        have = reader.shape if reader is not None else tuple(arr.shape)  # type: ignore[union-attr]  # arr is set when reader is None
        if shape is not None and have != tuple(shape):
            raise FormatError(f"{self.path}: array {path!r} has shape {list(have)} but the manifest implies "
                              f"{list(shape)}; the store is damaged or was tampered with")
        if most is not None and math.prod(have) > most:
            raise FormatError(f"{self.path}: array {path!r} has shape {list(have)}, more than the {most} values the "
                              "manifest allows it; the store is damaged or was tampered with")
        if reader is not None:
            fits = out is not None and out.dtype == reader.dtype and out.shape == reader.shape and out.flags.c_contiguous
            return reader.read_into(out if fits and out is not None else np.empty(reader.shape, reader.dtype))
        assert arr is not None  # no direct reader: zarr's array
        try:
            return arr[...]
        except Exception as e:
            raise FormatError(f"{self.path}: array {path!r} cannot be read ({short(e)}); the store is damaged") from e

    def _pack(self, info: dict):
        arr = self.array(info["path"])
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
                raise FormatError(f"{self.path}: model #{index} cannot be read from {info['path']} ({e}); the store is damaged") from e
            t = torch.from_numpy(np.ascontiguousarray(row))
            rows[pack] = t.to(device, non_blocking=True) if device.type != "cpu" else t
        return rows

    def cached(self, key: tuple, make: Callable[[], Any]) -> Any:
        """``make()``, computed once per ``key`` and kept until :meth:`clear_cache` (bases, shared tensors)."""
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
        self._seen.clear()
        self._fetched.clear()

    def compute_dtype(self, e: dict) -> torch.dtype:
        """The dtype tensor ``e`` is rebuilt in: float64 for float64 tensors, else float32."""
        return torch.float64 if e["dtype"] == "float64" else torch.float32

    def group_arrays(self, key: tuple, entries: list[dict], device: torch.device
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Stacked M / L / R of same-shape subspace tensors, cached on the device."""

        def make():
            cdt = self.compute_dtype(entries[0])
            def stack(field):
                if entries[0].get(field) is None:
                    return None
                # float16 means (format 1.1) stay float16 here: half the bytes cached and read per
                # load; readers convert them exactly as they add them (native kernel, torch's promotion)
                dt = torch.float16 if field == "mean" and cdt == torch.float32 and all(
                    self._storage_dtype(e[field]) == np.float16 for e in entries) else cdt
                # read straight into the stacked host tensor (no per-array allocation and copy)
                out = torch.empty((len(entries), *subspace.implied_shape(entries[0], field)), dtype=dt)
                for e, o in zip(entries, out):
                    view = o.numpy()
                    got = self.read_array(e[field], subspace.implied_shape(e, field), out=view)
                    if got is not view:  # another storage dtype, or read by zarr-python
                        o.copy_(torch.from_numpy(got))
                return out.to(device)
            return stack("mean"), stack("left"), stack("right")

        # the members are part of the key: state_dict(names=...) stacks a part of a group
        return self.cached(("group", key, tuple(e["name"] for e in entries), str(device)), make)

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
        dev = resolve_device(device)
        idx = self.model_index(model)
        wanted = None if names is None else list(dict.fromkeys(names))
        entries = self.manifest["tensors"] if wanted is None else list({id(e): e for e in map(self.tensor_entry, wanted)}.values())
        compat.refuse(self.path, self.manifest, idx, (e["name"] for e in entries), self._unknown)
        declared.refuse(self.path, self._mismatched, (e["name"] for e in entries))
        rows = self._rows(idx, dev) if self.manifest["packs"] else {}
        self.prefetch(entries)
        exceptions = self.manifest["models"][idx].get("exceptions") or ()
        ctx = ReadContext(self, idx, rows, dev, into=into, dtype=dtype, excepted={x["tensor"] for x in exceptions})
        groups = encodings.by_encoding(entries, self.path)
        decoded: dict[str, torch.Tensor] = {}
        for enc, group in groups.items():
            decoded.update(enc.read(ctx, group))
        for x in exceptions:  # appended models the bases missed
            if x["tensor"] in decoded:
                e = self.tensor_entry(x["tensor"])
                arrays = {a: self.read_array(f"{x['path']}/{a}") for a in exception_enc.array_names(x)}
                decoded[x["tensor"]] = exception_enc.decode(x, arrays, decoded[x["tensor"]], e["shape"], e["dtype"], dev)
        result = {}
        for e in entries:
            for name in encodings.for_entry(e).output_names(e):
                if name not in decoded or (wanted is not None and name not in wanted and e["name"] not in wanted):
                    continue
                t = decoded[name]
                if ctx.wants(name):  # the module's own tensor, in the module's dtype
                    result[name] = ctx.place(name, t)
                    continue
                want = ctx.returned_dtype(e) if name == e["name"] else t.dtype
                result[name] = t.to(want) if t.dtype != want else t
        if dev.type == "cpu" and rows:  # row buffers are reused by the next call: nothing returned may share them
            reused = {r.untyped_storage().data_ptr() for r in rows.values()}
            for k, v in result.items():
                if v.device.type == "cpu" and v.untyped_storage().data_ptr() in reused:
                    result[k] = v.clone()
        return result

    def tensor(
        self, model: ModelRef, name: str, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """One tensor of one model; reads only that tensor's slots, basis and mean."""
        with _damaged(self, model, name):
            return self._tensor(model, name, device=device, dtype=dtype)

    def _tensor(self, model: ModelRef, name: str, *, device, dtype) -> torch.Tensor:
        dev = resolve_device(device)
        e = self.tensor_entry(name)
        idx = self.model_index(model)
        compat.refuse(self.path, self.manifest, idx, [e["name"]], self._unknown)
        declared.refuse(self.path, self._mismatched, [e["name"]])
        if e["name"] != name:  # a LoRA factor (the module's own name gives the dense update)
            sd = self.state_dict(idx, device=dev, dtype=dtype, names=[name])
            if name not in sd:
                raise NotFoundError(f"{self.path}: model {self.model_entry(idx)['id']!r} has no LoRA module {e['name']!r}, so no {name!r}")
            return sd[name]
        enc = encodings.for_entry(e, self.path)
        if not enc.reads_single(e) or any(x["tensor"] == name for x in self.manifest["models"][idx].get("exceptions") or ()):
            return self.state_dict(idx, device=dev, dtype=dtype, names=[name])[name]
        ctx = ReadContext(self, idx, self._slot_rows(idx, e, dev), dev, dtype=dtype, single=True)
        t = enc.read(ctx, [e])[name]
        return t.to(ctx.returned_dtype(e))

    def delta(self, model: ModelRef, module: str, *, device: str | torch.device | None = None,
              dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense update s * B @ A of one LoRA module of one adapter, in the adapted weight's layout.

        >>> store.delta("task-3", "base_model.model.fc1")  # doctest: +SKIP
        """
        return lora_enc.delta(self, model, module, device=device, dtype=dtype)

    def _slot_rows(self, idx: int, e: dict, dev) -> dict[str, torch.Tensor]:
        """Sparse pack rows holding only the slots of tensor ``e`` (partial chunk reads)."""
        rows: dict[str, torch.Tensor] = {}
        for s in encodings.for_entry(e, self.path).slots(e):
            if s["length"] == 0:
                continue
            arr = self._pack(self.manifest["packs"][s["pack"]])
            if arr.shape[0] <= idx:
                raise FormatError(f"{self.path}: pack {s['pack']} has {arr.shape[0]} rows but model #{idx} is committed; the store is damaged")
            try:
                vals = torch.from_numpy(np.ascontiguousarray(arr[idx, s["offset"]: s["offset"] + s["length"]]))
            except Exception as e:
                raise FormatError(f"{self.path}: model #{idx} cannot be read from pack {s['pack']} ({short(e)}); the store is damaged") from e
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
        null = report.null_spectrum(total, dim, other * max(samples, 1), len(vals))
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
        return report.summary(self)

    def tensor_table(self) -> list[dict]:
        return report.tensor_table(self)

    def model_table(self) -> list[dict]:
        return report.model_table(self)

    def nbytes(self) -> int | None:
        """Bytes the store takes in storage (None where the server cannot list them, e.g. HTTP)."""
        if isinstance(self._zstore, (LocalStore, ZipStore)):
            return report.store_bytes(str(self._zstore.root if isinstance(self._zstore, LocalStore) else self._zstore.path))
        if isinstance(self._zstore, FsspecStore):
            return remote.total_bytes(self._zstore)
        return None

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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<uwsfmt.Store {self.path!r}: {self.n_models} models, {len(self.manifest['tensors'])} tensors, format {self.format_version}>"


R = TypeVar("R", bound=StoreReader)


@dataclasses.dataclass
class _Failed:
    """A prefetched array that could not be read: its error, raised where the array is used."""

    error: FormatError


@contextlib.contextmanager
def _damaged(store: StoreReader, model: ModelRef, name: str | None = None):
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
        raise FormatError(f"{store.path}: {what} cannot be rebuilt ({short(e)}); the store is damaged or was tampered with "
                          "(run `uwsfmt validate` on it)") from e


@overload
def open_reader(path: StoreLike, *, mode: str = "r", storage_options: dict | None = None) -> StoreReader: ...
@overload
def open_reader(path: StoreLike, *, mode: str = "r", storage_options: dict | None = None, cls: type[R]) -> R: ...
def open_reader(path: StoreLike, *, mode: str = "r", storage_options: dict | None = None,
                cls: type[StoreReader] = StoreReader) -> StoreReader:
    """Open a UWS store lazily: only the manifest is read. ``path``: a directory, a .zip file, a
    URL (``s3://``, ``gs://``, ``https://``, any fsspec URL; ``storage_options`` go to fsspec:
    endpoint, credentials, ...) or a zarr store object. ``mode``: "r" (read only) or "a"
    (appendable); ``cls``: the class to open it as (:class:`uwsfmt.Store`).

    >>> store = open_reader("family.uws")  # doctest: +SKIP
    >>> store.model_ids[:2]  # doctest: +SKIP
    ['model-000', 'model-001']
    """
    if isinstance(path, zarr.abc.store.Store):  # a zarr store object the caller made
        zstore, path, url = path, str(path), None
    else:
        url = remote.local_path(os.fspath(path))
        zstore = open_zarr_store(url, mode, storage_options)
        path = remote.redact(url)
    manifest = read_manifest(zstore, path)
    try:
        store = cls(path, zstore, manifest)
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # fields the schema leaves open (LoRA records)
        raise FormatError(f"{path}: the manifest cannot be indexed ({short(e)}); the store is damaged") from e
    store.location = Location(url, storage_options)
    return store
