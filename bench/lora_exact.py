"""Exact LoRA bases: from the factors (QR of the stacked B's and A^T's) vs from the product Grams.

One LoRA module of a synthetic family (default: 32 adapters of rank 16 on a 4096 x 4096 layer,
the shape of the suite's LoRA family) is fitted on the exact path both ways, alternating
(machine noise hits both alike), and the script prints the median times, their ratio, and how
far the two agree (largest spectrum difference relative to the top eigenvalue; largest
difference of the kept projectors L L^T and R R^T).

Run: ``python bench/lora_exact.py [--width 4096] [--adapters 32] [--rank 16] [--repeats 3]``
(about a minute at the defaults on 2 cores; the Gram path is most of it).
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

from uwsfmt.encodings import lora  # noqa: E402
from uwsfmt.sources import discover  # noqa: E402
from uwsfmt.testing.families import lora_family, write_peft_family  # noqa: E402
from uwsfmt.writer.plan import plan_family  # noqa: E402
from uwsfmt.writer.settings import Settings


class _Quiet:
    def step(self, *args, **kw) -> None:
        pass


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        fam = lora_family(a.adapters, layers=1, modules=("q_proj",), width=a.width, rank=a.rank, shared_rank=8, seed=0)
        cks = discover([str(d) for d in write_peft_family(fam, tmp)])
        s = Settings(tau=0.99)
        tp = next(t for t in plan_family(cks, s).tensors if t.encoding == "lora")
        dev = torch.device("cpu")
        times: dict[str, list[float]] = {"factors": [], "grams": []}
        fits = {}
        for _ in range(a.repeats):
            for how, share in (("factors", 1.0), ("grams", 0.0)):
                lora.FACTORED_SHARE = share
                t = time.perf_counter()
                fits[how] = lora.fit(tp, cks, s, dev, _Quiet())
                times[how].append(time.perf_counter() - t)
        for ck in cks:
            ck.close()
    f, g = fits["factors"], fits["grams"]
    top = float(g.spectra["left"][0])
    spec = max(float((f.spectra[side] - g.spectra[side]).abs().max()) for side in ("left", "right")) / top
    proj = max(float((getattr(f, side).double() @ getattr(f, side).double().T
                      - getattr(g, side).double() @ getattr(g, side).double().T).abs().max()) for side in ("left", "right"))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"one LoRA module {a.width}x{a.width}, {a.adapters} adapters of rank {a.rank} (sum of ranks {a.adapters * a.rank}), "
          f"exact bases, median of {a.repeats} alternating runs, torch {torch.__version__} with {torch.get_num_threads()} threads")
    print(f"  from the factors (QR + {a.adapters * a.rank}^2 eigenproblem): {med['factors']:.3f} s")
    print(f"  from the product Grams ({a.width}^2, two eigh):        {med['grams']:.3f} s")
    print(f"  ratio factors / grams: {med['factors'] / med['grams']:.3f}x   kept ranks {f.rank} vs {g.rank}")
    print(f"  agreement: spectra {spec:.1e} of the top eigenvalue, kept projectors {proj:.1e}")
    return {"factors_s": med["factors"], "grams_s": med["grams"], "spectrum_diff": spec, "projector_diff": proj}


if __name__ == "__main__":
    main()
