"""A UWS 1.x reader written from ``spec/uws-1.md`` alone.

tensorstore reads the Zarr v3 arrays, ``json`` the manifest, numpy/torch do the math. It does
not import ``uwsfmt`` (a test checks that): it exists to show that the spec, not the library, is
enough to rebuild every model of a store. Section numbers below refer to the spec.

>>> store = SpecReader("spec/examples/example.uws")  # doctest: +SKIP
>>> sd = store.model(0)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path

import jsonschema
import numpy as np
import tensorstore as ts
import torch

SCHEMA = Path(__file__).resolve().parents[1] / "spec" / "schema" / "manifest.schema.json"
MAX_MANIFEST_BYTES = 256 << 20  # §13
PATH_RE = re.compile(r"^(?!/)(?!.*//)(?!.*/$)(?!.*(^|/)\.\.?(/|$))[A-Za-z0-9._%~/-]+$")  # §8
MAJOR = 1

# §4: logical dtype -> (torch dtype, storage dtype, reinterpret the storage bits?)
DTYPES = {
    "float64": (torch.float64, "float64"),
    "float32": (torch.float32, "float32"),
    "float16": (torch.float16, "float16"),
    "bfloat16": (torch.bfloat16, "uint16"),
    "float8_e4m3fn": (torch.float8_e4m3fn, "uint8"),
    "float8_e5m2": (torch.float8_e5m2, "uint8"),
    "int64": (torch.int64, "int64"),
    "int32": (torch.int32, "int32"),
    "int16": (torch.int16, "int16"),
    "int8": (torch.int8, "int8"),
    "uint8": (torch.uint8, "uint8"),
    "bool": (torch.bool, "bool"),
}
BIT_TYPES = {"bfloat16": np.int16, "float8_e4m3fn": np.int8, "float8_e5m2": np.int8}


class SpecError(Exception):
    """The store is not a valid UWS 1.x store (by the spec)."""


def logical(a: np.ndarray, dtype: str) -> torch.Tensor:
    """§4: storage values -> logical tensor (raw bits reinterpreted, never converted)."""
    a = np.ascontiguousarray(a)
    if dtype in BIT_TYPES:
        return torch.from_numpy(a.view(BIT_TYPES[dtype])).view(DTYPES[dtype][0])
    return torch.from_numpy(a)


def compute_dtype(dtype: str) -> torch.dtype:
    return torch.float64 if dtype == "float64" else torch.float32


def unpack_codes(codes: np.ndarray, bits: int, count: int) -> np.ndarray:
    """§6.4: ``count`` codes, ``8 // bits`` per byte, first element in the lowest bits."""
    codes = np.asarray(codes, dtype=np.uint8).reshape(-1)
    if len(codes) != -(-count * bits // 8):
        raise SpecError(f"{len(codes)} code bytes for {count} {bits}-bit codes")
    if bits == 8:
        return codes[:count]
    per = 8 // bits
    shifts = np.arange(per, dtype=np.uint8) * bits
    return ((codes[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:count]


def dequantize(bits: int, view: tuple[int, int], *, codes=None, scales=None, values=None) -> torch.Tensor:
    """§6.4: a residual / correction as a float32 (m, n) matrix."""
    m, n = view
    if bits == 16:
        return torch.from_numpy(np.asarray(values, dtype=np.float16).reshape(m, n).astype(np.float32))
    if bits not in (1, 2, 4, 8):
        raise SpecError(f"unknown residual bits {bits}")
    code = unpack_codes(codes, bits, m * n).astype(np.int32)
    q = 2 * code - 1 if bits == 1 else code - (1 << (bits - 1))  # 1 bit: the sign, 0 -> -1, 1 -> +1
    s = np.asarray(scales, dtype=np.float32).reshape(m)
    return torch.from_numpy(s[:, None] * q.reshape(m, n).astype(np.float32))  # one float32 rounding


class SpecReader:
    """Open a UWS store (directory or zip) and rebuild its models."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.path.abspath(os.fspath(path))
        if os.path.isdir(self.path):
            self._kv = lambda p: {"driver": "file", "path": f"{self.path}/{p}"}
        elif zipfile.is_zipfile(self.path):  # §11: read in place
            self._kv = lambda p: {"driver": "zip", "base": {"driver": "file", "path": self.path}, "path": p}
        else:
            raise SpecError(f"{self.path}: neither a directory nor a zip file")
        self.manifest = self._read_manifest()
        self._arrays: dict[str, ts.TensorStore] = {}
        self._cache: dict[str, np.ndarray] = {}

    # -------------------------------------------------------------- manifest (§3, §10, §12, §13)
    def _read_manifest(self) -> dict:
        kv = ts.KvStore.open(self._kv("")).result()
        r = kv.read("zarr.json").result()
        if r.state != "value":
            raise SpecError(f"{self.path}: no zarr.json at the root")
        if len(r.value) > MAX_MANIFEST_BYTES:
            raise SpecError(f"{self.path}: zarr.json above {MAX_MANIFEST_BYTES} bytes")
        root = json.loads(bytes(r.value), parse_constant=lambda c: (_ for _ in ()).throw(SpecError(f"non-JSON constant {c}")))
        if root.get("zarr_format") != 3 or root.get("node_type") != "group":
            raise SpecError(f"{self.path}: the root is not a Zarr v3 group")
        m = (root.get("attributes") or {}).get("uws")
        if not isinstance(m, dict):
            raise SpecError(f"{self.path}: no 'uws' attribute: not a UWS store")
        v = m.get("format_version")
        if not (isinstance(v, str) and re.fullmatch(r"[0-9]+\.[0-9]+", v)):
            raise SpecError(f"{self.path}: bad format_version {v!r}")
        if int(v.split(".")[0]) != MAJOR:
            raise SpecError(f"{self.path}: UWS format {v} is not readable by this reader (it reads {MAJOR}.x)")
        jsonschema.validate(m, json.loads(SCHEMA.read_text()))
        if m["state"] != "complete":
            raise SpecError(f"{self.path}: state {m['state']!r}: not a committed store")
        self._check(m)
        return m

    @staticmethod
    def _check(m: dict) -> None:
        n_t = len(m["tensors"])
        for mod in m["models"]:
            if len(mod["error"]) != n_t or len(mod["delta_error"]) != n_t:
                raise SpecError(f"model {mod['id']!r}: error lists do not match the tensor table")
        for what in ("id",):
            vals = [x[what] for x in m["models"]]
            if len(set(vals)) != len(vals):
                raise SpecError("duplicate model ids")
        names = [t["name"] for t in m["tensors"]]
        if len(set(names)) != len(names):
            raise SpecError("duplicate tensor names")
        paths = [p["path"] for p in m["packs"].values()]
        for t in m["tensors"]:
            paths.append(t["node"])
            if t["encoding"] == "subspace":
                paths += [t[k] for k in ("mean", "left", "right") if t[k]] + list(t["spectrum"].values())
                if t["view"][0] * t["view"][1] != int(np.prod(t["shape"], dtype=np.int64)):
                    raise SpecError(f"tensor {t['name']!r}: view does not hold its shape")
            elif t["encoding"] == "shared":
                paths.append(t["data"]["path"])
            for s in _slots(t):
                if s["length"] and s["offset"] + s["length"] > m["packs"][s["pack"]]["width"]:
                    raise SpecError(f"tensor {t['name']!r}: slot outside its pack")
        for mod in m["models"]:
            paths += [x["path"] for x in mod.get("exceptions") or ()]
        for p in paths:
            if not PATH_RE.match(p) or "//" in p or len(p) > 512:
                raise SpecError(f"path {p!r} is not a safe relative path (§8)")

    # -------------------------------------------------------------- arrays (§2)
    def _open(self, path: str) -> ts.TensorStore:
        a = self._arrays.get(path)
        if a is None:
            if not PATH_RE.match(path):
                raise SpecError(f"path {path!r} is not a safe relative path (§8)")
            a = ts.open({"driver": "zarr3", "kvstore": self._kv(path + "/")}, open=True, read=True).result()
            self._arrays[path] = a
        return a

    def array(self, path: str, *, cache: bool = False) -> np.ndarray:
        if cache and path in self._cache:
            return self._cache[path]
        a = self._open(path).read().result()
        if cache:
            self._cache[path] = a
        return a

    # -------------------------------------------------------------- models (§6)
    @property
    def model_ids(self) -> list[str]:
        return [x["id"] for x in self.manifest["models"]]

    def model(self, i: int) -> dict[str, torch.Tensor]:
        m = self.manifest
        n_models = len(m["models"])
        if not 0 <= i < n_models:
            raise IndexError(f"model index {i} out of range ({n_models} models)")
        rows = {}
        for d, info in m["packs"].items():  # one row per pack, committed rows only (§2.2, §10)
            arr = self._open(info["path"])
            if arr.dtype.numpy_dtype != np.dtype(d) or arr.shape[0] < n_models or arr.shape[1] != info["width"]:
                raise SpecError(f"pack {info['path']}: {arr.dtype} {arr.shape} does not match the manifest")
            rows[d] = arr[i].read().result()

        def take(s: dict) -> np.ndarray:
            if s["length"] == 0:
                return np.zeros(0, dtype=np.float32)
            return rows[s["pack"]][s["offset"]: s["offset"] + s["length"]]

        pre: dict[str, torch.Tensor] = {}  # values before the cast (compute dtype) or final values
        for e in m["tensors"]:
            enc, dt = e["encoding"], e["dtype"]
            if enc == "dense":
                if e["data"].get("per_model"):
                    pre[e["name"]] = logical(self.array(f"{e['node']}/models/{i}"), dt)
                else:
                    pre[e["name"]] = logical(take(e["data"]), dt).reshape(e["shape"])
            elif enc == "shared":
                pre[e["name"]] = logical(self.array(e["data"]["path"], cache=True), dt).reshape(e["shape"])
            elif enc == "subspace":
                pre[e["name"]] = self._subspace(e, take)
            else:
                raise SpecError(f"tensor {e['name']!r}: unknown encoding {enc!r}")
        by_name = {e["name"]: e for e in m["tensors"]}
        for x in m["models"][i].get("exceptions") or ():  # §6.6
            e = by_name.get(x["tensor"])
            if e is None or e["encoding"] not in ("subspace", "shared"):
                raise SpecError(f"model {i}: exception for {x['tensor']!r}, which cannot have one")
            if x["kind"] == "replace":
                pre[e["name"]] = logical(self.array(f"{x['path']}/value"), e["dtype"]).reshape(e["shape"])
            elif x["kind"] == "correct":
                view = tuple(x["view"])
                if x["bits"] == 16:
                    k = dequantize(16, view, values=self.array(f"{x['path']}/values"))
                else:
                    k = dequantize(x["bits"], view, codes=self.array(f"{x['path']}/codes"), scales=self.array(f"{x['path']}/scales"))
                cdt = compute_dtype(e["dtype"])
                v = pre[e["name"]].to(cdt).reshape(view)
                pre[e["name"]] = (v + k.to(cdt)).reshape(e["shape"])
            else:
                raise SpecError(f"model {i}: unknown exception kind {x['kind']!r}")
        out = {}
        for e in m["tensors"]:  # §4: one cast, round-to-nearest-even
            out[e["name"]] = pre[e["name"]].to(DTYPES[e["dtype"]][0])
        return out

    def _subspace(self, e: dict, take) -> torch.Tensor:
        """§6.3: reshape(M + L @ C @ R^T + Q) in the compute dtype (cast later)."""
        cdt = compute_dtype(e["dtype"])
        m, n = e["view"]
        kl, kr = e["rank"]
        r, c = e["coefficients"]["shape"]
        if (r, c) != (kl if e["left"] else m, kr if e["right"] else n) or r * c != e["coefficients"]["length"]:
            raise SpecError(f"tensor {e['name']!r}: coefficient shape {[r, c]} does not fit its ranks and view")
        p = torch.from_numpy(np.asarray(take(e["coefficients"]))).to(cdt).reshape(r, c)
        if e["left"]:
            left = torch.from_numpy(self.array(e["left"], cache=True)).to(cdt)
            p = left @ p
        if e["right"]:
            right = torch.from_numpy(self.array(e["right"], cache=True)).to(cdt)
            p = p @ right.T
        if p.shape != (m, n):
            raise SpecError(f"tensor {e['name']!r}: L C R^T is {tuple(p.shape)}, not its view {(m, n)}")
        if e["mean"]:
            p = p + torch.from_numpy(self.array(e["mean"], cache=True)).to(cdt).reshape(m, n)
        res = e.get("residual")
        if res:
            if res["bits"] == 16:
                q = dequantize(16, (m, n), values=take(res["values"]))
            else:
                q = dequantize(res["bits"], (m, n), codes=take(res["codes"]), scales=take(res["scales"]))
            p = p + q.to(cdt)
        return p.reshape(e["shape"])


def _slots(t: dict) -> list[dict]:
    if t["encoding"] == "dense" and "pack" in t["data"]:
        return [t["data"]]
    if t["encoding"] == "subspace":
        r = t.get("residual") or {}
        return [t["coefficients"]] + [r[k] for k in ("codes", "scales", "values") if k in r]
    return []
