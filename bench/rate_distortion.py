"""Rate-distortion of UWS stores with error budgets against the honest baselines.

For each family: bytes and a quality metric for every baseline of ``bench/baselines.py`` and
for our automatic choice at several error budgets, then an equal-quality comparison (for each
baseline, our smallest store at least as good). Families:

- ``trained``: digits MLPs really fine-tuned from one base (``uwsfmt.testing.families.trained_family``);
  metric = held-out task accuracy (%) of each model on its own task, measured through the
  functional hook ``uwsfmt.evaluate`` for our stores.
- ``lowrank``: synthetic shared base + rank-8 deltas + small iid noise (the paper's picture).
- ``noise``: synthetic deltas with no shared structure (iid), where a subspace cannot help.
  Synthetic metric = worst relative weight error over tensors and models (lower is better).

    python bench/rate_distortion.py                       # all families, writes bench/results/
    python bench/rate_distortion.py --families trained --tasks 40 --hidden 256

Bytes: baselines count raw values only (no container); our stores count their size on disk,
metadata included (zarr.json files and the manifest), which favours the baselines.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import baselines as B  # noqa: E402

import uwsfmt  # noqa: E402
from bench.trained import trained_family  # noqa: E402
from uwsfmt.evaluate import summarize  # noqa: E402
from uwsfmt.report import store_bytes  # noqa: E402
from uwsfmt.testing.families import synthetic_family  # noqa: E402

#: error budgets tried on each family: (max_error, max_delta_error)
BUDGETS = {
    "trained": [(None, 0.75), (None, 0.7), (None, 0.65), (None, 0.6), (None, 0.55), (None, 0.5), (None, 0.45), (None, 0.3), (None, 0.1), (None, 0.03),
                (0.1, None), (0.05, None), (0.01, None), (0.0, None)],
    "lowrank": [(None, 0.3), (None, 0.1), (None, 0.03), (1e-2, None), (1e-3, None), (7e-4, None), (5e-4, None),
                (2e-4, None), (1e-4, None), (0.0, None)],
    "noise": [(None, 0.7), (None, 0.65), (None, 0.45), (None, 0.3), (None, 0.1), (1e-2, None), (1e-3, None), (0.0, None)],
}
SYNTH_SHAPES = {"blocks.0.attn.qkv.weight": (384, 128), "blocks.0.mlp.fc1.weight": (512, 128),
                "blocks.0.mlp.fc2.weight": (128, 512), "blocks.0.attn.proj.weight": (128, 128)}


def _label(max_error, max_delta_error) -> str:
    parts = []
    if max_error is not None:
        parts.append(f"--max-error {max_error:g}")
    if max_delta_error is not None:
        parts.append(f"--max-delta-error {max_delta_error:g}")
    return "ours " + " ".join(parts)


def make_family(name: str, args):
    if name == "trained":
        tf = trained_family(n_tasks=args.tasks, hidden=args.hidden, seed=args.seed)
        return tf.state_dicts, tf
    if name == "lowrank":
        return synthetic_family(n_models=args.models, shapes=SYNTH_SHAPES, rank=8, noise=1e-3, delta_scale=0.02,
                                seed=args.seed), None
    if name == "noise":
        return synthetic_family(n_models=args.models, shapes=SYNTH_SHAPES, rank=0, noise=0.02, delta_scale=0.0,
                                seed=args.seed), None
    raise SystemExit(f"unknown family {name!r}")


def run_family(name: str, args, workdir: str) -> dict:
    t0 = time.time()
    fam, tf = make_family(name, args)
    raw = B.safetensors_bytes(fam)
    rows = []

    def metric_of(rec) -> dict:
        errs = B.relative_errors(fam, rec)
        out = {"max_error": float(errs.max()), "mean_error": float(errs.mean())}
        if tf is not None:
            accs = {m: tf.evaluate(m, rec[m]) for m in fam}
            out["acc"] = float(np.mean(list(accs.values())))
            out["worst_drop"] = float(max(orig_acc[m] - accs[m] for m in fam))
        return out

    orig_acc = tf.accuracies() if tf is not None else None
    if tf is not None:
        rows.append({"method": "originals (safetensors)", "bytes": raw, "acc": float(np.mean(list(orig_acc.values()))),
                     "worst_drop": 0.0, "max_error": 0.0, "mean_error": 0.0, "kind": "original", "note": ""})
    else:
        rows.append({"method": "originals (safetensors)", "bytes": raw, "max_error": 0.0, "mean_error": 0.0,
                     "kind": "original", "note": ""})
    for res in (B.delta_quant(fam, 8), B.delta_quant(fam, 4), B.bitdelta(fam), B.zstd_safetensors(fam),
                B.rank_subspace(fam, 16, workdir=workdir)):
        rows.append({"method": res.method, "bytes": res.bytes, **metric_of(res.models), "kind": "baseline", "note": res.note})
        print(f"  [{name}] {res.method}: {res.bytes} B", flush=True)
    # each budget as convert() does it (float16 means where the rounding stays within a tenth of
    # the budget), then with float32 means (a budget of 0 keeps float32 anyway)
    for me, mde, md in [(me, mde, md) for me, mde in BUDGETS[name] for md in ("auto", "compute") if md == "auto" or me or mde]:
        path = os.path.join(workdir, f"{name}-{me}-{mde}-{md}.uws")
        t = time.time()
        store = uwsfmt.convert(fam, path, max_error=me, max_delta_error=mde, mean_dtype=md, overwrite=True)
        build_s = time.time() - t
        rec = {m: store.state_dict(m) for m in store.model_ids}
        row = {"method": _label(me, mde) + (" --mean-dtype compute" if md == "compute" else ""), "bytes": store_bytes(path),
               **metric_of(rec), "kind": "ours", "build_s": build_s, "max_error_budget": me, "max_delta_error_budget": mde,
               "mean_dtype": md,
               "note": ", ".join(f"{e['name'].split('.')[-2] if '.' in e['name'] else e['name']}:"
                                 f"{'dense' if e['encoding'] == 'dense' else _choice(e)}"
                                 for e in store.manifest["tensors"] if e.get("budget") and e["shape"] and len(e["shape"]) >= 2)}
        if tf is not None:  # the functional hook gives the same numbers as evaluating the rebuilt state dicts
            hook = summarize(uwsfmt.evaluate(store, tf.evaluate, sources=fam))
            assert abs(hook["reconstructed"] - row["acc"]) < 1e-9 and abs(hook["original"] - rows[0]["acc"]) < 1e-9
        store.close()
        shutil.rmtree(path, ignore_errors=True)
        rows.append(row)
        print(f"  [{name}] {row['method']}: {row['bytes']} B in {build_s:.1f} s", flush=True)
    for r in rows:
        r["ratio"] = raw / r["bytes"]
    return {"family": name, "raw_bytes": raw, "n_models": len(fam), "rows": rows, "seconds": time.time() - t0,
            "comparison": compare(rows, tf is not None)}


def _choice(e: dict) -> str:
    b = e["budget"]
    bits = "" if b["residual_bits"] is None else f"+{b['residual_bits']}b"
    return f"{b['mode'][0]}{b['rank']}{bits}"


def better_or_equal(r: dict, ref: dict, task: bool) -> bool:
    if task:
        return r["acc"] >= ref["acc"] - 1e-9
    return r["max_error"] <= ref["max_error"] + 1e-12


def compare(rows: list[dict], task: bool) -> dict:
    """For each baseline: our smallest store at least as good, and the size ratio."""
    ours = [r for r in rows if r["kind"] == "ours"]
    out = {"vs": []}
    for b in (r for r in rows if r["kind"] == "baseline"):
        ok = [r for r in ours if better_or_equal(r, b, task)]
        best = min(ok, key=lambda r: r["bytes"]) if ok else None
        out["vs"].append({"baseline": b["method"], "baseline_bytes": b["bytes"],
                          "ours": best["method"] if best else None, "ours_bytes": best["bytes"] if best else None,
                          "ratio": (b["bytes"] / best["bytes"]) if best else None})
    if task:
        orig = next(r for r in rows if r["kind"] == "original")
        keep = [r for r in ours if r["acc"] >= orig["acc"] - 0.5]
        if keep:
            best = min(keep, key=lambda r: r["bytes"])
            out["within_half_point"] = {
                "ours": best["method"], "bytes": best["bytes"], "acc": best["acc"],
                "vs_baselines_within_half_point": {b["method"]: b["bytes"] / best["bytes"] for b in rows
                                                   if b["kind"] == "baseline" and b["acc"] >= orig["acc"] - 0.5},
            }
    return out


def table(result: dict) -> str:
    task = "acc" in result["rows"][0]
    head = "| method | bytes | vs safetensors |" + (" mean acc (%) | Δ acc | worst task Δ |" if task else "") + \
        " max rel. error | per-matrix choice |\n|---|---:|---:|" + ("---:|---:|---:|" if task else "") + "---:|---|\n"
    lines = []
    orig = result["rows"][0]
    for r in result["rows"]:
        cells = [r["method"], f"{r['bytes']:,}", f"{r['ratio']:.2f}x"]
        if task:
            cells += [f"{r['acc']:.2f}", f"{r['acc'] - orig['acc']:+.2f}", f"{-r['worst_drop']:+.2f}"]
        cells += [f"{r['max_error']:.3g}", r.get("note", "")]
        lines.append("| " + " | ".join(cells) + " |")
    out = head + "\n".join(lines) + "\n"
    comp = result["comparison"]
    out += "\nEqual quality (" + ("mean accuracy" if task else "worst relative error") + \
        "): for each baseline, our smallest store that is at least as good:\n\n"
    for c in comp["vs"]:
        if c["ours"] is None:
            out += f"- {c['baseline']} ({c['baseline_bytes']:,} B): none of the budgets tried reaches it\n"
        else:
            verdict = f"**{c['ratio']:.2f}x smaller**" if c["ratio"] >= 1 else f"**{1 / c['ratio']:.2f}x larger**"
            out += f"- {c['baseline']} ({c['baseline_bytes']:,} B): {c['ours']} ({c['ours_bytes']:,} B), {verdict}\n"
    if "within_half_point" in comp:
        w = comp["within_half_point"]
        out += f"\nSmallest store within 0.5 point of the originals: {w['ours']} ({w['bytes']:,} B, " \
               f"{w['acc']:.2f}%, {result['raw_bytes'] / w['bytes']:.2f}x vs safetensors); baselines also within " \
               "0.5 point are " + ", ".join(f"{r:.2f}x larger ({m})" for m, r in w["vs_baselines_within_half_point"].items()) + \
               "; the others do not reach that accuracy at any size.\n"
    return out


def render(results: list[dict], args) -> str:
    md = [f"# Rate-distortion: UWS error budgets vs baselines\n\n`python bench/rate_distortion.py "
          f"--families {args.families} --tasks {args.tasks} --hidden {args.hidden} --models {args.models}`\n"]
    for r in results:
        md.append(f"\n## {r['family']} ({r['n_models']} models, {r['raw_bytes']:,} B of safetensors, {r['seconds']:.0f} s)\n\n")
        md.append(table(r))
    return "".join(md)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default="trained,lowrank,noise")
    p.add_argument("--tasks", type=int, default=40, help="trained family: number of fine-tuned tasks")
    p.add_argument("--hidden", type=int, default=256, help="trained family: hidden width")
    p.add_argument("--models", type=int, default=40, help="synthetic families: number of models")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these small matrices)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--render", metavar="JSON", help="only re-render the markdown of an earlier run's JSON")
    args = p.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            saved = json.load(f)
        text = render(saved["results"], argparse.Namespace(**saved["args"]))
        with open(os.path.splitext(args.render)[0] + ".md", "w") as f:
            f.write(text)
        print(text)
        return 0
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="uws-rd-")
    results = []
    try:
        for name in args.families.split(","):
            print(f"family {name} ...", flush=True)
            results.append(run_family(name, args, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = render(results, args)
    stem = "rate_distortion" if args.families == "trained,lowrank,noise" else "rate_distortion_" + args.families.replace(",", "_")
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=1, default=float)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
