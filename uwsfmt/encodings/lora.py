"""LoRA families: one shared basis over the products s * B @ A, small per-adapter cores.

A LoRA module (A: r x in, B: out x r, scale s) changes its layer by X = s * B @ A. Bases built
on A and B separately depend on an arbitrary gauge (B A = (B G)(G^-1 A) for any invertible G);
bases built on X do not. So, per module, over the family:

    left Gram   sum_i X_i X_i^T = sum_i s_i^2 B_i (A_i A_i^T) B_i^T      (out x out)
    right Gram  sum_i X_i^T X_i = sum_i s_i^2 A_i^T (B_i^T B_i) A_i      (in x in)

accumulated in float64 without ever forming X_i; L and R are their leading eigenvectors and
adapter i keeps the core C_i = L^T X_i R = s_i (L^T B_i)(A_i R) (kl x kr). In the manifest a
module is one ``subspace`` entry (mode ``both``, centre ``none``, view ``(out, in)``) plus a
``lora`` record naming its factor tensors, so any reader rebuilds the dense update
X_i ~= L C_i R^T from the spec alone. Readers that want factors back get a valid LoRA of rank
min(kl, kr, r_i) with the scale folded in (so its own scale must be 1): float32/float64 factors
of full basis rank are the basis itself and its product with the core (B' = L, A' = C_i R^T: one
GEMM per module, no SVD); a truncation, or half-precision factors, factor the core instead:
C_i = U S V^T, B'_i = L U sqrt(S), A'_i = sqrt(S) V^T R^T (equal scales, for float16's range).

Adapters may have different ranks, and different module sets: a module an adapter lacks is a
zero update for it (per-model rank 0) and is left out again on export.

The paper's factor-wise mode (``lora_mode="factors"``) stores A and B as ordinary subspace
tensors instead, B with a basis over its rows (out) and A over its columns (in), centred like
any tensor. It is there for comparison: it is not gauge invariant, needs one rank per module,
and a module present in every adapter.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import dtypes, linalg
from ..errors import ConflictError, SourceError
from ..sources.base import Checkpoint, LoraPair
from . import subspace
from .slots import take

#: auto: the product basis, except under an error budget where it would take more bytes than the
#: adapters' own factors (then factors; see build.convert)
LORA_MODES = ("auto", "product", "factors")
#: safetensors metadata values longer than this are not copied into the model table
MAX_META_VALUE = 4096


# ---------------------------------------------------------------------------- statistics


@dataclass
class ProductGramStats:
    """Map-reduce statistics of the products X_i = s_i B_i A_i, in float64, never forming X_i.

    >>> st = ProductGramStats.empty(4, 3, device=torch.device("cpu"))
    >>> st.add(torch.ones(2, 3), torch.ones(4, 2), 0.5); st.count
    1
    """

    count: int
    left: torch.Tensor  # (out, out): sum s^2 B (A A^T) B^T
    right: torch.Tensor  # (in, in): sum s^2 A^T (B^T B) A
    sq_norm: float  # sum ||X_i||_F^2

    @classmethod
    def empty(cls, out: int, inp: int, *, device: torch.device) -> ProductGramStats:
        z = torch.zeros
        return cls(0, z(out, out, dtype=torch.float64, device=device), z(inp, inp, dtype=torch.float64, device=device), 0.0)

    def add(self, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """Add one adapter's module (A: r x in, B: out x r); ``add_zero`` for a missing one."""
        self.add_many(a[None], b[None], [scale])

    def add_many(self, a: torch.Tensor, b: torch.Tensor, scales: list[float]) -> None:
        """Add n adapters' modules of one rank (A: n x r x in, B: n x out x r, one scale each)
        with one GEMM per side of inner dimension n r: each GEMM passes over its whole Gram,
        so n adapters at once pass over it once instead of n times."""
        f, dev = torch.float64, self.left.device
        a, b = a.to(device=dev, dtype=f), b.to(device=dev, dtype=f)
        n, r = a.shape[0], a.shape[1]
        s2 = torch.tensor([float(x) ** 2 for x in scales], dtype=f, device=dev)[:, None, None]
        aat, btb = a @ a.mT, b.mT @ b  # n x r x r
        b_cat = b.transpose(0, 1).reshape(b.shape[1], n * r)  # [B_1 ... B_n]
        a_cat = a.reshape(n * r, a.shape[2])  # [A_1; ...; A_n]
        self.left.addmm_(b_cat, ((s2 * aat) @ b.mT).reshape(n * r, -1))  # sum s^2 B (A A^T) B^T
        self.right.addmm_(a_cat.T, ((s2 * btb) @ a).reshape(n * r, -1))  # sum s^2 A^T (B^T B) A
        self.sq_norm += float(torch.sum(s2 * aat * btb))
        self.count += n

    def add_zero(self) -> None:
        self.count += 1

    def merge(self, other: ProductGramStats) -> None:
        self.left += other.left
        self.right += other.right
        self.sq_norm += other.sq_norm
        self.count += other.count


def core(left: torch.Tensor, right: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """C = s (L^T B)(A R) in float64: the adapter's coordinates in the shared bases. Batched
    over leading dimensions (``scale`` then a tensor of one scale per module)."""
    f = torch.float64
    s = scale.to(f)[..., None, None] if isinstance(scale, torch.Tensor) else float(scale)
    return s * ((left.to(f).mT @ b.to(f)) @ (a.to(f) @ right.to(f)))


def factors(left: torch.Tensor, right: torch.Tensor, c: torch.Tensor, rank: int,
            dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors (B' out x k, A' k x in) with B' A' = L C R^T truncated to ``rank``.

    Batched over leading dimensions. The singular values are split evenly (sqrt on each side)
    so that neither factor carries the whole scale (bf16 / fp16 range). The small SVD runs in
    ``c``'s dtype; the two products with the bases in ``dtype`` (default: ``c``'s).

    >>> L, R = torch.eye(3)[:, :2], torch.eye(4)[:, :2]
    >>> b, a = factors(L, R, torch.diag(torch.tensor([4.0, 1.0])), 2)
    >>> torch.allclose(b @ a, L @ torch.diag(torch.tensor([4.0, 1.0])) @ R.T)
    True
    """
    if min(c.shape[-2:]) == 0 or rank <= 0:  # nothing kept: empty factors
        lead = c.shape[:-2]
        return (c.new_zeros(lead + (left.shape[-2], 0)), c.new_zeros(lead + (0, right.shape[-2])))
    xb, xa = factor_cores(c, rank)
    dt = dtype or c.dtype
    b = left.to(dt) @ xb.to(dt)
    a = xa.to(dt) @ right.to(dt).transpose(-1, -2)
    return b, a


def factor_cores(c: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The small halves of :func:`factors`: (U_k sqrt(S_k), sqrt(S_k) V_k^T) of C = U S V^T
    (batched), so that B' = L @ first and A' = second @ R^T; ``rank`` >= 1 and C not empty.

    From the eigendecomposition of C^T C (half the time of a batched SVD, measured: 1.8 vs
    3.8 ms for 128 16 x 16 cores): V and S^2 directly, U sqrt(S) = C V_k / sqrt(S_k). The product
    first @ second = C V_k V_k^T whatever the accuracy of the small eigenvalues, so keeping every
    direction rebuilds C to round-off, and truncating keeps the best rank-``rank`` part.
    """
    vals, v = torch.linalg.eigh(c.mT @ c)
    k = max(0, min(int(rank), vals.shape[-1], c.shape[-2]))
    vals, v = vals.flip(-1)[..., :k], v.flip(-1)[..., :, :k]  # descending
    sq = vals.clamp_min(0).sqrt().sqrt()  # sqrt of the singular values
    first = (c @ v) / torch.where(sq > 0, sq, torch.ones_like(sq))[..., None, :]
    return first, sq[..., :, None] * v.mT


# ---------------------------------------------------------------------------- planning


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


# ---------------------------------------------------------------------------- build


class ProductGramSketch:
    """The product Grams applied to fixed thin matrices, never forming X_i or a Gram:
    ``sum s^2 B (A A^T)(B^T X)`` (left, X out x t) and ``sum s^2 A^T (B^T B)(A X)`` (right).

    Like the plain sketch (:class:`uwsfmt.linalg.GramSketch`), the products are computed in
    float32 (float64 for float64 factors), summed in float32 over the adapters of one
    :meth:`add_many` (at most :data:`SWEEP_BATCH`) and in float64 from there: 2.1x less time per
    adapter than float64 products for 4096 x 16 factors on 2 cores. ``energy``: also sum
    ||s B A||^2, in float64 (the total the explained variance is a share of; one sweep needs it).
    """

    def __init__(self, xs: dict[str, torch.Tensor], energy: bool = True):
        self.xs = {side: x.to(torch.float64) for side, x in xs.items()}
        self._xc = {side: x.to(torch.float32) for side, x in xs.items()}
        self.y = {side: torch.zeros_like(x) for side, x in self.xs.items()}
        self.count, self.sq_norm, self.energy = 0, 0.0, energy

    def add(self, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        self.add_many(a[None], b[None], [scale])

    def add_many(self, a: torch.Tensor, b: torch.Tensor, scales: list[float]) -> None:
        """Add n adapters' modules of one rank (A: n x r x in, B: n x out x r, one scale each):
        B^T X and A X for all n in one thin GEMM each, the r x r middle batched, and the sum
        over the n adapters in one GEMM of inner dimension n r (so summed in float32 over at
        most :data:`SWEEP_BATCH` adapters, then added in float64)."""
        dev = next(iter(self.xs.values())).device
        f = torch.float64
        cdt = f if f in (a.dtype, b.dtype) else torch.float32
        a, b = a.to(device=dev, dtype=cdt), b.to(device=dev, dtype=cdt)
        n, r = a.shape[0], a.shape[1]
        xc = self._xc if cdt == torch.float32 else self.xs
        s2 = torch.tensor([float(x) ** 2 for x in scales], dtype=f, device=dev)[:, None, None]
        if self.energy:
            a64, b64 = a.to(f), b.to(f)
            aat64, btb64 = a64 @ a64.mT, b64.mT @ b64
            self.sq_norm += float(torch.sum(s2 * aat64 * btb64))
            aat, btb = aat64.to(cdt), btb64.to(cdt)
        else:
            aat, btb = a @ a.mT, b.mT @ b
        s2c = s2.to(cdt)
        if "left" in xc:  # sum s^2 B (A A^T)(B^T X) = [B_1 ... B_n] [s^2 A_1 A_1^T B_1^T X; ...]
            b_cat = b.transpose(0, 1).reshape(b.shape[1], n * r)
            t = (s2c * aat) @ linalg.tmm(b_cat, xc["left"]).reshape(n, r, -1)
            self.y["left"] += linalg.thin_mm(b_cat, t.view(n * r, -1)).to(f)
        if "right" in xc:  # sum s^2 A^T (B^T B)(A X) = [A_1; ...; A_n]^T [s^2 B_1^T B_1 A_1 X; ...]
            a_cat = a.reshape(n * r, a.shape[2])
            u = (s2c * btb) @ linalg.thin_mm(a_cat, xc["right"]).view(n, r, -1)
            self.y["right"] += linalg.tmm(a_cat, u.view(n * r, -1)).to(f)
        self.count += n

    def add_zero(self) -> None:
        self.count += 1


#: adapters whose factors one sweep adds together (:meth:`ProductGramSketch.add_many`), and the
#: most bytes of factors it holds for them
SWEEP_BATCH = 16
SWEEP_BATCH_BYTES = 32 << 20


def _sweep(stats, cks: list[Checkpoint], mp, out: int, inp: int, prog, step: bool):
    """Every adapter's factors of module ``mp`` into ``stats`` (exact Grams or sketches),
    consecutive adapters of one rank and dtype added together (:func:`_runs`)."""
    for run in _runs(cks, mp, out, inp, prog, step):
        if run is None:
            stats.add_zero()
        else:
            stats.add_many(*run)
    return stats


def _runs(cks: list[Checkpoint], mp, out: int, inp: int, prog=None, step: bool = False):
    """The adapters' factors of module ``mp`` in runs: consecutive adapters of one rank and
    dtypes stacked, up to :data:`SWEEP_BATCH` adapters and :data:`SWEEP_BATCH_BYTES` of
    factors, as (A n x r x in, B n x out x r, [scale per adapter]); None for each adapter
    that lacks the module (yielded in order; a run ends before it only when shapes differ)."""
    run: list[tuple[torch.Tensor, torch.Tensor, float]] = []

    def stacked():
        got = torch.stack([x[0] for x in run]), torch.stack([x[1] for x in run]), [x[2] for x in run]
        run.clear()
        return got

    for got in _module_factors(cks, mp, out, inp, prog, step):
        if got is None:
            yield None
            continue
        a, b, scale = got
        if run and (a.shape != run[0][0].shape or a.dtype != run[0][0].dtype or b.dtype != run[0][1].dtype
                    or len(run) >= SWEEP_BATCH
                    or (len(run) + 1) * (a.numel() * a.element_size() + b.numel() * b.element_size()) > SWEEP_BATCH_BYTES):
            yield stacked()
        run.append((a, b, scale))
    if run:
        yield stacked()


def _module_factors(cks: list[Checkpoint], mp, out: int, inp: int, prog=None, step: bool = False):
    """Each adapter's (A, B, scale) of module ``mp`` (None where it lacks the module), NaN/Inf refused."""
    for ck in cks:
        pair = ck.lora_pairs().get(mp.module)
        if pair is None:
            yield None
        else:
            a, b = _factor_matrices(ck, pair, out, inp)
            # a sum is NaN/Inf when a value is (one pass, no mask); only then (or when a large sum overflows) look closer
            if not math.isfinite(float(a.sum()) + float(b.sum())) and not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise SourceError(f"{ck.path or ck.id}: LoRA module {mp.module!r} of {ck.id!r} contains NaN or Inf values; fix the adapter")
            yield a, b, pair.scale
        if prog is not None:
            prog.step(mp.module, 1 if step else 0)


def _fit_factored(mp, cks: list[Checkpoint], s, dev: torch.device, prog, step: bool) -> subspace.Fit:
    """The exact bases of a module whose adapters span few directions (sum of ranks R well
    below its sides), without its out x out and in x in Grams: with B_cat = [B_1 ... B_N] = Q T
    (QR, out x R), the left Gram sum_i s_i^2 B_i (A_i A_i^T) B_i^T = Q (T M T^T) Q^T, M the
    block diagonal of the s_i^2 A_i A_i^T, so its eigenvectors are Q V from the R x R
    eigenproblem T M T^T = V diag(vals) V^T (likewise on the right, with the A_i^T and the
    B_i^T B_i). Same spectrum (zero beyond R), more accurate (B is not squared); 4096 wide with
    R = 512 it replaces two 4096 x 4096 Grams and their eigendecompositions by two QRs of
    4096 x 512 per module."""
    out, inp = linalg.matrix_view(mp.shape)
    f64 = torch.float64
    a_s, b_s, scales = [], [], []
    for got in _module_factors(cks, mp, out, inp, prog, step):
        if got is not None:
            a, b, scale = got
            a_s.append(a.to(dev, f64))
            b_s.append(b.to(dev, f64))
            scales.append(float(scale))
    fit = subspace.Fit("both", "none", None, None, None)
    cap = sum(x.shape[0] for x in a_s)
    sides = (("left", out, torch.cat(b_s, 1), [s2 * (a @ a.T) for a, s2 in zip(a_s, (x * x for x in scales))]),
             ("right", inp, torch.cat(a_s, 0).T, [s2 * (b.T @ b) for b, s2 in zip(b_s, (x * x for x in scales))]))
    for side, dim, stacked, blocks in sides:
        q, t = torch.linalg.qr(stacked)
        tm = torch.cat([t[:, j: j + m.shape[0]] @ m for j, m in zip(np.cumsum([0] + [m.shape[0] for m in blocks[:-1]]), blocks)], 1)
        vals, v = linalg.eig_desc(tm @ t.T)
        vals = torch.cat([vals, vals.new_zeros(dim - vals.numel())])  # the Gram's spectrum: zero beyond R
        k = s.choose(side, vals, cap)
        fit.spectra[side], fit.kept[side] = vals, k
        vecs = q @ v[:, :k]
        setattr(fit, side, vecs.to(torch.float32))
        if getattr(s, "error_budget", None) is not None:
            fit.bases64 = (fit.bases64 or {}) | {side: vecs}
    return fit


#: the exact bases of a module come from its factors (:func:`_fit_factored`) when the adapters'
#: ranks add up to at most this share of its smaller side; else from its product Grams. Measured
#: (``bench/lora_exact.py``, 4096 wide, rank 16, 2 cores): factors / Grams 0.28x at a share of
#: 0.5, 0.58x at 0.75, 1.15x at 0.94
FACTORED_SHARE = 0.8


def _fit_sketch(tp, cks: list[Checkpoint], s, dev: torch.device, prog, target: int | None = None,
                step: bool = True) -> tuple[subspace.Fit | None, bool]:
    """basis="sketch" for a module: randomised range finder on each product Gram, checked
    a-posteriori like plain tensors (see :func:`uwsfmt.build._fit_sketch`).
    Returns (fit, swept): fit None means "use the exact Grams"; swept, whether progress was counted.

    Under an error budget the fit keeps ``target`` candidate directions per side (the Ritz
    vectors, float64 in ``bases64``) and no check is made here: :func:`fit_budget` checks the
    ranks it picks (``ritz``: each side's :class:`uwsfmt.linalg.SketchResult`)."""
    mp: ModulePlan = tp.lora
    out, inp = linalg.matrix_view(mp.shape)
    cap = sum(mp.ranks.values())
    budgeted = getattr(s, "error_budget", None) is not None
    if target is None:
        target = s.rank if s.rank is not None else (s.max_rank if s.max_rank is not None else linalg.SKETCH_RANK)
    width = min(target, cap) + s.sketch_oversample
    if width >= cap or width + linalg.SKETCH_PROBES > min(out, inp) // 2:
        return None, False  # the exact Grams cost about as much
    xs = {side: linalg.sketch_test_matrix(dim, width, s.seed, dev, salt=30 + i) for i, (side, dim) in enumerate((("left", out), ("right", inp)))}
    sk = _sweep(ProductGramSketch(xs), cks, mp, out, inp, prog, step)
    qs = {side: linalg.orthonormal_columns(y) for side, y in sk.y.items()}
    for _ in range(s.sketch_power - 1):
        qs = {side: linalg.orthonormal_columns(y) for side, y in _sweep(ProductGramSketch(qs, energy=False), cks, mp, out, inp, prog, False).y.items()}
    probes = {side: linalg.sketch_test_matrix(q.shape[0], linalg.SKETCH_PROBES, s.seed, dev, salt=40 + i) for i, (side, q) in enumerate(qs.items())}
    last = _sweep(ProductGramSketch({side: torch.cat([q, probes[side]], 1) for side, q in qs.items()}, energy=False), cks, mp, out, inp, prog, False)
    f = subspace.Fit("both", "none", None, None, None, method={"method": "sketch", "columns": {}, "power_sweeps": s.sketch_power, "check": {}})
    for side, q in qs.items():
        t = q.shape[1]
        g = last.y[side]
        res = linalg.sketch_ritz(q, g[:, :t], probes[side], g[:, t:], sk.sq_norm)
        spectrum = res.spectrum()
        k = s.choose(side, spectrum, min(cap, t))
        if budgeted:  # every well-found direction is a candidate; fit_budget checks the ranks it picks
            k = min(k, t - s.sketch_oversample)
            f.spectra[side], f.kept[side], f.method["columns"][side] = spectrum, k, t
            f.bases64 = (f.bases64 or {}) | {side: res.vectors[:, :k].contiguous()}
            f.ritz = (f.ritz or {}) | {side: res}
            setattr(f, side, res.vectors[:, :k].to(torch.float32))
            continue
        check = res.check(k, s.sketch_tolerance)
        if (s.rank is None and k > t - s.sketch_oversample) or not check["ok"]:
            return None, True
        f.spectra[side], f.kept[side] = spectrum, k
        f.method["columns"][side], f.method["check"][side] = t, check
        setattr(f, side, res.vectors[:, :k].to(torch.float32))
    return f, True


def fit(tp, cks: list[Checkpoint], s, dev: torch.device, prog) -> subspace.Fit:
    """Pass 1 for one module (no error budget, see :func:`fit_budgeted`): the sketch where
    asked for and it holds, else the exact bases."""
    swept = False
    if getattr(s, "basis", "exact") == "sketch":
        with linalg.no_tf32():
            f, swept = _fit_sketch(tp, cks, s, dev, prog)
        if f is not None:
            return f
    return _fit_exact(tp, cks, s, dev, prog, not swept,
                      "tau not met within the sketch, or the a-posteriori check failed" if swept else None)


def _fit_exact(tp, cks: list[Checkpoint], s, dev: torch.device, prog, step: bool, rejected: str | None) -> subspace.Fit:
    """The exact bases of one module: from its factors (:func:`_fit_factored`) where the
    adapters span few directions, else from its product Grams streamed in float64.
    ``rejected``: why a sketch was not used (recorded), None when none was tried."""
    mp: ModulePlan = tp.lora
    out, inp = linalg.matrix_view(mp.shape)
    cap = sum(mp.ranks.values())  # the products span at most sum of ranks directions per side
    with linalg.no_tf32():
        if cap <= FACTORED_SHARE * min(out, inp):
            f = _fit_factored(mp, cks, s, dev, prog, step)
        else:
            st = _sweep(ProductGramStats.empty(out, inp, device=dev), cks, mp, out, inp, prog, step)
            f = subspace.Fit("both", "none", None, None, None)
            for side, g in (("left", st.left), ("right", st.right)):
                vals, vecs = linalg.eig_desc(g)
                k = s.choose(side, vals, cap)
                f.spectra[side] = vals
                f.kept[side] = k
                setattr(f, side, vecs[:, :k].to(torch.float32))
                if getattr(s, "error_budget", None) is not None:
                    f.bases64 = (f.bases64 or {}) | {side: vecs[:, :k].clone()}  # not a view of every eigenvector
    if rejected is not None:
        f.method = {"method": "exact", "sketch_rejected": rejected}
    return f


def fit_budgeted(tp, cks: list[Checkpoint], s, dev: torch.device, prog) -> tuple[subspace.Fit, dict]:
    """Pass 1 for one module under an error budget: its bases, cut to the cheapest ranks at
    which every adapter meets the budget, and the manifest's ``budget`` record (:func:`fit_budget`).

    basis="sketch": the candidates are a sketch's Ritz vectors, :data:`uwsfmt.linalg.SKETCH_RANK`
    per side at first, 4x more (up to ``max_rank``) while the budget is not met within them or
    only with every candidate of a side.
    The errors the ranks are picked by are exact for those bases; the sketch only decides how
    close to the fewest bytes they are, so the ranks picked are checked a-posteriori
    (``sketch_tolerance``, as for tau) and the exact bases are used when the check fails, when
    ``max_rank`` sketched directions do not meet the budget, or when the sketch would cost about
    as much as they do (the adapters span few directions). 4096 wide, 256 adapters of rank 16:
    ~1.4 s per module, build included, instead of ~15 s (``bench/budget_sketch.py``).
    """
    from .. import budget as budget_mod

    mp: ModulePlan = tp.lora
    swept, rejected = False, None
    if getattr(s, "basis", "exact") == "sketch":
        most = min(budget_mod.MAX_CANDIDATE_RANK if s.max_rank is None else s.max_rank, sum(mp.ranks.values()))
        target = min(linalg.SKETCH_RANK, most)
        while True:
            with linalg.no_tf32():
                f, now = _fit_sketch(tp, cks, s, dev, prog, target, step=not swept)
            swept = swept or now
            if f is None:
                break
            record, rejected, more = fit_budget(tp, f, cks, s, dev, final=False, widen=target < most)
            if record is not None:
                return f, record
            if target >= most or not more:
                break
            target = min(4 * target, most)
    f = _fit_exact(tp, cks, s, dev, prog, not swept, rejected)
    record, _, _ = fit_budget(tp, f, cks, s, dev)
    return f, record


def fit_budget(tp, fit: subspace.Fit, cks: list[Checkpoint], s, dev: torch.device,
               final: bool = True, widen: bool = False) -> tuple[dict | None, str | None, bool]:
    """Error-budget mode for one module: cut ``fit`` (pass 1's bases, every candidate direction)
    to the ranks (kl, kr) with the fewest bytes at which every adapter, as a reader gets it back,
    is within ``s.error_budget``; return (the manifest's ``budget`` record of the module, None, False).

    One sweep gives every pair of ranks' error at once: with pass 1's float64 bases
    (``fit.bases64``: orthonormal, best first, rounded to float32 for the store), the
    two-sided projection loses ||X||^2 - ||C[:kl, :kr]||^2 of X = s B A, C = Q_L^T X Q_R (r x r
    and k x r products only; the two sides' spans differ, so kl and kr are chosen together). The
    stored bases are float32 and a reader's factors are cast to the source dtype, so the pair
    found is checked with pass 2's own error (:func:`read_back`) and raised until every adapter
    meets the budget; a budget no ranks meet (below the factors' rounding, or beyond
    ``max_rank`` directions) is a :class:`BudgetError` naming the module and adapter.

    Not ``final`` (``fit`` is a sketch's, with its ``ritz``): (None, why, more) instead of the
    error, or when the sketch's a-posteriori check fails at the ranks picked; ``more``: more
    candidate directions could meet the budget, or (``widen``) meet it with fewer bytes (the
    ranks picked use every candidate on a side).
    """
    from .. import budget as budget_mod
    from ..errors import BudgetError

    mp: ModulePlan = tp.lora
    out, inp = linalg.matrix_view(mp.shape)
    bud = s.error_budget
    f = torch.float64
    cap_l, cap_r = fit.left.shape[1], fit.right.shape[1]
    held = [(ck, pair) for ck in cks if (pair := ck.lora_pairs().get(mp.module)) is not None]
    spanned = sum(mp.ranks.values())

    def runs():  # the held adapters' factors in float64 runs (see _runs), with their scales
        for run in _runs(cks, mp, out, inp):
            if run is not None:
                a, b, scales = run
                yield a.to(dev, f), b.to(dev, f), torch.tensor([float(x) for x in scales], dtype=f, device=dev)

    worst = np.zeros((cap_l + 1, cap_r + 1))  # worst adapter's relative error at (kl, kr)
    fits_all = np.ones((cap_l + 1, cap_r + 1), dtype=bool)
    norms, allowed = [], []
    with linalg.no_tf32():
        ql, qr = fit.bases64["left"], fit.bases64["right"]  # pass 1's float64 bases: orthonormal, nested
        fit.bases64 = None
        for a, b, sc in runs():
            c = sc[:, None, None] * ((ql.mT @ b) @ (a @ qr))
            kept = torch.nn.functional.pad(torch.cumsum(torch.cumsum(c * c, 1), 2), (1, 0, 1, 0))  # ||C[:kl, :kr]||^2
            x2 = sc * sc * torch.sum((a @ a.mT) * (b.mT @ b), dim=(1, 2))
            lost = (x2[:, None, None] - kept).clamp_min(0).sqrt().cpu().numpy()
            wn = x2.sqrt().cpu().numpy()
            lim = np.array([bud.allowed(float(w), float(w), tp.dtype) for w in wn])
            norms += wn.tolist()
            allowed += lim.tolist()
            fits_all &= (lost <= lim[:, None, None]).all(0)
            if (wn > 0).any():
                np.maximum(worst, (lost[wn > 0] / wn[wn > 0, None, None]).max(0), out=worst)
    kl_grid, kr_grid = np.meshgrid(np.arange(cap_l + 1), np.arange(cap_r + 1), indexing="ij")
    # bytes at (kl, kr): bases, spectra and cores, as budget.tensor_bytes counts them
    sizes = (4 * (out * kl_grid + inp * kr_grid) + 4 * len(cks) * kl_grid * kr_grid
             + 8 * (fit.spectra["left"].numel() + fit.spectra["right"].numel()) + 2 * budget_mod.ARRAY_OVERHEAD)
    if fits_all.any():
        flat = np.lexsort((worst.ravel(), np.where(fits_all, sizes, np.iinfo(np.int64).max).ravel()))[0]
        kl, kr = (int(x) for x in np.unravel_index(flat, fits_all.shape))
    elif not final:
        return None, f"budget not met within the {cap_l} x {cap_r} sketched directions", True
    else:
        kl, kr = cap_l, cap_r

    def read_errors(kl: int, kr: int) -> list[float]:
        left, right = fit.left[:, :kl].to(f), fit.right[:, :kr].to(f)
        errs = []
        for a, b, sc in runs():
            errs += read_back(left, right, a, b, sc, min(kl, kr, a.shape[1]), tp.dtype)[2].sqrt().tolist()
        return errs

    while True:
        got = read_errors(kl, kr)
        bad = [j for j, (g, lim) in enumerate(zip(got, allowed)) if not g <= lim]
        if not bad:
            break
        if (kl, kr) == (cap_l, cap_r):
            if not final:
                return None, f"budget not met within the {cap_l} x {cap_r} sketched directions, read back", True
            j = max(bad, key=lambda j: got[j] / max(norms[j], 1e-300))
            err = got[j] / norms[j] if norms[j] > 0 else math.inf
            capped = max(cap_l, cap_r) < spanned and max(cap_l, cap_r) == (s.max_rank or budget_mod.MAX_CANDIDATE_RANK)
            why = (f"keeping all {max(cap_l, cap_r)} candidate directions (the adapters span up to {spanned})" if capped else
                   f"keeping every direction the adapters span: the {tp.dtype} factors a reader gets back round by about that much")
            raise BudgetError(
                f"LoRA module {mp.module!r}: the error budget ({bud.describe()}) cannot be met; adapter {held[j][0].id!r} "
                f"comes back with relative error {err:.3g} even {why}. Raise the budget to at least {err:.2g}"
                + (", or raise --max-rank" if capped else "")
                + ", or convert with --lora-mode factors (A and B stored as ordinary tensors, held to the budget one by one)")
        kl, kr = min(cap_l, kl + max(1, kl // 4)), min(cap_r, kr + max(1, kr // 4))
    if widen and (kl == cap_l or kr == cap_r):
        return None, f"budget met at ranks ({kl}, {kr}), every sketched direction on a side", True
    if fit.ritz:  # a sketch's candidates: are these ranks' directions near the best ones?
        checks = {side: fit.ritz[side].check(k, s.sketch_tolerance) for side, k in (("left", kl), ("right", kr))}
        if not all(c["ok"] for c in checks.values()):
            return None, (f"a-posteriori check failed at ranks ({kl}, {kr}) (a missed direction could lower "
                          f"the error by more than {s.sketch_tolerance:.0%})"), False
        fit.method["check"], fit.ritz = checks, None
    fit.left, fit.right = fit.left[:, :kl].contiguous(), fit.right[:, :kr].contiguous()
    fit.kept = {"left": kl, "right": kr}
    frontier = []
    order = np.lexsort((worst.ravel(), sizes.ravel()))  # fewest bytes first
    by_size = worst.ravel()[order]
    at, floor = 0, math.inf
    while at < len(order):  # a pair counts when it cuts the worst error by 20% (predicted, before rounding)
        hits = np.flatnonzero(by_size[at:] < 0.8 * floor)
        if not hits.size:
            break
        at += int(hits[0])
        floor = w = float(by_size[at])
        i, j = (int(x) for x in np.unravel_index(order[at], worst.shape))
        frontier.append(["both", [i, j], None, int(sizes[i, j]), budget_mod._g4(w), budget_mod._g4(w)])
        at += 1
    rel = max((g / w if w > 0 else 0.0 for g, w in zip(got, norms)), default=0.0)
    itemsize = dtypes.torch_dtype(tp.dtype).itemsize
    return {
        "max_error": bud.max_error, "max_delta_error": bud.max_delta_error,
        "error": rel, "delta_error": rel, "mode": "both", "rank": kl if kl == kr else None, "ranks": [kl, kr],
        "residual_bits": None, "bytes": int(sizes[kl, kr]),
        "dense_bytes": int(sum((out + inp) * r * itemsize for r in mp.ranks.values())),  # the adapters' own factors
        "frontier": frontier,
    }, None, False


def _factor_matrices(ck: Checkpoint, pair: LoraPair, out: int, inp: int) -> tuple[torch.Tensor, torch.Tensor]:
    a = ck.get(pair.a)
    b = ck.get(pair.b)
    r = a.shape[0]
    a = a.reshape(r, -1)
    b = b.reshape(b.shape[0], r)
    if a.shape[1] != inp or b.shape[0] != out:
        raise ConflictError(f"{ck.path or ck.id}: LoRA module {pair.module!r} of {ck.id!r} adapts a {b.shape[0]}x{a.shape[1]} "
                            f"matrix but the family's is {out}x{inp}")
    return a, b


def entry_record(tp) -> dict:
    """The manifest's ``lora`` record of a module: factor names and the shapes around the rank,
    A (r, *a_tail) and B (out, r, *b_tail)."""
    mp: ModulePlan = tp.lora
    return mp.record(tuple(mp.shape[1:]), mp.b_tail)


def encode(entries: list[dict], fits: dict[str, subspace.Fit], ck: Checkpoint, rows: dict[str, np.ndarray],
           stacks: dict | None = None) -> list[tuple[float, int]]:
    """Pass 2 for the LoRA modules ``entries`` of one adapter: write each core into ``rows``;
    return each module's (relative error, adapter rank), in order (0.0, 0 for a module the
    adapter lacks: a zero update, its core left zero).

    The error is that of the factors a reader gets back (cast to the source dtype) against
    the adapter's own s * B @ A, computed from r x r products only, in float64. Runs of
    consecutive modules of one kind (shapes, ranks, dtype) are computed together with batched
    GEMMs, a run's float64 operands kept to :data:`ENCODE_RUN_BYTES` (cache-sized; at most
    :data:`PRODUCT_BATCH` modules). Measured on 2 cores, 32 adapters x 128 modules, rank 16:
    pass 2 took 1.15-1.25 s instead of 1.57 s 1024 wide, 3.3-3.5 s instead of 3.6-3.75 s
    4096 wide (float64 products: the flops, not the calls, are most of it there). ``stacks``
    (a dict the caller keeps from one adapter to the next) holds runs' bases, stacked in
    float64, each module in one run at most.
    """
    stacks = {} if stacks is None else stacks
    pairs = ck.lora_pairs()
    infos = ck.infos()
    out: list[tuple[float, int] | None] = [None] * len(entries)
    runs: list[list[tuple[int, dict, LoraPair]]] = []
    run_key, most = None, 1
    for i, e in enumerate(entries):
        pair = pairs.get(e["name"])
        if pair is None:
            out[i] = (0.0, 0)
            continue
        fit = fits[e["name"]]
        r = int(infos[pair.a].shape[0])
        key = (tuple(e["view"]), tuple(e["rank"]), e["dtype"], r, infos[pair.a].dtype, infos[pair.b].dtype,
               fit.left.dtype, fit.left.device)
        if runs and key == run_key and runs[-1][-1][0] + 1 == i and len(runs[-1]) < most:
            runs[-1].append((i, e, pair))
        else:
            runs.append([(i, e, pair)])
            run_key = key
            out_dim, in_dim = e["view"]
            module_bytes = 8 * (out_dim + in_dim) * (r + max(e["rank"][0] or 0, e["rank"][1] or 0))
            most = max(1, min(PRODUCT_BATCH, ENCODE_RUN_BYTES // module_bytes))
    for run in runs:
        for (i, _, _), res in zip(run, _encode_run(run, fits, ck, rows, stacks)):
            out[i] = res
    return out  # type: ignore[return-value]


#: most bytes of float64 operands (A, B and the two bases) in one run of :func:`encode`: runs
#: of 32 4096-wide modules (64 MiB) were slower than runs of 4 (8 MiB)
ENCODE_RUN_BYTES = 8 << 20


def _encode_run(run: list[tuple[int, dict, LoraPair]], fits: dict[str, subspace.Fit], ck: Checkpoint,
                rows: dict[str, np.ndarray], stacks: dict) -> list[tuple[float, int]]:
    """:func:`encode` for one run of modules of one kind, batched over the run."""
    e0 = run[0][1]
    out, inp = e0["view"]
    f = torch.float64
    names = tuple(e["name"] for _, e, _ in run)
    bases = stacks.get(("lora",) + names)
    if bases is None:  # once per run of modules, not per adapter
        bases = (torch.stack([fits[n].left for n in names]).to(f), torch.stack([fits[n].right for n in names]).to(f))
        # kept for the next adapters, unless a module of it is kept in another run already (adapters
        # that lack different modules split the runs differently): one float64 copy per module at most
        covered = stacks.setdefault("lora_modules_kept", set())
        if covered.isdisjoint(names):
            stacks[("lora",) + names] = bases
            covered.update(names)
    left, right = bases
    dev = left.device
    mats = [_factor_matrices(ck, pair, out, inp) for _, _, pair in run]
    r = mats[0][0].shape[0]
    a = torch.empty((len(run), r, inp), dtype=f, device=dev)
    b = torch.empty((len(run), out, r), dtype=f, device=dev)
    for j, (aj, bj) in enumerate(mats):
        a[j].copy_(aj)
        b[j].copy_(bj)
    del mats
    s = torch.tensor([float(pair.scale) for _, _, pair in run], dtype=f, device=dev)
    c, x2, err2 = read_back(left, right, a, b, s, rank_of(e0, r), e0["dtype"])
    if c.shape[1] * c.shape[2]:
        host = c.cpu().numpy()
        for j, (_, e, _) in enumerate(run):
            sl = e["coefficients"]
            rows[sl["pack"]][sl["offset"]: sl["offset"] + host[j].size] = host[j].reshape(-1)
    return [(_relative(x2j, e2j), r) for x2j, e2j in zip(x2.tolist(), err2.tolist())]


def read_back(left: torch.Tensor, right: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: torch.Tensor, rank: int,
              dtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a reader gets back for adapters' modules (batched over the leading dimension of
    ``a``, ``b``, ``s``; the bases batched alike, or one pair for all): the cores as stored
    (float32), each ||s B A||^2 and each squared error of the factors a reader returns (rank
    ``rank``, cast to ``dtype``) against s B A, from r x r products only, in float64."""
    f = torch.float64
    with linalg.no_tf32():
        c = core(left, right, a, b, s).to(torch.float32)
        bb, aa = factors(left, right, c.to(f), rank)
        want = dtypes.torch_dtype(dtype)
        bb, aa = bb.to(want).to(f), aa.to(want).to(f)
        x2 = s * s * torch.sum((a @ a.mT) * (b.mT @ b), dim=(1, 2))
        y2 = torch.sum((aa @ aa.mT) * (bb.mT @ bb), dim=(1, 2))
        xy = s * torch.sum((b.mT @ bb) * (a @ aa.mT), dim=(1, 2))  # <sBA, B'A'> = s tr((B^T B')(A' A^T))
    return c, x2, (x2 - 2 * xy + y2).clamp_min(0)


def _relative(x2: float, err2: float) -> float:
    """||X - X'|| / ||X|| from the squares (0 for a zero update rebuilt exactly, else inf)."""
    if x2 <= 0.0:
        return 0.0 if err2 <= 0.0 else math.inf
    return math.sqrt(err2 / x2)


#: factor dtypes whose range needs no balancing: a full-rank read returns the basis itself as one
#: factor (no SVD, one GEMM per module instead of two; float16 factors get the balanced split)
BASIS_FACTOR_DTYPES = (torch.float32, torch.float64)


def rank_of(e: dict, r: int) -> int:
    """Rank of the factors a reader returns: min(kl, kr, the adapter's own rank)."""
    kl, kr = e["rank"]
    return max(0, min(kl or 0, kr or 0, r))


def model_record(entries: list[dict], ck: Checkpoint, ranks: dict[str, int] | None = None) -> dict:
    """Per-model LoRA facts for the model table: each entry's adapter rank (0 = module absent)
    and what an export needs to write an adapter its tools load (PEFT config, file metadata)."""
    lora_entries = [e for e in entries if e.get("lora") is not None]
    meta = ck.metadata() or {}
    pairs = ck.lora_pairs()
    if not lora_entries and not pairs:
        return {}
    rec: dict = {"format": ck.format}
    known = {e["name"] for e in lora_entries}
    extra = [m for m in pairs if m not in known] if lora_entries else []
    if extra:
        raise ConflictError(f"{ck.path or ck.id}: adapter {ck.id!r} has LoRA modules the store has no basis for "
                            f"({', '.join(map(repr, extra[:5]))}); rebuild the store with this adapter included")
    if lora_entries:
        infos = ck.infos() if any(e["name"] not in (ranks or {}) for e in lora_entries) else {}  # once, not per module
        rec["ranks"] = [None if e.get("lora") is None else (ranks or {}).get(e["name"], _rank_from(infos, pairs, e)) for e in entries]
    else:  # factor-wise store: the scales stay in the adapter's own config
        rec["scales"] = {m: p.scale for m, p in pairs.items()}
    if "peft_config" in meta:
        rec["peft_config"] = meta["peft_config"]
    st_meta = meta.get("safetensors_metadata")
    if st_meta:
        rec["metadata"] = {k: v for k, v in st_meta.items() if isinstance(v, str) and len(v) <= MAX_META_VALUE}
    return {"adapter": rec}


def _rank_from(infos: dict, pairs: dict[str, LoraPair], e: dict) -> int:
    p = pairs.get(e["name"])
    return 0 if p is None else int(infos[p.a].shape[0])


# ---------------------------------------------------------------------------- read


def model_ranks(store, idx: int) -> list | None:
    return ((store.manifest["models"][idx].get("adapter") or {}).get("ranks"))


def read(store, entries: list[dict], idx: int, rows: dict[str, torch.Tensor], dev: torch.device,
         dtype: torch.dtype | None = None, into: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Factor tensors of the LoRA ``entries`` for model ``idx`` under their source names.

    Modules the adapter did not have are left out; kohya-style alpha tensors are given back
    equal to the new rank (so the scale alpha / r is 1: the factors carry it). ``into``: the
    caller's tensors (``load_into``); a factor whose tensor there has the right shape, dtype and
    device is computed straight into it (one small GEMM each, no full-size temporary and no copy)
    and that tensor is returned.
    """
    ranks = model_ranks(store, idx)
    out: dict[str, torch.Tensor] = {}
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for e in entries:  # grouped independently of which modules this adapter has: stable cache keys
        groups[(tuple(e["view"]), tuple(e["rank"]))].append(e)
    from ..store import _group_key

    for key, group in groups.items():
        _, left, right = store._group_arrays(("lora",) + _group_key(group[0]) + tuple(x["name"] for x in group), group, dev)
        cshape = group[0]["coefficients"]["shape"]
        cw = torch.stack([take(rows, x["coefficients"]).reshape(cshape) for x in group]).to(dev)  # as stored
        kl, kr = key[1][0] or 0, key[1][1] or 0
        k = min(kl, kr)
        todo = []  # (entry, its rank, its dtype, basis factors?) for the modules this adapter has
        for i, e in enumerate(group):
            r = _stored_rank(store, ranks, e)
            if r == 0:
                continue  # the adapter did not have this module
            rk = rank_of(e, r)
            want = dtype if dtype is not None else dtypes.torch_dtype(e["dtype"])
            todo.append((i, e, rk, want, rk == k and want in BASIS_FACTOR_DTYPES))
        # the k x k factorisations in float64; the out x k and k x in products in the bases' compute
        # dtype (float64 products of the wide bases were most of a read's time and memory traffic)
        direct = into is not None and k > 0 and cw.numel() > 0
        if any(not plain for *_, plain in todo):
            c = cw.to(torch.float64)
            if direct:  # per factor, one GEMM into the caller's tensor
                xb, xa = (x.to(left.dtype) for x in factor_cores(c, k))
            else:
                bb, aa = factors(left, right, c, k, dtype=left.dtype)
        cs = cw.to(left.dtype)  # the cores in the bases' dtype, for the basis factors (one conversion)
        rt = right.transpose(1, 2)
        # one factor is the store's basis itself, the other its product with the core
        _basis_factors(into if direct else None, todo, left, cs, rt, kl <= kr, out)
        for i, e, rk, want, plain in todo:
            rec = e["lora"]
            b_shape, a_shape = [e["view"][0], rk] + rec["b_tail"], [rk] + rec["a_tail"]
            if plain:  # written above
                pass
            elif direct:  # balanced factors, one GEMM each straight into the caller's tensor
                out[rec["b"]] = _product_into(into, rec["b"], b_shape, left[i], xb[i, :, :rk], want)
                out[rec["a"]] = _product_into(into, rec["a"], a_shape, xa[i, :rk], rt[i], want)
            else:
                out[rec["a"]] = aa[i, :rk].reshape(a_shape).to(want).contiguous()
                out[rec["b"]] = bb[i, :, :rk].reshape(b_shape).to(want).contiguous()
            if rec.get("alpha"):
                adt = dtype if dtype is not None else dtypes.torch_dtype(rec.get("alpha_dtype") or "float32")
                out[rec["alpha"]] = torch.tensor(float(rk), dtype=adt, device=dev)
    return out


#: modules per batched GEMM of :func:`_basis_factors` (its scratch: 8 MiB for 4096 x 16 factors)
PRODUCT_BATCH = 32


def _fitting(into: dict[str, torch.Tensor] | None, name: str, shape: list[int], want: torch.dtype,
             like: torch.Tensor) -> torch.Tensor | None:
    """The caller's tensor ``name`` when a factor of this shape and dtype can be written straight into it."""
    d = None if into is None else into.get(name)
    if d is not None and d.dtype == like.dtype == want and d.device == like.device and d.is_contiguous() and list(d.shape) == shape:
        return d
    return None


def _basis_factors(into: dict[str, torch.Tensor] | None, todo: list, left: torch.Tensor, cs: torch.Tensor,
                   rt: torch.Tensor, core_right: bool, out: dict[str, torch.Tensor]) -> None:
    """The factors of the ``plain`` modules of ``todo`` into ``out``: one is the basis (copied),
    the other its product with the core, from one batched GEMM per run of up to
    :data:`PRODUCT_BATCH` consecutive modules (through a scratch, then copied: 128 modules of
    4096 x 16 x 16 take ~3.0 ms instead of ~4.6 ms as single GEMMs on 2 cores). ``core_right``:
    B' = L and A' = C R^T, else B' = L C and A' = R^T. Each factor is written straight into the
    caller's tensor where that fits (``load_into``), else into a new one: either way the same
    numbers (the same GEMM)."""
    plain = [(i, e, rk, want) for i, e, rk, want, p in todo if p]
    runs: list[list] = []
    for t in plain:
        if runs and runs[-1][-1][0] + 1 == t[0] and len(runs[-1]) < PRODUCT_BATCH:
            runs[-1].append(t)
        else:
            runs.append([t])
    shape = (cs.shape[1], rt.shape[2]) if core_right else (left.shape[1], cs.shape[2])
    scratch = torch.empty((min(PRODUCT_BATCH, len(plain)),) + shape, dtype=left.dtype, device=left.device) if plain else None
    for run in runs:
        lo, hi = run[0][0], run[-1][0] + 1
        prod = scratch[: hi - lo]
        torch.bmm(cs[lo:hi], rt[lo:hi], out=prod) if core_right else torch.bmm(left[lo:hi], cs[lo:hi], out=prod)
        for (i, e, rk, want), p in zip(run, prod):
            rec = e["lora"]
            b_shape, a_shape = [e["view"][0], rk] + rec["b_tail"], [rk] + rec["a_tail"]
            b, a = (left[i], p) if core_right else (p, rt[i])
            out[rec["b"]] = _copy_into(into, rec["b"], b_shape, b, want)
            out[rec["a"]] = _copy_into(into, rec["a"], a_shape, a, want)


def _copy_into(into: dict[str, torch.Tensor] | None, name: str, shape: list[int], x: torch.Tensor,
               want: torch.dtype) -> torch.Tensor:
    """``x`` as factor ``name``: copied into the caller's tensor when it fits, else a new tensor in ``want``."""
    d = _fitting(into, name, shape, want, x)
    if d is not None:
        d.view(x.shape).copy_(x)
        return d
    return x.reshape(shape).to(want, copy=True, memory_format=torch.contiguous_format)


def _product_into(into: dict[str, torch.Tensor] | None, name: str, shape: list[int], lhs: torch.Tensor,
                  rhs: torch.Tensor, want: torch.dtype) -> torch.Tensor:
    """``lhs @ rhs`` as factor ``name``: written straight into the caller's tensor (and that tensor
    returned) when it has this shape, dtype and device, else a new tensor in ``want``."""
    d = _fitting(into, name, shape, want, lhs)
    if d is not None:
        torch.mm(lhs, rhs, out=d.view(lhs.shape[0], rhs.shape[1]))
        return d
    return (lhs @ rhs).reshape(shape).to(want)


def _stored_rank(store, ranks: list | None, e: dict) -> int:
    if ranks is None:
        return max(e["rank"][0] or 0, e["rank"][1] or 0)
    r = ranks[store._tensor_index[e["name"]]]
    return 0 if r is None else int(r)


def check_record(e: dict) -> dict:
    """The entry's ``lora`` record, checked (a damaged or hostile manifest fails here, clearly)."""
    rec = e.get("lora")
    ok = (isinstance(rec, dict) and isinstance(rec.get("a"), str) and isinstance(rec.get("b"), str)
          and all(isinstance(rec.get(k), list) and all(isinstance(x, int) and x >= 0 for x in rec[k]) for k in ("a_tail", "b_tail"))
          and isinstance(rec.get("alpha"), (str, type(None))) and e.get("encoding") == "subspace" and e.get("mode") == "both"
          and e.get("center") == "none" and e.get("left") and e.get("right"))
    if not ok:
        from ..errors import FormatError

        raise FormatError(f"tensor {e.get('name')!r}: malformed LoRA record (needs a subspace entry, mode 'both', centre 'none', "
                          "and lora = {a, b, a_tail, b_tail, alpha}); the store is damaged")
    return rec


def factor_names(e: dict) -> list[str]:
    rec = check_record(e)
    return [rec["a"], rec["b"]] + ([rec["alpha"]] if rec.get("alpha") else [])


def delta(store, model, module: str, *, device=None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense s * B @ A of one module in the adapted weight's layout (transposed when the layer
    stores W transposed: fan_in_fan_out), rebuilt as L C R^T; zeros for a module the adapter lacks."""
    e = store.tensor_entry(module)
    if e.get("lora") is None:
        raise SourceError(f"{store.path}: {module!r} is not a LoRA module of this store")
    w = store.tensor(model, e["name"], device=device, dtype=dtype or torch.float32)
    if e["lora"].get("fan_in_fan_out"):
        w = w.reshape(e["view"]).T.contiguous()
    return w
