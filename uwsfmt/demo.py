"""`uwsfmt demo`: make a small family on disk, convert it, read a model back, print a summary."""

from __future__ import annotations

import os
import tempfile
import time

import torch

from uwsfmt.api import convert
from uwsfmt.report import print_summary
from uwsfmt.sources import open_checkpoint
from uwsfmt.testing.families import synthetic_family, write_family


def run_demo(folder: str | None = None, n_models: int = 12) -> dict:
    """Build a synthetic family of ``n_models`` fine-tunes, convert it and report the result."""

    folder = folder or tempfile.mkdtemp(prefix="uwsfmt-demo-")
    src = os.path.join(folder, "checkpoints")
    os.makedirs(src, exist_ok=True)
    shapes = {
        f"blocks.{b}.{k}.weight": s
        for b in range(4)
        for k, s in (("attn.qkv", (384, 128)), ("attn.proj", (128, 128)), ("mlp.fc1", (512, 128)), ("mlp.fc2", (128, 512)))
    }
    fam = synthetic_family(n_models=n_models, shapes=shapes, rank=6, noise=2e-4, delta_scale=0.02, seed=0)
    paths = write_family(fam, src)
    print(f"wrote {len(paths)} fine-tunes of one small transformer-like model to {src}")
    out = os.path.join(folder, "family.uws")
    t0 = time.perf_counter()
    store = convert(paths, out, tau=0.99, residual_bits=8, overwrite=True, progress=True)
    dt = time.perf_counter() - t0
    print(f"converted in {dt:.1f} s -> {out}")
    print_summary(store)
    mid = store.model_ids[3]
    sd = store.state_dict(mid)
    orig = open_checkpoint(paths[3])
    worst = max(
        float((sd[k].double() - orig.get(k).double()).norm() / max(orig.get(k).double().norm(), 1e-30))
        for k in sd
    )
    print(f"read back {mid!r}: {len(sd)} tensors, max relative error vs its source {worst:.2e}")
    problems = store.validate()
    print("validate:", "ok" if not problems else problems)
    s = store.summary()
    return {"store": out, "ratio": s["ratio"], "error_max": s["error_max"], "readback_error": worst,
            "valid": not problems, "dtype_ok": all(sd[k].dtype == orig.get(k).dtype for k in sd)}


if __name__ == "__main__":
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    run_demo()
