"""LoRA families: product basis (default) vs the paper's factor-wise bases, on real PEFT adapters.

Trains the test suite's adapter family (tests/peft_family.py: one tiny base, one task per
adapter) and reports, per LoRA module (median over modules):

- k90 / k99: directions needed for 90% / 99% explained variance. Product mode: of the
  products s*B*A (left and right Grams share their eigenvalues). Factor-wise mode: of the
  mean-centred B's (left) and A's (right), as the paper decomposes them.
- mean relative error of the adapters' updates s*B*A rebuilt from the store at fixed k,
  ||s B A - rebuilt||_F / ||s B A||_F, averaged over adapters and modules;
- float32 values stored per adapter (cores or factor coefficients, plus the saved head) and
  bytes of the store.

Three families: one rank with each adapter's own random init of A, one rank with a shared init
(one seed for all: where much of the "universal subspace" comes from), and the test suite's
mixed family (ranks 4/6/8, one adapter without the embedding LoRA), product mode only.

Run: ``python bench/lora_modes.py [--tasks 16] [--rank 8] [--steps 40]`` (CPU, about two minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import uwsfmt  # noqa: E402
from tests.peft_family import AdapterSpec, default_specs, train_adapters  # noqa: E402
from uwsfmt.report import store_bytes  # noqa: E402
from uwsfmt.sources import open_checkpoint  # noqa: E402

KS = (2, 4, 8, 16)


def k_for(vals: np.ndarray, tau: float) -> int:
    total = vals.sum()
    if total <= 0:
        return 0
    return int(np.searchsorted(np.cumsum(vals) / total, tau - 1e-12) + 1)


def source_updates(dirs) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for d in dirs:
        ck = open_checkpoint(str(d))
        out[d.name] = {m: p.scale * ck.get(p.b).double() @ ck.get(p.a).double() for m, p in ck.lora_pairs().items()}
    return out


def product_errors(store, truth) -> float:
    errs = []
    for mid, mods in truth.items():
        for m, x in mods.items():
            errs.append(float((store.delta(mid, m).double() - (x.T if store.tensor_entry(m)["lora"]["fan_in_fan_out"] else x)).norm() / x.norm()))
    return float(np.mean(errs))


def factor_errors(store, dirs, truth) -> float:
    errs = []
    for d in dirs:
        ck = open_checkpoint(str(d))
        sd = store.state_dict(d.name)
        for m, p in ck.lora_pairs().items():
            y = p.scale * sd[p.b].double() @ sd[p.a].double()
            x = truth[d.name][m]
            errs.append(float((y - x).norm() / x.norm()))
    return float(np.mean(errs))


def spectra_k(store, mode: str) -> dict:
    k90, k99 = {"A": [], "B": [], "BA": []}, {"A": [], "B": [], "BA": []}
    for e in store.manifest["tensors"]:
        if e["encoding"] != "subspace":
            continue
        if e.get("lora"):
            key, side = "BA", "left"
        elif mode == "factors":
            key, side = ("A", "right") if "lora_A" in e["name"] or "lora_embedding_A" in e["name"] else ("B", "left")
        else:
            continue
        vals = store.read_array(e["spectrum"][side])
        k90[key].append(k_for(vals, 0.90))
        k99[key].append(k_for(vals, 0.99))
    med = {k: (int(np.median(v)) if v else None) for k, v in k90.items()}
    med99 = {k: (int(np.median(v)) if v else None) for k, v in k99.items()}
    return {"k90": med, "k99": med99}


def run(work: str, tasks: int, rank: int | None, steps: int, shared_init: bool = False) -> dict:
    if rank is None:  # the test suite's mixed family: product mode only (factor-wise cannot hold it)
        specs = default_specs(tasks)
    else:
        specs = [AdapterSpec(f"task-{t:02d}", t, rank, alpha=2.0 * rank) for t in range(tasks)]
    _, dirs = train_adapters(os.path.join(work, "adapters"), specs, steps=steps, shared_init=shared_init)
    truth = source_updates(dirs)
    src_bytes = sum(os.path.getsize(os.path.join(d, f)) for d in dirs for f in os.listdir(d) if f.endswith(".safetensors"))
    result = {"adapters": len(dirs), "rank": rank or "4/6/8 mixed", "shared_init": shared_init, "source_bytes": src_bytes, "modes": {}}
    modes = ("product",) if rank is None else ("product", "factors")
    for mode in modes:
        row = {"error": {}, "bytes": {}, "floats_per_adapter": {}}
        full = uwsfmt.convert([str(d) for d in dirs], os.path.join(work, f"{mode}-full.uws"), tau=1.0, lora_mode=mode, overwrite=True)
        row.update(spectra_k(full, mode))
        for k in KS:
            st = uwsfmt.convert([str(d) for d in dirs], os.path.join(work, f"{mode}-{k}.uws"), rank=k, lora_mode=mode, overwrite=True)
            row["error"][k] = product_errors(st, truth) if mode == "product" else factor_errors(st, dirs, truth)
            row["bytes"][k] = store_bytes(st.path)
            row["floats_per_adapter"][k] = st.manifest["packs"]["float32"]["width"]
        result["modes"][mode] = row
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=16)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as work:
        runs = {
            "one rank, own init": run(os.path.join(work, "same"), a.tasks, a.rank, a.steps),
            "one rank, shared init": run(os.path.join(work, "shared"), a.tasks, a.rank, a.steps, shared_init=True),
            "test family (mixed ranks)": run(os.path.join(work, "mixed"), 8, None, a.steps),
        }
    if a.json:
        print(json.dumps(runs, indent=1))
        return
    for title, res in runs.items():
        print(f"{title}: {res['adapters']} adapters, rank {res['rank']}, {res['source_bytes']} bytes of adapter weights")
        for mode, row in res["modes"].items():
            errs = "  ".join(f"k={k}: {v:.3f} ({row['floats_per_adapter'][k]} floats)" for k, v in row["error"].items())
            print(f"  {mode:8s} k90 {row['k90']}  k99 {row['k99']}")
            print(f"  {'':8s} mean rel. error of s*B*A  {errs}")


if __name__ == "__main__":
    main()
