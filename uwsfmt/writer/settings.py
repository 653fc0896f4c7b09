"""Build settings: the options a build runs with, checked once, and the constants that steer it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from uwsfmt.encodings import budget, subspace
from uwsfmt.errors import ConfigError, UWSError
from uwsfmt.numerics import gram, linalg, quantize, randomized
from uwsfmt.writer.options import CHOICES, DEFAULT_BUDGET, DEFAULT_TAU, BuildOptions, Fidelity

ENCODING_NAMES = CHOICES["encoding"]


class FactorsAreSmaller(Exception):
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
    coefficient_bits: str = "auto"  # auto | float32 | 8 | 8/4 | 4 | 8/4/2 (encodings.coefficients)
    encodings: dict[str, str] = field(default_factory=dict)  # name pattern -> encoding
    min_numel: int = 1024  # smaller float tensors are stored dense
    allow_nonfinite: bool = False  # store tensors with NaN/Inf as dense instead of refusing
    sketch_oversample: int = 16  # flat mode and basis="sketch": extra sketch columns
    basis: str = "exact"  # exact (Gram summed in float64 + eigh) | sketch (randomised range finder, checked, exact fallback)
    sketch_power: int = 1  # basis="sketch": refinement sweeps after the sketch (the last one also checks)
    sketch_tolerance: float = 0.01  # basis="sketch": accepted loss of squared error vs the best basis
    seed: int = 0
    max_error: float | None = None  # error budget: ||W - W_hat|| / ||W|| per tensor and model (see budget.py)
    max_delta_error: float | None = None  # error budget: ||W - W_hat|| / ||W - M|| per tensor and model
    lora_mode: str = "auto"  # LoRA pairs: product (basis over s*B*A) | factors (paper: A and B apart) | auto (see convert)
    mean_dtype: str = "auto"  # subspace means: auto | float16 | compute (see stored_mean)
    lora_choice: str | None = None  # lora_mode="auto": what it chose and why (informative, recorded in the manifest)

    @classmethod
    def from_options(cls, fid: Fidelity, opts: BuildOptions, *, has_base: bool) -> Settings:
        """The settings a build runs with, from the user's typed options (no fidelity at all:
        the default error budget, :data:`uwsfmt.writer.options.DEFAULT_BUDGET`)."""
        budget_kw = DEFAULT_BUDGET if fid.kind == "default" and fid.max_rank is None else {
            "max_error": fid.max_error, "max_delta_error": fid.max_delta_error}
        return cls(rank=fid.rank, tau=fid.tau, max_rank=fid.max_rank, max_error=budget_kw["max_error"],
                   max_delta_error=budget_kw["max_delta_error"], mode=opts.side, center=opts.resolved_center(has_base),
                   residual_bits=opts.residual_bits or None, coefficient_bits=opts.coefficient_bits, encodings=dict(opts.encodings),
                   min_numel=opts.resolved_min_numel(fid), allow_nonfinite=opts.allow_nonfinite, seed=opts.seed,
                   lora_mode=opts.lora_mode, basis=opts.basis_method, mean_dtype=opts.mean_dtype)

    def check(self) -> None:
        if self.lora_mode not in CHOICES["lora_mode"]:
            raise ConfigError(f"lora_mode must be one of {', '.join(CHOICES['lora_mode'])}; not {self.lora_mode!r}")
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
        if self.residual_bits not in (None, 0) + quantize.RESIDUAL_BITS:
            raise ConfigError(f"residual_bits must be one of 1, 2, 4, 8, 16 (or None); not {self.residual_bits!r}")
        if self.coefficient_bits not in CHOICES["coefficient_bits"]:
            raise ConfigError(f"coefficient_bits must be one of {', '.join(CHOICES['coefficient_bits'])}; not {self.coefficient_bits!r}")
        for pat, enc in self.encodings.items():
            if enc not in ENCODING_NAMES:
                raise ConfigError(f"encoding override {pat!r}: {enc!r} is not one of {', '.join(ENCODING_NAMES)}")

    @property
    def coefficient_scheme(self) -> str:
        """How this tensor's coefficients are stored ("auto" outside a budget's pick: float32)."""
        return "float32" if self.coefficient_bits == "auto" else self.coefficient_bits

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
        return gram.choose_rank(vals, rank=self.rank, tau=tau, max_rank=max_rank, limit=limit)


BASIS_METHODS = CHOICES["basis_method"]


MEAN_DTYPES = CHOICES["mean_dtype"]


#: a float16 mean is kept only where its rounding moves it by at most this, relative (normal
#: float16 values: 2^-11 per value at most, ~2.8e-4 root-mean-square; more only where values
#: fall into float16's subnormals)
HALF_MEAN_RTOL = 2.0 ** -10





SKETCH_PROBES = randomized.SKETCH_PROBES


#: stacked statistics of one pass-1 batch are kept under this many bytes (sums and Grams, float64)
BATCH_STATS_BYTES = 256 << 20


#: tensors smaller than this are read inline: handing a read to a thread costs ~50 us, more
#: than reading a small tensor (measured: 2,000 64x64 tensors x 8 models, 0.7 s of hand-offs)
READ_AHEAD_MIN_BYTES = 1 << 20


#: the error from norms (below) is used when err^2 >= this * ||W - M||^2: its rounding, ~1e-9
#: of ||W - M||^2, then moves the error by at most ~5e-8 relative
NORM_ERROR_MIN_RATIO = 1e-2


EXACT_REBUILD_BELOW = subspace.EXACT_REBUILD_BELOW


#: subspace tensors up to this many values are encoded in batches of equal shape (pass 2)
BATCH_MAX_NUMEL = 1 << 16

#: tensors of at least this many values take float32 Gram products on the exact path (below it
#: the float64 products cost little: a 512 x 512 tensor's is ~5 ms a model on 2 cores)
FLOAT32_GRAM_MIN_NUMEL = 1 << 18


def gram_compute_dtype(dtype: str, numel: int, s: Settings) -> torch.dtype:
    """The dtype of one model's delta and Gram product on the exact path. float32 (half the GEMM
    time of float64; the GEMMs are most of an exact build) for large tensors; float64 for small
    ones (batched in pass 1, in float64), for float64 tensors, and in error-budget builds, whose
    rank pick sums spectrum tails down to the budget."""
    if dtype == "float64" or s.error_budget is not None or numel < FLOAT32_GRAM_MIN_NUMEL:
        return torch.float64
    return torch.float32


#: values per batch (bounds the stacked temporaries: 4M float32 values = 16 MiB each)
BATCH_MAX_VALUES = 1 << 22
