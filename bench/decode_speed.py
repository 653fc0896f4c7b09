"""Decode speed at every storage setting: loading one model from a store into a torch module vs
``module.load_state_dict(safetensors.torch.load_file(path))`` of its source file.

    python bench/decode_speed.py            # 6 models of a 3-block, width-384 transformer (21 MB each)
    python bench/decode_speed.py --quick    # 4 models, 1 block

The stores cover what a reader decodes: the default error budget (quantized coefficients and
residuals as the budget picks them), a fixed rank with no residual, and rank 8 plus a residual of
1, 2, 4 and 8 bits (per-row scales on wide views, per-column scales on views at least twice as
tall as wide, format 1.3), one of them with 8/4/2-bit coefficients. Each is timed by
``bench/measure.materialise``: store and baseline interleaved, page cache warm, bases cached on
the device; on CPUs with the native kernel also with the kernel suspended (torch's GEMMs and a
separate residual pass), and from a cold page cache. The goal (issue 25, point 6): at most 1.0x the
baseline at any setting.

The family is synthetic (a base + rank-8 deviations + noise per model, float32): decoding cost
depends on shapes, ranks and bit widths, not on what the weights mean.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from types import SimpleNamespace

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import uwsfmt  # noqa: E402  (after the path above: the checkout's uwsfmt)
from bench import measure  # noqa: E402
from uwsfmt.numerics import native  # noqa: E402
from uwsfmt.testing.families import synthetic_family  # noqa: E402

#: store name -> convert() keywords
STORES = {
    "default (error budget)": {},
    "rank 16, no residual": {"rank": 16},
    "rank 8 + 1-bit residual": {"rank": 8, "residual_bits": 1},
    "rank 8 + 2-bit residual": {"rank": 8, "residual_bits": 2},
    "rank 8 + 4-bit residual": {"rank": 8, "residual_bits": 4},
    "rank 8 + 8-bit residual": {"rank": 8, "residual_bits": 8},
    "rank 8 + 4-bit residual, 8/4/2-bit coefficients": {"rank": 8, "residual_bits": 4, "coefficient_bits": "8/4/2"},
}


def shapes(blocks: int, width: int) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for b in range(blocks):
        out.update({f"blocks.{b}.qkv.weight": (3 * width, width), f"blocks.{b}.proj.weight": (width, width),
                    f"blocks.{b}.fc1.weight": (4 * width, width), f"blocks.{b}.fc2.weight": (width, 4 * width)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", type=int, default=None)
    ap.add_argument("--blocks", type=int, default=None)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    n = args.models or (4 if args.quick else 6)
    blocks = args.blocks or (1 if args.quick else 3)
    fam_sd = synthetic_family(n_models=n, shapes=shapes(blocks, args.width), rank=8, noise=0.02, extra=False, seed=0)
    work = tempfile.mkdtemp(prefix="uwsfmt-decode-")
    ids, paths = list(fam_sd), []
    for mid in ids:
        paths.append(os.path.join(work, f"{mid}.safetensors"))
        save_file({k: v.contiguous() for k, v in fam_sd[mid].items()}, paths[-1])
    fam = SimpleNamespace(ids=ids, weights=paths)
    model_mb = os.path.getsize(paths[0]) / 1e6
    kernel = native.status()["isa"]
    print(f"{n} models of {model_mb:.1f} MB ({blocks} blocks, width {args.width}); torch threads {torch.get_num_threads()}; "
          f"native kernel: {kernel or 'none'}", flush=True)
    rows = []
    for i, (name, kw) in enumerate(STORES.items()):
        path = os.path.join(work, f"store-{i}.uws")
        t = time.perf_counter()
        st = uwsfmt.convert(paths, path, progress=False, **kw)
        built = time.perf_counter() - t
        ents = [e for e in st.manifest["tensors"] if e["encoding"] == "subspace"]
        what = sorted({f"r{max(x or 0 for x in e['rank'])}" + (f"+{e['residual']['bits']}b" + ("/col" if e["residual"].get("axis") else "")
                                                               if e.get("residual") else "")
                       + ("+q" if "bits" in e["coefficients"] else "") for e in ents})
        ratio = sum(os.path.getsize(p) for p in paths) / st.nbytes()
        st.close()
        r = measure.materialise(fam, path, "cpu", models=min(4, n), seconds=1.0 if args.quick else 3.0,
                                cold_repeats=1 if args.quick else 3)
        row = {"store": name, "settings": kw, "built_s": built, "compression": ratio, "tensors": what,
               "store_ms": r["store"]["median"] * 1e3, "baseline_ms": r["baseline"]["median"] * 1e3, "ratio": r["ratio"],
               "torch_path_ratio": r.get("ratio_torch"), "cold_ratio": r["cold_ratio"]}
        rows.append(row)
        torch_part = f", torch path {row['torch_path_ratio']:.2f}x" if row["torch_path_ratio"] else ""
        print(f"  {name}: {row['store_ms']:.1f} ms vs {row['baseline_ms']:.1f} ms = {row['ratio']:.2f}x{torch_part}, "
              f"cold {row['cold_ratio']:.2f}x; {ratio:.1f}x smaller; {', '.join(what)}", flush=True)
    os.makedirs(args.results, exist_ok=True)
    out = {"models": n, "blocks": blocks, "width": args.width, "model_mb": model_mb, "kernel": kernel,
           "threads": torch.get_num_threads(), "when": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}
    suffix = "-quick" if args.quick else ""
    with open(os.path.join(args.results, f"decode_speed{suffix}.json"), "w") as fh:
        json.dump(out, fh, indent=1)
    lines = ["# Decode speed at every storage setting\n",
             f"`python bench/decode_speed.py{' --quick' if args.quick else ''}` ({out['when']}): {n} models of {model_mb:.1f} MB "
             f"({blocks} blocks, width {args.width}, float32), torch threads {out['threads']}, native kernel "
             f"{kernel or 'none'}. *store*: `store.load_into(module, id)`, bases cached; *baseline*: "
             "`module.load_state_dict(load_file(path))`; both page-cache warm, interleaved, medians; *torch path*: the "
             "store with the native kernel suspended; *cold*: both files dropped from the page cache first. "
             "Tensors: rank (`rN`), residual bits (`/col`: per-column scales), `+q`: quantized coefficients.\n",
             "| store | tensors | smaller | store | baseline | ratio (goal <= 1.0x) | torch path | cold |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        tp = f"{r['torch_path_ratio']:.2f}x" if r["torch_path_ratio"] else "-"
        lines.append(f"| {r['store']} | {', '.join(r['tensors'])} | {r['compression']:.1f}x | {r['store_ms']:.1f} ms | "
                     f"{r['baseline_ms']:.1f} ms | {r['ratio']:.2f}x | {tp} | {r['cold_ratio']:.2f}x |")
    with open(os.path.join(args.results, f"decode_speed{suffix}.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"results in {args.results}/decode_speed{suffix}.md")


if __name__ == "__main__":
    main()
