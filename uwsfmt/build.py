"""Build a store: plan -> statistics pass -> bases -> coefficients pass -> commit.

Pass 1 is tensor-major: for one tensor at a time, every model's copy is streamed into
float64 map-reduce statistics (sums and a Gram), which become that tensor's mean and basis.
Pass 2 is model-major: each model is read once more and projected; its per-model values are
written as one row per pack. Memory holds one tensor's statistics, the family's shared arrays
and one model's rows — never anything proportional to the number of models.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import fnmatch
import math
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import zarr
from zarr.storage import LocalStore

from . import __version__, allocator, budget, dtypes, layout, linalg, naming, overlap
from .commit import BuildLock, replace_dir
from .encodings import dense as dense_enc
from .encodings import lora as lora_enc
from .encodings import residual as residual_enc
from .encodings import subspace
from .encodings.slots import PackLayout
from .errors import BudgetError, ConfigError, ConflictError, SourceError, StoreError, StoreExistsError, UWSError
from .sources import Checkpoint, StateDictCheckpoint, TensorInfo, discover, open_checkpoint
from .store import BUILDING_MARK, REPLACED_MARK, Store, _device, default_device, open

ENCODING_NAMES = ("subspace", "shared", "dense")


class _FactorsAreSmaller(Exception):
    """lora_mode="auto" under an error budget: the product bases would take more bytes than the
    adapters' own factors (adapters that share no subspace); :func:`convert` builds again in the
    factors mode."""

    def __init__(self, product: int, factors: int):
        super().__init__(f"product {product} bytes > factors {factors} bytes")
        self.product, self.factors = product, factors


class Cancelled(UWSError):
    """The build (or append) was cancelled; nothing was left at the target path (the store
    appended to keeps its previous committed state)."""


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
    sketch_oversample: int = 16  # flat mode and basis="sketch": extra sketch columns
    basis: str = "exact"  # exact (float64 Gram + eigh) | sketch (randomised range finder, checked, exact fallback)
    sketch_power: int = 1  # basis="sketch": refinement sweeps after the sketch (the last one also checks)
    sketch_tolerance: float = 0.01  # basis="sketch": accepted loss of squared error vs the best basis
    seed: int = 0
    max_error: float | None = None  # error budget: ||W - W_hat|| / ||W|| per tensor and model (see budget.py)
    max_delta_error: float | None = None  # error budget: ||W - W_hat|| / ||W - M|| per tensor and model
    lora_mode: str = "auto"  # LoRA pairs: product (basis over s*B*A) | factors (paper: A and B apart) | auto (see convert)
    mean_dtype: str = "auto"  # subspace means: auto | float16 | compute (see _stored_mean)
    lora_choice: str | None = None  # lora_mode="auto": what it chose and why (informative, recorded in the manifest)

    def check(self) -> None:
        if self.lora_mode not in lora_enc.LORA_MODES:
            raise ConfigError(f"lora_mode must be one of {', '.join(lora_enc.LORA_MODES)}; not {self.lora_mode!r}")
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
        for key, example in (("max_error", "--max-error 1e-3"), ("max_delta_error", "--max-delta-error 0.1")):
            v = getattr(self, key)
            if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= float(v) < math.inf):
                raise ConfigError(f"{key} must be a number >= 0 (relative error per tensor and model, e.g. {example}), not {v!r}")
        if self.mean_dtype not in MEAN_DTYPES:
            raise ConfigError(f"mean_dtype must be one of {', '.join(MEAN_DTYPES)}; not {self.mean_dtype!r}")
        if self.basis not in BASIS_METHODS:
            raise ConfigError(f"basis must be one of {', '.join(BASIS_METHODS)}; not {self.basis!r}")
        if not (isinstance(self.sketch_power, int) and self.sketch_power >= 1):
            raise ConfigError(f"sketch_power must be an integer >= 1 (refinement sweeps), not {self.sketch_power!r}")
        if self.residual_bits not in (None, 0) + linalg.RESIDUAL_BITS:
            raise ConfigError(f"residual_bits must be one of 1, 2, 4, 8, 16 (or None); not {self.residual_bits!r}")
        for pat, enc in self.encodings.items():
            if enc not in ENCODING_NAMES:
                raise ConfigError(f"encoding override {pat!r}: {enc!r} is not one of {', '.join(ENCODING_NAMES)}")

    @property
    def error_budget(self) -> budget.Budget | None:
        """The error budget (None: rank by tau / rank, no guarantee)."""
        if self.max_error is None and self.max_delta_error is None:
            return None
        return budget.Budget(self.max_error, self.max_delta_error)

    def choose(self, side: str, vals: torch.Tensor, limit: int | None) -> int:
        tau = self.tau if (self.rank is None and self.tau is not None) else None
        max_rank = self.max_rank
        if self.error_budget is not None:  # keep every candidate direction; the budget picks the rank
            max_rank = budget.MAX_CANDIDATE_RANK if max_rank is None else max_rank
        elif self.rank is None and self.tau is None:
            tau = DEFAULT_TAU
        return linalg.choose_rank(vals, rank=self.rank, tau=tau, max_rank=max_rank, limit=limit)


#: explained variance kept when neither rank nor tau is given (fidelity first)
DEFAULT_TAU = 0.999
BASIS_METHODS = ("exact", "sketch")
#: how subspace means are stored: "compute" (float32, float64 for float64 tensors), "float16"
#: (half the bytes, where the rounding stays small; see _stored_mean) or "auto" (float16 for
#: float16 / bfloat16 tensors, whose rebuild is cast to 16 bits anyway, and under an error
#: budget, which says how much error is acceptable; else the compute dtype)
MEAN_DTYPES = ("auto", "float16", "compute")
#: a float16 mean is kept only where its rounding moves it by at most this, relative (normal
#: float16 values: 2^-11 per value at most, ~2.8e-4 root-mean-square; more only where values
#: fall into float16's subnormals)
HALF_MEAN_RTOL = 2.0 ** -10
SKETCH_RANK = linalg.SKETCH_RANK
SKETCH_PROBES = linalg.SKETCH_PROBES


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
    lora: dict = field(default_factory=dict)  # LoRA section of the report (empty: no adapters)

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
            **({"lora": self.lora} if self.lora else {}),
        }


def _override(name: str, patterns: dict[str, str]) -> str | None:
    for pat, enc in patterns.items():
        if fnmatch.fnmatchcase(name, pat):
            return enc
    return None


def _headers(ck: Checkpoint, what: str) -> dict[str, TensorInfo]:
    """``ck.infos()``; an unexpected failure (not one of ours) becomes a SourceError naming the file."""
    try:
        return ck.infos()
    except UWSError:
        raise
    except Exception as e:
        raise SourceError(f"{ck.path or ck.id}: cannot read {what} ({e})") from None


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
        inf = _headers(c, "checkpoint headers")
        infos.append(inf)
        total += sum(t.nbytes for t in inf.values())
    names: list[str] = []
    seen = set()
    for inf in infos:
        for k in inf:
            if k not in seen:
                seen.add(k)
                names.append(k)
    for c in checkpoints:
        problems += naming.check_string(c.id, f"model id (of {c.path})" if c.path else "model id")
    for k in names:
        problems += naming.check_string(k, "tensor name", empty_ok=True)
    lora_plans, lora_names, lora_problems, lora_report = lora_enc.plan(checkpoints, infos, settings, TensorPlan)
    problems += lora_problems
    tensors = []
    for name in names:
        if name in lora_names:  # LoRA factors: planned as modules (or factor-wise) by encodings/lora.py
            tensors += lora_plans.get(name, [])
            continue
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
        elif len(shape) <= 1 and settings.error_budget is None:  # with a budget, vectors compete too
            tensors.append(TensorPlan(name, shape, dtype, "dense", "1-D tensor"))
        elif numel < settings.min_numel:
            tensors.append(TensorPlan(name, shape, dtype, "dense", f"small tensor (< {settings.min_numel} values)"))
        elif dtype.startswith("float8"):
            tensors.append(TensorPlan(name, shape, dtype, "dense", "float8 tensor"))
        else:
            tensors.append(TensorPlan(name, shape, dtype, "subspace", "float matrix"))
    if strict and problems:
        raise ConflictError(f"the {len(checkpoints)} sources do not form one family:", problems)
    return FamilyPlan(checkpoints, tensors, problems, total, lora_report)


def plan(sources, *, format: str | None = None, **settings) -> dict:
    """Planning report for sources, reading headers only (never raises on conflicts)."""
    cks = discover(sources, format=format)
    s = Settings(**settings)
    return plan_family(cks, s, strict=False).report()


# ---------------------------------------------------------------------------- helpers


#: bytes compared before the rest in :func:`_same_bits`
_SAME_BITS_HEAD = 4096


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    x, y = a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    # fine-tunes almost always differ in their first values: a full-size pass only for likely twins
    head = min(x.numel(), _SAME_BITS_HEAD)
    return torch.equal(x[:head], y[:head]) and torch.equal(x[head:], y[head:])


def _check_finite(w: torch.Tensor, name: str, ck: Checkpoint) -> bool:
    if not w.is_floating_point():
        return True
    if w.element_size() == 1:  # float8: torch has no isfinite for it; its float32 values are exact
        w = w.float()
    return bool(torch.isfinite(w).all())


def _projected_nonfinite_error(name: str, ck: Checkpoint) -> SourceError:
    return SourceError(
        f"{ck.path or ck.id}: tensor {name!r} of model {ck.id!r} has NaN/Inf but is a subspace tensor in the store; "
        "non-finite values cannot be projected. Rebuild the store including this model with allow_nonfinite=True."
    )


def _nonfinite_error(name: str, ck: Checkpoint) -> SourceError:
    return SourceError(
        f"{ck.path or ck.id}: tensor {name!r} of model {ck.id!r} contains NaN or Inf values. "
        "Fix the checkpoint, or pass allow_nonfinite=True (CLI: --allow-nonfinite) to store such tensors dense."
    )


class Progress:
    """tqdm bar, user callback ``(done, total, message)``, and cancellation, in one place."""

    def __init__(self, total: int, progress: bool | Callable | None, cancel: threading.Event | None, desc: str,
                 stopped: str = "cancelled by the user; nothing was written at the target"):
        self.total, self.done, self.cancel, self.stopped = total, 0, cancel, stopped
        self.callback = progress if callable(progress) else None
        self.bar = None
        if progress is True:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="step", leave=False)

    def step(self, msg: str, n: int = 1) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled(self.stopped)
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


def _fit_tensor(tp: TensorPlan, cks: list[Checkpoint], s: Settings, dev: torch.device, base: Checkpoint | None, prog: Progress,
                hold: Holdings | None = None, target: int | None = None, count: bool = True):
    """Statistics sweep for one tensor -> (final encoding, Fit or shared value, reason).
    ``hold``: memory pass 1 may keep pass-2 results in (see :func:`_coefficients_from_ritz`).
    ``target``: directions a sketch looks for (error budgets, see :func:`_budget_tensor`);
    ``count``: whether this sweep counts as the tensor's progress (a refit does not)."""
    m, n = linalg.matrix_view(tp.shape)
    mode = budget.gram_mode(s.mode, m, n) if s.error_budget is not None else subspace.resolve_mode(s.mode, m, n)
    first = cks[0].get(tp.name)
    if s.center == "base":
        if base is None:
            raise ConfigError("center='base' needs base=... (the checkpoint the family was fine-tuned from)")
        reference = base.get(tp.name).to(dev)
    else:
        reference = first.to(dev)
    identical = True
    with linalg.no_tf32():
        sketch = _sketch_test_matrices(s, mode, m, n, dev, target)
        # the sketch's later sweeps reuse the first models' tensors as read here, up to KEEP_SOURCES_BYTES
        keep = KEEP_SOURCES_BYTES // max(first.numel() * first.element_size(), 1) if sketch and mode != "flat" else 0
        kept: list[torch.Tensor] = []
        if mode == "flat":
            width = min(len(cks), (s.rank or s.max_rank or len(cks)) + s.sketch_oversample)
            sk = linalg.FlatSketch(m * n, max(1, width), reference, seed=s.seed)
        elif sketch:
            st = linalg.GramSketch(m, n, sketch, reference, w_norms=s.center == "none")
        else:
            st = linalg.GramStats.empty(m, n, left=mode in ("left", "both"), right=mode in ("right", "both"), reference=reference)
        for i, (ck, w) in enumerate(zip(cks, _tensors(cks, tp.name, dev, [first]))):
            if i > 0:
                identical = identical and _same_bits(w, first)
            sq = (sk if mode == "flat" else st).add(w.to(dev))
            if len(kept) < keep:
                kept.append(w)
            # the statistics' squared norm (of W; of W - reference for the sketch) is NaN/Inf when a value is: no separate pass
            if not (sq is not None and math.isfinite(sq)) and not _check_finite(w, tp.name, ck):
                if s.allow_nonfinite:
                    prog.step(tp.name, len(cks) - i if count else 0)
                    return "dense", None, "non-finite values"
                raise _nonfinite_error(tp.name, ck)
            if sketch and not math.isfinite(sq):  # finite values whose float32 delta overflows
                raise ConfigError(f"{ck.path or ck.id}: tensor {tp.name!r} has values too large for basis='sketch' (its deltas "
                                  "overflow float32); build with basis='exact'")
            prog.step(tp.name, 1 if count else 0)
        if identical and len(cks) > 1 and _override(tp.name, s.encodings) != "subspace":
            return "shared", first, "bit-identical in every model"
        if mode == "flat":
            mean, q = sk.range(s.center)
            if mean is not None:
                mean = _stored_mean(mean, tp.dtype, s).to(torch.float64)
            proj = torch.stack([q.T @ (cks[i].get(tp.name).to(dev, torch.float64).reshape(-1) - (mean if mean is not None else 0.0))
                                for i in range(len(cks))], dim=1)
            basis, spectrum = linalg.flat_basis(q, proj)
            fit = subspace.fit_flat(mean, basis, spectrum, s.choose)
        elif sketch:
            fit = _fit_sketch(tp, cks, s, dev, st, mode, prog, hold, kept)
            del st, kept
        else:
            fit = subspace.fit_gram(st, mode=mode, center=s.center, choose=s.choose)
            del st
    if fit.mean is not None:
        if fit.method.get("method") == "sketch":  # decided before its last sweep (centrings "mean" and "base")
            fit.mean = fit.mean if fit.mean.dtype == torch.float16 else fit.mean.to(_mean_dtype(tp.dtype))
        else:
            fit.mean = _stored_mean(fit.mean, tp.dtype, s, _spread(fit, len(cks)))
    return "subspace", fit, "float matrix"


#: integer dtype of each element size: bit patterns of a batch compared in one pass
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
#: stacked statistics of one pass-1 batch are kept under this many bytes (sums and Grams, float64)
BATCH_STATS_BYTES = 256 << 20


def _fit_batch_key(tp: TensorPlan, s: Settings, dev: torch.device) -> tuple | None:
    """Key under which pass 1 gathers the statistics of ``tp`` with others of its kind, or None:
    small float subspace tensors on the exact (float64 Gram) path, without an error budget."""
    if tp.encoding != "subspace" or tp.shape is None or s.error_budget is not None:
        return None
    if tp.dtype not in ("float16", "bfloat16", "float32", "float64"):
        return None
    m, n = linalg.matrix_view(tp.shape)
    if m * n > BATCH_MAX_NUMEL:
        return None
    ts = _tensor_settings(s, tp)
    mode = subspace.resolve_mode(ts.mode, m, n)
    if mode == "flat" or _sketch_test_matrices(ts, mode, m, n, dev) is not None:
        return None
    return (tuple(tp.shape), tp.dtype, mode, repr(ts))


def _fit_batches(tensors: list[TensorPlan], s: Settings, dev: torch.device) -> dict[str, list[TensorPlan]]:
    """Tensor name -> the batch (2 or more plans) pass 1 fits it with; each batch's stacked
    statistics stay under :data:`BATCH_STATS_BYTES`."""
    groups: dict[tuple, list[TensorPlan]] = {}
    for tp in tensors:
        key = _fit_batch_key(tp, s, dev)
        if key is not None:
            groups.setdefault(key, []).append(tp)
    out: dict[str, list[TensorPlan]] = {}
    for (shape, _, mode, _), members in groups.items():
        m, n = linalg.matrix_view(shape)
        per_tensor = 8 * (3 * m * n + (m * m if mode in ("left", "both") else 0) + (n * n if mode in ("right", "both") else 0))
        per = max(1, BATCH_STATS_BYTES // per_tensor)
        for i in range(0, len(members), per):
            chunk = members[i: i + per]
            if len(chunk) > 1:
                out.update((tp.name, chunk) for tp in chunk)
    return out


def _fit_batch(group: list[TensorPlan], cks: list[Checkpoint], s: Settings, dev: torch.device, base: Checkpoint | None,
               prog: Progress) -> dict[str, tuple]:
    """:func:`_fit_tensor` for a batch of same-kind small tensors: one read of each model's
    tensors, stacked float64 sums and Grams (one batched GEMM per model and side), then each
    tensor's own eigendecomposition. Name -> (encoding, Fit or shared value, reason)."""
    tp0 = group[0]
    ts = _tensor_settings(s, tp0)
    m, n = linalg.matrix_view(tp0.shape)
    mode = subspace.resolve_mode(ts.mode, m, n)
    names = [tp.name for tp in group]
    g = len(group)
    if ts.center == "base" and base is None:
        raise ConfigError("center='base' needs base=... (the checkpoint the family was fine-tuned from)")
    out: dict[str, tuple] = {}
    live = list(range(g))  # members still on the subspace path (not dropped as non-finite)
    with linalg.no_tf32(), linalg.threads_for(g * m * n):
        first = torch.stack([cks[0].get(x).to(dev).reshape(m, n) for x in names])
        ref_src = torch.stack([base.get(x).to(dev).reshape(m, n) for x in names]) if ts.center == "base" else first
        ref = ref_src.to(torch.float64)
        delta_sum = torch.zeros(g, m, n, dtype=torch.float64, device=dev)
        gl = torch.zeros(g, m, m, dtype=torch.float64, device=dev) if mode in ("left", "both") else None
        gr = torch.zeros(g, n, n, dtype=torch.float64, device=dev) if mode in ("right", "both") else None
        sq_sum = torch.zeros(g, dtype=torch.float64, device=dev)
        identical = torch.ones(g, dtype=torch.bool, device=dev)
        bits = _BITS[first.element_size()]  # bit patterns: -0.0 differs from 0.0, NaN payloads count
        first_bits = first.reshape(g, -1).view(bits)
        for i, ck in enumerate(cks):
            w = first if i == 0 else torch.stack([ck.get(x).to(dev).reshape(m, n) for x in names])
            if i > 0:
                identical &= (w.reshape(g, -1).view(bits) == first_bits).all(dim=1)
            sq = torch.linalg.vector_norm(w.reshape(g, -1), dim=1, dtype=torch.float64).square()
            bad = ~torch.isfinite(sq)
            if bool(bad.any()):
                for t in bad.nonzero().flatten().tolist():
                    if t in live and not _check_finite(w[t], names[t], ck):
                        if not ts.allow_nonfinite:
                            raise _nonfinite_error(names[t], ck)
                        live.remove(t)
                        out[names[t]] = ("dense", None, "non-finite values")
            d = w.to(torch.float64, copy=True).sub_(ref)  # a copy also for float64 (w may be `first`)
            delta_sum += d
            if gl is not None:
                gl.baddbmm_(d, d.transpose(1, 2))
            if gr is not None:
                gr.baddbmm_(d.transpose(1, 2), d)
            sq_sum += sq
            for x in names:
                prog.step(x)
        identical = identical.tolist()
        sqs = sq_sum.tolist()
        for t in live:
            name = names[t]
            if identical[t] and len(cks) > 1 and _override(name, ts.encodings) != "subspace":
                # on the CPU, as read (like _fit_tensor's): pass 2 compares each model's copy with it
                out[name] = ("shared", first[t].reshape(group[t].shape).to("cpu", copy=True), "bit-identical in every model")
                continue
            stats = linalg.GramStats(count=len(cks), reference=ref[t], delta_sum=delta_sum[t],
                                     left=None if gl is None else gl[t], right=None if gr is None else gr[t], sq_norm=sqs[t])
            fit = subspace.fit_gram(stats, mode=mode, center=ts.center, choose=ts.choose)
            if fit.mean is not None:
                fit.mean = _stored_mean(fit.mean, tp0.dtype, ts, _spread(fit, len(cks))).clone()
            out[name] = ("subspace", fit, "float matrix")
    return out


def _sketch_test_matrices(s: Settings, mode: str, m: int, n: int, dev: torch.device,
                          target: int | None = None) -> dict[str, torch.Tensor] | None:
    """Gaussian test matrices per basis side for basis="sketch", or None where the exact Gram is
    used: the setting asks for it, or the sketch would be nearly as wide as the Gram itself.
    ``target``: directions to look for (default: the rank, else max_rank, else
    :data:`SKETCH_RANK`; under an error budget, the candidates it picks from, SKETCH_RANK at first)."""
    if s.basis != "sketch" or mode == "flat":
        return None
    if target is None:
        target = s.rank if s.rank is not None else (s.max_rank if s.max_rank is not None else SKETCH_RANK)
        if s.error_budget is not None and s.rank is None:
            target = min(target, SKETCH_RANK)
    width = target + s.sketch_oversample
    out = {}
    for i, side in enumerate(("left", "right")):
        if mode in (side, "both"):
            dim = m if side == "left" else n
            if width + SKETCH_PROBES > dim // 2:
                return None
            out[side] = linalg.sketch_test_matrix(dim, width, s.seed, dev, salt=10 + i)
    return out


#: tensors smaller than this are read inline: handing a read to a thread costs ~50 us, more
#: than reading a small tensor (measured: 2,000 64x64 tensors x 8 models, 0.7 s of hand-offs)
READ_AHEAD_MIN_BYTES = 1 << 20


def _tensors(cks: list[Checkpoint], name: str, dev: torch.device, kept: Sequence[torch.Tensor] = ()):
    """Every model's copy of tensor ``name`` in order, each read while the caller works on the
    previous one where that pays (:mod:`uwsfmt.overlap`); ``kept``: the first models' copies,
    already read (the first model's, or an earlier sweep's)."""
    kept = list(kept) or [cks[0].get(name)]
    first = kept[0]

    def read(i):
        if len(kept) <= i + 1 < len(cks):
            cks[i + 1].prefetch(name)  # the kernel reads the next one from disk meanwhile
        return kept[i] if i < len(kept) else cks[i].get(name)

    big = first.numel() * first.element_size() >= READ_AHEAD_MIN_BYTES
    return overlap.read_ahead([(lambda i=i: read(i)) for i in range(len(cks))], enabled=big and overlap.useful(dev))


def _sweep(cks: list[Checkpoint], name: str, dev: torch.device, stats, prog: Progress, kept: Sequence[torch.Tensor] = ()):
    """One more pass over every model's copy of tensor ``name`` into ``stats`` (``kept``: the
    first models' copies, as an earlier sweep read them)."""
    for w in _tensors(cks, name, dev, kept=kept):
        prog.step(name, 0)  # cancellation point
        stats.add(w.to(dev))
    return stats


def _fit_sketch(tp: TensorPlan, cks: list[Checkpoint], s: Settings, dev: torch.device, sk: linalg.GramSketch, mode: str,
                prog: Progress, hold: Holdings | None = None, kept: Sequence[torch.Tensor] = ()) -> subspace.Fit:
    """Bases from a randomised range finder: orthonormalise the sketch G X, refine with
    ``sketch_power - 1`` power sweeps, then a last sweep gives G Q (exact energies of the found
    directions, Rayleigh-Ritz) and G P for fresh probes P (the a-posteriori check). Falls back to
    the exact Gram when the check fails or tau is not met within the sketched directions.

    The last sweep's deltas are taken against the mean readers use (centring "mean"; the base
    for "base"), so that where ``hold`` has room it also keeps what pass 2 would compute for a
    one-sided tensor: every model's coefficients and error (:func:`_coefficients_from_ritz`)."""
    m, n = linalg.matrix_view(tp.shape)
    mean, ys, total = sk.products(s.center)
    qs = {side: linalg.orthonormal_columns(y) for side, y in ys.items()}
    for _ in range(s.sketch_power - 1):
        refine = _sweep(cks, tp.name, dev, linalg.GramSketch(m, n, qs, sk.reference_c, sums=False), prog, kept)
        qs = {side: linalg.orthonormal_columns(y) for side, y in refine.products(s.center, sums=sk)[1].items()}
    probes = {}
    for i, (side, q) in enumerate(qs.items()):
        p = linalg.sketch_test_matrix(q.shape[0], SKETCH_PROBES, s.seed, dev, salt=20 + i)
        probes[side] = p - q @ (q.T @ p)  # the probes' parts outside span(Q)
    held = 0
    if _can_keep_coefficients(tp, s, mode) and hold is not None:
        t = next(iter(qs.values())).shape[1]
        held = len(cks) * t * max(m, n) * torch.finfo(sk.cdt).bits // 8
        held = held if hold.take(held) else 0
    spread = math.sqrt(total / len(cks))  # root-mean-square deviation from the centre (for _stored_mean)
    if s.center == "mean":
        # the mean as readers get it (stored by _stored_mean, computed in the compute dtype), and the
        # family's exact mean minus it (its rounding) for the centring
        mean_c, offset = sk.family_mean()
        mean = _stored_mean(mean_c, tp.dtype, s, spread)
        centre = mean.to(sk.cdt)
        if centre is not mean_c:  # stored in another dtype than computed: its rounding too
            offset = offset + (mean_c - centre)
        ritz = linalg.GramRitz(m, n, qs, probes, centre, keep=held > 0, mean_offset=offset)
        del mean_c
    else:
        centre = sk.reference_c
        if s.center == "base":  # the base as readers get it (float16 where _stored_mean keeps it): the sweep's centre
            mean = _stored_mean(sk.reference_c, tp.dtype, s, spread)
            centre = mean.to(sk.cdt)
        ritz = linalg.GramRitz(m, n, qs, probes, centre, keep=held > 0)
    try:
        last = _sweep(cks, tp.name, dev, ritz, prog, kept).centred(s.center, sk)
    except BaseException:
        if held:
            hold.release(held)
        raise
    fit = subspace.Fit(mode, s.center, mean, None, None,
                       method={"method": "sketch", "columns": {}, "power_sweeps": s.sketch_power, "check": {}})
    coords = {}
    for side, q in qs.items():
        t = q.shape[1]
        res = linalg.ritz_from_h(q, last[side][0], probes[side], last[side][1], total)
        spectrum = res.spectrum()
        k = s.choose(side, spectrum, t)
        check = res.check(k, s.sketch_tolerance)
        why = None
        if s.error_budget is not None:  # candidates: the well-found directions; _budget_tensor checks the rank it picks
            k = min(k, t - s.sketch_oversample)
            fit.ritz = (fit.ritz or {}) | {side: res}
        elif s.rank is None and k > t - s.sketch_oversample:
            why = f"{side}: tau needs more than the {t - s.sketch_oversample} directions sketched"
        elif not check["ok"]:
            why = f"{side}: a-posteriori check failed (a missed direction could lower the error by more than {s.sketch_tolerance:.0%})"
        if why:
            ritz.kept.clear()
            if held:
                hold.release(held)
            exact = _sweep(cks, tp.name, dev, linalg.GramStats.empty(
                m, n, left=mode in ("left", "both"), right=mode in ("right", "both"), reference=sk.reference), prog, kept)
            fit = subspace.fit_gram(exact, mode=mode, center=s.center, choose=s.choose)
            fit.method = {"method": "exact", "sketch_rejected": why}
            return fit
        fit.spectra[side] = spectrum
        fit.kept[side] = k
        fit.method["columns"][side] = t
        fit.method["check"][side] = check
        basis = res.vectors[:, :k].to(torch.float32)
        coords[side] = res.coords[:, :k]
        if side == "left":
            fit.left = basis
        else:
            fit.right = basis
    if held:
        fit.precomputed = _coefficients_from_ritz(fit, ritz.kept, coords)
        ritz.kept.clear()
        hold.release(held - sum(c.numel() * c.element_size() for c, _, _ in filter(None, fit.precomputed)))
    return fit


#: pass 1 keeps pass-2 results (coefficients) of sketched tensors up to this many bytes in all
KEEP_COEFFICIENTS_BYTES = 128 << 20
#: a sketched tensor's later sweeps reuse the first sweep's copies of the first models' tensors
#: up to this many bytes (then read the rest again, from the page cache): a fixed amount, so the
#: build's memory does not grow with the number of models
KEEP_SOURCES_BYTES = 64 << 20
#: the error from norms (below) is used when err^2 >= this * ||W - M||^2: its rounding, ~1e-9
#: of ||W - M||^2, then moves the error by at most ~5e-8 relative
NORM_ERROR_MIN_RATIO = 1e-2


class Holdings:
    """Bytes pass 1 may still keep for pass 2 (thread-safe; :data:`KEEP_COEFFICIENTS_BYTES`)."""

    def __init__(self, limit: int | None = None):
        self.left = KEEP_COEFFICIENTS_BYTES if limit is None else limit
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> bool:
        with self._lock:
            if nbytes > self.left:
                return False
            self.left -= nbytes
            return True

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.left += nbytes


def _can_keep_coefficients(tp: TensorPlan, s: Settings, mode: str) -> bool:
    """Whether the sketch's last sweep can stand in for pass 2 of ``tp``: a one-sided basis, the
    mean or the base subtracted, the source already in the compute dtype (no cast to round back),
    no error budget and no residual (both need the rebuild itself)."""
    return (mode in ("left", "right") and s.center in ("mean", "base") and tp.dtype in ("float32", "float64")
            and s.error_budget is None and not s.residual_bits)


def _coefficients_from_ritz(fit: subspace.Fit, kept: list, coords: dict[str, torch.Tensor]) -> list:
    """Every model's (coefficients, error, delta error) from the last sketch sweep, or None for a
    model whose error pass 2 must measure on the rebuild.

    The sweep kept Z_i = Q^T D_i (D_i = W_i - M, M the readers' mean) with ||D_i||^2 and
    ||W_i||^2. With the basis L = Q V (V: ``coords``), C_i = V^T Z_i (float64, then stored as
    float32: C_s), and the error of what readers rebuild, ||D_i - L C_s||^2 = ||D_i||^2 -
    2 <C_s, L^T D_i> + C_s^T (L^T L) C_s, with L the stored float32 basis (so its rounding and
    that of C_s are accounted for). The difference loses ||D_i||^2's rounding (~1e-9 relative,
    :func:`uwsfmt.linalg.sq_norm`) relative to the error's square, so it is used only when that
    is at least :data:`NORM_ERROR_MIN_RATIO` of ||D_i||^2, and, as pass 2 does, when the error is
    at least :data:`EXACT_REBUILD_BELOW` of ||W_i|| (the reader's own rounding)."""
    side = "left" if fit.left is not None else "right"
    basis = (fit.left if side == "left" else fit.right).to(torch.float64)
    gram = basis.T @ basis
    v = coords[side]
    out = []
    for zs, dsq, wsq in kept:
        z = zs[side].to(torch.float64)
        c64 = (z @ v).T if side == "left" else z @ v  # k x n (left), m x k (right): as linalg.project
        cs = c64.to(torch.float32)
        c = cs.to(torch.float64)
        quad = float((c * (gram @ c)).sum()) if side == "left" else float((c * (c @ gram)).sum())
        esq = dsq - 2.0 * float((c * c64).sum()) + quad
        wn, dn = math.sqrt(wsq), math.sqrt(dsq)
        if not (math.isfinite(esq) and esq >= NORM_ERROR_MIN_RATIO * dsq and math.sqrt(esq) >= EXACT_REBUILD_BELOW * wn):
            out.append(None)
            continue
        err = math.sqrt(esq)
        out.append((cs.contiguous(), err / wn if wn > 0 else float("inf"), err / dn if dn > 0 else float("inf")))
    return out


def _budget_tensor(e: dict, tp: TensorPlan, fit, cks: list[Checkpoint], s: Settings, dev: torch.device, prog: Progress,
                   base: Checkpoint | None = None):
    """Error-budget mode: sweep the models once more and let :mod:`uwsfmt.budget` pick the
    rank, mode and residual bits (or dense). Returns (encoding, fit, reason, settings for it).

    A sketched ``fit`` (basis="sketch": its Ritz vectors are the candidates, ``fit.ritz``) is
    sketched again with 4x the directions (up to ``max_rank``) while the pick is dense, rank 0
    or uses every candidate of a side and more directions could hold more than
    ``sketch_tolerance`` of the energy missed (:func:`_more_directions_matter`); it is replaced
    by the exact Gram's when the a-posteriori check fails at the rank picked. The errors the
    pick is made on are exact for the bases it gets, so the budget holds either way; the sketch
    only decides how close to the fewest bytes."""

    def models():
        for w in _tensors(cks, tp.name, dev):
            prog.step(tp.name, 0)  # cancellation point
            yield w

    ts = _tensor_settings(s, tp)
    most = budget.MAX_CANDIDATE_RANK if s.max_rank is None else s.max_rank
    target = min(SKETCH_RANK, most)
    while True:
        widen = bool(fit.ritz) and target < most and s.rank is None
        choice, chosen = budget.choose(
            fit, models(), name=tp.name, shape=tp.shape, dtype=tp.dtype, n_models=len(cks), budget=s.error_budget,
            residual_bits=s.residual_bits, fixed_rank=s.rank is not None or s.tau is not None, mode=s.mode,
            forced=_override(tp.name, s.encodings) == "subspace" and not widen,
        )
        if not fit.ritz:
            break
        c = choice.candidate
        sides = [] if c is None or c.rank == 0 else [x for x in ("left", "right") if c.mode in (x, "both")]
        edge = c is None or c.rank == 0 or any(c.rank >= fit.kept[x] for x in sides)
        if widen and edge and _more_directions_matter(fit, most, s.sketch_tolerance):
            target = min(4 * target, most)  # dense, rank 0 or every candidate of a side: more might do with fewer bytes
            with linalg.threads_for(math.prod(tp.shape)):
                _, fit, _ = _fit_tensor(tp, cks, ts, dev, base, prog, target=target, count=False)
            continue
        checks = {x: fit.ritz[x].check(c.rank, s.sketch_tolerance) for x in sides}
        if not all(x["ok"] for x in checks.values()):
            why = (f"a-posteriori check failed at rank {c.rank} (a missed direction could lower the error by more "
                   f"than {s.sketch_tolerance:.0%})")
            with linalg.threads_for(math.prod(tp.shape)):
                _, fit, _ = _fit_tensor(tp, cks, dataclasses.replace(ts, basis="exact"), dev, base, prog, count=False)
            fit.method = {"method": "exact", "sketch_rejected": why}
            continue
        if chosen is not None:
            chosen.method = fit.method | {"check": checks}
        break
    if chosen is not None and fit.method and not chosen.method:
        chosen.method = fit.method
    e["budget"] = choice.record()
    if chosen is None:
        return "dense", None, choice.reason(), s
    return "subspace", chosen, choice.reason(), dataclasses.replace(s, residual_bits=choice.candidate.bits)


def _more_directions_matter(fit: subspace.Fit, most: int, tolerance: float) -> bool:
    """Whether up to ``most`` candidate directions per side could hold more than ``tolerance`` of
    the energy the ``fit.kept`` candidates miss: the sketch's own directions beyond them hold
    their Ritz values, each one it missed at most the check's estimate of the largest missed
    eigenvalue (``residual_top``)."""
    for side, res in fit.ritz.items():
        k, t = fit.kept[side], res.values.numel()
        tail = max(res.total - float(res.values[:k].sum()), 0.0)
        if tail <= 1e-12 * res.total:
            continue  # the candidates hold it all (up to rounding): e.g. a vector over fewer models than candidates
        if float(res.values[k:most].sum()) + max(most - t, 0) * res.residual_top > tolerance * tail:
            return True
    return False


def _tensor_settings(s: Settings, tp: TensorPlan) -> Settings:
    """Settings for one tensor: a plan may fix its basis side (factor-wise LoRA: B left, A right)."""
    mode = getattr(tp, "mode", None)
    return dataclasses.replace(s, mode=mode) if mode else s


def check_base(fam: FamilyPlan, base: Checkpoint) -> None:
    """Every tensor decomposed around the base must be in it with the same shape: report all misses at once."""
    have = _headers(base, "the base checkpoint's headers")
    problems = []
    for tp in fam.tensors:
        if tp.encoding != "subspace" or tp.shape is None:
            continue
        got = have.get(tp.name)
        if got is None:
            problems.append(f"tensor {tp.name!r} is not in the base")
        elif tuple(got.shape) != tuple(tp.shape):
            problems.append(f"tensor {tp.name!r} is {list(tp.shape)} in the family but {list(got.shape)} in the base")
    if problems:
        raise ConflictError(f"{base.path or base.id}: not the base these models were fine-tuned from:", problems)


def _mean_dtype(logical: str) -> torch.dtype:
    return torch.float64 if logical == "float64" else torch.float32


def _stored_mean(mean: torch.Tensor, logical: str, s: Settings, spread: float | None = None) -> torch.Tensor:
    """The centre M as the store keeps it (and readers get it back): float16 where ``s.mean_dtype``
    asks for it (:data:`MEAN_DTYPES`) and the rounding keeps every value finite and moves M by at
    most :data:`HALF_MEAN_RTOL` of ||M||, else the compute dtype. Under an error budget the
    rounding must also stay within a tenth of the smallest allowance it can be compared with
    before the fit (``max_error`` x ||M||; ``max_delta_error`` x ``spread``, the root-mean-square
    of the models' deviations ||W_i - M||, where the caller knows it): it then adds at most ~0.5%
    to an error at the budget, and a budget of 0 keeps the compute dtype. Everything downstream
    (coefficients, residuals, recorded errors) is computed against the M returned here, so the
    recorded errors stay the ones readers get back."""
    if mean.dtype == torch.float16:
        return mean
    b = s.error_budget
    half = s.mean_dtype == "float16" or (s.mean_dtype == "auto" and (logical in ("float16", "bfloat16") or b is not None))
    if half:
        h = mean.to(torch.float16)
        if bool(torch.isfinite(h).all()):
            size = math.sqrt(linalg.sq_norm(mean))
            moved = math.sqrt(linalg.sq_norm(mean - h.to(mean.dtype)))
            allowed = HALF_MEAN_RTOL * size
            if b is not None and b.max_error is not None:
                allowed = min(allowed, 0.1 * b.max_error * size)
            if b is not None and b.max_delta_error is not None:
                allowed = min(allowed, 0.1 * b.max_delta_error * spread) if spread is not None else -1.0
            if moved <= allowed:
                return h
    return mean.to(_mean_dtype(logical))


def _spread(fit: subspace.Fit, n_models: int) -> float | None:
    """Root-mean-square of the models' deviations from the fit's centre: the trace of a full
    spectrum (the exact Gram's eigenvalues) over the models; None where the spectrum is partial."""
    if fit.method and fit.method.get("method") == "sketch":
        return None
    for vals in (fit.spectra or {}).values():
        return math.sqrt(max(float(vals.sum()), 0.0) / max(n_models, 1))
    return None


# ---------------------------------------------------------------------------- pass 2


#: below this relative error pass 2 measures the error on the reader's own rebuild (see
#: :func:`_encode_subspace`); above it, the reader's rounding cannot move the error by more than
#: ~1e-7 relative, and the cheaper difference (W - M) - L C R^T is used
EXACT_REBUILD_BELOW = 1e-4


def _encode_subspace(e: dict, fit: subspace.Fit, w: torch.Tensor, rows: dict[str, np.ndarray], keep: dict | None = None
                     ) -> tuple[float, float | None]:
    """Project one model's tensor, fill its slots; return (error, delta error) of what a reader
    rebuilds (compute dtype, then the source dtype). ``keep`` receives that rebuild (float64, before
    the cast) under "rebuilt", and "error" (absolute), "wn" = ||W||, "dn" = ||W - M|| (error budgets).

    Everything is done in the compute dtype readers use (float32; float64 for float64 tensors):
    D = W - M, the coefficients C = L^T D R (stored as float32 anyway). Norms are summed in
    float64 (:func:`uwsfmt.linalg.sq_norm`). The error is measured one of two ways:

    - the difference E = D - L C R^T, in place in D: 9 passes over memory. A reader returns
      fl(M + L C R^T), which differs from W - E by its rounding (at most half an ulp of W per
      value); with the error ||E|| >= :data:`EXACT_REBUILD_BELOW` ||W||, that moves the error by
      less than ~u^2 / (2 * 1e-8) ~ 2e-7 relative (u = 2^-24, float32), and the rounding is
      uncorrelated with E. Used when the source dtype is the compute dtype and neither an error
      budget (which needs the rebuild) nor a residual is involved.
    - otherwise (small errors, float16/bfloat16 sources whose cast back rounds by ~1e-3, budgets,
      residuals): the rebuild exactly as the reader does it (same dtype, same order of
      operations, then the cast), compared with W: 14 passes.
    """
    view = tuple(e["view"])
    prep = subspace.prepared(fit, _compute_dtype(e["dtype"]))
    want = dtypes.torch_dtype(e["dtype"])
    with linalg.no_tf32():
        w = w.to(prep.device).reshape(view)
        wc = w if w.dtype == prep.cdt else w.to(prep.cdt)
        d = wc.sub(prep.mean.reshape(view)) if prep.mean is not None else wc
        c = linalg.project(d, prep.left, prep.right).to(torch.float32)
        sl = e["coefficients"]
        if sl["length"]:  # rank 0: an empty slot, whose pack may not exist
            rows[sl["pack"]][sl["offset"]: sl["offset"] + c.numel()] = c.cpu().numpy().reshape(-1)
        dn = math.sqrt(linalg.sq_norm(d)) if prep.mean is not None else None
        wn = math.sqrt(linalg.sq_norm(wc))
        err = None
        if keep is None and not e.get("residual") and want == prep.cdt:
            err = math.sqrt(linalg.sq_norm(subspace.subtract_expansion(prep, c, d if d is not wc else d.clone())))
            if not err >= EXACT_REBUILD_BELOW * wn:  # small (or NaN): measure it on the reader's rebuild
                err = None
        del d
        if err is None:
            r = subspace.rebuild(prep, c, view)  # compute dtype, exactly as the reader
            if e.get("residual"):
                values, back = residual_enc.encode(e["residual"], (wc - r).to(torch.float32))
                residual_enc.write(e["residual"], values, rows)
                r.add_(back.to(prep.cdt))
            out = r if want == prep.cdt else r.to(want).to(prep.cdt)
            err = math.sqrt(linalg.sq_norm(out.sub_(wc) if out is not r else out - wc))
            if keep is not None:
                keep.update(rebuilt=r.to(torch.float64), error=err, wn=wn, dn=dn)
    rel = err / wn if wn > 0 else (0.0 if err == 0 else float("inf"))
    drel = None if dn is None else (err / dn if dn > 0 else (0.0 if err == 0 else float("inf")))
    return rel, drel


#: subspace tensors up to this many values are encoded in batches of equal shape (pass 2)
BATCH_MAX_NUMEL = 1 << 16
#: values per batch (bounds the stacked temporaries: 4M float32 values = 16 MiB each)
BATCH_MAX_VALUES = 1 << 22


def _batch_key(e: dict, fit, info, budgeted: bool) -> tuple | None:
    """Key under which pass 2 encodes ``e`` together with others of its kind, or None.

    Small subspace tensors whose error takes the cheap path (:func:`_encode_subspace`: source in
    the compute dtype, no residual, no budget) are batched when they share view, mode, rank,
    dtype and centring: one stacked GEMM per group instead of Python work per tensor and model."""
    if budgeted or e["encoding"] != "subspace" or e.get("lora") is not None or e.get("residual"):
        return None
    if e["dtype"] not in ("float32", "float64") or info is None or info.dtype != e["dtype"]:
        return None
    m, n = e["view"]
    if m * n > BATCH_MAX_NUMEL or tuple(info.shape) != tuple(e["shape"]) or not isinstance(fit, subspace.Fit):
        return None
    return (tuple(e["view"]), e["mode"], tuple(x or 0 for x in e["rank"]), e["dtype"], fit.mean is not None)


def _batch_plans(entries: list[dict], fits: dict[str, Any], infos: dict, budgeted: bool) -> list[list[dict]]:
    """Groups (of 2 or more, at most :data:`BATCH_MAX_VALUES` values each) of entries that pass 2
    encodes together, in the order of ``entries``."""
    groups: dict[tuple, list[dict]] = {}
    for e in entries:
        key = _batch_key(e, fits.get(e["name"]), infos.get(e["name"]), budgeted)
        if key is not None:
            groups.setdefault(key, []).append(e)
    out = []
    for key, members in groups.items():
        per = max(1, BATCH_MAX_VALUES // (key[0][0] * key[0][1]))
        out.extend(members[i: i + per] for i in range(0, len(members), per))
    return [g for g in out if len(g) > 1]


def _stacked(group: list[dict], fits: dict[str, Any], cache: dict) -> subspace.Prepared:
    """The group's means and bases stacked (G, ...), in the dtypes of :func:`subspace.prepared`
    (cached for the next models)."""
    key = tuple(e["name"] for e in group)
    st = cache.get(key)
    if st is None:
        view = tuple(group[0]["view"])
        ps = [subspace.prepared(fits[e["name"]], _compute_dtype(e["dtype"])) for e in group]

        def stack(field, shape=None):
            parts = [getattr(p, field) for p in ps]
            return None if parts[0] is None else torch.stack([t.reshape(shape) if shape else t for t in parts])

        p0 = ps[0]
        st = subspace.Prepared(p0.device, p0.cdt, stack("mean", view), None, None, stack("left"), stack("right"))
        cache[key] = st
    return st


def _encode_batch(group: list[dict], ws: list[torch.Tensor], st: subspace.Prepared, rows: dict[str, np.ndarray]
                  ) -> list[tuple[float, float | None] | None]:
    """:func:`_encode_subspace` (cheap error path) for a group of same-kind tensors of one model:
    (relative error, delta error) per member, or None where that member needs the exact
    rebuild (an error below :data:`EXACT_REBUILD_BELOW`, or NaN): the caller encodes it alone."""
    view = tuple(group[0]["view"])
    g = len(group)
    with linalg.no_tf32(), linalg.threads_for(g * view[0] * view[1]):
        w = torch.stack([x.to(st.device).reshape(view) for x in ws])
        if w.dtype != st.cdt:
            w = w.to(st.cdt)
        wn = torch.linalg.vector_norm(w.reshape(g, -1), dim=1, dtype=torch.float64)
        d = w.sub_(st.mean) if st.mean is not None else w  # w is a fresh stack: in place
        dn = torch.linalg.vector_norm(d.reshape(g, -1), dim=1, dtype=torch.float64) if st.mean is not None else None
        c = linalg.project(d, st.left, st.right).to(torch.float32)
        subspace.subtract_expansion(st, c, d)
        err = torch.linalg.vector_norm(d.reshape(g, -1), dim=1, dtype=torch.float64)
    flat = c.reshape(g, -1).cpu().numpy()
    wn, err = wn.tolist(), err.tolist()
    dn = None if dn is None else dn.tolist()
    out: list[tuple[float, float | None] | None] = []
    for i, e in enumerate(group):
        sl = e["coefficients"]
        rows[sl["pack"]][sl["offset"]: sl["offset"] + flat.shape[1]] = flat[i]
        if not err[i] >= EXACT_REBUILD_BELOW * wn[i]:
            out.append(None)
            continue
        rel = err[i] / wn[i] if wn[i] > 0 else (0.0 if err[i] == 0 else float("inf"))
        drel = None if dn is None else (err[i] / dn[i] if dn[i] > 0 else (0.0 if err[i] == 0 else float("inf")))
        out.append((rel, drel))
    return out


def _compute_dtype(logical: str) -> torch.dtype:
    return torch.float64 if logical == "float64" else torch.float32


def _finite_or_none(x: float | None) -> float | None:
    return x if (x is not None and np.isfinite(x)) else None


def encode_model(
    entries: list[dict], fits: dict[str, Any], ck: Checkpoint, widths: dict[str, int], *, allow_nonfinite: bool, store_path: str,
    error_budget: budget.Budget | None = None, corrections: dict | None = None, read_ahead: bool = False,
    stacks: dict | None = None, index: int | None = None, hold: Holdings | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor], list, list]:
    """One model -> (pack rows, per-model dense arrays, errors, delta errors).

    With an ``error_budget``, a tensor the store cannot hold within it (a subspace
    tensor whose projection misses the budget, a shared tensor this model differs in) gets a
    per-model exception (:func:`uwsfmt.budget.correct`) in ``corrections[name]``; its error
    is then the corrected one.

    Small subspace tensors of one kind are encoded in batches (:func:`_batch_plans`); ``stacks``
    keeps their stacked means and bases from one model to the next (a dict the caller keeps).

    ``index``: the model's position in the build; a fit holding this model's result from pass 1
    (:func:`_coefficients_from_ritz`) is used as is, without reading the tensor, and dropped
    (its bytes given back to ``hold``).
    """
    rows = {p: np.zeros(w, dtype=p) for p, w in widths.items()}
    per_model: dict[str, torch.Tensor] = {}
    errs, derrs = [], []
    infos = ck.infos()
    done = {}  # name -> this model's (coefficients, error, delta error) found in pass 1
    for e in entries:
        fit = fits.get(e["name"])
        pre = getattr(fit, "precomputed", None) if index is not None else None
        if pre is not None and e["encoding"] == "subspace" and pre[index] is not None:
            done[e["name"]] = pre[index]
            pre[index] = None
            c = done[e["name"]][0]
            if hold is not None:
                hold.release(c.numel() * c.element_size())
    entries_left = [e for e in entries if e["name"] not in done] if done else entries
    # read each tensor while the previous one is encoded; not with LoRA entries, whose encoder
    # reads the same checkpoint itself (no two reads of one checkpoint at once)
    budgeted = error_budget is not None and corrections is not None
    lora_entries = [e for e in entries if e.get("lora") is not None]
    batches = _batch_plans(entries_left, fits, infos, budgeted) if not lora_entries else []
    batch_of = {e["name"]: b for b in batches for e in b}
    batched: dict[str, tuple] = {}  # name -> (result or None, w) once its batch ran
    stacks = {} if stacks is None else stacks
    names = [e["name"] for e in entries_left if e["name"] in infos and e["name"] not in batch_of]
    pos = {nm: i for i, nm in enumerate(names)}
    for nm in names[:2]:
        ck.prefetch(nm)
    ahead = None if not read_ahead or lora_entries else overlap.read_ahead([(lambda nm=nm: ck.get(nm)) for nm in names])
    lora_errors = dict(zip((e["name"] for e in lora_entries), lora_enc.encode(lora_entries, fits, ck, rows, stacks))) if lora_entries else {}
    if budgeted and lora_entries:
        _check_lora_budget(lora_entries, lora_errors, ck, error_budget)
    for e in entries:
        name = e["name"]
        if e.get("lora") is not None:
            rel, _ = lora_errors[name]
            errs.append(_finite_or_none(rel))
            derrs.append(_finite_or_none(rel))
            continue
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
        if name in done:
            c, rel, drel = done.pop(name)
            sl = e["coefficients"]
            rows[sl["pack"]][sl["offset"]: sl["offset"] + c.numel()] = c.cpu().numpy().reshape(-1)
            errs.append(_finite_or_none(rel))
            derrs.append(_finite_or_none(drel))
            continue
        group = batch_of.get(name)
        if group is not None:  # read the batch's tensors of this model, encode them together
            if name not in batched:
                ws = [ck.get(x["name"]) for x in group]
                for x, res, wx in zip(group, _encode_batch(group, ws, _stacked(group, fits, stacks), rows), ws):
                    batched[x["name"]] = (res, wx)
            res, w = batched.pop(name)
            if res is not None:
                rel, drel = res
                if not math.isfinite(rel) and not _check_finite(w, name, ck):
                    raise _nonfinite_error(name, ck) if not allow_nonfinite else _projected_nonfinite_error(name, ck)
                errs.append(_finite_or_none(rel))
                derrs.append(_finite_or_none(drel))
                continue
        else:
            at = pos.get(name, -1) if ahead is None else -1
            if 0 <= at < len(names) - 2:
                ck.prefetch(names[at + 2])  # the kernel reads two tensors ahead while this one is encoded
            w = ck.get(name) if ahead is None else next(ahead)
        if enc != "subspace" and not allow_nonfinite and not _check_finite(w, name, ck):
            raise _nonfinite_error(name, ck)
        if enc == "shared":
            if not _same_bits(w, fits[name]) and error_budget is not None and corrections is not None:
                before = budget.read_error(w.to(torch.float64), fits[name].to(torch.float64), e["dtype"]) if w.is_floating_point() else math.inf
                corrections[name] = budget.correct(w, fits[name], e["dtype"], error_budget, before)
                errs.append(_finite_or_none(corrections[name].error))
                derrs.append(None)
                continue
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
            keep: dict | None = {} if (error_budget is not None and corrections is not None) else None
            with linalg.threads_for(w.numel()):
                rel, drel = _encode_subspace(e, fits[name], w, rows, keep)
            if not math.isfinite(rel) and not _check_finite(w, name, ck):  # NaN/Inf in W make the error NaN or Inf: one pass saved
                raise _nonfinite_error(name, ck) if not allow_nonfinite else _projected_nonfinite_error(name, ck)
            if keep is not None and not budget.meets(error_budget, keep["error"], keep["wn"], keep["dn"], e["dtype"]):
                corrections[name] = fix = budget.correct(w, keep["rebuilt"], e["dtype"], error_budget, rel, keep["dn"])
                rel, drel = fix.error, fix.delta_error
            errs.append(_finite_or_none(rel))
            derrs.append(_finite_or_none(drel))
    return rows, per_model, errs, derrs


def _check_lora_budget(entries: list[dict], errors: dict[str, tuple[float, int]], ck: Checkpoint, error_budget: budget.Budget) -> None:
    """Refuse a model whose LoRA modules come back over the budget: unlike other tensors, a LoRA
    module has no per-model exception, so the store's promise holds only if the model stays out."""
    # relative errors: the allowed absolute error of a unit update (for an update, W - M is W)
    over = [(e["name"], errors[e["name"]][0]) for e in entries if not errors[e["name"]][0] <= error_budget.allowed(1.0, 1.0, e["dtype"])]
    if over:
        worst = max(over, key=lambda x: x[1])
        raise BudgetError(
            f"{ck.path or ck.id}: adapter {ck.id!r} comes back from the store's bases over the error budget "
            f"({error_budget.describe()}) in {len(over)} LoRA module(s), worst {worst[0]!r} at {worst[1]:.3g}; "
            "a LoRA module has no per-model exception, so it was not added (the store is unchanged). Rebuild the "
            "store with this adapter among its sources (uwsfmt convert), or append it with a looser budget (--max-error)")


# ---------------------------------------------------------------------------- convert


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


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
    min_numel: int | None = None,
    allow_nonfinite: bool = False,
    base=None,
    device: str | None = None,
    format: str | None = None,
    overwrite: bool = False,
    progress: bool | Callable[[int, int, str], None] | None = False,
    cancel: threading.Event | None = None,
    seed: int = 0,
    max_error: float | None = None,
    max_delta_error: float | None = None,
    lora_mode: str = "auto",
    basis: str = "exact",
    mean_dtype: str = "auto",
) -> Store:
    """Build a UWS store at ``out`` from a family of checkpoints and return it opened.

    ``sources``: paths, folders, globs, Checkpoint objects, or ``{model_id: state_dict}``.
    Rank: fixed ``rank`` per basis side, else the smallest k reaching ``tau`` explained
    variance (default 0.999), capped by ``max_rank``. ``residual_bits`` adds a quantized
    per-model correction (2/4/8 bits with per-row scales, or 16 = float16).

    ``max_error`` (the error budget) bounds the relative error ||W - W_hat|| / ||W|| of every
    tensor of every model, ``max_delta_error`` the share ||W - W_hat|| / ||W - M|| of each model's
    deviation from the family centre that may be lost (either or both): per tensor, the mode, rank
    and residual bits with the fewest bytes that meet it are chosen (dense when nothing smaller
    does; 0 = lossless). ``rank``, ``tau``,
    ``residual_bits`` and ``mode`` still fix what they name. The choice, the bytes of the
    alternatives and the achieved errors are recorded in the store (``info`` shows them).

    ``basis="sketch"`` finds the bases with a randomised range finder (rank + 16 Gaussian columns,
    one refinement sweep) instead of the exact float64 Gram: two thin GEMMs per model instead of
    one square one. The refinement sweep measures the exact energy of every direction found and
    checks a-posteriori that no missed direction could lower the squared error by more than 1%;
    tensors that fail the check (or whose tau needs more directions than sketched) fall back to
    the exact Gram. Each tensor records which method it got (``basis`` in its manifest entry).

    ``lora_mode`` (LoRA adapters): ``"product"``, one basis over the updates s*B*A per module
    with a small core per adapter; ``"factors"``, A and B stored as ordinary tensors (the paper's
    factor-wise bases; with a budget, mean + quantized factors); ``"auto"`` (default): the
    product basis, except under an error budget where, at the end of the statistics pass, the
    product bases would take more bytes than the adapters' own factors (adapters that share no
    subspace: their cores grow with the family's total rank); the store is then built in the
    factors mode. The choice and its byte counts are recorded (``build.settings.lora_choice``).

    ``base``: the checkpoint the family was fine-tuned from (a path, a ``{name: tensor}`` state
    dict or a Checkpoint); with the default ``center``, deviations are then taken from it
    instead of the family mean.

    ``mean_dtype``: how each subspace tensor's mean (the centre the family's deviations are
    taken from; one model's worth of values per store) is kept. ``"float16"``: half the bytes,
    and faster loads, rounding each mean value by at most 2^-11 relative (kept per tensor only
    where every value stays finite and the rounding moves the mean by at most 2^-10 relative;
    coefficients, residuals and the recorded errors are computed against the rounded mean);
    ``"compute"``: float32 (float64 for float64 tensors); ``"auto"`` (default): float16 for
    float16 / bfloat16 tensors, whose rebuild is cast to 16 bits anyway, and under an error
    budget (where the rounding must stay within a tenth of the allowance), else the compute
    dtype. A budget of 0 always keeps the compute dtype.

    >>> fam = {f"m{i}": {"w": torch.randn(64, 64)} for i in range(4)}
    >>> store = convert(fam, "/tmp/doc.uws", rank=2, overwrite=True)  # doctest: +SKIP
    """
    s = Settings(rank=rank, tau=tau, max_rank=max_rank, mode=mode, center=center,
                 residual_bits=residual_bits or None, encodings=dict(encodings or {}),
                 min_numel=(min_numel if min_numel is not None else budget.MIN_NUMEL
                            if (max_error, max_delta_error) != (None, None) else 1024),
                 allow_nonfinite=allow_nonfinite, seed=seed, max_error=max_error, max_delta_error=max_delta_error, lora_mode=lora_mode, basis=basis, mean_dtype=mean_dtype)
    s.check()
    out = os.fspath(out)
    if os.path.exists(out) and not overwrite:
        raise StoreExistsError(f"{out}: already exists; choose another output path or pass overwrite=True (CLI: --overwrite)")
    cks = discover(sources, format=format)
    base_ck = None
    if base is not None:
        if isinstance(base, Checkpoint):
            base_ck = base
        elif isinstance(base, dict):  # a state dict in memory
            base_ck = StateDictCheckpoint("base", base)
        elif isinstance(base, (str, os.PathLike)):
            base_ck = open_checkpoint(os.fspath(base), id="base")
        else:
            raise ConfigError(f"base must be a checkpoint path, a state dict or a Checkpoint, not {type(base).__name__}")
        if center == "mean":
            s.center = "base"
    fam = plan_family(cks, s)
    factors_plan = None  # lora_mode="auto": the family planned in the factors mode, to build it that way if it is smaller
    if s.lora_mode == "auto" and s.error_budget is not None and any(tp.encoding == "lora" for tp in fam.tensors):
        # the factors mode needs every module in every adapter: where it cannot hold them, the product mode it is
        try:
            factors_plan = plan_family(cks, dataclasses.replace(s, lora_mode="factors"))
        except ConflictError as e:
            s.lora_mode = "product"
            s.lora_choice = f"auto: product (the factors mode cannot hold these adapters: {e.problems[0] if e.problems else e})"
        else:
            if s.error_budget.exact:
                s.lora_mode, s.lora_choice, fam = "factors", "auto: factors (a budget of 0 needs the factors' exact bits)", factors_plan
    elif s.lora_mode == "auto":
        s.lora_mode = "product"  # without a budget (or LoRA modules) there is nothing to weigh
    if s.error_budget is not None and s.error_budget.exact and any(tp.encoding == "lora" for tp in fam.tensors):
        raise BudgetError(
            f"{out}: a budget of 0 (exact bits) cannot hold LoRA modules in the product mode: a reader rebuilds new factors "
            "from the shared bases, exact only to rounding. Give a budget above 0 (e.g. --max-error 1e-6), or convert "
            "with --lora-mode factors (A and B stored as ordinary tensors, exact where the budget says so)")
    if base_ck is not None:
        check_base(fam, base_ck)
    dev = _device(device, default_device())
    parent, name = os.path.split(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise StoreError(f"{out}: the parent folder {parent} does not exist")
    # The store is built in a hidden sibling and renamed into place at the end, so a killed
    # convert never leaves a store at ``out``; converts to one target serialise on a lock, under
    # which the leftovers of killed ones are removed.
    with BuildLock(out):
        _remove_stale_builds(parent, name)
        if os.path.lexists(out) and not overwrite:  # another convert finished it while we waited
            raise StoreExistsError(f"{out}: already exists; choose another output path or pass overwrite=True (CLI: --overwrite)")
        tmp = os.path.join(parent, f".{name}{BUILDING_MARK}{uuid.uuid4().hex[:8]}")
        try:
            with allocator.reuse_freed_memory():  # fewer page faults on the build's temporaries
                try:
                    _build(fam, tmp, s, dev, base_ck, progress, cancel)
                except _FactorsAreSmaller as e:  # lora_mode="auto": build again with the adapters' factors
                    shutil.rmtree(tmp, ignore_errors=True)
                    s.lora_mode = "factors"
                    s.lora_choice = (f"auto: factors (under the budget the product basis needed {e.product:,} bytes, "
                                     f"more than the adapters' own factors, {e.factors:,})")
                    _build(factors_plan, tmp, s, dev, base_ck, progress, cancel)
            _replace(tmp, out, overwrite, os.path.join(parent, f".{name}{REPLACED_MARK}{uuid.uuid4().hex[:8]}"))
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            kept = "the existing store there is unchanged" if os.path.exists(out) else "nothing was written there"
            raise StoreError(f"{out}: could not write the store ({_os_reason(e)}); {kept}") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            for c in cks:
                c.close()
    return open(out)


def _os_reason(e: OSError) -> str:
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    return f"{e.strerror or e}{where}"


def _remove_stale_builds(parent: str, name: str) -> None:
    """Delete the temporary folders of killed converts to ``parent/name``, and replaced stores a
    killed convert did not finish deleting (caller holds its BuildLock)."""
    prefixes = (f".{name}{BUILDING_MARK}", f".{name}{REPLACED_MARK}")
    for entry in os.listdir(parent):
        if entry.startswith(prefixes):
            p = os.path.join(parent, entry)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.remove(p)


def _replace(tmp: str, out: str, overwrite: bool, trash: str) -> None:
    if os.path.lexists(out) and not overwrite:
        raise StoreExistsError(f"{out}: appeared while building; the new store was not moved there")
    old = replace_dir(tmp, out, trash)  # atomic swap where the OS has one: ``out`` is always a whole store
    if old is not None:
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.remove(old)


def _build(fam: FamilyPlan, path: str, s: Settings, dev: torch.device, base: Checkpoint | None, progress, cancel) -> None:
    cks = fam.checkpoints
    N = len(cks)
    zstore = LocalStore(path)
    root = zarr.open_group(zstore, mode="w", attributes={"uws": {"format_version": layout.version_for(False), "state": "building"}})
    layout.create_group(zstore, layout.TENSORS)
    nodes = naming.unique_nodes([t.name for t in fam.tensors])
    prog = Progress(len(fam.tensors) * N + N, progress, cancel, "uwsfmt convert")
    packs = PackLayout()
    lora_bytes = [0, 0]  # under a budget: bytes of the LoRA modules' product bases, of the adapters' own factors
    entries: list[dict] = []
    fits: dict[str, Any] = {}
    # overlap: the sources' sha256 on a background thread, array writes behind the compute
    stop = threading.Event()
    fingerprints = _Fingerprints(cks, stop)
    hashes = overlap.Background(fingerprints.work)
    wb = overlap.WriteBehind(enabled=overlap.useful(dev))

    def write(path, data):
        wb.submit(layout.write_array, zstore, path, data)

    # the next tensors' bytes come from disk while this one is computed (cold builds)
    ahead = overlap.Lookahead(cks, [(tp.name, _model_bytes(tp)) for tp in fam.tensors])
    fit_batches = _fit_batches(fam.tensors, s, dev)  # small same-kind tensors: pass 1 in batches
    hold = Holdings()  # pass 2's results that pass 1 found on the way (sketched tensors)
    batch_fits: dict[str, tuple] = {}
    try:
        for j, (tp, node) in enumerate(zip(fam.tensors, nodes)):
            ahead.advance(j)
            npath = layout.tensor_node(node)
            layout.create_group(zstore, npath, {"uws_tensor": tp.name})
            e: dict[str, Any] = {"name": tp.name, "node": npath, "dtype": tp.dtype}
            enc, reason = tp.encoding, tp.reason
            if tp.shape is None:
                e.update(shape=None, encoding="dense", data={"per_model": True}, reason=reason)
                prog.step(tp.name, N)
            elif enc == "lora":  # one LoRA module: product basis, per-adapter cores (encodings/lora.py)
                if s.error_budget is not None:  # the cheapest ranks at which every adapter meets the budget
                    fit, e["budget"] = lora_enc.fit_budgeted(tp, cks, s, dev, prog)
                    reason = f"{reason}; error budget ({s.error_budget.describe()}): rank {e['budget']['rank']}"
                    lora_bytes[0] += e["budget"]["bytes"]
                    lora_bytes[1] += tp.lora.factor_bytes()
                else:
                    fit = lora_enc.fit(tp, cks, s, dev, prog)
                e["shape"] = list(tp.shape)
                _add_subspace(e, fit, npath, packs, dataclasses.replace(s, residual_bits=None), tp, write)
                e.update(encoding="subspace", reason=reason, lora=lora_enc.entry_record(tp))
                fits[tp.name] = fit
            elif enc == "subspace":
                if tp.name in fit_batches and tp.name not in batch_fits:  # this tensor's batch: all of it at once
                    batch_fits.update(_fit_batch(fit_batches[tp.name], cks, s, dev, base, prog))
                if tp.name in batch_fits:
                    enc, fit, reason = batch_fits.pop(tp.name)
                else:
                    with linalg.threads_for(math.prod(tp.shape)):
                        enc, fit, reason = _fit_tensor(tp, cks, _tensor_settings(s, tp), dev, base, prog, hold)
                e["shape"] = list(tp.shape)
                ts = _tensor_settings(s, tp)
                if enc == "subspace" and s.error_budget is not None:
                    enc, fit, reason, ts = _budget_tensor(e, tp, fit, cks, s, dev, prog, base)
                if enc == "subspace":
                    _add_subspace(e, fit, npath, packs, ts, tp, write)
                    fits[tp.name] = fit
                elif enc == "shared":
                    _add_shared(e, fit, npath, write)
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
                    _add_shared(e, first, npath, write)
                    fits[tp.name] = first
                    e["encoding"], e["reason"] = "shared", "bit-identical in every model"
                else:
                    e["encoding"], e["reason"] = "dense", reason
                    e["data"] = packs.add(dtypes.storage_dtype(tp.dtype), int(np.prod(tp.shape)))
            entries.append(e)

        if s.lora_mode == "auto" and lora_bytes[1]:
            if lora_bytes[0] > lora_bytes[1]:
                raise _FactorsAreSmaller(*lora_bytes)
            s.lora_mode = "product"
            s.lora_choice = (f"auto: product (under the budget the product basis needs {lora_bytes[0]:,} bytes, "
                             f"the adapters' own factors {lora_bytes[1]:,})")
        pack_arrays = {p: layout.create_pack(zstore, p, N, w) for p, w in packs.widths.items() if w > 0}
        manifest_packs = {p: {"path": layout.pack_path(p), "dtype": p, "width": w} for p, w in packs.widths.items() if w > 0}
        models = []
        stacks: dict = {}  # pass 2's stacked means and bases of small same-kind tensors, for every model
        for i, ck in enumerate(cks):
            fixes: dict = {}
            rows, per_model, errs, derrs = encode_model(entries, fits, ck, packs.widths, allow_nonfinite=s.allow_nonfinite, store_path=path,
                                                        error_budget=s.error_budget, corrections=fixes,
                                                        read_ahead=overlap.useful(dev), stacks=stacks, index=i, hold=hold)
            for p, arr in pack_arrays.items():  # one shard per row, one writer thread: no shard has two writers
                wb.submit(arr.__setitem__, (i, slice(None)), rows[p])
            for name, w in per_model.items():
                e = entries[[x["name"] for x in entries].index(name)]
                write(f"{e['node']}/models/{i}", dtypes.to_storage(w))
            models.append({"id": ck.id, "added": _now(), "source": None, "error": errs, "delta_error": derrs,
                           **lora_enc.model_record(entries, ck)})
            if fixes:  # the budget's emulation and pass 2 disagreed by rounding: keep the promise anyway
                models[-1]["exceptions"] = _write_exceptions(zstore, entries, i, fixes)
            prog.step(ck.id)
        fingerprints.work()  # the sources the background thread has not reached yet
        hashes.result()
        for rec, ck in zip(models, cks):
            rec["source"] = _source_record(ck)
        wb.drain()
        manifest = {
            "format_version": layout.version_for(any(isinstance(f, subspace.Fit) and f.mean is not None and f.mean.dtype == torch.float16
                                                     for f in fits.values())),
            "state": "complete",
            "generation": 1,
            "writer": f"uwsfmt {__version__}",
            "created": _now(),
            "updated": _now(),
            "build": {
                "device": str(dev),
                "settings": {k: v for k, v in asdict(s).items()},
                "default_tau": DEFAULT_TAU,
                "n_models": N,
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
        stop.set()
        wb.close()  # waits for writes in flight (the caller may remove the folder next)
        prog.close()


def _model_bytes(tp: TensorPlan) -> int:
    """Bytes of one model's copy of a tensor (0 where its shape varies between models, and for
    LoRA modules, whose factors are read by name as they go)."""
    if tp.shape is None or tp.encoding == "lora":
        return 0
    return math.prod(tp.shape) * dtypes.torch_dtype(tp.dtype).itemsize


class _Fingerprints:
    """Every source's sha256 (cached on the checkpoint), taken one source at a time by whichever
    thread asks next: the low-priority background thread during the build, and the build's own
    thread once its work is done (instead of waiting while a core idles). Stops with ``stop``."""

    def __init__(self, cks: list[Checkpoint], stop: threading.Event):
        self._todo = iter(cks)
        self._lock = threading.Lock()
        self._stop = stop

    def work(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                ck = next(self._todo, None)
            if ck is None:
                return
            ck.fingerprint()


def _write_exceptions(zstore, entries: list[dict], idx: int, fixes: dict) -> list[dict]:
    """Write each correction's arrays under ``<node>/extra/<idx>``; return the model-table records."""
    nodes = {e["name"]: e["node"] for e in entries}
    out = []
    for name, fix in fixes.items():
        where = f"{nodes[name]}/extra/{idx}"
        layout.create_group(zstore, where)
        for key, arr in fix.arrays.items():
            layout.write_array(zstore, f"{where}/{key}", np.asarray(arr))
        out.append(fix.record(name, where))
    return out


def _add_shared(e: dict, value: torch.Tensor, npath: str, write) -> None:
    write(f"{npath}/value", dtypes.to_storage(value))
    e["data"] = {"path": f"{npath}/value"}


def _add_subspace(e: dict, fit: subspace.Fit, npath: str, packs: PackLayout, s: Settings, tp: TensorPlan, write) -> None:
    """Write a subspace tensor's shared arrays with ``write(path, array)`` and fill its manifest entry."""
    m, n = linalg.matrix_view(tp.shape)
    view = (m * n, 1) if fit.mode == "flat" else (m, n)
    e.update(view=list(view), mode=fit.mode, center=fit.center)
    if fit.mean is not None:
        write(f"{npath}/mean", fit.mean.reshape(view).cpu().numpy())
        e["mean"] = f"{npath}/mean"
    else:
        e["mean"] = None
    e["left"] = e["right"] = None
    if fit.left is not None:
        write(f"{npath}/left", fit.left.cpu().numpy())
        e["left"] = f"{npath}/left"
    if fit.right is not None:
        write(f"{npath}/right", fit.right.cpu().numpy())
        e["right"] = f"{npath}/right"
    e["spectrum"] = {}
    for side, vals in fit.spectra.items():
        write(f"{npath}/spectrum_{side}", vals.cpu().numpy().astype(np.float64))
        e["spectrum"][side] = f"{npath}/spectrum_{side}"
    e["rank"] = fit.rank
    if fit.method:
        e["basis"] = fit.method
    ex = fit.explained()
    e["explained_variance"] = {k: float(v) for k, v in ex.items()}
    e["energy"] = float(next(iter(fit.spectra.values())).sum()) if fit.spectra else 0.0
    r = fit.left.shape[1] if fit.left is not None else view[0]
    c = fit.right.shape[1] if fit.right is not None else view[1]
    e["coefficients"] = packs.add("float32", r * c, shape=[r, c])
    e["residual"] = residual_enc.plan(packs, view[0], view[1], s.residual_bits) if s.residual_bits else None
