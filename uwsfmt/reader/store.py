"""A UWS store on Zarr: open, read models and tensors, append, commit.

The manifest (root ``zarr.json`` attribute ``uws``) is the committed state: which models and
tensors exist and where their values are. Writers add data first and replace the manifest
last, atomically, so a crash leaves the previous committed state readable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import itertools
import math
import os
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
from uwsfmt.io import remote
from uwsfmt.numerics.device import resolve_device
from uwsfmt.reader import compat, declared
from uwsfmt.reader.arrays import StoreArrays
from uwsfmt.reader.manifest import (
    open_zarr_store,
    read_manifest,
    short,
)

ModelRef = str | int
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


class StoreReader(StoreArrays):
    """An open UWS store. Opening reads only the manifest; arrays are read on demand.

    >>> store = uwsfmt.open("family.uws")  # doctest: +SKIP
    >>> sd = store.state_dict("model-003", device="cuda")  # doctest: +SKIP
    """

    def __init__(self, path: str, zstore, manifest: dict):
        super().__init__(path, zstore, manifest)
        self._index_cache()
        self._cache: dict[tuple, Any] = {}
        self.location = Location(path)

    # ------------------------------------------------------------------ metadata
    def committed(self, manifest: dict) -> None:
        """Take ``manifest`` as the store's committed state (after an append): indexes rebuilt, array handles dropped."""
        self.manifest = manifest
        self._index_cache()
        self.drop_handles()

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
        self.drop_handles(fetched=True)

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
                    self.storage_dtype(e[field]) == np.float16 for e in entries) else cdt
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
        rows = self.model_rows(idx, dev) if self.manifest["packs"] else {}
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
            arr = self.pack_array(self.manifest["packs"][s["pack"]])
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
