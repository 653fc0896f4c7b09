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
# the values of the open fields that format 1.3 defines (§3.4, §6.3.1, §6.4, §6.6, §12)
ENCODINGS, KINDS, BITS = ("subspace", "shared", "dense"), ("correct", "replace"), (1, 2, 4, 8, 16)
RUN_BITS = (1, 2, 4, 8)  # §6.3.1: bit widths of quantized coefficient runs
COMPUTED = ("float64", "float32", "float16", "bfloat16")  # §4: the dtypes that may be computed
# §6.7, factors mode: the A / B key suffixes of the layouts (informative table)
LORA_SUFFIXES = ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B"),
                 (".lora_down.weight", ".lora_up.weight"), (".lora.down.weight", ".lora.up.weight"),
                 ("_lora.down.weight", "_lora.up.weight"), (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"))


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


def unit(cdt: torch.dtype) -> float:
    """§6.8: the unit roundoff u of the compute dtype (2^-24 for float32, 2^-53 for float64)."""
    return 2.0 ** -53 if cdt == torch.float64 else 2.0 ** -24


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


def dequantize(bits: int, view: tuple[int, int], *, codes=None, scales=None, values=None, axis: int = 0) -> torch.Tensor:
    """§6.4: a residual / correction as a float32 (m, n) matrix; ``axis`` 1 (format 1.3): the
    codes and scales are those of Q^T (one scale per column of Q), only where m > n."""
    m, n = view
    if axis == 1:
        if not m > n or bits == 16:
            raise SpecError(f"residual axis 1 over a {m}x{n} view ({bits} bits): only for views taller than wide")
        return dequantize(bits, (n, m), codes=codes, scales=scales).T
    if axis != 0:
        raise SpecError(f"unknown residual axis {axis}")
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
            if t["encoding"] == "dense" and "pack" in t["data"]:  # §3.4 cross-field rules
                if t["shape"] is None or t["data"]["length"] != int(np.prod(t["shape"], dtype=np.int64)) \
                        or (t["data"]["length"] and t["data"]["pack"] != DTYPES[t["dtype"]][1]):
                    raise SpecError(f"tensor {t['name']!r}: its slot does not hold its declared shape and dtype")
            if t["encoding"] == "subspace" and t["dtype"] not in COMPUTED:
                raise SpecError(f"tensor {t['name']!r}: a {t['dtype']} tensor cannot be a subspace tensor (§4)")
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

    def model(self, i: int, names: list[str] | None = None, *, tolerances: dict | None = None) -> dict[str, torch.Tensor]:
        """Model ``i``'s tensors (all, or ``names``) by §6: LoRA entries (§6.7) as their dense
        update under the module's name. ``tolerances``, when given, receives for each computed
        tensor the bound T of §6.8 on |value before the cast - exact value| (0 for exact ones)."""
        m = self.manifest
        n_models = len(m["models"])
        if not 0 <= i < n_models:
            raise IndexError(f"model index {i} out of range ({n_models} models)")
        wanted = None if names is None else set(names)
        entries = [e for e in m["tensors"] if wanted is None or e["name"] in wanted]
        exceptions = [x for x in m["models"][i].get("exceptions") or () if wanted is None or x["tensor"] in wanted]
        for e in entries:  # §12: a value this reader does not know refuses the tensors concerned only
            runs = e.get("coefficients", {}).get("bits") if e["encoding"] == "subspace" else None
            if e["encoding"] not in ENCODINGS or (e["encoding"] == "subspace" and e["residual"] and e["residual"]["bits"] not in BITS) \
                    or (runs is not None and any(b not in RUN_BITS for _, b in runs)):
                raise SpecError(f"tensor {e['name']!r} uses an encoding or residual width this reader does not know")
        for x in exceptions:
            if x["kind"] not in KINDS or (x["kind"] == "correct" and x["bits"] not in BITS):
                raise SpecError(f"tensor {x['tensor']!r} of model {i} has an exception this reader does not know")
        tol = {} if tolerances is None else tolerances
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
        for e in entries:
            enc, dt = e["encoding"], e["dtype"]
            tol[e["name"]] = 0.0
            if enc == "dense":
                if e["data"].get("per_model"):
                    pre[e["name"]] = logical(self.array(f"{e['node']}/models/{i}"), dt)
                else:
                    pre[e["name"]] = logical(take(e["data"]), dt).reshape(e["shape"])
            elif enc == "shared":
                pre[e["name"]] = logical(self.array(e["data"]["path"], cache=True), dt).reshape(e["shape"])
            elif enc == "subspace":
                if dt not in COMPUTED:
                    raise SpecError(f"tensor {e['name']!r}: a {dt} tensor cannot be a subspace tensor (§4)")
                pre[e["name"]], tol[e["name"]] = self._subspace(e, take)
        by_name = {e["name"]: e for e in m["tensors"]}
        for x in exceptions:  # §6.6
            e = by_name.get(x["tensor"])
            if e is None or e["encoding"] not in ("subspace", "shared"):
                raise SpecError(f"model {i}: exception for {x['tensor']!r}, which cannot have one")
            if x["kind"] == "replace":
                pre[e["name"]] = logical(self.array(f"{x['path']}/value"), e["dtype"]).reshape(e["shape"])
                tol[e["name"]] = 0.0
            else:  # correct
                if e["dtype"] not in COMPUTED:
                    raise SpecError(f"model {i}: a correct exception on {x['tensor']!r}, a {e['dtype']} tensor (§6.6)")
                view = tuple(x["view"])
                if x["bits"] == 16:
                    k = dequantize(16, view, values=self.array(f"{x['path']}/values"))
                else:
                    k = dequantize(x["bits"], view, codes=self.array(f"{x['path']}/codes"), scales=self.array(f"{x['path']}/scales"))
                cdt = compute_dtype(e["dtype"])
                v = pre[e["name"]].to(cdt).reshape(view)
                pre[e["name"]] = (v + k.to(cdt)).reshape(e["shape"])
                # §6.8: one more rounded addition, of a correction up to max|K|
                scale = tol[e["name"]] / (self._count(e) * unit(cdt)) if tol[e["name"]] else float(v.abs().max())
                tol[e["name"]] = (self._count(e) + 1) * unit(cdt) * (scale + float(k.abs().max()))
        out = {}
        for e in entries:  # §4: one cast, round-to-nearest-even
            out[e["name"]] = pre[e["name"]].to(DTYPES[e["dtype"]][0])
        return out

    @staticmethod
    def _count(e: dict) -> int:
        """§6.8: the roundings one element of a subspace tensor goes through, K + 4."""
        if e["encoding"] != "subspace":
            return 0
        return sum(k or 0 for k in e["rank"]) + 4

    def lora_factors(self, i: int) -> dict[str, torch.Tensor]:
        """§6.7: factors (B', A') of every LoRA module adapter ``i`` has, k = min(kl, kr, r_i),
        B' A' the best rank-k approximation of L C R^T (the SVD of the kl x kr core in float64),
        balanced (sqrt(S) on both sides), in the entry's dtype; alpha tensors equal to k."""
        m = self.manifest
        ranks = (m["models"][i].get("adapter") or {}).get("ranks")
        row = self._open(m["packs"]["float32"]["path"])[i].read().result()
        out = {}
        for t, e in enumerate(m["tensors"]):
            rec = e.get("lora")
            if not rec:
                continue
            r = ranks[t] if ranks is not None else max(e["rank"])
            k = min(e["rank"][0], e["rank"][1], r)
            if k == 0:
                continue  # the adapter lacks the module: no factors
            s = e["coefficients"]
            c = torch.from_numpy(np.asarray(row[s["offset"]: s["offset"] + s["length"]])).double().reshape(s["shape"])
            left = torch.from_numpy(self.array(e["left"], cache=True)).double()
            right = torch.from_numpy(self.array(e["right"], cache=True)).double()
            u, sv, vh = torch.linalg.svd(c)
            root = sv[:k].sqrt()
            dt = DTYPES[e["dtype"]][0]
            out[rec["b"]] = ((left @ u[:, :k]) * root).reshape([e["view"][0], k] + rec["b_tail"]).to(dt)
            out[rec["a"]] = (root[:, None] * (vh[:k] @ right.T)).reshape([k] + rec["a_tail"]).to(dt)
            if rec.get("alpha"):
                out[rec["alpha"]] = torch.tensor(float(k), dtype=DTYPES[rec.get("alpha_dtype") or "float32"][0])
        return out

    def adapter_update(self, i: int, module: str) -> torch.Tensor:
        """§6.7, factors mode: the update s * B @ A of ``module`` (float64, view (out, in)), with s
        from the model's ``adapter.scales`` and A, B the model's tensors named by the layout."""
        adapter = self.manifest["models"][i].get("adapter") or {}
        if module not in (adapter.get("scales") or {}):
            raise SpecError(f"model {i} records no scale for LoRA module {module!r}")
        sd = self.model(i)
        for sa, sb in LORA_SUFFIXES:
            if module + sa in sd and module + sb in sd:
                a, b = sd[module + sa].double(), sd[module + sb].double()
                return adapter["scales"][module] * b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)
        raise SpecError(f"model {i}: no A/B tensors for LoRA module {module!r}")

    def _subspace(self, e: dict, take) -> tuple[torch.Tensor, float]:
        """§6.3: reshape(M + L @ C @ R^T + Q) in the compute dtype (cast later), and the bound T
        of §6.8 on its distance to the exact value: (K + 4) u (||C||_F + max|M| + max|Q|)."""
        cdt = compute_dtype(e["dtype"])
        m, n = e["view"]
        kl, kr = e["rank"]
        co = e["coefficients"]
        r, c = co["shape"]
        if (r, c) != (kl if e["left"] else m, kr if e["right"] else n) or ("bits" not in co and r * c != co["length"]):
            raise SpecError(f"tensor {e['name']!r}: coefficient shape {[r, c]} does not fit its ranks and view")
        if "bits" in co:
            p = quantized_coefficients(e["name"], co, take).to(cdt)
        else:
            p = torch.from_numpy(np.asarray(take(co))).to(cdt).reshape(r, c)
        scale = float(p.double().norm())
        if e["left"]:
            left = torch.from_numpy(self.array(e["left"], cache=True)).to(cdt)
            p = left @ p
        if e["right"]:
            right = torch.from_numpy(self.array(e["right"], cache=True)).to(cdt)
            p = p @ right.T
        if p.shape != (m, n):
            raise SpecError(f"tensor {e['name']!r}: L C R^T is {tuple(p.shape)}, not its view {(m, n)}")
        if e["mean"]:
            mean = torch.from_numpy(self.array(e["mean"], cache=True)).to(cdt).reshape(m, n)
            p = p + mean
            scale += float(mean.abs().max())
        res = e.get("residual")
        if res:
            if res["bits"] == 16:
                q = dequantize(16, (m, n), values=take(res["values"]))
            else:  # §3.4 / §6.4: m scales per row, or (1.3, axis 1, only where m > n) n per column
                axis = res.get("axis", 0)
                if axis not in (0, 1) or (axis == 1 and not m > n) \
                        or res["scales"]["length"] != (n if axis == 1 else m) or res["scales"]["pack"] != "float32" \
                        or res["codes"]["length"] != -(-m * n * res["bits"] // 8) or res["codes"]["pack"] != "uint8":
                    raise SpecError(f"tensor {e['name']!r}: residual slots {res} do not fit its {m}x{n} view")
                q = dequantize(res["bits"], (m, n), codes=take(res["codes"]), scales=take(res["scales"]), axis=axis)
            p = p + q.to(cdt)
            scale += float(q.abs().max())
        return p.reshape(e["shape"]), self._count(e) * unit(cdt) * scale


def quantized_coefficients(name: str, co: dict, take) -> torch.Tensor:
    """§6.3.1: C (float32) from a quantized coefficients record: D (C, or C^T for axis 1) is
    k x len; runs [count, b] of its rows, each a byte-aligned block decoded like a residual of b
    bits with the rows' scales."""
    r, c = co["shape"]
    if co.get("axis") not in (0, 1) or co["pack"] != "uint8":
        raise SpecError(f"tensor {name!r}: quantized coefficients need axis 0 or 1 and pack uint8")
    k, length = (r, c) if co["axis"] == 0 else (c, r)
    runs = co["bits"]
    blocks = [(cnt * length * b + 7) // 8 for cnt, b in runs]
    sc = co["scales"]
    if sum(cnt for cnt, _ in runs) != k or sum(blocks) != co["length"] or sc["pack"] != "float32" or sc["length"] != k:
        raise SpecError(f"tensor {name!r}: quantized coefficient runs {runs} do not add up to {k} directions / {co['length']} bytes")
    codes, scales = np.asarray(take(co)), np.asarray(take(sc))
    parts, row, at = [], 0, 0
    for (cnt, b), nb in zip(runs, blocks):
        parts.append(dequantize(b, (cnt, length), codes=codes[at: at + nb], scales=scales[row: row + cnt]))
        row, at = row + cnt, at + nb
    d = torch.cat(parts) if parts else torch.zeros(k, length)
    return d if co["axis"] == 0 else d.T


def _slots(t: dict) -> list[dict]:
    if t["encoding"] == "dense" and "pack" in t["data"]:
        return [t["data"]]
    if t["encoding"] == "subspace":
        r = t.get("residual") or {}
        co = t["coefficients"]
        return [co] + ([co["scales"]] if "bits" in co else []) + [r[k] for k in ("codes", "scales", "values") if k in r]
    return []
