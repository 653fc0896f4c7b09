"""What a store says about itself: summaries, tables, spectra baselines. No source needed."""

from __future__ import annotations

import os
import sys
import zipfile
from typing import IO, Any

import numpy as np

#: a :class:`uwsfmt.reader.store.StoreReader` (not imported: the reader imports this module)
_Store = Any


def store_bytes(path: str) -> int:
    """Bytes on disk of a directory store (or the size of a zipped one)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total


def null_spectrum(total: float, dim: int, samples: int, length: int) -> np.ndarray:
    """Expected eigenvalues (descending) of the Gram of i.i.d. noise with the same total energy.

    For a dim x samples matrix of i.i.d. entries, the Gram's eigenvalues follow the
    Marchenko-Pastur law with ratio c = dim / samples; we take its quantiles, scaled so they sum
    to ``total``. A family with real shared structure has a spectrum far steeper than this.
    """
    length = max(int(length), 0)
    if length == 0 or total <= 0:
        return np.zeros(length)
    r = min(dim, samples)
    c = min(dim, samples) / max(dim, samples)
    lo, hi = (1 - np.sqrt(c)) ** 2, (1 + np.sqrt(c)) ** 2
    x = np.linspace(lo, hi, 4097)
    with np.errstate(divide="ignore", invalid="ignore"):
        pdf = np.sqrt(np.clip((hi - x) * (x - lo), 0, None)) / (2 * np.pi * c * x)
    pdf = np.nan_to_num(pdf)
    cdf = np.cumsum(pdf)
    cdf /= cdf[-1]
    q = (np.arange(r) + 0.5) / r
    vals = np.interp(1 - q, cdf, x)  # descending quantiles
    vals = np.sort(vals)[::-1]
    vals = vals / vals.sum() * total
    out = np.zeros(length)
    out[: min(length, r)] = vals[: min(length, r)]
    return out


def _err_stats(col: np.ndarray) -> tuple[float | None, float | None]:
    col = col[np.isfinite(col)]
    if col.size == 0:
        return None, None
    return float(col.mean()), float(col.max())


def refit_suggested(store: _Store) -> list[str]:
    """Tensors whose bases no longer fit the models appended after the build.

    With an error budget: tensors some appended model needed a per-model exception for. Without
    one: tensors where an appended model's error is more than twice the worst of the build's.
    """
    m = store.manifest
    out = {x["tensor"] for mod in m["models"] for x in mod.get("exceptions") or ()}
    built = m["build"].get("n_models")
    if built is not None and store.n_models > built and budget_met(store) is None:
        errs = store.errors()
        with np.errstate(invalid="ignore"):
            before = np.nanmax(np.where(np.isfinite(errs[:built]), errs[:built], np.nan), axis=0, initial=0.0)
            after = np.nanmax(np.where(np.isfinite(errs[built:]), errs[built:], np.inf), axis=0, initial=0.0)
        for j, name in enumerate(store.tensor_names):
            if after[j] > max(2.0 * before[j], 1e-6):
                out.add(name)
    return sorted(out)


def budget_met(store: _Store) -> bool | None:
    """Whether every recorded error is within the build's error budget (None: no budget)."""
    st = store.manifest["build"]["settings"]
    e, d = st.get("max_error"), st.get("max_delta_error")
    if e is None and d is None:
        return None
    for mod in store.manifest["models"]:
        for v, dv in zip(mod["error"], mod["delta_error"]):
            if e is not None and not (v is not None and v <= e):
                return False
            if d is not None and dv is not None and not dv <= d:
                return False
    return True


def tensor_table(store: _Store) -> list[dict]:
    errs = store.errors()
    exc: dict[str, int] = {}
    for mod in store.manifest["models"]:
        for x in mod.get("exceptions") or ():
            exc[x["tensor"]] = exc.get(x["tensor"], 0) + 1
    out = []
    for j, e in enumerate(store.manifest["tensors"]):
        mean, mx = _err_stats(errs[:, j]) if store.n_models else (None, None)
        sub = e["encoding"] == "subspace"
        rank = None
        ev = None
        if sub:
            ks = [k for k in e["rank"] if k is not None]
            rank = ks[0] if len(ks) == 1 else (tuple(ks) if ks else 0)
            evs = list((e.get("explained_variance") or {}).values())
            ev = float(np.prod(evs)) if evs else None
        out.append({
            "name": e["name"], "shape": e["shape"], "dtype": e["dtype"], "encoding": e["encoding"],
            "mode": e.get("mode"), "rank": rank, "explained_variance": ev,
            "residual_bits": (e.get("residual") or {}).get("bits") if sub else None,
            "error_mean": mean, "error_max": mx, "reason": e.get("reason"),
            "max_error": (e.get("budget") or {}).get("max_error"), "bytes": (e.get("budget") or {}).get("bytes"),
            "dense_bytes": (e.get("budget") or {}).get("dense_bytes"), "exceptions": exc.get(e["name"], 0),
            # how the bases were found: exact (Gram), sketch (randomised, checked); why a sketch was not kept
            "basis": ((e.get("basis") or {}).get("method") or "exact") if sub else None,
            "basis_note": (e.get("basis") or {}).get("sketch_rejected") if sub else None,
        })
    return out


def model_table(store: _Store) -> list[dict]:
    errs = store.errors()
    out = []
    for i, m in enumerate(store.manifest["models"]):
        mean, mx = _err_stats(errs[i]) if errs.shape[1] else (0.0, 0.0)
        src = m.get("source") or {}
        out.append({"id": m["id"], "name": src.get("name"), "path": src.get("path"), "format": src.get("format"), "sha256": src.get("sha256"),
                    "size": src.get("size"), "added": m.get("added"), "error_mean": mean, "error_max": mx})
    return out


def summary(store: _Store) -> dict:
    m = store.manifest
    enc: dict[str, int] = {}
    for t in m["tensors"]:
        enc[t["encoding"]] = enc.get(t["encoding"], 0) + 1
    src = sum((x.get("source") or {}).get("size") or 0 for x in m["models"])
    size = store_bytes(store.path)
    errs = store.errors()
    finite = errs[np.isfinite(errs)]
    return {
        "path": store.path,
        "format_version": m["format_version"],
        "zipped": os.path.isfile(store.path) and zipfile.is_zipfile(store.path),
        "n_models": store.n_models,
        "n_tensors": len(m["tensors"]),
        "encodings": enc,
        "store_bytes": size,
        "source_bytes": src,
        "ratio": (src / size) if size else None,
        "error_mean": float(finite.mean()) if finite.size else None,
        "error_max": float(finite.max()) if finite.size else None,
        "device": m["build"]["device"],
        "created": m.get("created"),
        "updated": m.get("updated"),
        "generation": m.get("generation"),
        "settings": m["build"]["settings"],
        "max_error": m["build"]["settings"].get("max_error"),
        "max_delta_error": m["build"]["settings"].get("max_delta_error"),
        "budget": ", ".join(f"{k}={m['build']['settings'][k]:g}" for k in ("max_error", "max_delta_error")
                            if m["build"]["settings"].get(k) is not None) or None,
        "budget_met": budget_met(store),
        "refit_suggested": refit_suggested(store),
        # a product-basis LoRA store larger than the adapters: they share no subspace (see README)
        "lora_larger_than_sources": bool(size and src and size > src and m["build"]["settings"].get("lora_mode", "product") != "factors"
                                         and any(e.get("lora") is not None for e in m["tensors"])),
    }


def info(store: _Store) -> dict:
    """Everything ``uwsfmt info --json`` prints."""
    return {"summary": summary(store), "tensors": tensor_table(store), "models": model_table(store),
            "errors": {"tensors": store.tensor_names,
                       "models": {m["id"]: m["error"] for m in store.manifest["models"]}}}


def human_size(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def short_number(x: float | None, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def print_summary(store: _Store, out: IO[str] | None = None) -> None:
    out = out or sys.stdout  # looked up at call time (redirections, pytest capture)

    s = summary(store)
    print(f"UWS store {s['path']}  (format {s['format_version']}, generation {s['generation']})", file=out)
    print(f"  models: {s['n_models']}   tensors: {s['n_tensors']}   " + "  ".join(f"{k}: {v}" for k, v in sorted(s["encodings"].items())), file=out)
    ratio = f"{s['ratio']:.2f}x" if s["ratio"] else "?"
    print(f"  size: {human_size(s['store_bytes'])} on disk vs {human_size(s['source_bytes'])} of sources  ->  compression {ratio}", file=out)
    print(f"  relative error per tensor and model: mean {short_number(s['error_mean'])}, max {short_number(s['error_max'])}", file=out)
    if s.get("budget"):
        met = "met for every tensor of every model" if s["budget_met"] else "NOT met by every tensor (see the table)"
        print(f"  error budget: {s['budget']} per tensor and model: {met}", file=out)
    if (s.get("settings") or {}).get("lora_choice"):
        print(f"  LoRA mode {s['settings']['lora_choice']}", file=out)
    if s.get("lora_larger_than_sources"):
        print("  LARGER THAN THE ADAPTERS: these adapters share little of a subspace, so the product basis holds them "
              "only near their total rank; `uwsfmt convert --lora-mode factors` (with a budget: mean + quantized "
              "factors) stores them smaller", file=out)
    if s.get("refit_suggested"):
        names = ", ".join(s["refit_suggested"][:5]) + (" ..." if len(s["refit_suggested"]) > 5 else "")
        print(f"  REFIT SUGGESTED for {len(s['refit_suggested'])} tensor(s): {names} - appended models do not fit "
              "the bases; rebuild with `uwsfmt convert` including them", file=out)
