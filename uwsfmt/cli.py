"""The ``uwsfmt`` command line: commands only, every piece of logic lives in the library."""

from __future__ import annotations

import argparse
import json
import os
import sys

from uwsfmt.errors import ConfigError, UWSError
from uwsfmt.report import human_size, info, print_summary, short_number
from uwsfmt.version import __version__
from uwsfmt.writer.options import CHOICES, BuildOptions, Fidelity


def _cmd_convert(a) -> int:
    from uwsfmt.api import convert  # lazy: keeps `uwsfmt --help` fast (no torch import)

    enc = {}
    for item in a.encoding or []:
        if "=" not in item:
            raise SystemExit(f"uwsfmt convert: --encoding wants PATTERN=ENCODING, got {item!r}")
        pat, e = item.rsplit("=", 1)
        enc[pat] = e
    if a.dry_run:
        from uwsfmt.api import plan  # lazy: keeps `uwsfmt --help` fast (no torch import)

        rep = plan(a.sources, format=a.format, lora_mode=a.lora_mode, encodings=enc)
        _print_plan(rep, a)
        return 1 if rep["conflicts"] else 0
    if not a.output:
        raise SystemExit("uwsfmt convert: -o/--output STORE is required (or pass --dry-run for the planning report)")
    fidelity = Fidelity(rank=a.rank, tau=a.tau, max_rank=a.max_rank, max_error=a.max_error, max_delta_error=a.max_delta_error)
    options = BuildOptions(side=a.mode, center="none" if a.no_center else a.center, residual_bits=a.residual_bits,
                           coefficient_bits=a.coefficient_bits,
                           encodings=enc, min_numel=a.min_numel, basis_method=a.basis, mean_dtype=a.mean_dtype,
                           lora_mode=a.lora_mode, seed=a.seed, allow_nonfinite=a.allow_nonfinite)
    from uwsfmt.writer.folder_files import FilePolicy  # lazy: keeps `uwsfmt --help` fast (no torch import)

    files = FilePolicy(keep=not a.no_files, remote_code=a.remote_code, max_size=a.max_file_size)
    st = convert(a.sources, a.output, fidelity=fidelity, options=options, base=a.base, device=a.device,
                 format=a.format, overwrite=a.overwrite, progress=not a.quiet, files=files, source_root=a.source_root,
                 client=a.dask)
    print_summary(st)
    return 0


def _cmd_plan(a) -> int:
    from uwsfmt.api import plan  # lazy: keeps `uwsfmt --help` fast (no torch import)

    rep = plan(a.sources, format=a.format, lora_mode=a.lora_mode)
    _print_plan(rep, a)
    return 1 if rep["conflicts"] else 0


def _print_plan(rep: dict, a) -> None:
    if getattr(a, "json", False):
        print(json.dumps(rep, indent=2))
        return
    print(f"{rep['n_models']} models ({', '.join(f'{k}: {v}' for k, v in rep['formats'].items())}), "
          f"{rep['n_tensors']} tensors, {human_size(rep['total_bytes'])}")
    print("  encodings (before data is read): " + ", ".join(f"{k}: {v}" for k, v in rep["encodings"].items()))
    if rep["varying_shapes"]:
        print(f"  shape varies between models (stored dense): {', '.join(rep['varying_shapes'][:10])}")
    lo = rep.get("lora")
    if lo:
        ranks = ", ".join(f"r={r}: {n}" for r, n in lo["ranks"].items())
        print(f"  LoRA ({lo['mode']} mode): {lo['adapters']} adapters, {lo['modules']} modules, ranks {ranks}")
        if lo["partial_modules"]:
            print(f"  LoRA modules missing from some adapters (a zero update there): {len(lo['partial_modules'])}")
    for c in rep["conflicts"]:
        print(f"  CONFLICT: {c}")


def _cmd_info(a) -> int:
    from uwsfmt.api import open as open_store  # lazy: keeps `uwsfmt --help` fast (no torch import)

    with open_store(a.store) as st:
        if a.json:
            print(json.dumps(info(st), indent=1, default=str))
            return 0
        print_summary(st)
        print(f"  {'tensor':<48} {'shape':<16} {'encoding':<9} {'rank':>5} {'bits':>4} {'expl.var':>9} {'err mean':>9} {'err max':>9}")
        for r in st.tensor_table():
            name = r["name"] if len(r["name"]) <= 48 else "..." + r["name"][-45:]
            print(f"  {name:<48} {str(r['shape']):<16} {r['encoding']:<9} {short_number(r['rank'], '')!s:>5} {short_number(r['residual_bits'], '')!s:>4} "
                  f"{short_number(r['explained_variance'], '.4f'):>9} {short_number(r['error_mean']):>9} {short_number(r['error_max']):>9}")
    return 0


def _cmd_validate(a) -> int:
    from uwsfmt.validate import validate  # lazy: keeps `uwsfmt --help` fast (no torch import)

    notes: list[str] = []
    problems = validate(a.store, deep=a.deep, notes=notes, source_root=a.source_root)
    for n in notes:
        print(f"  note: {n}")
    if problems:
        print(f"{a.store}: INVALID ({len(problems)} problem(s))", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print(f"{a.store}: valid UWS store")
    return 0


def _cmd_export(a) -> int:
    from uwsfmt.api import open as open_store  # lazy: keeps `uwsfmt --help` fast (no torch import)

    with open_store(a.store) as st:
        kw = {"max_shard_size": a.max_shard_size} if a.max_shard_size is not None else {}
        if kw and a.format != "hf":
            raise ConfigError(f"--max-shard-size lays out the shards of --format hf, not of --format {a.format}")
        out = st.export(a.model, a.output, format=a.format, overwrite=a.overwrite, **kw)
    print(f"wrote {out}")
    return 0


def _cmd_append(a) -> int:
    from uwsfmt.api import open as open_store  # lazy: keeps `uwsfmt --help` fast (no torch import)

    if a.id is not None and len(a.source) > 1:
        raise ConfigError(f"--id names one model, but {len(a.source)} sources were given; append them one by one to name each")
    if a.dask is not None and a.id is not None:
        raise ConfigError("--dask adds sources named by their files; drop --id (or add this one model without --dask)")
    if a.dask is not None and a.dry_run:
        raise ConfigError("--dry-run reads the sources' headers here and needs no cluster; drop --dask")
    if a.id is not None and (a.skip_existing or a.dry_run):
        raise ConfigError(f"--{'skip-existing' if a.skip_existing else 'dry-run'} goes with sources named by their files; "
                          "drop --id (with --id, the one model is added or refused)")
    kw = {"format": a.format, "max_error": a.max_error, "max_delta_error": a.max_delta_error, "device": a.device,
          "source_root": a.source_root}
    if a.dry_run:
        with open_store(a.store) as st:
            rep = st.plan_append(a.source, format=a.format, skip_existing=a.skip_existing)
        if a.json:
            print(json.dumps(rep, indent=1))
        else:
            print(f"{rep['n_models']} source(s), {human_size(rep['total_bytes'])}: {len(rep['new'])} new, "
                  f"{len(rep['existing'])} already in {rep['store']}")
            for c in rep["conflicts"]:
                print(f"  CONFLICT {c}")
        return 1 if rep["conflicts"] else 0
    with open_store(a.store, mode="a") as st:
        first = st.n_models
        if a.id is not None:
            added = [st.append(a.source[0], id=a.id, **kw)]
        else:
            added = st.extend(a.source, progress=not a.quiet and sys.stderr.isatty(), skip_existing=a.skip_existing,
                              client=a.dask, **kw)
            if a.skip_existing and not added:
                print(f"nothing to add: the store already has every model these sources name ({first} models)")
        for i, e in enumerate(added):
            errs = [x for x in e["error"] if x is not None]
            print(f"appended {e['id']!r} as model #{first + i}: max relative error {short_number(max(errs, default=0.0))}")
            if e.get("exceptions"):
                print(f"  {len(e['exceptions'])} tensor(s) needed a per-model exception to meet the error budget "
                      "(the bases do not fit this model; `uwsfmt info` suggests a refit)")
    return 0


def _cmd_pack(a) -> int:
    from uwsfmt.packing import pack  # lazy: keeps `uwsfmt --help` fast (no torch import)

    print(f"wrote {pack(a.store, a.output, overwrite=a.overwrite)}")
    return 0


def _cmd_unpack(a) -> int:
    from uwsfmt.packing import unpack  # lazy: keeps `uwsfmt --help` fast (no torch import)

    print(f"wrote {unpack(a.zip, a.output, overwrite=a.overwrite)}")
    return 0


def _cmd_demo(a) -> int:
    from uwsfmt.demo import run_demo  # lazy: keeps `uwsfmt --help` fast (no torch import)

    run_demo(a.dir)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="uwsfmt", description="Families of checkpoints as shared bases + per-model coefficients (UWS stores).")
    p.add_argument("--version", action="version", version=f"uwsfmt {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="build a store from checkpoints")
    c.add_argument("sources", nargs="+", help="files, folders or globs; one checkpoint per model")
    c.add_argument("-o", "--output", help="store directory to create")
    c.add_argument("--dry-run", action="store_true", help="print the planning report (headers only) and stop")
    c.add_argument("--json", action="store_true", help="with --dry-run: the report as JSON")
    c.add_argument("--lora-mode", default="auto", choices=CHOICES["lora_mode"],
                   help="LoRA adapters: one basis over the products s*B*A (gauge invariant), the paper's separate A and B "
                        "bases, or auto (default): the product basis, except under --max-error/--max-delta-error where it "
                        "would take more bytes than the adapters' own factors (adapters that share no subspace)")
    c.add_argument("--rank", type=int, help="kept rank per tensor (fixed k)")
    c.add_argument("--tau", type=float, help="explained-variance threshold (no fidelity option at all: the default error "
                                            "budget, --max-delta-error 0.2 with --max-error 0.1)")
    c.add_argument("--max-rank", type=int)
    c.add_argument("--mode", "--side", dest="mode", default="auto", choices=CHOICES["side"],
                   help="which side(s) of each tensor's matrix view get a shared basis (auto: the smaller)")
    c.add_argument("--center", default="auto", choices=CHOICES["center"],
                   help="what deviations are taken from (auto, the default: --base when given, else the family mean)")
    c.add_argument("--no-center", action="store_true", help="same as --center none")
    c.add_argument("--base", help="checkpoint the family was fine-tuned from: stored once, deltas decomposed from it")
    c.add_argument("--residual-bits", type=int, choices=CHOICES["residual_bits"])
    c.add_argument("--coefficient-bits", default="auto", choices=CHOICES["coefficient_bits"],
                   help="how per-model coefficients are stored: float32, 8 or 4 bits, or mixed precision by direction "
                        "(8/4, 8/4/2: more bits for the leading directions; format 1.2); auto (default): float32, except "
                        "under an error budget (the default), which picks per tensor")
    c.add_argument("--basis", default="exact", choices=CHOICES["basis_method"],
                   help="how bases are found: exact (Gram summed in float64 + eigendecomposition) or sketch (randomised range finder, "
                        "checked a-posteriori, exact where the check fails; much faster for wide tensors and LoRA families)")
    c.add_argument("--seed", type=int, default=0, help="seed of the sketch's random test matrices (--basis sketch)")
    c.add_argument("--mean-dtype", default="auto", choices=CHOICES["mean_dtype"],
                   help="how each tensor's family mean is stored: float16 (half the bytes, faster loads; rounds it by "
                        "<= 2^-11 relative, kept only where that holds), compute (float32), auto (default: float16 for "
                        "float16/bfloat16 tensors and under --max-error/--max-delta-error, within a tenth of the budget; "
                        "else float32)")
    c.add_argument("--max-error", type=float, metavar="E",
                   help="error budget: relative error ||W - W_hat|| / ||W|| of every tensor of every model stays <= E; "
                        "rank, mode, coefficient and residual bits are chosen per tensor for the fewest bytes (0 = lossless). "
                        "With no fidelity option the default budget applies: --max-delta-error 0.2 --max-error 0.1")
    c.add_argument("--max-delta-error", type=float, metavar="E",
                   help="error budget relative to each model's deviation from the family mean: ||W - W_hat|| / ||W - M|| <= E")
    c.add_argument("--encoding", action="append", metavar="PATTERN=ENC", help="force an encoding for matching tensor names")
    c.add_argument("--min-numel", type=int, help="smaller float tensors are stored dense (default 32 under an error budget, the default; 1024 with --rank or --tau)")
    c.add_argument("--allow-nonfinite", action="store_true", help="store tensors with NaN/Inf dense instead of refusing")
    c.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    c.add_argument("--format", help="force the source format")
    c.add_argument("--no-files", action="store_true",
                   help="keep none of a model folder's other files (config, tokenizer, chat template, model card); by "
                        "default they are kept, so that `export --format hf` gives the folder back")
    c.add_argument("--remote-code", action="store_true", help="also keep a model folder's *.py files (data, never run)")
    c.add_argument("--max-file-size", default="64MiB", metavar="SIZE",
                   help="largest folder file kept, e.g. 10MiB (default 64MiB); a larger one refuses the conversion")
    c.add_argument("--source-root", metavar="DIR",
                   help="record each source's path relative to DIR (default: its name only; never an absolute path)")
    c.add_argument("--dask", metavar="ADDRESS",
                   help="build on a Dask cluster: its scheduler's address (tcp://HOST:8786), or 'local' (worker processes "
                        "on this machine); sources and output folder on a file system every worker shares")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=_cmd_convert)

    c = sub.add_parser("plan", help="report formats, models, tensors and conflicts (headers only)")
    c.add_argument("sources", nargs="+")
    c.add_argument("--format")
    c.add_argument("--lora-mode", default="auto", choices=CHOICES["lora_mode"])
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=_cmd_plan)

    c = sub.add_parser("info", help="summary, per-tensor rank / explained variance / error")
    c.add_argument("store")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.set_defaults(func=_cmd_info)

    c = sub.add_parser("validate", help="check a store against the spec")
    c.add_argument("store")
    c.add_argument("--deep", action="store_true",
                   help="also read every array back (checksums) and rebuild every model; where a model's source file is "
                        "still there unchanged (sha256), recompute its errors and compare with the recorded ones")
    c.add_argument("--source-root", metavar="DIR", help="with --deep: find the sources under DIR (by recorded relative path or name)")
    c.set_defaults(func=_cmd_validate)

    c = sub.add_parser("export", help="write one model back out")
    c.add_argument("store")
    c.add_argument("model")
    c.add_argument("-o", "--output", required=True)
    c.add_argument("--format", default="safetensors",
                   help="safetensors (any store; LoRA stores give factors; .safetensors is appended to a name without an "
                        "extension), hf (the Hugging Face model folder it came from: config, tokenizer, shards and index, "
                        "for from_pretrained), peft (an adapter folder PEFT loads), kohya (a kohya/A1111 LoRA file)")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--max-shard-size", metavar="SIZE", help="with --format hf: shards of at most SIZE (e.g. 5GB) instead of the source's layout")
    c.set_defaults(func=_cmd_export)

    c = sub.add_parser("append", help="add models by projection onto the existing bases (one commit for all)")
    c.add_argument("store")
    c.add_argument("source", nargs="+", help="checkpoint files, folders or globs")
    c.add_argument("--id", help="the model's id (one source only; default: the file stem or folder name)")
    c.add_argument("--skip-existing", action="store_true",
                   help="leave out sources whose model id the store already has (default: refuse them all)")
    c.add_argument("--dry-run", action="store_true", help="headers only: what would be added, and every conflict (exit 1 if any)")
    c.add_argument("--json", action="store_true", help="with --dry-run: the report as JSON")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    c.add_argument("--format")
    c.add_argument("--max-error", type=float, metavar="E", help="error budget for this model (default: the store's)")
    c.add_argument("--max-delta-error", type=float, metavar="E", help="delta error budget for this model (default: the store's)")
    c.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    c.add_argument("--source-root", metavar="DIR", help="record each source's path relative to DIR (default: its name only)")
    c.add_argument("--dask", metavar="ADDRESS",
                   help="encode the new models on a Dask cluster: its scheduler's address (tcp://HOST:8786), or 'local'; "
                        "workers must see the sources and the store at the same paths (or URL)")
    c.set_defaults(func=_cmd_append)

    c = sub.add_parser("pack", help="directory store -> single .zip (readable in place)")
    c.add_argument("store")
    c.add_argument("output")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(func=_cmd_pack)

    c = sub.add_parser("unpack", help=".zip store -> directory store")
    c.add_argument("zip")
    c.add_argument("output")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(func=_cmd_unpack)

    c = sub.add_parser("demo", help="build a small family, convert it, print a summary")
    c.add_argument("dir", nargs="?", default=None, help="working folder (default: a temporary one)")
    c.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UWSError as e:
        print(f"uwsfmt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"uwsfmt {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"uwsfmt {args.command}: error: {e.strerror or e}: {e.filename or ''}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug: say so in one line (UWSFMT_DEBUG=1 shows the traceback)
        if os.environ.get("UWSFMT_DEBUG"):
            raise
        print(f"uwsfmt {args.command}: internal error: {type(e).__name__}: {e}. This is a bug in uwsfmt; "
              "please report it (run with UWSFMT_DEBUG=1 for the traceback)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
