"""The measurements. Each returns a JSON-friendly dict; baselines are measured in the same call.

- :func:`read_once`: what "only reading the checkpoints" costs (every value touched).
- :func:`build`: ``uwsfmt.convert`` wall time, store size, errors (and accuracy when the family
  can be evaluated).
- :func:`materialise`: one model into a torch module from an open store with bases cached, vs
  ``module.load_state_dict(safetensors.torch.load_file(path, device=...))``; plus the lazy
  ``load_file`` alone and the floor (bytes that must move / memory bandwidth).
- :func:`switch`: cycling through models, per-switch median and p95, both ways.
- :func:`first_load`: a freshly opened store, nothing cached (directory and zip), vs the same baseline.
- :func:`append`: adding one checkpoint to a store vs reading it once; several with one ``extend``.
- :func:`random_access`: bytes read from storage for one tensor of one model, by kind.
- :func:`memory`: peak RSS of builds at several N, each in a fresh process.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics

import numpy as np
import torch
from safetensors.torch import load_file

import uwsfmt
from uwsfmt import Store
from uwsfmt.numerics import native
from uwsfmt.reader.manifest import read_manifest

from .common import bandwidth, counting_store, dir_bytes, drop_cache, module_for, nbytes, run_json, summary, timed

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------- build


def read_once(paths: list[str], *, cold: bool = False) -> float:
    """Seconds to read every checkpoint once, touching every value (warm page cache unless ``cold``)."""
    if cold:
        drop_cache(paths)

    def run():
        for p in paths:
            for t in load_file(p).values():
                t.sum()

    return timed(run)


def _subspace_columns(store: Store) -> list[int]:
    return [j for j, e in enumerate(store.manifest["tensors"]) if e["encoding"] == "subspace"]


def quality(store: Store, fam=None) -> dict:
    """Relative errors over (model, subspace tensor) pairs, ranks, how bases were found."""
    cols = _subspace_columns(store)
    errs = store.errors()[:, cols] if cols else np.zeros((store.n_models, 0))
    ranks = [max(x or 0 for x in e["rank"]) for e in store.manifest["tensors"] if e["encoding"] == "subspace"]
    methods: dict[str, int] = {}
    for e in store.manifest["tensors"]:
        if e["encoding"] == "subspace":
            b = e.get("basis") or {}
            m = b.get("method", "exact") + (" (sketch rejected)" if b.get("sketch_rejected") else "")
            methods[m] = methods.get(m, 0) + 1
    out = {
        "error_mean": float(np.nanmean(errs)) if errs.size else 0.0,
        "error_max": float(np.nanmax(errs)) if errs.size else 0.0,
        "subspace_tensors": len(cols),
        "rank_median": float(statistics.median(ranks)) if ranks else 0.0,
        "rank_max": max(ranks) if ranks else 0,
        "basis_methods": methods,
    }
    if fam is not None and fam.evaluate is not None:
        drops = []
        for mid in store.model_ids:
            acc = fam.evaluate(mid, store.state_dict(mid))
            drops.append(fam.accuracies[mid] - acc)
        out["accuracy_original_mean"] = float(np.mean(list(fam.accuracies.values())))
        out["accuracy_drop_mean"] = float(np.mean(drops))
        out["accuracy_drop_max"] = float(np.max(drops))
    return out


def build(fam, out: str, settings: dict, device: str, *, cold_repeats: int = 0) -> dict:
    """Convert the family with ``settings``; wall time, size ratio, quality. ``cold_repeats``:
    also that many pairs of (read every checkpoint once, build), each from a page cache with the
    checkpoints dropped, one right after the other: how long the kernel takes to read the same
    files moves by 30% within an hour on a shared machine, so each build is compared with the
    read next to it (``cold_ratio``: the median of the pairs' ratios)."""
    # each timed build writes a new store, and starts with no other file system work pending:
    # deleting a previous store (about a second for 400 MB on this ext4 with online discard; many
    # seconds for the 32,000 files of the many-tensor store) and writing back the last build's
    # pages is not part of converting checkpoints, so it is done, and synced, before the clock starts
    cold_outs = [f"{out}.cold{j}" for j in range(cold_repeats)]
    _clear([out, *cold_outs])
    secs = timed(lambda: uwsfmt.convert(fam.paths, out, device=device, **settings), device)
    reads, builds = [], []
    for path in cold_outs:
        reads.append(read_once(fam.weights, cold=True))
        os.sync()
        drop_cache(fam.weights)
        builds.append(timed(lambda path=path: uwsfmt.convert(fam.paths, path, device=device, **settings), device))
    _clear(cold_outs)
    cold = {}
    if builds:
        cold = {"cold_seconds": statistics.median(builds), "cold_read_seconds": statistics.median(reads),
                "cold_ratio": statistics.median(b / r for b, r in zip(builds, reads)),
                "cold_pairs": [{"build_s": b, "read_s": r} for b, r in zip(builds, reads)]}
    with uwsfmt.open(out) as store:
        size = dir_bytes(out)
        return {"settings": settings, "seconds": secs, "cold_seconds": None, **cold, "store_bytes": size, "source_bytes": fam.source_bytes,
                "size_ratio": size / fam.source_bytes, **quality(store, fam)}


def _clear(paths: list[str]) -> None:
    """Delete ``paths`` and flush the file system (journal, discards, dirty pages) before timing."""
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)
    os.sync()


# ---------------------------------------------------------------------------- loading


def _cached_bytes(store: Store) -> int:
    total = 0
    for v in store._cache.values():
        for t in v if isinstance(v, tuple) else (v,):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _row_files(store: Store, index: int) -> list[str]:
    out = []
    for info in store.manifest["packs"].values():
        r = store._row_reader(info)
        if r is not None:
            out.append(r.shard_file(index))
    return out


def _without_kernel(fn, *args):
    with native.suspended():
        return fn(*args)


def materialise(fam, store_path: str, device: str, *, models: int = 6, seconds: float = 2.0, cold_repeats: int = 3) -> dict:
    """One model into a module, bases cached, vs load_state_dict(load_file(...)); warm and cold.

    Store and baseline alternate (machine noise hits both alike); rounds repeat until each side
    has had about ``seconds`` (3 to 40 rounds over the models). On the CPU with the native kernel
    (:mod:`uwsfmt.numerics.native`), the store is also timed without it (torch's GEMMs), interleaved too."""
    store = uwsfmt.open(store_path)
    ids = fam.ids[: max(2, min(models, len(fam.ids)))]
    mod_store = module_for(store.state_dict(ids[0], device=device), device)
    mod_base = module_for(load_file(fam.weights[0]), device)
    store.load_into(mod_store, ids[-1])  # bases now cached on the device
    mod_base.load_state_dict(load_file(fam.weights[-1], device=device))
    for p in fam.weights[: len(ids)]:  # page cache warm for the baseline, as for the store
        load_file(p)
    kernel = native.status()["isa"]  # the fused CPU kernel, when it is there also timed without it
    t_store, t_base, t_lazy, t_torch = [], [], [], []
    one = timed(lambda: mod_base.load_state_dict(load_file(fam.weights[0], device=device)), device)
    repeats = int(min(40, max(3, seconds / max(one * len(ids), 1e-6))))
    for _ in range(repeats):
        for i, mid in enumerate(ids):  # interleaved, so that machine noise hits both alike
            path = fam.weights[i]
            t_store.append(timed(lambda mid=mid: store.load_into(mod_store, mid), device))
            t_base.append(timed(lambda path=path: mod_base.load_state_dict(load_file(path, device=device)), device))
            t_lazy.append(timed(lambda path=path: load_file(path, device=device), device))
            if kernel and device == "cpu":
                t_torch.append(timed(lambda mid=mid: _without_kernel(store.load_into, mod_store, mid), device))
    cold_store, cold_base = [], []
    for j in range(cold_repeats):
        i = j % len(ids)
        drop_cache(_row_files(store, fam.ids.index(ids[i])))
        mid, path = ids[i], fam.weights[i]
        cold_store.append(timed(lambda mid=mid: store.load_into(mod_store, mid), device))
        drop_cache([path])
        cold_base.append(timed(lambda path=path: mod_base.load_state_dict(load_file(path, device=device)), device))
    bw = bandwidth(device)
    module_bytes = nbytes(mod_store.state_dict())
    row_bytes = sum(info["width"] * np.dtype(info["dtype"]).itemsize for info in store.manifest["packs"].values())
    store_moved = _cached_bytes(store) + row_bytes + module_bytes
    base_moved = os.path.getsize(fam.weights[0]) + nbytes(mod_base.state_dict())
    s, b, lazy = summary(t_store), summary(t_base), summary(t_lazy)
    store.close()
    torch_path = {"store_torch": summary(t_torch), "ratio_torch": statistics.median(t_torch) / b["median"]} if t_torch else {}
    return {
        "kernel": kernel if device == "cpu" else None, **torch_path,
        "store": s, "baseline": b, "lazy_load_file": lazy,
        "ratio": s["median"] / b["median"],
        "cold_store": summary(cold_store), "cold_baseline": summary(cold_base),
        "cold_ratio": statistics.median(cold_store) / statistics.median(cold_base) if cold_store else None,
        "bandwidth_bytes_per_s": bw,
        "store_bytes_moved": store_moved, "baseline_bytes_moved": base_moved,
        "store_floor_s": store_moved / bw, "baseline_floor_s": base_moved / bw,
        "module_bytes": module_bytes, "row_bytes": row_bytes,
    }


def switch(fam, store_path: str, device: str, *, switches: int = 100) -> dict:
    """Cycle through the models ``switches`` times, into one module; per-switch median and p95."""
    store = uwsfmt.open(store_path)
    mod_store = module_for(store.state_dict(fam.ids[0], device=device), device)
    mod_base = module_for(load_file(fam.weights[0]), device)
    store.load_into(mod_store, fam.ids[-1])
    n = len(fam.ids)
    t_store, t_base = [], []
    for j in range(switches):  # alternating, so that machine noise hits both alike
        mid, path = fam.ids[j % n], fam.weights[j % n]
        t_store.append(timed(lambda mid=mid: store.load_into(mod_store, mid), device))
        t_base.append(timed(lambda path=path: mod_base.load_state_dict(load_file(path, device=device)), device))
    store.close()
    s, b = summary(t_store), summary(t_base)
    return {"switches": switches, "models_cycled": n, "store": s, "baseline": b,
            "ratio_median": s["median"] / b["median"], "ratio_p95": s["p95"] / b["p95"]}


def first_load(fam, store_path: str, device: str, *, repeats: int = 3) -> dict:
    """Open the store and load one model into a module with nothing cached (every mean and basis
    read from storage: what a fresh process pays once), vs the same baseline as :func:`materialise`
    (page cache warm for both). Also the store zipped (``uwsfmt.pack``), read the same way."""
    ids = fam.ids[: max(1, min(repeats, len(fam.ids)))]
    with uwsfmt.open(store_path) as store:
        mod = module_for(store.state_dict(ids[0], device=device), device)
    mod_base = module_for(load_file(fam.weights[0]), device)
    zipped = store_path + ".zip"
    if os.path.exists(zipped):
        os.remove(zipped)
    uwsfmt.pack(store_path, zipped)

    def fresh(path: str, mid: str) -> None:
        with uwsfmt.open(path) as st:
            st.load_into(mod, mid)

    t_dir, t_zip, t_base = [], [], []
    for i, mid in enumerate(ids):  # interleaved, page cache warm for all three
        t_dir.append(timed(lambda mid=mid: fresh(store_path, mid), device))
        t_zip.append(timed(lambda mid=mid: fresh(zipped, mid), device))
        t_base.append(timed(lambda i=i: mod_base.load_state_dict(load_file(fam.weights[i], device=device)), device))
    os.remove(zipped)
    d, z, b = summary(t_dir), summary(t_zip), summary(t_base)
    return {"store": d, "zip": z, "baseline": b, "ratio": d["median"] / b["median"], "zip_ratio": z["median"] / b["median"]}


def append(fam, store_path: str, workdir: str, device: str, *, repeats: int = 3) -> dict:
    """``Store.append`` of one checkpoint (projected onto the bases, its row written, the manifest
    committed) into a copy of the store, vs reading that checkpoint once (warm page cache both)."""
    copy = os.path.join(workdir, os.path.basename(store_path) + ".append")
    _clear([copy])
    shutil.copytree(store_path, copy)
    from uwsfmt.sources import discover

    t_app, t_read = [], []
    with uwsfmt.open(copy, mode="a") as store:
        for j in range(repeats):  # the same checkpoints again under new ids; timings alternate
            i = j % len(fam.paths)
            t_read.append(read_once([fam.weights[i]]))
            t_app.append(timed(lambda i=i, j=j: store.append(fam.paths[i], id=f"again-{j}", device=device), device))
        cks = []
        for j in range(repeats):  # the same ones once more, with one extend (bases read once, one commit)
            ck = discover([fam.paths[j % len(fam.paths)]])[0]
            ck.id = f"batch-{j}"
            cks.append(ck)
        t_ext = timed(lambda: store.extend(cks, device=device), device)
    _clear([copy])
    a, r = summary(t_app), summary(t_read)
    return {"append": a, "read_once": r, "ratio": a["median"] / r["median"], "extend_models": repeats,
            "extend_s": t_ext, "extend_per_model_s": t_ext / repeats}


# ---------------------------------------------------------------------------- random access


def random_access(fam, store_path: str, names: list[str] | None = None) -> list[dict]:
    """Bytes read from storage to get one tensor of one model, through a counting zarr store.

    Kinds: coefficients (the model's pack row, partial), mean, basis (left/right), metadata
    (zarr.json of the arrays touched), other (anything else: should be zero).
    """
    cs = counting_store(store_path)
    store = Store(store_path, cs, read_manifest(cs, store_path))
    entries = [e for e in store.manifest["tensors"] if e["encoding"] == "subspace"]
    if names is None:
        entries.sort(key=lambda e: -int(np.prod(e["shape"])))
        names = [entries[0]["name"]] if entries else []
        if len(entries) > 1:
            names.append(entries[len(entries) // 2]["name"])
    pack_paths = {info["path"] for info in store.manifest["packs"].values()}
    model = fam.ids[len(fam.ids) // 2]
    out = []
    for name in names:
        cs.reset()
        e = store.tensor_entry(name)
        store.clear_cache()
        t = store.tensor(model, e["name"])
        kinds = {"coefficients": 0, "mean": 0, "basis": 0, "metadata": 0, "other": 0}
        for key, n in cs.reads:
            if key.endswith("zarr.json"):
                kinds["metadata"] += n
            elif any(key.startswith(p + "/") for p in pack_paths):
                kinds["coefficients"] += n
            elif e.get("mean") and key.startswith(e["mean"] + "/"):
                kinds["mean"] += n
            elif any(e.get(s) and key.startswith(e[s] + "/") for s in ("left", "right")):
                kinds["basis"] += n
            else:
                kinds["other"] += n
        needed = {"coefficients": e["coefficients"]["length"] * 4,
                  "mean": int(np.prod(e["view"])) * 4 if e.get("mean") else 0,
                  "basis": sum((e["view"][i] * (e["rank"][i] or 0)) * 4 for i, s in enumerate(("left", "right")) if e.get(s))}
        out.append({"tensor": e["name"], "shape": e["shape"], "rank": e["rank"], "requests": len(cs.reads),
                    "bytes": kinds, "total": sum(kinds.values()), "needed": needed, "tensor_bytes": t.numel() * t.element_size()})
    return out


# ---------------------------------------------------------------------------- memory


def memory(fam, workdir: str, ns: tuple[int, ...], settings: dict, prefix: str = "memory") -> dict:
    """Peak RSS of ``convert`` over the first N models, each N in a fresh process."""
    probe = os.path.join(HERE, "memory_probe.py")
    out = {"settings": settings, "model_bytes": os.path.getsize(fam.weights[0]), "runs": {}}
    for n in ns:
        res = run_json(probe, os.path.join(workdir, f"{prefix}-{n}.uws"), json.dumps(settings), *fam.paths[:n])
        out["runs"][str(n)] = res
    lo, hi = out["runs"][str(min(ns))], out["runs"][str(max(ns))]
    out["growth"] = hi["peak_rss"] / lo["peak_rss"]
    out["growth_bytes"] = hi["peak_rss"] - lo["peak_rss"]
    return out


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"

