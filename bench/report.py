"""Markdown tables of a benchmark run, for bench/README.md: ``python bench/report.py [bench/results/summary-full.json]``."""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bench.common import fmt_bytes, fmt_s  # noqa: E402


def rows(header: list[str], body: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in body]
    return "\n".join(out)


def main(path: str) -> None:
    with open(path) as f:
        r = json.load(f)
    m = r["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
          f"{fmt_bytes(m.get('memory_bytes'))} RAM, zarr {m['zarr']}, safetensors {m['safetensors']}, "
          f"native kernel {m.get('native_kernel', 'none')}; "
          f"load average at start {', '.join(f'{x:.1f}' for x in m.get('load_average', []))}; mode {r['mode']}, "
          f"total {fmt_s(r['seconds'])}\n")
    fams = r["families"]
    print(rows(["family", "N", "checkpoints"], [[f["family"], f.get("n_models", ""), fmt_bytes(f.get("source_bytes"))]
                                                for f in fams.values()]))
    print()
    print(rows(["goal", "measured", "target", "status"], r["goals"]))
    print()
    def materialise_cells(ma: dict) -> list[str]:
        torch_path = f"{fmt_s(ma['store_torch']['median'])} ({ma['ratio_torch']:.2f}x)" if ma.get("store_torch") else "-"
        return [fmt_s(ma["store"]["median"]), fmt_s(ma["baseline"]["median"]), f"{ma['ratio']:.2f}x", torch_path,
                f"{fmt_s(ma['cold_store']['median'])} / {fmt_s(ma['cold_baseline']['median'])}", fmt_s(ma["lazy_load_file"]["median"]),
                f"{fmt_s(ma['store_floor_s'])} / {fmt_s(ma['baseline_floor_s'])}"]

    body = []
    for name, f in fams.items():
        if name == "memory":
            continue
        sw = f["switch"]
        body.append([name, *materialise_cells(f["materialise"]),
                     f"{fmt_s(sw['store']['median'])} vs {fmt_s(sw['baseline']['median'])} ({sw['ratio_median']:.2f}x)",
                     f"{fmt_s(sw['store']['p95'])} vs {fmt_s(sw['baseline']['p95'])} ({sw['ratio_p95']:.2f}x)"])
    extra = (("materialise_bf16", "bfloat16 copy"), ("materialise_half_mean", "float16 means"))
    for name, key, what in [(n, key, what) for n in fams for key, what in extra]:
        ma = fams[name].get(key)  # the same family in bfloat16, and its store with float16 means (materialise only)
        if ma:
            body.append([f"{name}, {what}", *materialise_cells(ma), "-", "-"])
    print(rows(["family", "store", "baseline", "ratio", "store without the native kernel", "cold: store / baseline", "lazy load_file", "floor store / baseline",
                "switch median", "switch p95"], body))
    print()
    body = []
    for name, f in fams.items():
        fl, ap = f.get("first_load"), f.get("append")
        if fl and ap:
            body.append([name, f"{fmt_s(fl['store']['median'])} ({fl['ratio']:.1f}x)", f"{fmt_s(fl['zip']['median'])} ({fl['zip_ratio']:.1f}x)",
                         fmt_s(fl["baseline"]["median"]), fmt_s(ap["append"]["median"]),
                         fmt_s(ap["extend_per_model_s"]) if "extend_per_model_s" in ap else "",
                         fmt_s(ap["read_once"]["median"]), f"{ap['ratio']:.1f}x"])
    if body:
        print(rows(["family", "first load: directory store", "first load: zipped", "baseline", "append one model",
                    "extend: per model", "read that checkpoint once", "append / read"], body))
        print()
    body = []
    for name, f in fams.items():
        if name == "memory":
            continue
        ro = f["read_once"]
        for bname, b in f["builds"].items():
            acc = f"{b['accuracy_drop_mean']:+.2f} / {b['accuracy_drop_max']:+.2f}" if "accuracy_drop_mean" in b else ""
            cold = (f"{fmt_s(b['cold_seconds'])}: {b['ratio_cold']:.1f}x (read {fmt_s(b.get('cold_read_seconds') or ro['cold_s'])})"
                    if b.get("ratio_cold") else "")
            body.append([name, f"{bname} `{json.dumps(b['settings'])}`", fmt_s(b["seconds"]),
                         f"{b['ratio_warm']:.0f}x (read {fmt_s(ro['warm_s'])})", cold,
                         f"{b['size_ratio']:.3f} ({1 / b['size_ratio']:.1f}x smaller)", f"{b['error_mean']:.2e}", f"{b['error_max']:.2e}",
                         f"{b['rank_median']:.0f}", acc])
    print(rows(["family", "build", "time (warm cache)", "vs read once, warm", "cold cache: time, vs read once cold", "store / source", "error mean", "error max", "rank", "accuracy lost"], body))
    print()
    body = []
    for name, f in fams.items():
        for a in f.get("random_access", []):
            b, need = a["bytes"], a["needed"]
            body.append([name, f"`{a['tensor']}` {'x'.join(map(str, a['shape']))}", a["requests"],
                         f"{fmt_bytes(b['coefficients'])} ({fmt_bytes(need['coefficients'])})",
                         f"{fmt_bytes(b['mean'] + b['basis'])} ({fmt_bytes(need['mean'] + need['basis'])})",
                         fmt_bytes(b["metadata"]), fmt_bytes(b["other"])])
    print(rows(["family", "tensor", "requests", "coefficients (needed)", "mean + basis (needed)", "metadata", "other"], body))
    print()
    mem = fams.get("memory")
    if mem:
        print(rows(["N", "peak RSS", "RSS after imports", "build time"],
                   [[n, fmt_bytes(x["peak_rss"]), fmt_bytes(x["rss_after_imports"]), fmt_s(x["seconds"])] for n, x in mem["runs"].items()]))
        print(f"\ngrowth: {mem['growth']:.2f}x ({fmt_bytes(mem['growth_bytes'])}; one model is {fmt_bytes(mem['model_bytes'])})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "results", "summary-full.json"))
