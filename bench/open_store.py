"""How long opening a big store takes: 500 models x 300 tensors, metadata only.

    python bench/open_store.py [--models 500] [--tensors 300] [--workdir DIR]

Builds the store once (small tensors, so the build takes about a minute), then, each in a fresh
Python process (so imports count, as in a new notebook kernel): ``import uwsfmt``;
``uwsfmt.open``; ``open`` + the summary, tensor table, model table and error matrix the
Inspector shows; and ``jupyter_ext.Inspector(path)``. Baseline in the same run: ``json.load`` of
the root ``zarr.json`` (the bytes every reader must parse). Goal (issue 4): the Inspector opens
in under 2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

STEPS = {
    "json.load(zarr.json) (baseline)": "import json; json.load(open(P + '/zarr.json'))",
    "import uwsfmt": "import uwsfmt",
    "uwsfmt.open": "import uwsfmt; uwsfmt.open(P)",
    "open + summary/tables/errors": ("import uwsfmt; s = uwsfmt.open(P); s.summary(); s.tensor_table(); "
                                     "s.model_table(); s.errors()"),
    "jupyter_ext.Inspector(P)": "from jupyter_ext import Inspector; Inspector(P)",
}


def build(path: str, n_models: int, n_tensors: int) -> None:
    import uwsfmt

    rng = np.random.default_rng(0)
    shapes = [(16 + 8 * (i % 4), 16) for i in range(n_tensors)]
    base = {f"layers.{i}.weight": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)}
    dirs = {f"layers.{i}.weight": rng.standard_normal((s[0], 2)).astype(np.float32) for i, s in enumerate(shapes)}

    def models():
        import torch

        for m in range(n_models):
            r = np.random.default_rng(m + 1)
            sd = {}
            for name, w in base.items():
                d = dirs[name] @ r.standard_normal((2, w.shape[1])).astype(np.float32)
                sd[name] = torch.from_numpy(w + 0.1 * d + 1e-3 * r.standard_normal(w.shape).astype(np.float32))
            yield f"model-{m:04d}", sd

    uwsfmt.convert(dict(models()), path, rank=2, overwrite=True, progress=True)


def timed(code: str, path: str, repeats: int) -> list[float]:
    prog = f"import time; t0 = time.perf_counter(); P = {path!r}; {code}; print(time.perf_counter() - t0)"
    out = []
    for _ in range(repeats):
        r = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, cwd=ROOT, check=False)
        if r.returncode:
            raise SystemExit(f"step failed: {code}\n{r.stderr[-2000:]}")
        out.append(float(r.stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, default=500)
    ap.add_argument("--tensors", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workdir", default=os.environ.get("UWSFMT_BENCH_DIR", "/tmp/uwsfmt-bench"))
    a = ap.parse_args()
    path = os.path.join(a.workdir, f"open-{a.models}x{a.tensors}.uws")
    if not os.path.exists(os.path.join(path, "zarr.json")):
        os.makedirs(a.workdir, exist_ok=True)
        print(f"building {path} ...", flush=True)
        build(path, a.models, a.tensors)
    size = os.path.getsize(os.path.join(path, "zarr.json"))
    print(f"store: {a.models} models x {a.tensors} tensors; root zarr.json {size / 1e6:.2f} MB\n")
    print("| step (fresh process, imports included) | median | min | max |")
    print("|---|---:|---:|---:|")
    res = {}
    for label, code in STEPS.items():
        t = timed(code, path, a.repeats)
        res[label] = statistics.median(t)
        print(f"| {label} | {statistics.median(t):.2f} s | {min(t):.2f} s | {max(t):.2f} s |", flush=True)
    insp = res["jupyter_ext.Inspector(P)"]
    print(f"\nInspector open: {insp:.2f} s (goal < 2 s: {'met' if insp < 2 else 'NOT met'}); "
          f"without the uwsfmt import: {insp - res['import uwsfmt']:.2f} s")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "open_store.json"), "w") as f:
        json.dump({"models": a.models, "tensors": a.tensors, "root_json_bytes": size, "median_s": res}, f, indent=1)


if __name__ == "__main__":
    main()
