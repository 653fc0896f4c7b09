"""What a store says about itself: summaries, tables, spectra baselines. No source needed."""

from __future__ import annotations

import os
import sys
import zipfile
from typing import IO, Any

import numpy as np

from uwsfmt.errors import UWSError

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


def leading_above(values: np.ndarray, baseline: np.ndarray) -> int:
    """How many leading eigenvalues rise above the null baseline (the first one that does not ends the run).

    >>> leading_above(np.array([5.0, 3.0, 0.1, 2.0]), np.array([1.0, 1.0, 1.0, 1.0]))
    2
    """
    v = np.asarray(values, dtype=np.float64)
    b = np.asarray(baseline, dtype=np.float64)
    n = min(v.size, b.size)
    above = v[:n] > b[:n]
    return int(n if above.all() else np.argmin(above))


#: share of budgeted matrices stored at rank 0 from which a store is said to share no subspace
NO_SUBSPACE_SHARE = 0.9


def notes(store: _Store, size: int, src: int) -> list[str]:
    """One-line findings a user should see after a build and in ``info``: a store larger than its
    sources (and the option that would fix it), a family that shares no useful subspace (stored
    as mean + quantized deltas), a forced rank that keeps directions indistinguishable from noise."""
    m = store.manifest
    st = m["build"]["settings"]
    out = []
    budgeted = st.get("max_error") is not None or st.get("max_delta_error") is not None
    subs = [e for e in m["tensors"] if e["encoding"] == "subspace" and e.get("lora") is None and min(e["view"]) > 1]
    if size and src and size > src:
        lora = any(e.get("lora") is not None for e in m["tensors"])
        if lora and st.get("lora_mode", "product") != "factors":
            fix = "`--lora-mode factors` (with the default error budget: mean + quantized factors) stores them smaller"
        elif not budgeted:
            fix = "drop --rank/--tau/--max-rank to use the default error budget (or give one: --max-delta-error 0.2)"
        elif st.get("residual_bits") == 16 or st.get("coefficient_bits") == "float32":
            fix = "drop --residual-bits 16 / --coefficient-bits float32 and let the error budget choose"
        else:
            fix = "a looser error budget (--max-delta-error) stores it smaller"
        out.append(f"LARGER THAN ITS SOURCES ({human_size(size)} vs {human_size(src)}): {fix}")
    chosen = [e for e in subs if e.get("budget")]
    if budgeted and chosen:
        flat = sum(1 for e in chosen if not any(e["rank"]))
        if flat >= NO_SUBSPACE_SHARE * len(chosen):
            out.append(f"the family shares no useful subspace: {flat} of {len(chosen)} matrices are stored at rank 0, "
                       "as the family centre + quantized per-model deltas")
    if st.get("rank") and not budgeted and subs:
        noisy = []
        for e in subs:
            try:
                sp = store.spectrum(e["name"])
            except UWSError:
                continue
            if sp["kept"] and leading_above(sp["eigenvalues"], sp["null"]) < sp["kept"]:
                noisy.append(e["name"])
        if noisy:
            errs = store.errors()
            worst = float(np.nanmax(errs)) if errs.size and np.isfinite(errs).any() else float("nan")
            out.append(f"rank {st['rank']} keeps directions no stronger than noise (the null baseline) in {len(noisy)} of "
                       f"{len(subs)} matrices (worst relative error {worst:.3g}): these models share little of a subspace; "
                       "drop --rank to use the default error budget")
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
    size = store.nbytes()
    errs = store.errors()
    finite = errs[np.isfinite(errs)]
    return {
        "path": store.path,
        "format_version": m["format_version"],
        "zipped": not store.location.remote and os.path.isfile(store.path) and zipfile.is_zipfile(store.path),
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
        "notes": notes(store, size, src),
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
    for note in s.get("notes") or ():
        print(f"  {note}", file=out)
    if s.get("refit_suggested"):
        names = ", ".join(s["refit_suggested"][:5]) + (" ..." if len(s["refit_suggested"]) > 5 else "")
        print(f"  REFIT SUGGESTED for {len(s['refit_suggested'])} tensor(s): {names} - appended models do not fit "
              "the bases; rebuild with `uwsfmt convert` including them", file=out)
