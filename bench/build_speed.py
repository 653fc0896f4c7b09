"""Build speed per core: the single-process build vs reading the sources once, and vs its arithmetic.

    python bench/build_speed.py                 # ViT-B-shaped family, 8 models (2.6 GB), 3 cold pairs
    python bench/build_speed.py --quick         # 2 blocks, 1 cold pair
    python bench/build_speed.py --family many   # any family of bench/sources.py

For the exact build (``rank=16``) and the sketch build (``rank=16, basis="sketch"``), in one process
with torch's default threads:

- *warm*: the build with the sources in the page cache, against reading every checkpoint once
  (safetensors ``load_file`` + touching every value) from the page cache;
- *cold*: pairs of (cold read, cold build), each starting with the sources dropped from the page
  cache, one right after the other; the median of the pairs' ratios (bench/measure.py);
- *arithmetic*: the build's GEMM work at this machine's GEMM rate, measured in the same run on the
  Gram's own shape (upper-block products, float32 and float64): the exact path's Gram products
  (float32 for tensors of 2^18 values or more, float64 below) and their eigendecompositions
  (timed on the same Gram sizes); the sketch's thin products (an estimate: one product in the
  sketch sweep and two in the Rayleigh-Ritz sweep, with its recorded widths). "Other" is the
  build's time beyond it: reading, hashing, copies, writing, Python.

It ends with a paper estimate of a 500-model 7B family (Llama-2-7B shapes, bfloat16 sources) built
on 32 Dask workers, from the rates measured here (see ``estimate_7b``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import uwsfmt  # noqa: E402  (after the path above: the checkout's uwsfmt)
from bench import measure, sources  # noqa: E402
from bench.common import cpu_name, fmt_s, table  # noqa: E402
from uwsfmt.numerics import gram  # noqa: E402
from uwsfmt.writer.settings import FLOAT32_GRAM_MIN_NUMEL  # noqa: E402

BUILDS = {"exact": {"rank": 16}, "sketch": {"rank": 16, "basis": "sketch"}}


def _blocks_fraction(d: int) -> float:
    """Share of a full d x d GEMM that :func:`uwsfmt.numerics.gram.gram_upper_add_` computes."""
    nb = len(gram._gram_edges(d)) - 1
    return (nb * (nb + 1) / 2) / (nb * nb)


def gemm_rate(d: int, k: int, dtype: torch.dtype, repeat: int = 5) -> float:
    """FLOP/s of the blocked Gram product g += a a^T (a: d x k) on this machine, all torch threads."""
    a = torch.randn(d, k, dtype=dtype)
    g = torch.zeros(d, d, dtype=dtype)
    gram.gram_upper_add_(g, a)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        gram.gram_upper_add_(g, a)
        times.append(time.perf_counter() - t)
    return 2.0 * d * d * k * _blocks_fraction(d) / statistics.median(times)


def eigh_seconds(d: int, repeat: int = 3) -> float:
    a = torch.randn(d, d, dtype=torch.float64)
    g = a @ a.T
    torch.linalg.eigh(g)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        torch.linalg.eigh(g)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def gram_work(store) -> list[tuple[int, int, str]]:
    """(Gram side d, inner dimension K, product dtype) of every side of every subspace tensor."""
    out = []
    for e in store.manifest["tensors"]:
        if e["encoding"] != "subspace":
            continue
        m, n = e["view"]
        dt = "float32" if m * n >= FLOAT32_GRAM_MIN_NUMEL and e["dtype"] != "float64" else "float64"
        for side, r in zip(("left", "right"), e["rank"]):
            if r is not None:
                out.append((m, n, dt) if side == "left" else (n, m, dt))
    return out


def arithmetic(store, n_models: int, basis: str, rates: dict, eighs: dict) -> dict:
    """Seconds of GEMM/eigh work the build cannot avoid, at the rates measured here."""
    gemm = eig = 0.0
    for d, k, dt in gram_work(store):
        if basis == "exact":
            # n models' products, plus the mean's n mu mu^T (one more), upper blocks only
            gemm += (n_models + 1) * 2.0 * d * d * k * _blocks_fraction(d) / rates[dt]
            if d not in eighs:  # timed once per Gram size
                eighs[d] = eigh_seconds(d)
            eig += eighs[d]
    if basis == "sketch":
        for e in store.manifest["tensors"]:
            cols = (e.get("basis") or {}).get("columns") or {}
            if e["encoding"] == "subspace" and cols:
                m, n = e["view"]
                for t in cols.values():
                    gemm += n_models * 3 * 2.0 * m * n * t / rates["float32"]
    return {"gemm_s": gemm, "eigh_s": eig, "total_s": gemm + eig}


#: Llama-2-7B: 32 layers of q, k, v, o (4096 x 4096) and gate, up (11008 x 4096), down (4096 x 11008)
LLAMA7B = {"layers": 32, "hidden": 4096, "mlp": 11008, "bytes": 13.5e9}


def estimate_7b(rate_core32: float, eigh768: float, read_bps: float, models: int = 500, workers: int = 32,
                cores: int = 16) -> tuple[list[list[str]], float]:
    """Paper estimate of an exact rank-16 build of ``models`` 7B fine-tunes on ``workers`` Dask
    workers of ``cores`` cores each, from per-core rates measured here. Pass 1 (one task per
    tensor: read that tensor of every model, float32 Gram products, float64 eigh), pass 2 (one
    task per model: read it, project it, write its row). Assumes each worker reads its sources
    at ``read_bps`` (this machine's cold read) and GEMMs scale with cores; ignores the driver's
    writes of the means (one model's worth) and task overheads (seconds)."""
    h, f, L = LLAMA7B["hidden"], LLAMA7B["mlp"], LLAMA7B["layers"]
    shapes = [(h, h)] * 4 + [(h, f)] * 3  # (Gram side, inner dimension)
    flops_model = L * sum(2.0 * d * d * k * _blocks_fraction(d) for d, k in shapes)
    tensors = L * len(shapes)
    gemm_s = models * flops_model / (rate_core32 * cores)  # all pass 1's products, one worker
    eigh_s = tensors * eigh768 * (h / 768) ** 3  # one worker: every tensor's 4096 x 4096 eigh
    read_s = models * LLAMA7B["bytes"] / read_bps  # one pass over every source, one worker
    proj_s = models * L * sum(2.0 * 16 * d * k for d, k in shapes) / (rate_core32 * cores)
    pass1 = (gemm_s + eigh_s + read_s) / workers
    pass2 = (read_s + proj_s) / workers
    rows = [
        ["Gram products (float32, upper blocks)", f"{flops_model / 1e12:.1f} TFLOP per model", fmt_s(gemm_s), fmt_s(gemm_s / workers)],
        ["eigendecompositions (4096 x 4096, float64, one core each)", f"{tensors} tensors", fmt_s(eigh_s), fmt_s(eigh_s / workers)],
        ["reading the sources, pass 1", f"{models} x {LLAMA7B['bytes'] / 1e9:.1f} GB", fmt_s(read_s), fmt_s(read_s / workers)],
        ["reading the sources, pass 2", "the same again", fmt_s(read_s), fmt_s(read_s / workers)],
        ["coefficients (rank 16)", "", fmt_s(proj_s), fmt_s(proj_s / workers)],
        ["total", "", fmt_s(gemm_s + eigh_s + 2 * read_s + proj_s), fmt_s(pass1 + pass2)],
    ]
    return rows, pass1 + pass2


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="vit", choices=sorted(sources.MAKERS))
    ap.add_argument("--quick", action="store_true", help="the family's small configuration, one cold pair")
    ap.add_argument("--cold-pairs", type=int, default=None, help="cold (read, build) pairs per build (default 3; 1 with --quick)")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "uwsfmt-bench"))
    ap.add_argument("--json", default=None, help="also write the figures here")
    a = ap.parse_args(argv)
    mode = "quick" if a.quick else "full"
    pairs = a.cold_pairs if a.cold_pairs is not None else (1 if a.quick else 3)
    os.makedirs(a.workdir, exist_ok=True)
    fam = sources.MAKERS[a.family](a.workdir, sources.CONFIGS[a.family][mode])
    threads = torch.get_num_threads()
    print(f"# build speed: {fam.title}; {len(fam.paths)} models, {fam.source_bytes / 1e9:.2f} GB; "
          f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} ({threads} threads)\n")

    warm_read = statistics.median(measure.read_once(fam.weights) for _ in range(3))
    rates = {"float32": gemm_rate(768, 3072, torch.float32), "float64": gemm_rate(768, 3072, torch.float64)}
    eighs: dict[int, float] = {}
    rows, out = [], {"family": fam.name, "models": len(fam.paths), "source_bytes": fam.source_bytes,
                     "warm_read_s": warm_read, "gemm_flops": rates, "threads": threads, "builds": {}}
    for name, settings in BUILDS.items():
        path = os.path.join(a.workdir, f"build-speed-{fam.name}-{name}.uws")
        r = measure.build(fam, path, settings, "cpu", cold_repeats=pairs)
        with uwsfmt.open(path) as store:
            ar = arithmetic(store, len(fam.paths), settings.get("basis", "exact"), rates, eighs)
        r["arithmetic"] = ar
        out["builds"][name] = {k: v for k, v in r.items() if k not in ("errors",)}
        rows.append([name, fmt_s(r["seconds"]), f"{r['seconds'] / warm_read:.1f}x", fmt_s(ar["total_s"]),
                     f"{ar['total_s'] / warm_read:.1f}x", fmt_s(r["seconds"] - ar["total_s"]),
                     fmt_s(r.get("cold_seconds")), fmt_s(r.get("cold_read_seconds")),
                     f"{r['cold_ratio']:.2f}x" if r.get("cold_ratio") else "-"])
    print(table(rows, ["build", "warm", "vs warm read", "arithmetic", "arithmetic / warm read", "other",
                       "cold build", "cold read", "cold ratio (goal <= 3x)"]))
    print(f"\nwarm read {fmt_s(warm_read)}; GEMM rate (768 x 768 Gram of K = 3072, upper blocks): "
          f"float32 {rates['float32'] / 1e9:.1f} GFLOP/s, float64 {rates['float64'] / 1e9:.1f} GFLOP/s "
          f"({threads} threads); eigh {', '.join(f'{d}: {fmt_s(s)}' for d, s in sorted(eighs.items()))}")

    cold = out["builds"]["exact"].get("cold_read_seconds") or warm_read
    read_bps = fam.source_bytes / cold
    eigh768 = eighs.get(768) or eigh_seconds(768)
    est, total = estimate_7b(rates["float32"] / threads, eigh768 * threads, read_bps)
    print("\n## Paper estimate: 500 Llama-2-7B fine-tunes (bfloat16), exact rank 16, 32 Dask workers of 16 cores\n")
    print(f"Per-core rates measured above: float32 Gram GEMMs {rates['float32'] / threads / 1e9:.1f} GFLOP/s per core, "
          f"eigh (768) {fmt_s(eigh768 * threads)} core-seconds scaled by d^3, reads {read_bps / 1e9:.2f} GB/s per worker "
          f"(this machine's cold read).\n")
    print(table(est, ["step", "size", "one worker", "32 workers"]))
    print(f"\nestimated wall time: {total / 3600:.1f} h (perfect balance over 224 tensor tasks and 500 model tasks)")
    out["estimate_7b_s"] = total
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
