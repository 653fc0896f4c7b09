"""LoRA families under an error budget: sketched bases vs exact bases, end to end.

A synthetic LoRA family (default: 256 adapters of rank 16 on four 4096 x 4096 modules of one
layer, bf16 factors, as PEFT folders) is converted with ``--max-error`` both ways, alternating
(machine noise hits both alike): ``basis="exact"`` (the adapters' ranks add up to the layer
width, so the exact bases come from the 4096 x 4096 product Grams and their eigendecompositions)
and ``basis="sketch"`` (a sketch's Ritz vectors as candidates, see
``uwsfmt.encodings.lora.fit_budgeted``). Printed: the median build times and their ratio, the
stores' sizes, the worst error over every module and adapter (both must meet the budget), and
each module's ranks.

Run: ``python bench/lora_budget.py [--adapters 256] [--width 4096] [--rank 16] [--budget 0.15] [--repeats 2]``
(about 2.5 minutes at the defaults on 2 cores; the exact builds are most of it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import uwsfmt  # noqa: E402
from uwsfmt.families import iter_lora_family, write_peft_family  # noqa: E402


def _size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, default=256)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--budget", type=float, default=0.15)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        src = [str(d) for d in write_peft_family(
            iter_lora_family(a.adapters, layers=1, width=a.width, rank=a.rank, dtype=torch.bfloat16), os.path.join(tmp, "src"))]
        times: dict[str, list[float]] = {"exact": [], "sketch": []}
        stores = {}
        for _ in range(a.repeats):
            for basis in times:
                out = os.path.join(tmp, f"{basis}.uws")
                t = time.perf_counter()
                stores[basis] = uwsfmt.convert(src, out, max_error=a.budget, basis=basis, overwrite=True)
                times[basis].append(time.perf_counter() - t)
        sizes = {b: _size(os.path.join(tmp, f"{b}.uws")) for b in times}
        src_bytes = sum(_size(d) for d in src)
        worst = {b: float(st.errors().max()) for b, st in stores.items()}
        ranks = {b: [tuple(e["rank"]) for e in st.manifest["tensors"]] for b, st in stores.items()}
        methods = [e.get("basis", {}).get("method", "exact") for e in stores["sketch"].manifest["tensors"]]
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"LoRA family: {a.adapters} adapters of rank {a.rank} (bf16) on 4 modules {a.width}x{a.width} "
          f"(sum of ranks {a.adapters * a.rank} per module), --max-error {a.budget}, median of {a.repeats} alternating builds, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads")
    for b in times:
        print(f"  {b:6s}: build {med[b]:6.2f} s   store {sizes[b] / 2**20:6.2f} MiB ({src_bytes / sizes[b]:.1f}x smaller than "
              f"the adapters)   worst error {worst[b]:.4f}   ranks {ranks[b]}")
    print(f"  ratio sketch / exact: time {med['sketch'] / med['exact']:.3f}x, size {sizes['sketch'] / sizes['exact']:.3f}x; "
          f"sketched modules: {methods.count('sketch')} of {len(methods)}")
    return {"exact_s": med["exact"], "sketch_s": med["sketch"], "sizes": sizes, "worst": worst, "ranks": ranks}


if __name__ == "__main__":
    main()
