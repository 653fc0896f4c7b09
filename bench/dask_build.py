"""Build time on a Dask cluster vs the build in one process: one family, 1, 2 and 4 worker processes.

    python bench/dask_build.py            # 12 models x 16 tensors of 256x256 (+ 6 small ones)
    python bench/dask_build.py --quick    # 8 models x 12 tensors of 128x128
    python bench/dask_build.py --workers 1,2,4,8 --repeat 3

Each cluster is a ``LocalCluster`` of worker processes on this machine, one thread each (Dask
also sets each worker's BLAS and torch to one thread); the local build uses torch's default
threads (every core). A cluster's start and its first (warm-up) build, in which each worker
imports torch and uwsfmt (a warm-up task on each worker), are timed apart from the builds.
Two fidelities: the default error budget (per-tensor compute dominates) and a fixed rank 8
(reads, Python and task overheads dominate). Sources are in the page
cache for every build (warm reads). Every Dask store is checked to equal, file for file, the
store a local build computing with one torch thread writes (as each worker computes). Ratios are against the local build measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import dask.distributed as dd
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import uwsfmt  # noqa: E402  (after the path above: the checkout's uwsfmt)
from bench.common import cpu_name, table  # noqa: E402
from uwsfmt.testing.families import synthetic_family, write_family  # noqa: E402


def make_family(folder: str, n_models: int, n_tensors: int, side: int) -> str:
    shapes = {f"blocks.{j}.weight": (side, side) for j in range(n_tensors)}
    write_family(synthetic_family(n_models=n_models, shapes=shapes, rank=8, noise=1e-3, seed=0), os.path.join(folder, "src"))
    return os.path.join(folder, "src")


def files_of(store: str) -> dict[str, bytes]:
    out = {}
    for d, _, names in os.walk(store):
        for n in names:
            if not (d == store and n == "zarr.json"):  # the manifest holds timestamps
                with open(os.path.join(d, n), "rb") as f:
                    out[os.path.relpath(os.path.join(d, n), store)] = f.read()
    return out


def build_time(src: str, out: str, kw: dict, client=None) -> float:
    t = time.perf_counter()
    uwsfmt.convert(src, out, overwrite=True, client=client, **kw)
    return time.perf_counter() - t


def warm_up() -> None:
    """On each worker before the timed builds: the imports a worker's first task would pay."""
    import uwsfmt.writer.distributed  # noqa: F401


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small family, one repeat")
    ap.add_argument("--workers", default="1,2,4", help="worker process counts (default 1,2,4)")
    ap.add_argument("--models", type=int)
    ap.add_argument("--tensors", type=int)
    ap.add_argument("--side", type=int)
    ap.add_argument("--repeat", type=int)
    ap.add_argument("--workdir")
    a = ap.parse_args()
    n_models = a.models or (8 if a.quick else 12)
    n_tensors = a.tensors or (12 if a.quick else 16)
    side = a.side or (128 if a.quick else 256)
    repeat = a.repeat or 1
    fidelities = {"default budget": {}, "rank 8": {"rank": 8}}
    workers = [int(x) for x in a.workers.split(",")]
    work = a.workdir or tempfile.mkdtemp(prefix="uwsfmt-dask-bench-")
    try:
        src = make_family(work, n_models, n_tensors, side)
        size = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src))
        print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
              f"uwsfmt {uwsfmt.__version__}; load average before: {os.getloadavg()[0]:.1f}")
        print(f"family: {n_models} models x ({n_tensors} tensors of {side}x{side} + 6 small ones), {size / 2**20:.0f} MiB; "
              f"median of {repeat} build(s)")
        rows = []
        local: dict[str, float] = {}
        want: dict[str, dict[str, bytes]] = {}
        for name, kw in fidelities.items():
            out = os.path.join(work, "local.uws")
            build_time(src, out, kw)  # warm-up: imports, page cache
            local[name] = statistics.median(build_time(src, out, kw) for _ in range(repeat))
            # the reference bytes: a local build computing with one thread, as each worker does (some
            # BLAS/LAPACK reductions round differently with another thread count)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            build_time(src, out, kw)
            torch.set_num_threads(threads)
            want[name] = files_of(out)
            rows.append([name, "local (1 process)", f"{torch.get_num_threads()} torch threads", "", f"{local[name]:.2f}", "1.00", ""])
        for n in workers:
            t0 = time.perf_counter()
            with dd.LocalCluster(n_workers=n, processes=True, threads_per_worker=1, dashboard_address=":0") as cluster, \
                    dd.Client(cluster) as client:
                client.run(warm_up)
                start = time.perf_counter() - t0
                for name, kw in fidelities.items():
                    out = os.path.join(work, f"dask{n}.uws")
                    t = statistics.median(build_time(src, out, kw, client) for _ in range(repeat))
                    rows.append([name, f"dask, {n} worker{'s' if n > 1 else ''}", f"{n} x 1 thread", f"{start:.1f}", f"{t:.2f}",
                                 f"{t / local[name]:.2f}", "yes" if files_of(out) == want[name] else "NO"])
        rows.sort(key=lambda r: list(fidelities).index(r[0]))
        print()
        print(table(rows, ["fidelity", "build", "threads", "cluster start (s)", "build (s)", "vs local", "same store (1 thread)"]))
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
