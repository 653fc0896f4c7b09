"""Synthetic families with exact structure: a shared base plus low-rank deltas (+ noise), with their ground truth."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Literal, overload

import torch

from uwsfmt.errors import ConfigError
from uwsfmt.testing.families.common import (
    DEFAULT_SHAPES,
    Entry,
    Family,
    StateDict,
    check_count,
    compute_dtype,
    keyed_generator,
    make_model_id,
    matrix_shape,
    model_ids,
    orthonormal,
)


@dataclass(frozen=True)
class LowRankSpec:
    entries: dict[str, Entry]
    n_models: int
    rank: int
    noise: float
    base_scale: float
    delta_scale: float
    decay: float
    dtype: torch.dtype
    seed: int
    prefix: str = "model"

    def ranks(self, shape: tuple[int, ...]) -> int:
        m, n = matrix_shape(shape)
        return min(self.rank, m, n)

    def sigmas(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Per-direction coefficient std, so a delta's expected RMS entry is delta_scale."""
        m, n = matrix_shape(shape)
        r = self.ranks(shape)
        w = self.decay ** torch.arange(r, dtype=torch.float64)
        return self.delta_scale * torch.sqrt(m * n * w / w.sum())

    def static(self, name: str, entry: Entry) -> dict[str, torch.Tensor]:
        """The parts of a tensor shared by all models (base, bases U and V)."""
        g = keyed_generator(self.seed, "tensor", name)
        cd = compute_dtype(self.dtype)
        if entry.kind == "lowrank":
            m, n = matrix_shape(entry.shape)
            r = self.ranks(entry.shape)
            u = orthonormal(m, r, g)
            v = orthonormal(n, r, g)
            base = torch.randn(m, n, generator=g, dtype=cd) * self.base_scale
            return {"u": u, "v": v, "base": base}
        if entry.kind in ("dense", "shared"):
            return {"base": torch.randn(entry.shape, generator=g, dtype=cd) * self.base_scale}
        return {}

    def coefficients(self, name: str, entry: Entry, index: int) -> torch.Tensor:
        """Model ``index``'s true coefficients (float64, length r) of a low-rank tensor."""
        g = keyed_generator(self.seed, "model", name, index)
        r = self.ranks(entry.shape)
        return torch.randn(r, generator=g, dtype=torch.float64) * self.sigmas(entry.shape)

    def tensor(self, name: str, entry: Entry, index: int, static: dict) -> torch.Tensor:
        cd = compute_dtype(self.dtype)
        if entry.kind == "lowrank":
            g = keyed_generator(self.seed, "model", name, index)
            r = self.ranks(entry.shape)
            # drawn first from the same stream, exactly as coefficients() does
            c = torch.randn(r, generator=g, dtype=torch.float64) * self.sigmas(entry.shape)
            w = static["base"] + ((static["u"] * c) @ static["v"].T).to(cd)
            if self.noise:
                w = w + torch.randn(w.shape, generator=g, dtype=cd) * self.noise
            return w.reshape(entry.shape).to(self.dtype)
        if entry.kind == "dense":
            g = keyed_generator(self.seed, "model", name, index)
            delta = torch.randn(entry.shape, generator=g, dtype=cd) * self.delta_scale
            base = static["base"] * 0.1 if entry.center == 0 else entry.center
            return (base + delta).to(self.dtype)
        if entry.kind == "shared":
            return static["base"].to(self.dtype)
        if entry.kind == "int":
            return torch.arange(math.prod(entry.shape), dtype=torch.int64).reshape(entry.shape)
        if entry.kind == "mask":
            g = keyed_generator(self.seed, "model", name, index)
            return torch.rand(entry.shape, generator=g) < 0.5
        raise AssertionError(entry.kind)

    def models(self) -> Iterator[tuple[str, StateDict]]:
        statics: dict[str, dict] = {}
        for i in range(self.n_models):
            model_id = make_model_id(self.prefix, i, self.n_models)
            sd = {}
            for name, entry in self.entries.items():
                if name not in statics:
                    statics[name] = self.static(name, entry)
                sd[name] = self.tensor(name, entry, i, statics[name])
            yield model_id, sd

    def truth(self) -> FamilyTruth:
        tensors = {}
        for name, entry in self.entries.items():
            if entry.kind != "lowrank":
                continue
            g = keyed_generator(self.seed, "tensor", name)
            m, n = matrix_shape(entry.shape)
            r = self.ranks(entry.shape)
            u = orthonormal(m, r, g)
            v = orthonormal(n, r, g)
            coeffs = torch.stack([self.coefficients(name, entry, i) for i in range(self.n_models)])
            tensors[name] = TensorTruth(
                name=name,
                shape=entry.shape,
                matrix_shape=(m, n),
                left=u,
                right=v,
                coefficients=coeffs,
                noise=float(self.noise),
            )
        return FamilyTruth(
            model_ids=tuple(model_ids(self.prefix, self.n_models)),
            tensors=tensors,
            shared=tuple(n for n, e in self.entries.items() if e.kind in ("shared", "int")),
            dense=tuple(n for n, e in self.entries.items() if e.kind in ("dense", "mask")),
        )


@dataclass(frozen=True)
class TensorTruth:
    """The exact structure of one low-rank tensor of a generated family.

    With ``(m, n) = matrix_shape`` (a conv kernel ``(o, i, h, w)`` is viewed as
    ``(o, i*h*w)``), model ``i``'s tensor is, before casting to the family dtype::

        W_i = B + left @ diag(coefficients[i]) @ right.T + noise * E_i,   E_i iid N(0, 1)

    ``left`` (m, r) and ``right`` (n, r) have orthonormal columns, so the rank-1 directions
    ``left[:, j] right[:, j]^T`` are orthonormal too. With ``D = coefficients - mean over
    models`` (the centred coefficients), for the noise-free part of the centred deltas:

    - flat PCA (each model's delta vectorised, models stacked): singular values are those of
      ``D`` (:meth:`flat_singular_values`); rank :attr:`flat_rank` = ``min(r, n_models - 1)``.
    - left mode (centred deltas side by side, ``m x (n_models*n)``) and right mode: the basis
      is exactly ``left`` (``right``), with singular values the column norms of ``D``
      (:meth:`mode_singular_values`); rank :attr:`mode_rank` = ``r`` (for 2+ models).
    - two-sided (Tucker-2) with ``L = left, R = right``: model i's core is ``diag(D[i])``.

    All tensors are float64. Casting to float32 adds relative errors of about 6e-8 of
    ``|W|``; casting to bfloat16 about 4e-3, which then acts as extra noise.
    """

    name: str
    shape: tuple[int, ...]
    matrix_shape: tuple[int, int]
    left: torch.Tensor
    right: torch.Tensor
    coefficients: torch.Tensor
    noise: float

    @property
    def rank(self) -> int:
        """Number of shared directions r (the requested rank, capped by the matrix shape)."""
        return self.left.shape[1]

    @property
    def n_models(self) -> int:
        return self.coefficients.shape[0]

    @property
    def centred_coefficients(self) -> torch.Tensor:
        return self.coefficients - self.coefficients.mean(dim=0, keepdim=True)

    @property
    def flat_rank(self) -> int:
        """Rank of the vectorised centred deltas: ``min(r, n_models - 1)`` (with noise=0)."""
        return int(torch.linalg.matrix_rank(self.centred_coefficients).item())

    @property
    def mode_rank(self) -> int:
        """Rank of the left (and right) mode unfolding of the centred deltas: r for 2+ models."""
        return int((self.centred_coefficients.norm(dim=0) > 0).sum().item())

    def flat_singular_values(self) -> torch.Tensor:
        """Singular values (descending) of the noise-free vectorised centred deltas.

        Length ``min(n_models, r)``; values beyond :attr:`flat_rank` are exactly 0.
        """
        s = torch.linalg.svdvals(self.centred_coefficients)
        s[self.flat_rank:] = 0.0  # drop round-off of the rank lost to centring
        return s

    def mode_singular_values(self) -> torch.Tensor:
        """Singular values (descending) of the noise-free left/right mode unfolding."""
        return self.centred_coefficients.norm(dim=0).sort(descending=True).values

    @property
    def noise_energy(self) -> float:
        """Expected squared Frobenius norm of the centred noise, summed over models."""
        m, n = self.matrix_shape
        return (self.n_models - 1) * m * n * self.noise**2

    def tail_energy(self, k: int, mode: Literal["flat", "left", "right"] = "flat") -> float:
        """Expected fraction of centred-delta energy outside the true top-k directions.

        ``E||P_perp X||^2 / E||X||^2`` where X are the centred deltas (signal + noise) in the
        given mode and ``P_perp`` removes the k strongest true directions: the relative
        squared error (``err**2``) of projecting onto the true rank-k basis. Exact when
        ``noise == 0``; with noise, a rank-k SVD of the sample itself fits part of the noise
        and gets a lower in-sample error than this.
        Relative Frobenius error of the whole family is ``sqrt(tail_energy(k))``.
        """
        if mode not in ("flat", "left", "right"):
            raise ConfigError(f"mode must be 'flat', 'left' or 'right', got {mode!r}")
        s2 = (self.flat_singular_values() if mode == "flat" else self.mode_singular_values()) ** 2
        m, n = self.matrix_shape
        dim = {"flat": m * n, "left": m, "right": n}[mode]
        k = max(0, min(int(k), dim))
        total = float(s2.sum()) + self.noise_energy
        if total == 0:
            return 0.0
        return (float(s2[k:].sum()) + self.noise_energy * (1 - k / dim)) / total


@dataclass(frozen=True)
class FamilyTruth:
    """Ground truth of a generated family: see :class:`TensorTruth` for the low-rank tensors.

    ``shared`` names tensors bit-identical in every model; ``dense`` names tensors that differ
    per model without low-rank structure (biases, norms, bool masks).
    """

    model_ids: tuple[str, ...]
    tensors: dict[str, TensorTruth]
    shared: tuple[str, ...]
    dense: tuple[str, ...]


def _synthetic_spec(
    n_models: int,
    shapes: Mapping[str, tuple[int, ...]] | None,
    rank: int,
    noise: float,
    base_scale: float,
    delta_scale: float,
    dtype: torch.dtype,
    seed: int,
    extra: bool,
    decay: float,
) -> LowRankSpec:
    check_count("n_models", n_models)
    check_count("rank", rank, 0)
    if not dtype.is_floating_point:
        raise ConfigError(f"dtype must be a floating-point torch dtype, got {dtype}")
    entries: dict[str, Entry] = {}
    for name, shape in (DEFAULT_SHAPES if shapes is None else shapes).items():
        shape = tuple(int(s) for s in shape)
        if len(shape) < 2 or min(shape) < 1:
            raise ConfigError(
                f"shape {shape} of tensor {name!r}: low-rank tensors need 2+ dimensions of "
                f"size >= 1 (a conv kernel is (out, in, h, w)); put 1-D tensors in extra=True"
            )
        entries[name] = Entry("lowrank", shape)
    if extra:
        width = next(iter(entries.values())).shape[-1] if entries else 32
        extras = {
            "blocks.0.attn.qkv.bias": Entry("dense", (3 * width,)),
            "blocks.0.norm1.weight": Entry("dense", (width,), center=1.0),
            "blocks.0.norm1.bias": Entry("dense", (width,)),
            "embed.frozen.weight": Entry("shared", (50, width)),
            "position_ids": Entry("int", (1, 64)),
            "blocks.0.mlp.keep_mask": Entry("mask", (64,)),
        }
        clash = sorted(set(extras) & set(entries))
        if clash:
            raise ConfigError(
                f"shapes uses names reserved for extra tensors: {clash}; rename them or pass "
                f"extra=False"
            )
        entries.update(extras)
    return LowRankSpec(
        entries, n_models, rank, noise, base_scale, delta_scale, decay, dtype, seed
    )


@overload
def synthetic_family(
    n_models: int = ...,
    shapes: Mapping[str, tuple[int, ...]] | None = ...,
    rank: int = ...,
    noise: float = ...,
    base_scale: float = ...,
    delta_scale: float = ...,
    dtype: torch.dtype = ...,
    seed: int = ...,
    extra: bool = ...,
    *,
    decay: float = ...,
    return_truth: Literal[False] = ...,
) -> Family: ...


@overload
def synthetic_family(
    n_models: int = ...,
    shapes: Mapping[str, tuple[int, ...]] | None = ...,
    rank: int = ...,
    noise: float = ...,
    base_scale: float = ...,
    delta_scale: float = ...,
    dtype: torch.dtype = ...,
    seed: int = ...,
    extra: bool = ...,
    *,
    decay: float = ...,
    return_truth: Literal[True],
) -> tuple[Family, FamilyTruth]: ...


def synthetic_family(
    n_models: int = 8,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    rank: int = 4,
    noise: float = 0.0,
    base_scale: float = 1.0,
    delta_scale: float = 0.05,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    extra: bool = True,
    *,
    decay: float = 0.8,
    return_truth: bool = False,
) -> Family | tuple[Family, FamilyTruth]:
    """A family ``{model_id: state_dict}`` with exact shared-base + low-rank-delta structure.

    Every tensor of ``shapes`` (default :data:`DEFAULT_SHAPES`; 2-D, or 4-D conv viewed as
    ``(o, i*h*w)``) is ``W_i = B + U diag(c_i) V^T + noise * E_i`` with a base B of entries
    ``N(0, base_scale**2)``, orthonormal ``U`` (m x r), ``V`` (n x r) shared by all models,
    per-model coefficients ``c_i[j] ~ N(0, s_j**2)`` with ``s_j**2`` proportional to
    ``decay**j`` and scaled so the delta's expected RMS entry is ``delta_scale``, and iid
    noise of std ``noise`` (absolute). ``r = min(rank, m, n)``. With ``noise=0`` the centred,
    vectorised deltas have rank exactly ``min(r, n_models - 1)``, and their left-mode
    unfolding has column space exactly ``span(U)``; see :class:`TensorTruth`.

    With ``extra=True`` the family also holds: per-model biases and norm weights/biases
    (``blocks.0.attn.qkv.bias``, ``blocks.0.norm1.weight``, ``blocks.0.norm1.bias``); a
    tensor bit-identical in every model (``embed.frozen.weight``); an int64 buffer
    (``position_ids``, identical); and a per-model bool mask (``blocks.0.mlp.keep_mask``).

    Model ids are ``model-000``, ``model-001``, ...; models are a prefix-stable function of
    ``seed``. ``return_truth=True`` returns ``(family, truth)`` (see
    :func:`synthetic_family_truth`).

    >>> fam, truth = synthetic_family(n_models=5, rank=3, return_truth=True)
    >>> sorted(fam)[:2], fam["model-000"]["conv.weight"].shape
    (['model-000', 'model-001'], torch.Size([16, 8, 3, 3]))
    >>> truth.tensors["blocks.0.mlp.fc1.weight"].flat_rank
    3
    """
    spec = _synthetic_spec(
        n_models, shapes, rank, noise, base_scale, delta_scale, dtype, seed, extra, decay
    )
    family = dict(spec.models())
    return (family, spec.truth()) if return_truth else family


def synthetic_family_truth(
    n_models: int = 8,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    rank: int = 4,
    noise: float = 0.0,
    base_scale: float = 1.0,
    delta_scale: float = 0.05,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    extra: bool = True,
    *,
    decay: float = 0.8,
) -> FamilyTruth:
    """The ground truth of ``synthetic_family`` called with the same arguments.

    Cheap: it never materialises the models. For each low-rank tensor a
    :class:`TensorTruth` gives the true bases ``left``/``right``, per-model ``coefficients``,
    ranks (``flat_rank``, ``mode_rank``), noise-free spectra of the centred deltas and
    ``tail_energy(k, mode)``: the expected relative squared error of keeping k directions.

    >>> t = synthetic_family_truth(n_models=3, rank=4).tensors["conv.weight"]
    >>> t.matrix_shape, t.rank, t.flat_rank, t.mode_rank, t.tail_energy(2)
    ((16, 72), 4, 2, 4, 0.0)
    """
    return _synthetic_spec(
        n_models, shapes, rank, noise, base_scale, delta_scale, dtype, seed, extra, decay
    ).truth()
