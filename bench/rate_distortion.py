"""Rate-distortion: UWS stores (the default and error budgets) against the honest baselines.

For each family: the bytes of every baseline of ``bench/baselines.py``, of a pure rank-k
subspace (the paper's setting) and of our stores (``uwsfmt.convert`` at its default and at a
sweep of error budgets), each followed by the family's held-out members (appended to a store,
coded against the members' mean by a baseline); then every model read back and scored on its
own task. One table per family, an equal-accuracy comparison, a JSON and a PNG plot per family.

    python bench/rate_distortion.py                  # transformer, conv, mlp, lora: 40 + 8 members each
    python bench/rate_distortion.py --quick          # 8 + 2 members, short training (a few minutes)
    python bench/rate_distortion.py --families mlp,lowrank --tasks 20 --held-out 4
    python bench/rate_distortion.py --render bench/results/rate_distortion.json   # tables + plots again

Families (``bench/families.py``; all on scikit-learn's digits, really trained): ``transformer``
(full fine-tunes of a small pre-LN transformer), ``conv`` (a small CNN), ``mlp`` (the MLP of
``bench/trained.py``; alias ``trained``), ``lora`` (PEFT LoRA r=8 adapters of the transformer's
linear layers; sources = the adapters' files). Synthetic, on request: ``lowrank`` (shared
rank-8 deltas + noise) and ``noise`` (i.i.d. deltas); their "drop" is the worst relative
weight error (%).

Columns: *bytes*: everything needed for members and held-out models; baselines count raw
values only (codes, scales, means: no container), our stores their size on disk with all
metadata, which favours the baselines. *ratio*: the sources' bytes (each model's safetensors
file; the adapter files for ``lora``) / bytes. *drop*: mean over members of (original accuracy
- accuracy of the reconstruction), in percentage points, in-domain (the members the store was
built from) and held-out (the members appended afterwards).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

import uwsfmt  # noqa: E402
from bench import baselines as B  # noqa: E402
from bench import families as F  # noqa: E402
from uwsfmt.errors import UWSError  # noqa: E402
from uwsfmt.report import store_bytes  # noqa: E402

DEFAULT_FAMILIES = "transformer,conv,mlp,lora"
ALIASES = {"trained": "mlp"}
#: our stores, as --budgets names them: "default" (convert() without a fidelity argument: the
#: library's default, whatever it is today), "mde=X" (max_delta_error=X), "me=X" (max_error=X)
BUDGETS = "default,mde=0.6,mde=0.45,mde=0.3,mde=0.2,mde=0.1,me=0.05,me=0.01"
#: the stores --quick builds (budgeted builds cost the most)
QUICK_BUDGETS = "default,mde=0.6,mde=0.3,mde=0.1,me=0.05"


def parse_budgets(text: str) -> dict[str, dict]:
    """``"default,mde=0.3,me=0.05"`` -> {row label: convert() keywords}.

    >>> parse_budgets("default,mde=0.3,mde=0.2+me=0.1")["ours: max_delta_error=0.2, max_error=0.1"]
    {'max_delta_error': 0.2, 'max_error': 0.1}
    >>> parse_budgets("default,mde=0.3")
    {'ours: default': {}, 'ours: max_delta_error=0.3': {'max_delta_error': 0.3}}
    """
    keys = {"mde": "max_delta_error", "me": "max_error"}
    out = {}
    for token in filter(None, (t.strip() for t in text.split(","))):
        if token == "default":
            out["ours: default"] = {}
            continue
        kw = {}
        for part in token.split("+"):  # "mde=0.25+me=0.1": both budgets at once
            key, _, value = part.partition("=")
            if key not in keys or not value:
                raise SystemExit(f"--budgets: {token!r} is not 'default', 'mde=X', 'me=X' or such joined by '+'")
            kw[keys[key]] = float(value)
        out["ours: " + ", ".join(f"{k}={v:g}" for k, v in kw.items())] = kw
    return out


#: the pure subspace baseline's rank
SUBSPACE_RANK = 16
SYNTH_SHAPES = {"blocks.0.attn.qkv.weight": (384, 128), "blocks.0.mlp.fc1.weight": (512, 128),
                "blocks.0.mlp.fc2.weight": (128, 512), "blocks.0.attn.proj.weight": (128, 128)}
#: --quick: narrower models, shorter training (seconds per family instead of minutes)
QUICK = {"transformer": {"width": 32, "mlp": 64, "base_epochs": 2, "finetune_epochs": 3},
         "conv": {"channels": 8, "hidden": 64, "base_epochs": 2, "finetune_epochs": 3},
         "mlp": {"hidden": 64, "base_epochs": 3, "finetune_epochs": 8}, "lora": {"epochs": 4}}


# ---------------------------------------------------------------------------- families


def make_family(name: str, args, workdir: str, cache: dict) -> F.BenchFamily:
    """The family ``name`` at the sizes of ``args`` (the transformer is built once: lora needs its base)."""
    quick = QUICK if args.quick else {}
    n, h = args.tasks, args.held_out
    if name in ("transformer", "lora") and "transformer" not in cache:
        cache["transformer"] = F.transformer_family(n, h, args.seed, **quick.get("transformer", {}))
    if name == "transformer":
        return cache["transformer"]
    if name == "lora":
        return F.lora_family(cache["transformer"], os.path.join(workdir, "adapters"), seed=args.seed, **quick.get("lora", {}))
    if name == "conv":
        return F.conv_family(n, h, args.seed, **quick.get("conv", {}))
    if name == "mlp":
        return F.mlp_family(n, h, args.seed, **{**quick.get("mlp", {}), **({"hidden": args.hidden} if args.hidden else {})})
    if name == "lowrank":
        return F.synthetic_bench_family(name, args.models, h, SYNTH_SHAPES, args.seed, rank=8, noise=1e-3, delta_scale=0.02)
    if name == "noise":
        return F.synthetic_bench_family(name, args.models, h, SYNTH_SHAPES, args.seed, rank=0, noise=0.02, delta_scale=0.0)
    raise SystemExit(f"unknown family {name!r}; choose from transformer, conv, mlp (trained), lora, lowrank, noise")


# ---------------------------------------------------------------------------- measuring


def measure_store(fam: F.BenchFamily, path: str, settings: dict) -> tuple[dict, dict]:
    """Build a store of ``fam``'s members with ``settings``, append the held-out members one by
    one, read every model back: (row fields, reconstructions).

    An append the store refuses (a LoRA adapter its bases miss beyond the budget: LoRA modules
    take no per-model exception) is recorded; that model is then counted as kept beside the
    store in its own file, bytes included, and reconstructed exactly.
    """
    t = time.perf_counter()
    uwsfmt.convert(fam.sources, path, overwrite=True, **settings).close()
    build_s = time.perf_counter() - t
    built = store_bytes(path)
    refused: dict[str, str] = {}
    t = time.perf_counter()
    with uwsfmt.open(path, mode="a") as store:
        for mid, source in fam.held_out_sources.items():
            try:
                store.append(source, id=mid)
            except UWSError as err:
                refused[mid] = f"{type(err).__name__}: {err}"
    append_s = time.perf_counter() - t
    with uwsfmt.open(path) as store:
        missing = set(fam.all_models) - set(store.model_ids) - set(refused)
        if missing:
            raise RuntimeError(f"{path}: the store has no model(s) {sorted(missing)} (its ids: {store.model_ids})")
        rec = {m: fam.held_out[m] if m in refused else fam.read_back(store, m) for m in fam.all_models}
        m = store.manifest
        kept = B.safetensors_bytes({mid: fam.held_out[mid] for mid in refused})
        fields = {"bytes": store_bytes(path) + kept, "bytes_before_append": built, "build_s": build_s, "append_s": append_s,
                  "settings": m["build"]["settings"], "breakdown": store_breakdown(store),
                  "exceptions": sum(len(x.get("exceptions") or ()) for x in m["models"]),
                  "choices": choices(m), "refused": refused}
    return fields, rec


def choices(manifest: dict) -> str:
    """What the build chose per matrix, briefly: ``fc1:r12+4b, head:dense, ...``."""
    out = []
    for e in manifest["tensors"]:
        if not e.get("shape") or len(e["shape"]) < 2:
            continue
        short = e["name"].removeprefix("base_model.model.").removesuffix(".weight")
        if e["encoding"] != "subspace":
            out.append(f"{short}:{e['encoding']}")
            continue
        rank = "/".join(str(k) for k in (e.get("rank") or []) if k is not None)
        bits = (e.get("residual") or {}).get("bits")
        out.append(f"{short}:r{rank}" + (f"+{bits}b" if bits else ""))
    return ", ".join(out)


#: where a store's bytes go: the kind of each per-tensor array (by its name under the tensor's node)
ARRAY_KINDS = {"mean": "means", "left": "bases", "right": "bases", "value": "shared tensors",
               "extra": "exceptions (appended models)", "models": "per-model arrays"}


def store_breakdown(store) -> dict[str, int]:
    """Bytes on disk by kind: bases, means, spectra, shared tensors (per-tensor arrays);
    coefficients, residuals, dense tensors (per-model pack rows, split by the manifest's slot
    lengths x itemsize); exceptions (corrections of appended models the bases missed); metadata (every
    ``zarr.json``, the manifest in the root one); kept folder files (configs of PEFT folders).
    A directory store only."""
    root = store.path
    nodes = {e["node"]: e for e in store.manifest["tensors"]}
    packs = {p["path"]: d for d, p in store.manifest["packs"].items()}
    shares: dict[str, dict[str, int]] = {}  # pack dtype -> kind -> slot bytes
    for e in store.manifest["tensors"]:
        for kind, slot in _slots(e):
            itemsize = torch.empty(0, dtype=getattr(torch, slot["pack"])).element_size()
            shares.setdefault(slot["pack"], {}).setdefault(kind, 0)
            shares[slot["pack"]][kind] += slot["length"] * itemsize
    out: dict[str, float] = {}

    def add(kind: str, n: float) -> None:
        out[kind] = out.get(kind, 0) + n

    for dirpath, _, files in os.walk(root):
        for f in files:
            full = os.path.join(dirpath, f)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            size = os.path.getsize(full)
            if size == 0:  # lock files
                continue
            if f == "zarr.json":
                add("metadata (manifest)" if rel == "zarr.json" else "metadata (zarr.json)", size)
            elif rel.startswith("packs/"):
                dtype = packs.get("/".join(rel.split("/")[:2]))
                kinds = shares.get(dtype) or {"pack rows": 1}
                total = sum(kinds.values()) or 1
                for kind, n in kinds.items():
                    add(kind, size * n / total)
            elif rel.startswith("tensors/"):
                node = next((n for n in nodes if rel.startswith(n + "/")), None)
                array = rel[len(node) + 1:].split("/")[0] if node else "?"
                add(ARRAY_KINDS.get(array, "spectra" if array.startswith("spectrum") else f"tensor arrays ({array})"), size)
            elif rel.startswith("files/"):
                add("kept folder files (configs)", size)
            else:
                add(f"other ({rel.split('/')[0]})", size)
    return {k: round(v) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def _slots(entry: dict):
    """(kind, slot) of every per-model slot of a tensor entry."""
    kinds = {"coefficients": "coefficients", "residual": "residuals", "data": "dense tensors"}

    def walk(value, kind):
        if isinstance(value, dict):
            if {"pack", "offset", "length"} <= set(value):
                yield kind, value
            else:
                for v in value.values():
                    yield from walk(v, kind)
        elif isinstance(value, list):
            for v in value:
                yield from walk(v, kind)

    for key, value in entry.items():
        if key not in ("budget", "basis", "spectrum"):
            yield from walk(value, kinds.get(key, f"per-model ({key})"))


def run_family(name: str, args, workdir: str, cache: dict) -> dict:
    t0 = time.time()
    fam = make_family(name, args, workdir, cache)
    train_s = time.time() - t0
    models = fam.all_models
    source_bytes = fam.source_bytes or B.safetensors_bytes(models)
    orig = {m: fam.evaluate(m, sd) for m, sd in models.items()}
    print(f"  [{name}] {len(fam.members)} + {len(fam.held_out)} held-out models, {source_bytes:,} B of sources, built in "
          f"{train_s:.0f} s; original {fam.metric} {statistics.mean(orig.values()):.2f}", flush=True)
    rows: list[dict] = []

    def add(method: str, kind: str, nbytes: int, rec: dict, **extra) -> None:
        drops = {m: orig[m] - fam.evaluate(m, rec[m]) for m in models}
        d_in = [drops[m] for m in fam.members]
        d_out = [drops[m] for m in fam.held_out]
        row = {"method": method, "kind": kind, "bytes": nbytes, "ratio": source_bytes / nbytes,
               "drop_in": statistics.mean(d_in), "drop_held_out": statistics.mean(d_out) if d_out else None,
               "worst_in": max(d_in), "worst_held_out": max(d_out) if d_out else None, **extra}
        rows.append(row)
        took = extra.get("seconds", extra.get("build_s", 0.0) + extra.get("append_s", 0.0))
        print(f"  [{name}] {method}: {nbytes:,} B ({row['ratio']:.2f}x), drop {_pt(row['drop_in'])} / "
              f"{_pt(row['drop_held_out'])} ({took:.1f} s)", flush=True)

    for key, baseline in B.ALL.items():
        t = time.perf_counter()
        res = baseline(fam.members, fam.held_out)
        add(res.method, "baseline", res.bytes, res.models, seconds=time.perf_counter() - t, lossless=res.lossless, note=res.note)
    stores = {f"rank-{SUBSPACE_RANK} subspace (uws store, no residual)": ("baseline", {"rank": SUBSPACE_RANK}),
              **{label: ("ours", kw) for label, kw in parse_budgets(args.budgets).items()}}
    for label, (kind, kw) in stores.items():
        path = os.path.join(workdir, f"{name}.uws")
        try:
            fields, rec = measure_store(fam, path, kw)
        except Exception as err:  # one failing setting must not lose the others' figures
            print(f"  [{name}] {label}: FAILED: {err}\n{traceback.format_exc(limit=3)}", flush=True)
            rows.append({"method": label, "kind": kind, "error": f"{type(err).__name__}: {err}"})
            continue
        finally:
            shutil.rmtree(path, ignore_errors=True)
        add(label, kind, fields.pop("bytes"), rec, convert_kwargs=kw, **fields)
    return {"family": name, "description": fam.description, "metric": fam.metric, "n_members": len(fam.members),
            "n_held_out": len(fam.held_out), "source_bytes": source_bytes, "original_score": statistics.mean(orig.values()),
            "train_seconds": train_s, "train_breakdown": fam.train_seconds, "rows": rows,
            "comparison": compare(rows), "seconds": time.time() - t0}


# ---------------------------------------------------------------------------- comparing


#: drops this close count as equal (a test image is 0.19 point of one member's accuracy; means over
#: 40 members move in steps of 0.005 point, and a reconstruction can score an image or two above its original)
TOLERANCE = 0.05


def compare(rows: list[dict]) -> list[dict]:
    """For each baseline: our smallest store whose mean drop is no larger (within
    :data:`TOLERANCE`; a negative drop, noise, counts as 0), in-domain and held-out each on its
    own, and how many times smaller it is.

    >>> rows = [{"method": "b", "kind": "baseline", "bytes": 100, "drop_in": -0.01, "drop_held_out": 1.0},
    ...         {"method": "s", "kind": "ours", "bytes": 50, "drop_in": 0.04, "drop_held_out": 2.0}]
    >>> c = compare(rows)[0]
    >>> c["drop_in"]["times_smaller"], c["drop_held_out"]["ours"]
    (2.0, None)
    """
    ours = [r for r in rows if r["kind"] == "ours" and "error" not in r]
    out = []
    for b in (r for r in rows if r["kind"] == "baseline" and "error" not in r):
        entry = {"baseline": b["method"], "baseline_bytes": b["bytes"]}
        for key in ("drop_in", "drop_held_out"):
            if b.get(key) is None:
                continue
            target = max(b[key], 0.0) + TOLERANCE
            ok = [r for r in ours if r.get(key) is not None and r[key] <= target]
            best = min(ok, key=lambda r: r["bytes"]) if ok else None
            entry[key] = {"ours": best["method"] if best else None, "ours_bytes": best["bytes"] if best else None,
                          "times_smaller": b["bytes"] / best["bytes"] if best else None}
        out.append(entry)
    return out


# ---------------------------------------------------------------------------- output


def _pt(x: float | None) -> str:
    """A drop with its sign, never "-0.00"."""
    return "-" if x is None else f"{round(x, 2) + 0.0:+.2f}"


def _drop_label(metric: str) -> str:
    return "acc drop" if metric.startswith("accuracy") else "worst rel. error"


def _unit(metric: str) -> str:
    return "pt" if metric.startswith("accuracy") else "%"


def table(result: dict) -> str:
    """The family's table, its byte breakdown and its equal-accuracy comparison (markdown)."""
    d, u = _drop_label(result["metric"]), _unit(result["metric"])
    lines = [f"| setting | bytes | ratio vs sources | {d} in-domain ({u}) | {d} held-out ({u}) |", "|---|---:|---:|---:|---:|",
             f"| sources (safetensors files) | {result['source_bytes']:,} | 1.00x | 0 | 0 |"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error'][:80]} | | | |")
            continue
        held = _pt(r["drop_held_out"])
        if r.get("refused"):
            held += f" ({len(r['refused'])} of {result['n_held_out']} appends refused: kept as files)"
        lines.append(f"| {r['method']}{' (lossless)' if r.get('lossless') else ''} | {r['bytes']:,} | {r['ratio']:.2f}x | "
                     f"{_pt(r['drop_in'])} | {held} |")
    out = "\n".join(lines) + "\n"
    default = next((r for r in result["rows"] if r["method"] == "ours: default" and "breakdown" in r), None)
    if default:
        total = sum(default["breakdown"].values())
        budget = {k: default["settings"].get(k) for k in ("rank", "tau", "max_error", "max_delta_error")
                  if default["settings"].get(k) is not None}
        out += (f"\nWhere the default store's {total:,} B go (after the appends; its fidelity: "
                f"{', '.join(f'{k}={v}' for k, v in budget.items()) or 'none recorded'}): " +
                ", ".join(f"{k} {v:,} B ({100 * v / total:.0f}%)" for k, v in default["breakdown"].items()) +
                f". Per-matrix choices: {default['choices']}; {default['exceptions']} exception(s) for appended models.\n")
    out += f"\nEqual accuracy: for each baseline, our smallest store whose mean drop is no larger (within {TOLERANCE} " \
           f"{u}; a negative drop counts as 0), in-domain | held-out:\n\n| baseline | bytes | ours, in-domain | x smaller | ours, held-out | x smaller |\n" \
           "|---|---:|---|---:|---|---:|\n"
    for c in compare(result["rows"]):  # recomputed, so that --render applies the current rule
        cells = [c["baseline"], f"{c['baseline_bytes']:,}"]
        for key in ("drop_in", "drop_held_out"):
            m = c.get(key) or {}
            if m.get("ours"):
                cells += [f"{m['ours']} ({m['ours_bytes']:,} B)", f"{m['times_smaller']:.2f}x"]
            else:
                cells += ["none of ours reaches it", "-"]
        out += "| " + " | ".join(cells) + " |\n"
    return out


#: baseline colours (blue and red are ours)
COLOURS = ("tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan", "tab:orange", "black", "gold")


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


def plot(result: dict, path: str) -> None:
    """Rate (bytes, log scale) vs drop, in-domain and held-out side by side, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    rows = [r for r in result["rows"] if "error" not in r]
    u = _unit(result["metric"])
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), sharey=True)
    markers = "osD^v<>phX*"
    for ax, key, title in ((axes[0], "drop_in", "in-domain"), (axes[1], "drop_held_out", "held-out (appended)")):
        ours = sorted((r for r in rows if r["kind"] == "ours" and r.get(key) is not None), key=lambda r: r["bytes"])
        ax.plot([r["bytes"] for r in ours], [r[key] for r in ours], "-o", color="tab:blue", label="ours (budget sweep)", zorder=3)
        for r in ours:
            if r["method"] == "ours: default":
                ax.plot(r["bytes"], r[key], "*", color="tab:red", markersize=16, label="ours: default", zorder=4)
        for i, r in enumerate(r for r in rows if r["kind"] == "baseline" and r.get(key) is not None):
            ax.plot(r["bytes"], r[key], markers[i % len(markers)], color=COLOURS[i % len(COLOURS)], markersize=8, label=r["method"])
        ax.axvline(result["source_bytes"], color="grey", linestyle="--", linewidth=1, label="sources (safetensors)")
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _human(v)))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: _human(v) if str(round(v / 10 ** int(math.log10(v))))
                                                   in "25" else ""))
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_yscale("symlog", linthresh=1.0)  # the first point linear, large drops compressed
        ax.set_yticks([-0.5, 0, 0.25, 0.5, 1, 2, 5, 10, 20, 50])
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_xlabel("bytes (members + held-out)")
        ax.set_title(f"{result['family']}: {title}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel(f"{_drop_label(result['metric'])} ({u}), mean over members (symlog)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(f"{result['family']}: {result['n_members']} members + {result['n_held_out']} held-out; {result['description']}",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.16, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_name(args: argparse.Namespace, family: str) -> str:
    return f"rate_distortion{'-quick' if getattr(args, 'quick', False) else ''}_{family}.png"


def render(results: list[dict], args: argparse.Namespace) -> str:
    flags = " --quick" if getattr(args, "quick", False) else ""
    md = [f"# Rate-distortion: UWS stores vs baselines\n\n`python bench/rate_distortion.py --families {args.families} "
          f"--tasks {args.tasks} --held-out {args.held_out}{flags}` (torch threads: {args.threads}; our stores: "
          f"{getattr(args, 'budgets', BUDGETS)}).\n\n"
          "Bytes: baselines count raw values (codes, scales, float32 means; no container); our stores and the rank-k "
          "subspace count their size on disk, metadata included. Drops: original minus reconstructed score, mean "
          "over members, for the members built in (in-domain) and those appended afterwards (held-out).\n"]
    for r in results:
        md.append(f"\n## {r['family']}: {r['n_members']} + {r['n_held_out']} held-out models, {r['source_bytes']:,} B of "
                  f"sources ({r['seconds']:.0f} s, {r['train_seconds']:.0f} s of it training)\n\n{r['description']}; "
                  f"original {r['metric']}: {r['original_score']:.2f}. Plot: `{plot_name(args, r['family'])}`.\n\n")
        md.append(table(r))
    return "".join(md)


def write_outputs(results: list[dict], args: argparse.Namespace, out: str, stem: str) -> str:
    text = render(results, args)
    with open(os.path.join(out, stem + ".md"), "w") as f:
        f.write(text)
    for r in results:
        plot(r, os.path.join(out, plot_name(args, r["family"])))
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default=DEFAULT_FAMILIES, help=f"comma-separated (default {DEFAULT_FAMILIES}; also lowrank, noise)")
    p.add_argument("--quick", action="store_true", help="8 + 2 members per family and short training: a few minutes")
    p.add_argument("--tasks", type=int, default=None, help="members per family (default 40, --quick 8)")
    p.add_argument("--held-out", type=int, default=None, help="held-out members per family, appended (default 8, --quick 2)")
    p.add_argument("--hidden", type=int, default=None, help="mlp family: hidden width (default 256, --quick 64)")
    p.add_argument("--models", type=int, default=None, help="synthetic families: members (default: --tasks)")
    p.add_argument("--budgets", default=None, help=f"our stores (default {BUDGETS}; --quick {QUICK_BUDGETS}): "
                   "'default' (no fidelity argument), 'mde=X' (max_delta_error), 'me=X' (max_error), or such joined by '+' (both at once: 'mde=0.2+me=0.1')")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these small matrices)")
    p.add_argument("--results", "--out", dest="out", default=os.path.join(HERE, "results"), help="folder for .md, .json, .png")
    p.add_argument("--render", metavar="JSON", help="only re-render the tables and plots of an earlier run's JSON")
    args = p.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            saved = json.load(f)
        for r in saved["results"]:
            r["comparison"] = compare(r["rows"])
        with open(args.render, "w") as f:  # the comparison as the current rule makes it
            json.dump(saved, f, indent=1, default=float)
        text = write_outputs(saved["results"], argparse.Namespace(**saved["args"]), os.path.dirname(os.path.abspath(args.render)),
                             os.path.splitext(os.path.basename(args.render))[0])
        print(text)
        return 0
    args.tasks = args.tasks or (8 if args.quick else 40)
    args.held_out = args.held_out if args.held_out is not None else (2 if args.quick else 8)
    args.models = args.models or args.tasks
    args.budgets = args.budgets or (QUICK_BUDGETS if args.quick else BUDGETS)
    parse_budgets(args.budgets)  # refuse a bad list before training anything
    names = [ALIASES.get(n, n) for n in args.families.split(",") if n]
    args.families = ",".join(names)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="uws-rd-")
    t0 = time.time()
    results: list[dict] = []
    cache: dict = {}
    try:
        for name in names:
            print(f"family {name} ...", flush=True)
            results.append(run_family(name, args, workdir, cache))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    stem = "rate_distortion" + ("-quick" if args.quick else "") + \
        ("" if args.families == DEFAULT_FAMILIES else "_" + args.families.replace(",", "_"))
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump({"args": vars(args), "seconds": time.time() - t0, "results": results}, f, indent=1, default=float)
    text = write_outputs(results, args, args.out, stem)
    print(text)
    print(f"(total {time.time() - t0:.0f} s; results in {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
