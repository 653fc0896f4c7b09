"""A UWS store on Zarr: open, read models and tensors, append, commit.

The manifest (root ``zarr.json`` attribute ``uws``) is the committed state: which models and
tensors exist and where their values are. Writers add data first and replace the manifest
last, atomically, so a crash leaves the previous committed state readable.
"""

from __future__ import annotations

import fnmatch
import json
import os
import zipfile
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import zarr
from zarr.storage import LocalStore, ZipStore

from . import dtypes, layout
from .encodings import dense as dense_enc
from .encodings import residual as residual_enc
from .encodings.slots import take
from .errors import FormatError, NotFoundError, StoreError, VersionError

#: a manifest larger than this is refused on open (hostile stores must not exhaust memory)
MAX_MANIFEST_BYTES = 256 << 20

ModelRef = str | int


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cpu")
    return torch.device(device)


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


def _root_json_size(zstore, path: str) -> int | None:
    if isinstance(zstore, LocalStore):
        p = os.path.join(path, "zarr.json")
        return os.path.getsize(p) if os.path.exists(p) else None
    try:
        with zipfile.ZipFile(path) as z:
            return z.getinfo("zarr.json").file_size
    except KeyError:
        return None


def read_manifest(zstore, path: str) -> dict:
    """Load and check the manifest: size limit, JSON, format version, schema."""
    size = _root_json_size(zstore, path)
    if size is None:
        raise FormatError(f"{path}: not a UWS store: no zarr.json at its root")
    if size > MAX_MANIFEST_BYTES:
        raise FormatError(
            f"{path}: zarr.json is {size} bytes, above the {MAX_MANIFEST_BYTES}-byte limit; "
            "refusing to parse it (the store is damaged or hostile)"
        )
    try:
        root = zarr.open_group(zstore, mode="r")
        attrs = dict(root.attrs)
    except Exception as e:  # zarr raises many types for a broken hierarchy
        raise FormatError(f"{path}: the root zarr.json is not a readable Zarr v3 group ({e})") from None
    m = attrs.get("uws")
    if not isinstance(m, dict):
        raise FormatError(f"{path}: a Zarr group but not a UWS store (no 'uws' attribute in zarr.json)")
    check_version(m.get("format_version"), path)
    from .schema import validate_manifest

    validate_manifest(m, path)
    if m.get("state") != "complete":
        raise FormatError(
            f"{path}: the store is marked {m.get('state')!r}, not 'complete': a conversion was "
            "interrupted. Delete it and run the conversion again."
        )
    return m


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

    # ------------------------------------------------------------------ metadata
    def _index_cache(self) -> None:
        m = self.manifest
        self._model_index = {e["id"]: i for i, e in enumerate(m["models"])}
        self._tensor_index = {e["name"]: i for i, e in enumerate(m["tensors"])}

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
            return self.manifest["tensors"][self._tensor_index[name]]
        except KeyError:
            raise NotFoundError(f"{self.path}: no tensor {name!r} (store has {len(self._tensor_index)} tensors)") from None

    def model_entry(self, model: ModelRef) -> dict:
        return self.manifest["models"][self.model_index(model)]

    # ------------------------------------------------------------------ arrays
    def _array(self, path: str):
        a = self._arrays.get(path)
        if a is None:
            try:
                a = zarr.open_array(self._zstore, path=path, mode="r")
            except Exception as e:
                raise FormatError(f"{self.path}: array {path!r} named by the manifest cannot be opened ({e}); the store is damaged") from None
            self._arrays[path] = a
        return a

    def read_array(self, path: str) -> np.ndarray:
        try:
            return self._array(path)[...]
        except FormatError:
            raise
        except Exception as e:
            raise FormatError(f"{self.path}: array {path!r} cannot be read ({e}); the store is damaged") from None

    def _rows(self, index: int, device: torch.device) -> dict[str, torch.Tensor]:
        """One model's pack rows, each read with one call (a handful of storage requests)."""
        rows = {}
        for pack, info in self.manifest["packs"].items():
            arr = self._array(info["path"])
            if arr.shape[0] <= index:
                raise FormatError(
                    f"{self.path}: pack {info['path']} has {arr.shape[0]} rows but model #{index} is committed; the store is damaged"
                )
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

    def _float_array(self, path: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(self.read_array(path)).to(device=device, dtype=dtype)

    def _compute_dtype(self, e: dict) -> torch.dtype:
        return torch.float64 if e["dtype"] == "float64" else torch.float32

    def _group_arrays(self, key: tuple, entries: list[dict], device: torch.device):
        """Stacked M / L / R of same-shape subspace tensors, cached on the device."""

        def make():
            cdt = self._compute_dtype(entries[0])
            def stack(field):
                if entries[0].get(field) is None:
                    return None
                return torch.stack([self._float_array(e[field], device, cdt) for e in entries])
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
        dev = _device(device)
        idx = self.model_index(model)
        entries = self.manifest["tensors"] if names is None else [self.tensor_entry(n) for n in names]
        rows = self._rows(idx, dev) if self.manifest["packs"] else {}
        out: dict[str, torch.Tensor] = {}
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for e in entries:
            enc = e["encoding"]
            if enc == "subspace":
                groups[_group_key(e)].append(e)
            elif enc == "shared":
                out[e["name"]] = self._shared(
                    ("shared", e["name"], str(dev)),
                    lambda e=e: dtypes.from_storage(self.read_array(e["data"]["path"]), e["dtype"]).to(dev),
                ).clone()
            elif enc == "dense":
                if e["data"].get("per_model"):
                    out[e["name"]] = dtypes.from_storage(self.read_array(f"{e['node']}/models/{idx}"), e["dtype"]).to(dev)
                else:
                    out[e["name"]] = dense_enc.decode(e, rows).clone()
            else:
                raise FormatError(f"{self.path}: tensor {e['name']!r} has unknown encoding {enc!r}")
        for key, group in groups.items():
            for e, w in zip(group, self._decode_group(key, group, rows, dev)):
                out[e["name"]] = w
        result = {}
        for e in entries:
            t = out[e["name"]]
            want = dtype if (dtype is not None and dtypes.is_float(e["dtype"])) else dtypes.torch_dtype(e["dtype"])
            result[e["name"]] = t.to(want) if t.dtype != want else t
        return result

    def _decode_group(self, key: tuple, group: list[dict], rows, dev) -> list[torch.Tensor]:
        mean, left, right = self._group_arrays(key, group, dev)
        e0 = group[0]
        cdt = self._compute_dtype(e0)
        m, n = e0["view"]
        cshape = e0["coefficients"]["shape"]
        c = torch.stack([take(rows, e["coefficients"]).reshape(cshape) for e in group]).to(cdt)
        w = c
        if left is not None:
            w = torch.bmm(left, w)
        if right is not None:
            w = torch.bmm(w, right.transpose(1, 2))
        if mean is not None:
            w = w + mean if w.shape == mean.shape else mean.expand(len(group), m, n) + w
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
        dev = _device(device)
        e = self.tensor_entry(name)
        idx = self.model_index(model)
        if e["encoding"] == "shared" or (e["encoding"] == "dense" and e["data"].get("per_model")):
            return self.state_dict(idx, device=dev, dtype=dtype, names=[name])[name]
        rows = self._slot_rows(idx, e, dev)
        if e["encoding"] == "dense":
            t = dense_enc.decode(e, rows).clone()
        else:
            t = self._decode_group(_group_key(e) + ("single", name), [e], rows, dev)[0]
        want = dtype if (dtype is not None and dtypes.is_float(e["dtype"])) else dtypes.torch_dtype(e["dtype"])
        return t.to(want)

    def _slot_rows(self, idx: int, e: dict, dev) -> dict[str, torch.Tensor]:
        """Sparse pack rows holding only the slots of tensor ``e`` (partial chunk reads)."""
        rows: dict[str, torch.Tensor] = {}
        for s in _slots_of(e):
            if s["length"] == 0:
                continue
            arr = self._array(self.manifest["packs"][s["pack"]]["path"])
            vals = torch.from_numpy(np.ascontiguousarray(arr[idx, s["offset"]: s["offset"] + s["length"]]))
            full = rows.get(s["pack"])
            if full is None:
                full = torch.zeros(self.manifest["packs"][s["pack"]]["width"], dtype=vals.dtype)
                rows[s["pack"]] = full
            full[s["offset"]: s["offset"] + s["length"]] = vals
        return {k: v.to(dev) for k, v in rows.items()}

    def load_into(self, module: torch.nn.Module, model: ModelRef, *, strict: bool = True) -> torch.nn.Module:
        """Load a model's weights into ``module`` (on the module's device and dtypes)."""
        try:
            p = next(module.parameters())
            dev = p.device
        except StopIteration:
            dev = torch.device("cpu")
        sd = self.state_dict(model, device=dev)
        missing, unexpected = module.load_state_dict(sd, strict=False)
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
        vals = self.read_array(e["spectrum"][side]).astype(np.float64)
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
        return {"side": side, "eigenvalues": vals, "kept": k, "explained": cum, "null": null,
                "tau": self.manifest["build"]["settings"].get("tau")}

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
    def append(self, source, *, id: str | None = None, format: str | None = None, progress: bool = False) -> dict:
        """Project a new checkpoint onto the existing bases and commit it as a new model."""
        from .build import append

        return append(self, source, id=id, format=format, progress=progress)

    def project(self, source, *, format: str | None = None) -> dict:
        """Coefficients and errors of an unseen checkpoint, without adding it."""
        from .build import project

        return project(self, source, format=format)

    def export(self, model: ModelRef, out: str, *, format: str = "safetensors", **kw) -> str:
        from .export import export

        return export(self, model, out, format=format, **kw)

    def validate(self, *, deep: bool = False) -> list[str]:
        from .validate import validate_store

        return validate_store(self, deep=deep)

    def close(self) -> None:
        self.clear_cache()
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
    return Store(path, zstore, manifest)


def dumps_manifest(m: dict) -> str:
    return json.dumps(m, allow_nan=False)
