"""Error budgets on sketched bases vs exact bases, end to end, on the two kinds of family
where the exact bases are expensive.

- ``lora``: 256 adapters of rank 16 on four 4096 x 4096 modules of one layer (bf16 factors,
  PEFT folders). The adapters' ranks add up to the layer width, so the exact bases come from
  the 4096 x 4096 product Grams and their eigendecompositions.
- ``wide``: 8 full fine-tunes of a 4096 x 4096 and a 4096 x 2048 weight (bf16, shared base +
  rank-16 deltas + noise), the size of an LLM's projections: the exact path accumulates each
  model's float64 Gram of the wide side.

Each family is converted with ``max_error`` both ways, alternating (machine noise hits both
alike): ``basis="exact"`` and ``basis="sketch"`` (the sketch's directions as the candidates,
checked; see ``uwsfmt.writer.fit.budget_tensor`` and ``uwsfmt.encodings.lora.fit_budgeted``).
Printed per family: the median build times and their ratio, the stores' sizes, the worst error
over every tensor and model (both must meet the budget), and each tensor's choice.

Run: ``python bench/budget_sketch.py [--families lora,wide] [--repeats 2]``
(about 4 minutes at the defaults on 2 cores; the exact builds are most of it).
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
from uwsfmt.testing.families import iter_lora_family, synthetic_family, write_family, write_peft_family  # noqa: E402

FAMILIES = {
    "lora": ("256 adapters of rank 16 (bf16) on 4 modules 4096x4096 (sum of ranks 4096 per module)", 0.15),
    "wide": ("8 full fine-tunes of 4096x4096 + 4096x2048 (bf16, rank-16 deltas + noise)", 0.01),
}


def _size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _write(name: str, folder: str) -> list[str]:
    if name == "lora":
        fam = iter_lora_family(256, layers=1, width=4096, rank=16, dtype=torch.bfloat16)
        return [str(d) for d in write_peft_family(fam, folder)]
    fam = synthetic_family(8, shapes={"a.weight": (4096, 4096), "b.weight": (4096, 2048)}, rank=16, noise=1e-3,
                           extra=False, dtype=torch.bfloat16)
    return [str(p) for p in write_family(fam, folder)]


def _choice(e: dict) -> str:
    b = e["budget"]
    if b.get("ranks"):
        return f"({b['ranks'][0]},{b['ranks'][1]})"
    bits = "" if b["residual_bits"] is None else f"+{b['residual_bits']}b"
    return f"{b['mode']} {b['rank']}{bits}" if b["mode"] else "dense"


def run_family(name: str, repeats: int, tmp: str) -> dict:
    what, budget = FAMILIES[name]
    src = _write(name, os.path.join(tmp, name))
    times: dict[str, list[float]] = {"exact": [], "sketch": []}
    stores = {}
    for _ in range(repeats):
        for basis in times:
            out = os.path.join(tmp, f"{name}-{basis}.uws")
            t = time.perf_counter()
            stores[basis] = uwsfmt.convert(src, out, max_error=budget, basis=basis, overwrite=True)
            times[basis].append(time.perf_counter() - t)
    sizes = {b: _size(os.path.join(tmp, f"{name}-{b}.uws")) for b in times}
    src_bytes = sum(_size(p) if os.path.isdir(p) else os.path.getsize(p) for p in src)
    worst = {b: float(st.errors().max()) for b, st in stores.items()}
    choices = {b: [_choice(e) for e in st.manifest["tensors"]] for b, st in stores.items()}
    methods = [e.get("basis", {}).get("method", "exact") for e in stores["sketch"].manifest["tensors"]]
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{name}: {what}, max_error {budget}, median of {repeats} alternating builds")
    for b in times:
        print(f"  {b:6s}: build {med[b]:6.2f} s   store {sizes[b] / 2**20:7.2f} MiB ({src_bytes / sizes[b]:.1f}x smaller "
              f"than the sources)   worst error {worst[b]:.4f}   {choices[b]}")
    print(f"  ratio sketch / exact: time {med['sketch'] / med['exact']:.3f}x, size {sizes['sketch'] / sizes['exact']:.3f}x; "
          f"sketched tensors: {methods.count('sketch')} of {len(methods)}")
    return {"exact_s": med["exact"], "sketch_s": med["sketch"], "sizes": sizes, "worst": worst, "choices": choices}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="lora,wide", help="comma-separated: " + ", ".join(FAMILIES))
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args(argv)
    names = [x.strip() for x in a.families.split(",") if x.strip()]
    for x in names:
        if x not in FAMILIES:
            ap.error(f"unknown family {x!r}; choose from {', '.join(FAMILIES)}")
    print(f"torch {torch.__version__} with {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        return {x: run_family(x, a.repeats, tmp) for x in names}


if __name__ == "__main__":
    main()
