"""Run the performance benchmarks and print one table per family plus the goals.

    python bench/run.py            # full suite (ViT-B-sized family: tens of minutes on 2 cores)
    python bench/run.py --quick    # shrunken families, a few minutes (CI)
    python bench/run.py --families vit,memory --device cuda

Every figure comes with its baseline measured in the same run. Sources are generated once into
``--workdir`` (default ``$UWSFMT_BENCH_DIR`` or ``/tmp/uwsfmt-bench``) and reused; results go
to ``bench/results/<family>.json`` and ``bench/results/summary.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

import uwsfmt  # noqa: E402
from bench import common, measure, sources  # noqa: E402
from bench.common import fmt_bytes, fmt_s, table  # noqa: E402

BUILDS = {
    # name -> convert() settings; "k16" is the store the loading benchmarks read
    "vit": {"k16": {"rank": 16}, "k16-sketch": {"rank": 16, "basis": "sketch"}, "tau0.9": {"tau": 0.9}, "tau0.99": {"tau": 0.99},
            "k16-sketch-half": {"rank": 16, "basis": "sketch", "mean_dtype": "float16"}},
    "lora": {"k16": {"rank": 16}, "k16-sketch": {"rank": 16, "basis": "sketch"}, "tau0.9": {"tau": 0.9}, "tau0.99": {"tau": 0.99}},
    "trained": {"k16": {"rank": 16}, "k16-sketch": {"rank": 16, "basis": "sketch"}, "tau0.9": {"tau": 0.9}, "tau0.99": {"tau": 0.99},
                "k16-half": {"rank": 16, "mean_dtype": "float16"}},
    "many": {"k16": {"rank": 16}, "tau0.99": {"tau": 0.99}},
}
#: 4096-wide LoRA modules: the exact product Grams are two 4096 x 4096 eigendecompositions per
#: module (about an hour for 128 modules on 2 cores), so the full run builds with the sketch
#: (tau capped at 64 directions, the sketch's width) and says so
LORA_WIDE = {"k16": {"rank": 16, "basis": "sketch"}, "tau0.9": {"tau": 0.9, "basis": "sketch", "max_rank": 64},
             "tau0.99": {"tau": 0.99, "basis": "sketch", "max_rank": 64}}


#: builds timed warm (vs the warm read) and cold (vs the cold read): the build goal's
GOAL_BUILDS = ("k16", "k16-sketch")


def run_family(name: str, mode: str, workdir: str, device: str, log) -> dict:
    cfg = sources.CONFIGS[name][mode]
    fam = sources.MAKERS[name](workdir, cfg)
    quick = mode == "quick"
    log(f"\n== {fam.title} ({fmt_bytes(fam.source_bytes)} of checkpoints) ==")
    res: dict = {"family": fam.title, "config": cfg, "source_bytes": fam.source_bytes, "n_models": len(fam.ids)}
    measure.read_once(fam.weights)  # warm the page cache
    res["read_once"] = {"warm_s": min(measure.read_once(fam.weights) for _ in range(2)),
                        "cold_s": measure.read_once(fam.weights, cold=True)}
    builds = LORA_WIDE if (name == "lora" and cfg["width"] > 2048) else BUILDS[name]
    res["builds"] = {}
    for bname, settings in builds.items():
        out = os.path.join(workdir, f"{name}-{mode}-{bname}.uws")
        log(f"  build {bname} {settings} ...")
        # the goal's builds are also timed from a cold page cache, each against a cold read just before it
        r = measure.build(fam, out, settings, device, cold_repeats=(1 if quick else 3) if bname in GOAL_BUILDS else 0)
        r["ratio_warm"] = r["seconds"] / res["read_once"]["warm_s"]
        r["ratio_cold"] = r.get("cold_ratio")
        res["builds"][bname] = r
    store_path = os.path.join(workdir, f"{name}-{mode}-k16.uws")
    log("  materialise ...")
    res["materialise"] = measure.materialise(fam, store_path, device, models=4 if quick else 6, seconds=1.0 if quick else 3.0)
    if name == "vit":  # the same family published in bfloat16, as most fine-tunes are
        log("  materialise, bfloat16 copy ...")
        half = sources.half_copy(fam)
        half_store = os.path.join(workdir, f"{name}-{mode}-bf16-k16-sketch.uws")
        uwsfmt.convert(half.paths, half_store, device=device, overwrite=True, rank=16, basis="sketch")
        res["materialise_bf16"] = measure.materialise(half, half_store, device, models=4 if quick else 6,
                                                      seconds=1.0 if quick else 3.0, cold_repeats=1 if quick else 3)
        log("  materialise, float16 means ...")  # the k16 sketch store with mean_dtype="float16"
        res["materialise_half_mean"] = measure.materialise(fam, os.path.join(workdir, f"{name}-{mode}-k16-sketch-half.uws"), device,
                                                           models=4 if quick else 6, seconds=1.0 if quick else 3.0,
                                                           cold_repeats=1 if quick else 3)
    log("  switch ...")
    res["switch"] = measure.switch(fam, store_path, device, switches=30 if quick else 100)
    log("  first load, append ...")
    res["first_load"] = measure.first_load(fam, store_path, device, repeats=2 if quick else 3)
    res["append"] = measure.append(fam, store_path, workdir, device, repeats=2 if quick else 3)
    log("  random access ...")
    res["random_access"] = measure.random_access(fam, store_path)
    log(report(name, res))
    return res


def run_memory(mode: str, workdir: str, device: str, log) -> dict:
    cfg = sources.CONFIGS["memory"][mode]
    fam = sources.memory_family(workdir, cfg)
    log(f"\n== build memory: {fam.title.replace(', N=', ', N up to ')} ==")
    res = measure.memory(fam, workdir, tuple(cfg["ns"]), {"rank": 16, "device": device}, prefix=f"memory-{mode}")
    res["family"] = fam.title.replace(", N=", ", N up to ")
    res["n_models"] = ", ".join(map(str, cfg["ns"]))
    res["source_bytes"] = fam.source_bytes
    rows = [[n, fmt_bytes(r["peak_rss"]), fmt_bytes(r["rss_after_imports"]), fmt_s(r["seconds"])] for n, r in res["runs"].items()]
    log(table(rows, ["N", "peak RSS", "RSS after imports", "build time"]))
    log(f"growth {min(cfg['ns'])} -> {max(cfg['ns'])}: {res['growth']:.3f}x ({fmt_bytes(res['growth_bytes'])}; one model is "
        f"{fmt_bytes(res['model_bytes'])})")
    return res


def half_rows(h: dict | None, what: str = "bfloat16 copy") -> list[list[str]]:
    """Rows for the bfloat16 copy's (or the float16-mean store's) materialise (none where it was not measured)."""
    if not h:
        return []
    rows = [[f"materialise (warm), {what}", fmt_s(h["store"]["median"]), fmt_s(h["baseline"]["median"]), f"{h['ratio']:.2f}x",
             f"{fmt_s(h['store_floor_s'])} / {fmt_s(h['baseline_floor_s'])}"]]
    if h.get("store_torch"):
        rows.append([f"materialise (warm), {what}, torch path: no {h['kernel']} kernel", fmt_s(h["store_torch"]["median"]),
                     fmt_s(h["baseline"]["median"]), f"{h['ratio_torch']:.2f}x", ""])
    return rows


def report(name: str, r: dict) -> str:
    m, sw, fl, ap = r["materialise"], r["switch"], r["first_load"], r["append"]
    ro = r["read_once"]
    lines = [
        f"read every checkpoint once (touch all values): warm {fmt_s(ro['warm_s'])}, cold {fmt_s(ro['cold_s'])}",
        "",
        table([
            ["materialise (warm)", fmt_s(m["store"]["median"]), fmt_s(m["baseline"]["median"]), f"{m['ratio']:.2f}x",
             f"{fmt_s(m['store_floor_s'])} / {fmt_s(m['baseline_floor_s'])}"],
            ["materialise (cold cache)", fmt_s(m["cold_store"]["median"]), fmt_s(m["cold_baseline"]["median"]),
             f"{m['cold_ratio']:.2f}x", ""],
            *([[f"materialise (warm), torch path: no {m['kernel']} kernel", fmt_s(m["store_torch"]["median"]),
                 fmt_s(m["baseline"]["median"]), f"{m['ratio_torch']:.2f}x", ""]] if m.get("store_torch") else []),
            *half_rows(r.get("materialise_bf16")),
            *half_rows(r.get("materialise_half_mean"), "float16 means"),
            ["lazy load_file alone", "", fmt_s(m["lazy_load_file"]["median"]), "", ""],
            [f"switch x{sw['switches']} ({sw['models_cycled']} models), median", fmt_s(sw["store"]["median"]),
             fmt_s(sw["baseline"]["median"]), f"{sw['ratio_median']:.2f}x", ""],
            ["switch p95", fmt_s(sw["store"]["p95"]), fmt_s(sw["baseline"]["p95"]), f"{sw['ratio_p95']:.2f}x", ""],
            ["first load: fresh store, nothing cached", fmt_s(fl["store"]["median"]), fmt_s(fl["baseline"]["median"]), f"{fl['ratio']:.2f}x", ""],
            ["first load: the same store zipped", fmt_s(fl["zip"]["median"]), fmt_s(fl["baseline"]["median"]), f"{fl['zip_ratio']:.2f}x", ""],
        ], ["load one model into a module", "store", "load_state_dict(load_file)", "ratio", "floor store / baseline"]),
        f"append one model: {fmt_s(ap['append']['median'])} (reading that checkpoint once: {fmt_s(ap['read_once']['median'])}, "
        f"{ap['ratio']:.1f}x); extend with {ap['extend_models']}: {fmt_s(ap['extend_per_model_s'])} per model",
        f"(floor = bytes moved / bandwidth {m['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s: store {fmt_bytes(m['store_bytes_moved'])}, "
        f"baseline {fmt_bytes(m['baseline_bytes_moved'])})",
        "",
    ]
    rows = []
    for bname, b in r["builds"].items():
        cold = (f"{fmt_s(b['cold_seconds'])} / {b['ratio_cold']:.1f}x (read {fmt_s(b['cold_read_seconds'])})"
                if b.get("ratio_cold") else "-")
        row = [bname, json.dumps(b["settings"]), fmt_s(b["seconds"]), f"{b['ratio_warm']:.1f}x", cold,
               f"{b['size_ratio']:.3f}", f"{b['error_mean']:.2e}", f"{b['error_max']:.2e}", f"{b['rank_median']:.0f}",
               ", ".join(f"{k}: {v}" for k, v in b["basis_methods"].items())]
        if "accuracy_drop_mean" in b:
            row.append(f"{b['accuracy_drop_mean']:+.2f} / {b['accuracy_drop_max']:+.2f}")
        rows.append(row)
    header = ["build", "settings", "time (warm)", "vs read once (warm)", "cold build / vs cold read", "store/source", "err mean", "err max", "rank med", "bases"]
    if any(len(x) > len(header) for x in rows):
        header.append("acc. drop mean/max (pts)")
    lines.append(table(rows, header))
    lines.append("")
    ra_rows = []
    for a in r["random_access"]:
        b, need = a["bytes"], a["needed"]
        ra_rows.append([a["tensor"], "x".join(map(str, a["shape"])), a["requests"],
                        f"{fmt_bytes(b['coefficients'])} ({fmt_bytes(need['coefficients'])})",
                        f"{fmt_bytes(b['mean'] + b['basis'])} ({fmt_bytes(need['mean'] + need['basis'])})",
                        fmt_bytes(b["metadata"]), fmt_bytes(b["other"]), fmt_bytes(a["total"])])
    lines.append(table(ra_rows, ["random access: one tensor", "shape", "requests", "coefficients read (needed)",
                                 "mean+basis read (needed)", "metadata", "other", "total"]))
    return "\n".join(lines)


def goals(results: dict, device: str) -> list[list[str]]:
    gpu = device.startswith("cuda")
    rows = []
    for name, r in results["families"].items():
        if name == "memory":
            g = r["growth"]
            rows.append([f"{name}: peak RSS growth N=8 -> 128", f"{g:.3f}x", "<= 1.2x", "met" if g <= 1.2 else "NOT met"])
            continue
        lim = 0.1 if gpu else 1.0
        ratio = r["materialise"]["ratio"]
        rows.append([f"{name}: materialise vs load_state_dict(load_file)", f"{ratio:.2f}x", f"<= {lim}x",
                     "met" if ratio <= lim else "NOT met"])
        if name == "vit":
            lim = 1.5 if gpu else 3.0
            for bname in ("k16", "k16-sketch"):
                b = r["builds"].get(bname)
                if b:
                    cold = b.get("ratio_cold") or float("inf")
                    rows.append([f"{name}: build {bname} vs reading once (warm cache / cold cache, both sides)",
                                 f"{b['ratio_warm']:.1f}x / {cold:.2f}x", f"<= {lim}x",
                                 "met" if b["ratio_warm"] <= lim else ("met from a cold cache only" if cold <= lim else "NOT met")])
        other = sum(a["bytes"]["other"] for a in r["random_access"])
        rows.append([f"{name}: random access reads only coefficients + mean/basis + metadata",
                     f"{fmt_bytes(other)} other", "0 other", "met" if other == 0 else "NOT met"])
    if not gpu:
        rows.append(["GPU goals (materialise <= 0.1x, build <= 1.5x)", "not measured", "", "no GPU in this run"])
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small families: a few minutes (CI)")
    ap.add_argument("--families", default="vit,lora,trained,many,memory", help="comma-separated: vit, lora, trained, many, memory")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--workdir", default=os.environ.get("UWSFMT_BENCH_DIR", "/tmp/uwsfmt-bench"))
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from uwsfmt.numerics.device import default_device

    device = args.device or default_device()
    mode = "quick" if args.quick else "full"
    os.makedirs(args.workdir, exist_ok=True)
    os.makedirs(args.results, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    t0 = time.perf_counter()
    machine = common.machine(device)
    log(f"uwsfmt benchmarks ({mode}) on {machine['cpu']} x{machine['cores']}, torch threads {machine['torch_threads']}, "
        f"device {device}{' (' + machine['gpu'] + ')' if 'gpu' in machine else ''}, native kernel {machine['native_kernel']}")
    results = {"mode": mode, "machine": machine, "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "families": {}}
    for name in [f.strip() for f in args.families.split(",") if f.strip()]:
        if name == "memory":
            r = run_memory(mode, args.workdir, device, log)
        elif name in sources.MAKERS:
            r = run_family(name, mode, args.workdir, device, log)
        else:
            ap.error(f"unknown family {name!r}; choose from vit, lora, trained, many, memory")
        results["families"][name] = r
        with open(os.path.join(args.results, f"{name}-{mode}.json"), "w") as f:
            json.dump(r, f, indent=1)
    results["seconds"] = time.perf_counter() - t0
    results["goals"] = goals(results, device)
    log("\n== goals ==")
    log(table(results["goals"], ["goal", "measured", "target", "status"]))
    log(f"\n(total {fmt_s(results['seconds'])}; results in {args.results})")
    with open(os.path.join(args.results, f"summary-{mode}.json"), "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
