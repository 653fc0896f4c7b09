"""The build's options as typed records, and the one place their allowed values are listed.

``convert(sources, out, fidelity=Fidelity(...), options=BuildOptions(...))``: :class:`Fidelity`
says how close every rebuilt tensor must be (a rank, a variance threshold or an error budget, one
kind at a time); :class:`BuildOptions` says how tensors are encoded. The CLI, the converter widget
(Python and JS) and the JupyterLab panels take their choices from :data:`CHOICES`.

No torch here: the CLI imports this module to build its parser.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from uwsfmt.errors import ConfigError

#: allowed values of every option that has a fixed set, in the order forms show them
CHOICES: dict[str, tuple] = {
    "side": ("auto", "left", "right", "both", "flat"),  # which side(s) of the matrix view get a basis
    "center": ("auto", "mean", "none", "base"),  # what deviations are taken from (auto: base if given, else mean)
    "residual_bits": (1, 2, 4, 8, 16),  # quantized per-model correction (16 = float16)
    # per-model coefficients: float32, or quantized per direction (auto: float32 unless an error budget picks)
    "coefficient_bits": ("auto", "float32", "8", "8/4", "4", "8/4/2"),
    "basis_method": ("exact", "sketch"),  # Gram (float64 sums) + eigh, or a checked randomised sketch
    "mean_dtype": ("auto", "float16", "compute"),  # how each subspace tensor's mean is stored
    "lora_mode": ("auto", "product", "factors"),  # LoRA adapters: basis over s*B*A, or A and B as tensors
    "encoding": ("subspace", "shared", "dense"),  # what an override (name pattern -> encoding) may force
}

#: explained variance kept by a ``Fidelity(max_rank=...)`` alone (no rank, tau or budget)
DEFAULT_TAU = 0.999
#: the error budget of a build given no fidelity at all: each tensor of each model keeps at least
#: 80% of its own deviation from the family centre (``max_delta_error``), and is never off by more
#: than 10% of its norm (``max_error``: the cap that matters when the members share no centre,
#: e.g. models trained from different seeds, or LoRA factors). Evidence (bench/rate_distortion.py,
#: bench/results/rate_distortion.md, 2026-12-06): on the transformer, CNN and MLP families (40
#: fine-tunes + 8 appended) this costs at most 0.21 point of task accuracy, in-domain or held-out,
#: at 7.4-8.1x; 0.3 (the default until then) cost up to 0.58 point on the CNN's held-out members,
#: 0.25 up to 0.42, 0.45 more than one point.
DEFAULT_BUDGET = {"max_delta_error": 0.2, "max_error": 0.1}
#: smallest float tensor given a basis (smaller ones are stored dense): without / with an error budget
MIN_NUMEL = 1024
MIN_NUMEL_UNDER_BUDGET = 32


def _number(name: str, v: Any, *, lo: float, hi: float = math.inf, lo_open: bool = False, example: str) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (lo < v if lo_open else lo <= v) and v <= hi
    if not ok or (isinstance(v, float) and math.isnan(v)):
        raise ConfigError(f"{name} must be a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{']' if hi < math.inf else ')'}, "
                          f"not {v!r} (e.g. {example})")
    return float(v)


def _count(name: str, v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ConfigError(f"{name} must be a non-negative integer, not {v!r}")
    return v


def check_choice(name: str, value: Any) -> None:
    """A clear ConfigError when ``value`` is not one of ``CHOICES[name]``."""
    if value not in CHOICES[name]:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, CHOICES[name]))}; not {value!r}")


@dataclass(frozen=True)
class Fidelity:
    """How close every rebuilt tensor must be to its original: one kind at a time.

    - ``Fidelity(rank=k)``: keep k directions per basis side (no error guarantee);
    - ``Fidelity(tau=t, max_rank=m)``: the fewest directions whose explained variance reaches t;
    - ``Fidelity(max_error=e)`` and/or ``Fidelity(max_delta_error=d)``: an error budget per tensor
      and model (``||W - W_hat|| / ||W||`` <= e, ``||W - W_hat|| / ||W - M||`` <= d); rank, side and
      residual bits are chosen per tensor for the fewest bytes. Under a budget ``rank`` or
      ``tau`` may also be given: they then fix the rank, and the budget picks the residual.

    ``rank`` with ``tau`` is refused (which would win?). ``Fidelity()`` means the default: the
    error budget :data:`DEFAULT_BUDGET` (``max_delta_error=0.2, max_error=0.1``).

    >>> Fidelity(max_delta_error=0.3).kind
    'budget'
    >>> Fidelity(rank=16).kind
    'rank'
    """

    rank: int | None = None
    tau: float | None = None
    max_rank: int | None = None
    max_error: float | None = None
    max_delta_error: float | None = None

    def __post_init__(self) -> None:
        if self.rank is not None:
            _count("rank", self.rank)
        if self.tau is not None:
            _number("tau", self.tau, lo=0.0, hi=1.0, lo_open=True, example="tau=0.99")
        if self.max_rank is not None:
            _count("max_rank", self.max_rank)
        if self.max_error is not None:
            _number("max_error", self.max_error, lo=0.0, example="max_error=1e-3")
        if self.max_delta_error is not None:
            _number("max_delta_error", self.max_delta_error, lo=0.0, example="max_delta_error=0.1")
        if self.rank is not None and self.tau is not None:
            raise ConfigError(f"Fidelity: rank={self.rank} and tau={self.tau} both fix the rank; give one of them")

    @property
    def kind(self) -> str:
        """"budget", "rank", "tau" or "default"."""
        if self.max_error is not None or self.max_delta_error is not None:
            return "budget"
        if self.rank is not None:
            return "rank"
        if self.tau is not None:
            return "tau"
        return "default"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class BuildOptions:
    """How tensors are encoded (everything but the fidelity). Defaults are the library's.

    ``side``: which side(s) of each tensor's matrix view get a shared basis (``auto``: the
    smaller one). ``center``: what deviations are taken from (``auto``: the ``base`` checkpoint
    when one is given, else the family mean). ``residual_bits``: a quantized per-model
    correction (None: none, unless an error budget picks one). ``coefficient_bits``: how the
    per-model coefficients are stored: ``float32``, ``8`` / ``4`` bits per value, or mixed
    precision by direction (``8/4``, ``8/4/2``: more bits for the leading directions); ``auto``:
    float32, except under an error budget, which picks per tensor (format 1.2). ``encodings``:
    name pattern -> encoding overrides. ``min_numel``: smaller float tensors are stored dense (None: 1024, or 32
    under an error budget). ``basis_method``: ``exact`` or ``sketch``. ``mean_dtype``: how means
    are stored. ``lora_mode``: LoRA adapters as a product basis or as factors. ``seed``: the
    sketch's random test matrices. ``allow_nonfinite``: store tensors with NaN/Inf dense instead
    of refusing them.

    >>> BuildOptions(side="left", residual_bits=4).side
    'left'
    """

    side: str = "auto"
    center: str = "auto"
    residual_bits: int | None = None
    coefficient_bits: str = "auto"
    encodings: dict[str, str] = field(default_factory=dict)
    min_numel: int | None = None
    basis_method: str = "exact"
    mean_dtype: str = "auto"
    lora_mode: str = "auto"
    seed: int = 0
    allow_nonfinite: bool = False

    def __post_init__(self) -> None:
        for name in ("side", "center", "basis_method", "mean_dtype", "lora_mode", "coefficient_bits"):
            check_choice(name, getattr(self, name))
        if self.residual_bits not in (None, 0) + CHOICES["residual_bits"]:
            raise ConfigError(f"residual_bits must be one of {', '.join(map(str, CHOICES['residual_bits']))} (or None); "
                              f"not {self.residual_bits!r}")
        if self.min_numel is not None:
            _count("min_numel", self.min_numel)
        for pat, enc in dict(self.encodings).items():
            if enc not in CHOICES["encoding"]:
                raise ConfigError(f"encoding override {pat!r}: {enc!r} is not one of {', '.join(CHOICES['encoding'])}")

    def resolved_center(self, has_base: bool) -> str:
        """The centre actually used: ``auto`` is the base when one is given, else the mean."""
        if self.center == "auto":
            return "base" if has_base else "mean"
        return self.center

    def resolved_min_numel(self, fidelity: Fidelity) -> int:
        if self.min_numel is not None:
            return self.min_numel
        budgeted = fidelity.kind == "budget" or (fidelity.kind == "default" and fidelity.max_rank is None)  # the default is a budget
        return MIN_NUMEL_UNDER_BUDGET if budgeted else MIN_NUMEL


#: keyword arguments convert() still takes one by one (before Fidelity / BuildOptions), and where each goes
LEGACY_FIDELITY = ("rank", "tau", "max_rank", "max_error", "max_delta_error")
LEGACY_OPTIONS = {"mode": "side", "center": "center", "residual_bits": "residual_bits", "coefficient_bits": "coefficient_bits",
                  "encodings": "encodings",
                  "min_numel": "min_numel", "basis": "basis_method", "mean_dtype": "mean_dtype", "lora_mode": "lora_mode",
                  "seed": "seed", "allow_nonfinite": "allow_nonfinite"}


def from_keywords(fidelity: Fidelity | None, options: BuildOptions | None, kw: dict[str, Any]) -> tuple[Fidelity, BuildOptions]:
    """(Fidelity, BuildOptions) from ``convert``'s arguments: the typed objects, or the older
    one-by-one keywords (``rank=``, ``tau=``, ``mode=``, ``basis=`` ...), never both for one object."""
    unknown = sorted(set(kw) - set(LEGACY_FIDELITY) - set(LEGACY_OPTIONS))
    if unknown:
        raise ConfigError(f"convert() got unknown option(s) {', '.join(unknown)}; see help(uwsfmt.convert)")
    fid_kw = {k: kw[k] for k in LEGACY_FIDELITY if kw.get(k) is not None}
    opt_kw = {LEGACY_OPTIONS[k]: v for k, v in kw.items() if k in LEGACY_OPTIONS and v is not None}
    if fidelity is not None and fid_kw:
        raise ConfigError(f"convert(): fidelity= and {', '.join(fid_kw)}= both set the fidelity; put them in the Fidelity")
    if options is not None and opt_kw:
        raise ConfigError(f"convert(): options= and {', '.join(opt_kw)}= both set build options; put them in the BuildOptions")
    if not isinstance(fidelity, (Fidelity, type(None))):
        raise ConfigError(f"convert(): fidelity must be a uwsfmt.Fidelity, not {type(fidelity).__name__}")
    if not isinstance(options, (BuildOptions, type(None))):
        raise ConfigError(f"convert(): options must be a uwsfmt.BuildOptions, not {type(options).__name__}")
    if opt_kw.get("residual_bits") == 0:
        opt_kw["residual_bits"] = None
    return fidelity or Fidelity(**fid_kw), options or BuildOptions(**opt_kw)
