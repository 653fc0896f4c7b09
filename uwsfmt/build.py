"""Build a store: plan -> statistics pass -> bases -> coefficients pass -> commit.

Pass 1 is tensor-major: for one tensor at a time, every model's copy is streamed into
float64 map-reduce statistics (sums and a Gram), which become that tensor's mean and basis.
Pass 2 is model-major: each model is read once more and projected; its per-model values are
written as one row per pack. Memory holds one tensor's statistics, the family's shared arrays
and one model's rows — never anything proportional to the number of models.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import os
import shutil
import threading
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import zarr
from zarr.storage import LocalStore

from . import __version__, dtypes, layout, linalg, naming
from .encodings import dense as dense_enc
from .encodings import residual as residual_enc
from .encodings import subspace
from .encodings.slots import PackLayout
from .errors import ConfigError, ConflictError, SourceError, StoreError, StoreExistsError, UWSError
from .sources import Checkpoint, TensorInfo, discover, open_checkpoint
from .store import Store, _open_zarr_store, default_device, open, read_manifest

ENCODING_NAMES = ("subspace", "shared", "dense")


class Cancelled(UWSError):
    """The build was cancelled; nothing was left at the target path."""


@dataclass
class Settings:
    """How a family is encoded. Every field is a keyword of :func:`convert`."""

    rank: int | None = None  # fixed kept rank per basis side
    tau: float | None = None  # explained-variance threshold (used when rank is None)
    max_rank: int | None = None  # cap on the kept rank
    mode: str = "auto"  # auto | left | right | both | flat
    center: str = "mean"  # mean | none | base (base needs base=...)
    residual_bits: int | None = None  # 2 | 4 | 8 | 16 | None
    encodings: dict[str, str] = field(default_factory=dict)  # name pattern -> encoding
    min_numel: int = 1024  # smaller float tensors are stored dense
    allow_nonfinite: bool = False  # store tensors with NaN/Inf as dense instead of refusing
    sketch_oversample: int = 16  # flat mode: extra sketch columns
    seed: int = 0

    def check(self) -> None:
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 0):
            raise ConfigError(f"rank must be a non-negative integer, not {self.rank!r}")
        if self.tau is not None and not (0.0 < float(self.tau) <= 1.0):
            raise ConfigError(f"tau must be in (0, 1], not {self.tau!r} (e.g. --tau 0.99)")
        if self.max_rank is not None and self.max_rank < 0:
            raise ConfigError(f"max_rank must be >= 0, not {self.max_rank}")
        if self.mode not in ("auto",) + linalg.MODES:
            raise ConfigError(f"mode must be one of auto, {', '.join(linalg.MODES)}; not {self.mode!r}")
        if self.center not in linalg.CENTERS:
            raise ConfigError(f"center must be one of {', '.join(linalg.CENTERS)}; not {self.center!r}")
        if self.residual_bits not in (None, 0) + linalg.RESIDUAL_BITS:
            raise ConfigError(f"residual_bits must be one of 2, 4, 8, 16 (or None); not {self.residual_bits!r}")
        for pat, enc in self.encodings.items():
            if enc not in ENCODING_NAMES:
                raise ConfigError(f"encoding override {pat!r}: {enc!r} is not one of {', '.join(ENCODING_NAMES)}")

    def choose(self, side: str, vals: torch.Tensor, limit: int | None) -> int:
        tau = self.tau if (self.rank is None and self.tau is not None) else None
        if self.rank is None and self.tau is None:
            tau = DEFAULT_TAU
        return linalg.choose_rank(vals, rank=self.rank, tau=tau, max_rank=self.max_rank, limit=limit)


#: explained variance kept when neither rank nor tau is given (fidelity first)
DEFAULT_TAU = 0.999


# ---------------------------------------------------------------------------- planning


@dataclass
class TensorPlan:
    name: str
    shape: tuple[int, ...] | None  # None when it varies between models
    dtype: str
    encoding: str  # candidate: subspace | dense | shared (final after pass 1)
    reason: str
    shapes: list[tuple[int, ...]] | None = None


@dataclass
class FamilyPlan:
    checkpoints: list[Checkpoint]
    tensors: list[TensorPlan]
    problems: list[str]
    total_bytes: int

    def report(self) -> dict:
        """JSON-friendly planning report (what ``uwsfmt plan`` prints)."""
        formats: dict[str, int] = {}
        for c in self.checkpoints:
            formats[c.format] = formats.get(c.format, 0) + 1
        enc: dict[str, int] = {}
        for t in self.tensors:
            enc[t.encoding] = enc.get(t.encoding, 0) + 1
        return {
            "n_models": len(self.checkpoints),
            "models": [c.id for c in self.checkpoints],
            "formats": formats,
            "n_tensors": len(self.tensors),
            "encodings": enc,
            "varying_shapes": [t.name for t in self.tensors if t.shape is None],
            "conflicts": list(self.problems),
            "total_bytes": self.total_bytes,
        }


def _override(name: str, patterns: dict[str, str]) -> str | None:
    for pat, enc in patterns.items():
        if fnmatch.fnmatchcase(name, pat):
            return enc
    return None


def plan_family(checkpoints: list[Checkpoint], settings: Settings | None = None, *, strict: bool = True) -> FamilyPlan:
    """Read headers only; decide candidate encodings; collect every conflict at once."""
    settings = settings or Settings()
    problems: list[str] = []
    ids: dict[str, int] = {}
    for c in checkpoints:
        ids[c.id] = ids.get(c.id, 0) + 1
    for i, n in ids.items():
        if n > 1:
            problems.append(f"model id {i!r} is used by {n} sources; give each model a unique id")
    infos: list[dict[str, TensorInfo]] = []
    total = 0
    for c in checkpoints:
        try:
            inf = c.infos()
        except UWSError:
            raise
        except Exception as e:
            raise SourceError(f"{c.path or c.id}: cannot read checkpoint headers ({e})") from None
        infos.append(inf)
        total += sum(t.nbytes for t in inf.values())
    names: list[str] = []
    seen = set()
    for inf in infos:
        for k in inf:
            if k not in seen:
                seen.add(k)
                names.append(k)
    tensors = []
    for name in names:
        have = [(c, inf[name]) for c, inf in zip(checkpoints, infos) if name in inf]
        if len(have) < len(checkpoints):
            missing = [c.id for c, inf in zip(checkpoints, infos) if name not in inf]
            problems.append(f"tensor {name!r} is missing from {len(missing)} model(s): {', '.join(missing[:5])}")
            continue
        dts = {t.dtype for _, t in have}
        if len(dts) > 1:
            detail = ", ".join(f"{c.id}: {t.dtype}" for c, t in have[:4])
            problems.append(f"tensor {name!r} has different dtypes across models ({detail})")
            continue
        dtype = dts.pop()
        shapes = [t.shape for _, t in have]
        forced = _override(name, settings.encodings)
        if len(set(shapes)) > 1:
            if forced not in (None, "dense"):
                problems.append(f"tensor {name!r} has different shapes across models, so it cannot be {forced}")
            tensors.append(TensorPlan(name, None, dtype, "dense", "shape varies between models", shapes))
            continue
        shape = shapes[0]
        numel = int(np.prod(shape, dtype=np.int64))
        if forced:
            if forced == "subspace" and not dtypes.is_float(dtype):
                problems.append(f"tensor {name!r} is {dtype}; only float tensors can use the subspace encoding")
                continue
            tensors.append(TensorPlan(name, shape, dtype, forced, "override"))
        elif not dtypes.is_float(dtype):
            tensors.append(TensorPlan(name, shape, dtype, "dense", f"{dtype} tensor"))
        elif len(shape) <= 1:
            tensors.append(TensorPlan(name, shape, dtype, "dense", "1-D tensor"))
        elif numel < settings.min_numel:
            tensors.append(TensorPlan(name, shape, dtype, "dense", f"small tensor (< {settings.min_numel} values)"))
        elif dtype.startswith("float8"):
            tensors.append(TensorPlan(name, shape, dtype, "dense", "float8 tensor"))
        else:
            tensors.append(TensorPlan(name, shape, dtype, "subspace", "float matrix"))
    if strict and problems:
        raise ConflictError(f"the {len(checkpoints)} sources do not form one family:", problems)
    return FamilyPlan(checkpoints, tensors, problems, total)


def plan(sources, *, format: str | None = None, **settings) -> dict:
    """Planning report for sources, reading headers only (never raises on conflicts)."""
    cks = discover(sources, format=format)
    s = Settings(**settings)
    return plan_family(cks, s, strict=False).report()


# ---------------------------------------------------------------------------- helpers


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _check_finite(w: torch.Tensor, name: str, ck: Checkpoint) -> bool:
    if not w.is_floating_point():
        return True
    return bool(torch.isfinite(w).all())


def _nonfinite_error(name: str, ck: Checkpoint) -> SourceError:
    return SourceError(
        f"{ck.path or ck.id}: tensor {name!r} of model {ck.id!r} contains NaN or Inf values. "
        "Fix the checkpoint, or pass allow_nonfinite=True (CLI: --allow-nonfinite) to store such tensors dense."
    )


class Progress:
    """tqdm bar, user callback ``(done, total, message)``, and cancellation, in one place."""

    def __init__(self, total: int, progress: bool | Callable | None, cancel: threading.Event | None, desc: str):
        self.total, self.done, self.cancel = total, 0, cancel
        self.callback = progress if callable(progress) else None
        self.bar = None
        if progress is True:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="step", leave=False)

    def step(self, msg: str, n: int = 1) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("cancelled by the user; nothing was written at the target")
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix_str(msg[-40:], refresh=False)
        if self.callback is not None:
            self.callback(self.done, self.total, msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------- pass 1


def _fit_tensor(tp: TensorPlan, cks: list[Checkpoint], s: Settings, dev: torch.device, base: Checkpoint | None, prog: Progress):
    """Statistics sweep for one tensor -> (final encoding, Fit or shared value, reason)."""
    m, n = linalg.matrix_view(tp.shape)
    mode = subspace.resolve_mode(s.mode, m, n)
    first = cks[0].get(tp.name)
    if not _check_finite(first, tp.name, cks[0]):
        if s.allow_nonfinite:
            prog.step(tp.name, len(cks))
            return "dense", None, "non-finite values"
        raise _nonfinite_error(tp.name, cks[0])
    if s.center == "base":
        if base is None:
            raise ConfigError("center='base' needs base=... (the checkpoint the family was fine-tuned from)")
        reference = base.get(tp.name).to(dev)
    else:
        reference = first.to(dev)
    identical = True
    with linalg.no_tf32():
        if mode == "flat":
            width = min(len(cks), (s.rank or s.max_rank or len(cks)) + s.sketch_oversample)
            sk = linalg.FlatSketch(m * n, max(1, width), reference, seed=s.seed)
        else:
            st = linalg.GramStats.empty(m, n, left=mode in ("left", "both"), right=mode in ("right", "both"), reference=reference)
        for i, ck in enumerate(cks):
            w = first if i == 0 else ck.get(tp.name)
            if i > 0:
                if not _check_finite(w, tp.name, ck):
                    if s.allow_nonfinite:
                        prog.step(tp.name, len(cks) - i)
                        return "dense", None, "non-finite values"
                    raise _nonfinite_error(tp.name, ck)
                identical = identical and _same_bits(w, first)
            (sk if mode == "flat" else st).add(w.to(dev))
            prog.step(tp.name)
        if identical and len(cks) > 1 and _override(tp.name, s.encodings) != "subspace":
            return "shared", first, "bit-identical in every model"
        if mode == "flat":
            mean, q = sk.range(s.center)
            if mean is not None:
                mean = mean.to(_mean_dtype(tp.dtype)).to(torch.float64)
            proj = torch.stack([q.T @ (cks[i].get(tp.name).to(dev, torch.float64).reshape(-1) - (mean if mean is not None else 0.0))
                                for i in range(len(cks))], dim=1)
            basis, spectrum = linalg.flat_basis(q, proj)
            fit = subspace.fit_flat(mean, basis, spectrum, s.choose)
        else:
            fit = subspace.fit_gram(st, mode=mode, center=s.center, choose=s.choose)
            del st
    if fit.mean is not None:
        fit.mean = fit.mean.to(_mean_dtype(tp.dtype))
    return "subspace", fit, "float matrix"


def _mean_dtype(logical: str) -> torch.dtype:
    return torch.float64 if logical == "float64" else torch.float32


# ---------------------------------------------------------------------------- pass 2


def _encode_subspace(e: dict, fit: subspace.Fit, w: torch.Tensor, rows: dict[str, np.ndarray]) -> tuple[float, float | None]:
    """Project one model's tensor, fill its slots; return (error, delta error)."""
    view = tuple(e["view"])
    dev = fit.mean.device if fit.mean is not None else (fit.left if fit.left is not None else fit.right).device
    with linalg.no_tf32():
        w64 = w.to(device=dev, dtype=torch.float64).reshape(view)
        d = w64 - fit.mean.to(torch.float64).reshape(view) if fit.mean is not None else w64
        c = subspace.coefficients(fit, d)
        rows[e["coefficients"]["pack"]][e["coefficients"]["offset"]: e["coefficients"]["offset"] + c.numel()] = c.cpu().numpy().reshape(-1)
        approx = subspace.subspace_part(fit, c)
        if e.get("residual"):
            values, back = residual_enc.encode(e["residual"], (d - approx).to(torch.float32))
            residual_enc.write(e["residual"], values, rows)
            approx = approx + back.to(torch.float64)
        err = torch.linalg.vector_norm(d - approx).item()
        wn = torch.linalg.vector_norm(w64).item()
        dn = torch.linalg.vector_norm(d).item() if fit.mean is not None else None
    rel = err / wn if wn > 0 else (0.0 if err == 0 else float("inf"))
    drel = None if dn is None else (err / dn if dn > 0 else (0.0 if err == 0 else float("inf")))
    return rel, drel


def _finite_or_none(x: float | None) -> float | None:
    return x if (x is not None and np.isfinite(x)) else None


def encode_model(
    entries: list[dict], fits: dict[str, Any], ck: Checkpoint, widths: dict[str, int], *, allow_nonfinite: bool, store_path: str
) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor], list, list]:
    """One model -> (pack rows, per-model dense arrays, errors, delta errors)."""
    rows = {p: np.zeros(w, dtype=p) for p, w in widths.items()}
    per_model: dict[str, torch.Tensor] = {}
    errs, derrs = [], []
    infos = ck.infos()
    for e in entries:
        name = e["name"]
        if name not in infos:
            raise ConflictError(f"{ck.path or ck.id}: model {ck.id!r} lacks tensor {name!r} that the store {store_path} holds")
        info = infos[name]
        if info.dtype != e["dtype"]:
            raise ConflictError(f"{ck.path or ck.id}: tensor {name!r} is {info.dtype} but the store holds it as {e['dtype']}")
        enc = e["encoding"]
        per = enc == "dense" and e["data"].get("per_model")
        if not per and tuple(info.shape) != tuple(e["shape"]):
            raise ConflictError(
                f"{ck.path or ck.id}: tensor {name!r} has shape {list(info.shape)} but the store holds {e['shape']}"
            )
        w = ck.get(name)
        if enc == "subspace" and not _check_finite(w, name, ck):
            raise _nonfinite_error(name, ck) if not allow_nonfinite else SourceError(
                f"{ck.path or ck.id}: tensor {name!r} of model {ck.id!r} has NaN/Inf but is a subspace tensor in the store; "
                "non-finite values cannot be projected. Rebuild the store including this model with allow_nonfinite=True."
            )
        if enc == "shared":
            if not _same_bits(w, fits[name]):
                raise ConflictError(
                    f"{ck.path or ck.id}: tensor {name!r} of model {ck.id!r} differs from the store's shared copy; "
                    "a shared tensor must be bit-identical in every model. Rebuild the store with this model included "
                    f"(or with --encoding '{name}=dense')."
                )
            errs.append(0.0)
            derrs.append(0.0)
        elif enc == "dense":
            if per:
                per_model[name] = w
            else:
                dense_enc.encode(e, w, rows)
            errs.append(0.0)
            derrs.append(0.0)
        else:
            rel, drel = _encode_subspace(e, fits[name], w, rows)
            errs.append(_finite_or_none(rel))
            derrs.append(_finite_or_none(drel))
    return rows, per_model, errs, derrs


# ---------------------------------------------------------------------------- convert


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _source_record(ck: Checkpoint) -> dict:
    fp = ck.fingerprint()
    return {
        "path": os.path.abspath(ck.path) if ck.path else None,
        "format": ck.format,
        "sha256": fp.get("sha256"),
        "size": fp.get("size"),
    }


def convert(
    sources,
    out: str | os.PathLike,
    *,
    rank: int | None = None,
    tau: float | None = None,
    max_rank: int | None = None,
    mode: str = "auto",
    center: str = "mean",
    residual_bits: int | None = None,
    encodings: dict[str, str] | None = None,
    min_numel: int = 1024,
    allow_nonfinite: bool = False,
    base=None,
    device: str | None = None,
    format: str | None = None,
    overwrite: bool = False,
    progress: bool | Callable[[int, int, str], None] | None = False,
    cancel: threading.Event | None = None,
    seed: int = 0,
) -> Store:
    """Build a UWS store at ``out`` from a family of checkpoints and return it opened.

    ``sources``: paths, folders, globs, Checkpoint objects, or ``{model_id: state_dict}``.
    Rank: fixed ``rank`` per basis side, else the smallest k reaching ``tau`` explained
    variance (default 0.999), capped by ``max_rank``. ``residual_bits`` adds a quantized
    per-model correction (2/4/8 bits with per-row scales, or 16 = float16).

    >>> fam = {f"m{i}": {"w": torch.randn(64, 64)} for i in range(4)}
    >>> store = convert(fam, "/tmp/doc.uws", rank=2, overwrite=True)  # doctest: +SKIP
    """
    s = Settings(rank=rank, tau=tau, max_rank=max_rank, mode=mode, center=center,
                 residual_bits=residual_bits or None, encodings=dict(encodings or {}),
                 min_numel=min_numel, allow_nonfinite=allow_nonfinite, seed=seed)
    s.check()
    out = os.fspath(out)
    if os.path.exists(out) and not overwrite:
        raise StoreExistsError(f"{out}: already exists; choose another output path or pass overwrite=True (CLI: --overwrite)")
    cks = discover(sources, format=format)
    base_ck = None
    if base is not None:
        base_ck = base if isinstance(base, Checkpoint) else open_checkpoint(os.fspath(base), id="base")
        if center == "mean":
            s.center = "base"
    fam = plan_family(cks, s)
    dev = torch.device(device or default_device())
    parent = os.path.dirname(os.path.abspath(out)) or "."
    if not os.path.isdir(parent):
        raise StoreError(f"{out}: the parent folder {parent} does not exist")
    tmp = os.path.join(parent, f".{os.path.basename(out)}.uws-building-{uuid.uuid4().hex[:8]}")
    try:
        _build(fam, tmp, s, dev, base_ck, progress, cancel)
        _replace(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        for c in cks:
            c.close()
    return open(out)


def _replace(tmp: str, out: str, overwrite: bool) -> None:
    if os.path.exists(out):
        if not overwrite:
            raise StoreExistsError(f"{out}: appeared while building; the new store was not moved there")
        trash = f"{tmp}.old"
        os.rename(out, trash)
        os.rename(tmp, out)
        if os.path.isdir(trash):
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.remove(trash)
    else:
        os.rename(tmp, out)


def _build(fam: FamilyPlan, path: str, s: Settings, dev: torch.device, base: Checkpoint | None, progress, cancel) -> None:
    cks = fam.checkpoints
    N = len(cks)
    zstore = LocalStore(path)
    root = zarr.open_group(zstore, mode="w", attributes={"uws": {"format_version": layout.FORMAT_VERSION, "state": "building"}})
    zarr.open_group(zstore, path=layout.TENSORS, mode="w")
    nodes = naming.unique_nodes([t.name for t in fam.tensors])
    prog = Progress(len(fam.tensors) * N + N, progress, cancel, "uwsfmt convert")
    packs = PackLayout()
    entries: list[dict] = []
    fits: dict[str, Any] = {}
    try:
        for tp, node in zip(fam.tensors, nodes):
            npath = layout.tensor_node(node)
            zarr.open_group(zstore, path=npath, mode="w", attributes={"uws_tensor": tp.name})
            e: dict[str, Any] = {"name": tp.name, "node": npath, "dtype": tp.dtype}
            enc, reason = tp.encoding, tp.reason
            if tp.shape is None:
                e.update(shape=None, encoding="dense", data={"per_model": True}, reason=reason)
                prog.step(tp.name, N)
            elif enc == "subspace":
                enc, fit, reason = _fit_tensor(tp, cks, s, dev, base, prog)
                e["shape"] = list(tp.shape)
                if enc == "subspace":
                    _add_subspace(e, fit, zstore, npath, packs, s, tp)
                    fits[tp.name] = fit
                elif enc == "shared":
                    _add_shared(e, fit, zstore, npath)
                    fits[tp.name] = fit
                else:
                    e["data"] = packs.add(dtypes.storage_dtype(tp.dtype), int(np.prod(tp.shape)))
                e["encoding"], e["reason"] = enc, reason
            else:
                e["shape"] = list(tp.shape)
                first = cks[0].get(tp.name)
                identical = False
                if N > 1 and reason != "override" or enc == "shared":
                    identical = True
                    for i, ck in enumerate(cks[1:], 1):
                        if not _same_bits(ck.get(tp.name), first):
                            identical = False
                            break
                prog.step(tp.name, N)
                if enc == "shared" and not identical and N > 1:
                    raise ConflictError(f"tensor {tp.name!r} is forced to 'shared' but differs between models; use 'dense' or 'subspace'")
                if identical:
                    _add_shared(e, first, zstore, npath)
                    fits[tp.name] = first
                    e["encoding"], e["reason"] = "shared", "bit-identical in every model"
                else:
                    e["encoding"], e["reason"] = "dense", reason
                    e["data"] = packs.add(dtypes.storage_dtype(tp.dtype), int(np.prod(tp.shape)))
            entries.append(e)

        pack_arrays = {p: layout.create_pack(zstore, p, N, w) for p, w in packs.widths.items() if w > 0}
        manifest_packs = {p: {"path": layout.pack_path(p), "dtype": p, "width": w} for p, w in packs.widths.items() if w > 0}
        models = []
        for i, ck in enumerate(cks):
            rows, per_model, errs, derrs = encode_model(entries, fits, ck, packs.widths, allow_nonfinite=s.allow_nonfinite, store_path=path)
            for p, arr in pack_arrays.items():
                arr[i, :] = rows[p]
            for name, w in per_model.items():
                e = entries[[x["name"] for x in entries].index(name)]
                layout.write_array(zstore, f"{e['node']}/models/{i}", dtypes.to_storage(w))
            models.append({"id": ck.id, "added": _now(), "source": _source_record(ck), "error": errs, "delta_error": derrs})
            prog.step(ck.id)
        manifest = {
            "format_version": layout.FORMAT_VERSION,
            "state": "complete",
            "generation": 1,
            "writer": f"uwsfmt {__version__}",
            "created": _now(),
            "updated": _now(),
            "build": {
                "device": str(dev),
                "settings": {k: v for k, v in asdict(s).items()},
                "default_tau": DEFAULT_TAU,
                "base": _source_record(base) if base is not None else None,
            },
            "packs": manifest_packs,
            "tensors": entries,
            "models": models,
        }
        from .schema import validate_manifest

        validate_manifest(manifest, path)
        root.attrs.put({"uws": manifest})
    finally:
        prog.close()


def _add_shared(e: dict, value: torch.Tensor, zstore, npath: str) -> None:
    layout.write_array(zstore, f"{npath}/value", dtypes.to_storage(value))
    e["data"] = {"path": f"{npath}/value"}


def _add_subspace(e: dict, fit: subspace.Fit, zstore, npath: str, packs: PackLayout, s: Settings, tp: TensorPlan) -> None:
    m, n = linalg.matrix_view(tp.shape)
    view = (m * n, 1) if fit.mode == "flat" else (m, n)
    e.update(view=list(view), mode=fit.mode, center=fit.center)
    if fit.mean is not None:
        layout.write_array(zstore, f"{npath}/mean", fit.mean.reshape(view).cpu().numpy())
        e["mean"] = f"{npath}/mean"
    else:
        e["mean"] = None
    e["left"] = e["right"] = None
    if fit.left is not None:
        layout.write_array(zstore, f"{npath}/left", fit.left.cpu().numpy())
        e["left"] = f"{npath}/left"
    if fit.right is not None:
        layout.write_array(zstore, f"{npath}/right", fit.right.cpu().numpy())
        e["right"] = f"{npath}/right"
    e["spectrum"] = {}
    for side, vals in fit.spectra.items():
        layout.write_array(zstore, f"{npath}/spectrum_{side}", vals.cpu().numpy().astype(np.float64))
        e["spectrum"][side] = f"{npath}/spectrum_{side}"
    e["rank"] = fit.rank
    ex = fit.explained()
    e["explained_variance"] = {k: float(v) for k, v in ex.items()}
    e["energy"] = float(next(iter(fit.spectra.values())).sum()) if fit.spectra else 0.0
    r = fit.left.shape[1] if fit.left is not None else view[0]
    c = fit.right.shape[1] if fit.right is not None else view[1]
    e["coefficients"] = packs.add("float32", r * c, shape=[r, c])
    e["residual"] = residual_enc.plan(packs, view[0], view[1], s.residual_bits) if s.residual_bits else None


# ---------------------------------------------------------------------------- append / project


def _fits_from_store(store: Store, dev: torch.device) -> dict[str, Any]:
    fits: dict[str, Any] = {}
    for e in store.manifest["tensors"]:
        if e["encoding"] == "subspace":
            cdt = torch.float64 if e["dtype"] == "float64" else torch.float32
            def arr(p):
                return None if p is None else torch.from_numpy(store.read_array(p)).to(dev, cdt)
            kept = {"left": e["rank"][0], "right": e["rank"][1]}
            fits[e["name"]] = subspace.Fit(e["mode"], e["center"], arr(e["mean"]), arr(e["left"]), arr(e["right"]), {}, kept)
        elif e["encoding"] == "shared":
            fits[e["name"]] = dtypes.from_storage(store.read_array(e["data"]["path"]), e["dtype"])
    return fits


def project(store: Store, source, *, format: str | None = None, device: str | None = None) -> dict:
    """Coefficients and errors of an unseen checkpoint against the store's bases (nothing written).

    Returns ``{"id", "coefficients": {name: tensor}, "error": {name: float}, "delta_error": {...}}``.
    """
    ck = _one_checkpoint(source, format=format)
    dev = torch.device(device or "cpu")
    widths = {p: info["width"] for p, info in store.manifest["packs"].items()}
    entries = store.manifest["tensors"]
    rows, _, errs, derrs = encode_model(entries, _fits_from_store(store, dev), ck, widths,
                                        allow_nonfinite=False, store_path=store.path)
    coefs = {}
    for e in entries:
        if e["encoding"] == "subspace":
            sl = e["coefficients"]
            coefs[e["name"]] = torch.from_numpy(rows[sl["pack"]][sl["offset"]: sl["offset"] + sl["length"]].copy()).reshape(sl["shape"])
    names = [e["name"] for e in entries]
    return {"id": ck.id, "coefficients": coefs, "error": dict(zip(names, errs)), "delta_error": dict(zip(names, derrs))}


def _one_checkpoint(source, *, format: str | None, id: str | None = None) -> Checkpoint:
    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, dict):
        from .sources import StateDictCheckpoint

        return StateDictCheckpoint(id or "model", source)
    cks = discover([source], format=format)
    if len(cks) != 1:
        raise SourceError(f"{source}: expected one checkpoint, found {len(cks)}")
    if id is not None:
        cks[0].id = id
    return cks[0]


def append(store: Store, source, *, id: str | None = None, format: str | None = None, progress: bool = False,
           device: str | None = None) -> dict:
    """Add one model to a directory store: project, write its row, commit the manifest.

    Existing data is never rewritten: the new model's rows go into new shards, and the
    manifest (root zarr.json) is replaced atomically last. A lock serialises appenders.
    """
    from .commit import StoreLock

    if not os.path.isdir(store.path):
        raise StoreError(f"{store.path}: only directory stores can be appended to; unpack the zip first (uwsfmt unpack)")
    ck = _one_checkpoint(source, format=format, id=id)
    with StoreLock(store.path):
        zstore = _open_zarr_store(store.path, "w")
        current = read_manifest(zstore, store.path)  # re-read under the lock: another writer may have committed
        if any(m["id"] == ck.id for m in current["models"]):
            raise ConflictError(f"{store.path}: a model with id {ck.id!r} is already in the store; pass another id (CLI: --id)")
        dev = torch.device(device or "cpu")
        fresh = Store(store.path, zstore, current)
        widths = {p: info["width"] for p, info in current["packs"].items()}
        rows, per_model, errs, derrs = encode_model(current["tensors"], _fits_from_store(fresh, dev), ck, widths,
                                                    allow_nonfinite=False, store_path=store.path)
        idx = len(current["models"])
        for p, info in current["packs"].items():
            arr = zarr.open_array(zstore, path=info["path"], mode="r+")
            if arr.shape[0] < idx + 1:
                arr.resize((idx + 1, arr.shape[1]))
            arr[idx, :] = rows[p]
        for e in current["tensors"]:
            if e["name"] in per_model:
                layout.write_array(zstore, f"{e['node']}/models/{idx}", dtypes.to_storage(per_model[e["name"]]))
        entry = {"id": ck.id, "added": _now(), "source": _source_record(ck), "error": errs, "delta_error": derrs}
        new = dict(current)
        new["models"] = current["models"] + [entry]
        new["generation"] = int(current.get("generation", 0)) + 1
        new["updated"] = _now()
        from .commit import commit_manifest

        commit_manifest(zstore, store.path, new)
        ck.close()
    store.manifest = new
    store._index_cache()
    store._arrays.clear()
    return entry
