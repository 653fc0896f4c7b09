"""Plan a family: which tensors exist, their shapes and dtypes, and the encoding each one gets."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from uwsfmt.encodings import lora as lora_enc
from uwsfmt.errors import ConflictError, SourceError, UWSError
from uwsfmt.format import dtypes, naming
from uwsfmt.sources import Checkpoint, TensorInfo, discover
from uwsfmt.sources.registry import Sources
from uwsfmt.writer.settings import Settings


@dataclass
class TensorPlan:
    name: str
    shape: tuple[int, ...] | None  # None when it varies between models
    dtype: str
    encoding: str  # candidate: subspace | dense | shared (final after pass 1)
    reason: str
    shapes: list[tuple[int, ...]] | None = None
    #: the module of a LoRA plan (set by :func:`uwsfmt.encodings.lora.plan`)
    lora: lora_enc.ModulePlan | None = field(default=None, repr=False, compare=False)


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


def override_for(name: str, patterns: dict[str, str]) -> str | None:
    for pat, enc in patterns.items():
        if fnmatch.fnmatchcase(name, pat):
            return enc
    return None


def headers_of(ck: Checkpoint, what: str) -> dict[str, TensorInfo]:
    """``ck.infos()``; an unexpected failure (not one of ours) becomes a SourceError naming the file."""
    try:
        return ck.infos()
    except UWSError:
        raise
    except Exception as e:
        raise SourceError(f"{ck.path or ck.id}: cannot read {what} ({e})") from e


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
        inf = headers_of(c, "checkpoint headers")
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
        forced = override_for(name, settings.encodings)
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


def plan(sources: Sources, *, format: str | None = None, **settings: Any) -> dict:
    """Planning report for sources, reading headers only (never raises on conflicts)."""
    cks = discover(sources, format=format)
    s = Settings(**settings)
    return plan_family(cks, s, strict=False).report()


def check_finite(w: torch.Tensor, name: str, ck: Checkpoint) -> bool:
    if not w.is_floating_point():
        return True
    if w.element_size() == 1:  # float8: torch has no isfinite for it; its float32 values are exact
        w = w.float()
    return bool(torch.isfinite(w).all())


def projected_nonfinite_error(name: str, ck: Checkpoint) -> SourceError:
    return SourceError(
        f"{ck.path or ck.id}: tensor {name!r} of model {ck.id!r} has NaN/Inf but is a subspace tensor in the store; "
        "non-finite values cannot be projected. Rebuild the store including this model with allow_nonfinite=True."
    )


def nonfinite_error(name: str, ck: Checkpoint) -> SourceError:
    return SourceError(
        f"{ck.path or ck.id}: tensor {name!r} of model {ck.id!r} contains NaN or Inf values. "
        "Fix the checkpoint, or pass allow_nonfinite=True (CLI: --allow-nonfinite) to store such tensors dense."
    )
