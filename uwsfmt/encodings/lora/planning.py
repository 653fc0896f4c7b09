"""Planning LoRA modules: which adapters have which modules, their ranks, scales and shapes."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from uwsfmt.errors import SourceError
from uwsfmt.format import dtypes
from uwsfmt.sources.base import Checkpoint, LoraPair

#: safetensors metadata values longer than this are not copied into the model table
MAX_META_VALUE = 4096


@dataclass
class ModulePlan:
    """What planning learnt about one LoRA module across the family (headers only)."""

    module: str
    shape: tuple[int, ...]  # shape of B @ A (the adapted weight's layout before fan_in_fan_out)
    dtype: str
    a: str
    b: str
    fan_in_fan_out: bool
    alpha: str | None
    alpha_dtype: str | None
    b_tail: tuple[int, ...] = ()  # B's dims after the rank (1x1 for conv LoRAs)
    ranks: dict[str, int] = field(default_factory=dict)  # model id -> rank (absent: not listed)

    def factor_bytes(self) -> int:
        """Bytes of every adapter's own A (r, *shape[1:]) and B (shape[0], r, *b_tail)."""
        per_rank = math.prod(self.shape[1:]) + self.shape[0] * math.prod(self.b_tail)
        return sum(self.ranks.values()) * per_rank * dtypes.torch_dtype(self.dtype).itemsize

    def record(self, a_tail: tuple[int, ...], b_tail: tuple[int, ...]) -> dict:
        return {"a": self.a, "b": self.b, "a_tail": list(a_tail), "b_tail": list(b_tail),
                "fan_in_fan_out": self.fan_in_fan_out, "alpha": self.alpha, "alpha_dtype": self.alpha_dtype}


def plan(checkpoints: list[Checkpoint], infos: list[dict], settings, tensor_plan_cls) -> tuple[dict, set, list[str], dict]:
    """LoRA part of the planning pass.

    Returns ``(plans, consumed, problems, report)``: ``plans`` maps the first tensor name of a
    module (in file order) to the TensorPlan(s) that replace its factor tensors, ``consumed``
    is every tensor name handled here, ``report`` the LoRA section of the planning report.
    """
    pairs: list[dict[str, LoraPair]] = []
    problems: list[str] = []
    for ck in checkpoints:
        try:
            pairs.append(ck.lora_pairs())
        except SourceError as e:
            problems.append(str(e))
            pairs.append({})
    with_lora = [ck.id for ck, p in zip(checkpoints, pairs) if p]
    if not with_lora:
        return {}, set(), problems, {}
    mode = getattr(settings, "lora_mode", "product")
    mode = "product" if mode == "auto" else mode
    without = [ck.id for ck, p in zip(checkpoints, pairs) if not p]
    if without:
        problems.append(
            f"{len(with_lora)} source(s) are LoRA adapters but {len(without)} are not ({', '.join(without[:5])}); "
            "a family is either adapters or full models: convert them separately"
        )
    fmts = defaultdict(list)
    bases = defaultdict(list)
    for ck, p in zip(checkpoints, pairs):
        if p:
            fmts[ck.format].append(ck.id)
            bm = (ck.metadata() or {}).get("base_model")
            if bm:
                bases[str(bm)].append(ck.id)
    if len(fmts) > 1:
        problems.append("the adapters use different LoRA layouts (" + "; ".join(f"{f}: {', '.join(v[:3])}" for f, v in fmts.items())
                        + "); convert each layout separately")
    if len(bases) > 1:
        problems.append("the adapters were trained for different base models (" + "; ".join(
            f"{b!r}: {', '.join(v[:3])}" for b, v in bases.items()) + "); their updates do not add up in one family")

    modules: dict[str, ModulePlan] = {}
    first_name: dict[str, str] = {}
    for ck, inf, p in zip(checkpoints, infos, pairs):
        for mod, pair in p.items():
            a, b = inf[pair.a], inf[pair.b]
            shape = (b.shape[0],) + tuple(a.shape[1:])
            alpha_dtype = inf[pair.alpha].dtype if pair.alpha else None
            mp = modules.get(mod)
            if mp is None:
                mp = modules[mod] = ModulePlan(mod, shape, a.dtype, pair.a, pair.b, pair.fan_in_fan_out, pair.alpha, alpha_dtype,
                                               tuple(b.shape[2:]))
                first_name[mod] = pair.a
            else:
                first = next(iter(mp.ranks), "?")
                if shape != mp.shape:
                    problems.append(f"LoRA module {mod!r} adapts a {list(shape)} weight in {ck.id!r} but a {list(mp.shape)} weight in "
                                    f"{first!r}: the adapters were made for different base models")
                if a.dtype != mp.dtype or b.dtype != mp.dtype:
                    problems.append(f"LoRA module {mod!r} is {a.dtype} in {ck.id!r} but {mp.dtype} in {first!r}; "
                                    "cast the adapters to one dtype first")
                if (pair.a, pair.b) != (mp.a, mp.b) or pair.fan_in_fan_out != mp.fan_in_fan_out or pair.alpha != mp.alpha:
                    problems.append(f"LoRA module {mod!r} has a different key layout in {ck.id!r} than in {first!r}")
            if b.dtype != a.dtype:
                problems.append(f"LoRA module {mod!r} of {ck.id!r}: A is {a.dtype} but B is {b.dtype}")
            mp.ranks[ck.id] = a.shape[0]

    consumed: set[str] = set()
    for p in pairs:
        for pair in p.values():
            consumed.update((pair.a, pair.b))
            if mode == "product" and pair.alpha:
                consumed.add(pair.alpha)
    all_names = set().union(*[set(i) for i in infos])
    for mod in modules:
        if mod in all_names:
            problems.append(f"LoRA module name {mod!r} is also a tensor name; rename the tensor")

    plans: dict[str, list] = {}
    if mode == "product":
        for mod, mp in modules.items():
            tp = tensor_plan_cls(mod, mp.shape, mp.dtype, "lora", "LoRA pair: basis over the products s*B*A")
            tp.lora = mp
            plans[first_name[mod]] = [tp]
    else:
        # factor-wise: A and B become ordinary subspace tensors with the paper's side choice
        for mod, mp in modules.items():
            out = []
            for name, side in ((mp.a, "right"), (mp.b, "left")):
                shapes = [inf[name].shape for inf in infos if name in inf]
                missing = [ck.id for ck, inf in zip(checkpoints, infos) if name not in inf]
                if missing:
                    problems.append(f"tensor {name!r} is missing from {len(missing)} model(s): {', '.join(missing[:5])} "
                                    "(the factor-wise LoRA mode needs every module in every adapter; the product mode does not)")
                    continue
                if len(set(shapes)) > 1:
                    out.append(tensor_plan_cls(name, None, mp.dtype, "dense", "LoRA factor whose rank varies between adapters "
                                               "(factor-wise mode; the product mode handles mixed ranks)", shapes))
                    continue
                tp = tensor_plan_cls(name, shapes[0], mp.dtype, "subspace", f"LoRA factor ({'A' if side == 'right' else 'B'}, factor-wise basis)")
                tp.mode = side
                out.append(tp)
            plans[first_name[mod]] = out
    ranks: dict[int, int] = defaultdict(int)
    for mp in modules.values():
        for r in mp.ranks.values():
            ranks[r] += 1
    n = len(checkpoints)
    report = {
        "mode": mode,
        "adapters": len(with_lora),
        "modules": len(modules),
        "ranks": {str(k): v for k, v in sorted(ranks.items())},
        "partial_modules": {m: n - len(mp.ranks) for m, mp in modules.items() if len(mp.ranks) < n},
        "formats": {f: len(v) for f, v in fmts.items()},
    }
    return plans, consumed, problems, report
