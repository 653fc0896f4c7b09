"""The honest alternatives to a UWS store, measured the same way: bytes and reconstructions.

Every baseline takes a family's ``members`` (``{model_id: state_dict}``, what a store is built
from) and its ``held_out`` models (added afterwards), and returns a :class:`Result`: the bytes
it needs for all of them and each one's reconstructed state dict. A baseline that codes deltas
fits its shared part (the family mean) on the members only and codes each held-out model
against it, which is what appending means for it. Shared rules, so that only the method differs:

- a tensor bit-identical in every member is stored once (any container can do that); a
  held-out model whose copy differs stores its own, raw;
- "matrices" are float tensors with 2+ dimensions (viewed as first axis x the rest);
  everything else (biases, norms, integer buffers) is stored as-is per model;
- the family mean is stored once in float32; bytes count values only (codes, scales, means;
  no container, header or index), which favours the baselines over the store, whose bytes are
  its size on disk, metadata included.

Methods (see each function): mean + int8 / int4 / 2-bit deltas with per-row scales
(:func:`delta_quant`); BitDelta, 1 bit + one scale per matrix (:func:`bitdelta`); a
Delta-CoMe-style mixed-precision SVD of each delta (:func:`delta_svd`); zstd of each model's
safetensors file (:func:`zstd_safetensors`) and a ZipNN-style lossless byte-grouping coder
(:func:`byte_grouped_zstd`). The pure rank-k subspace of the paper is a UWS store built with
``rank=k`` (no residual), measured by ``bench/rate_distortion.py`` like our own stores.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import save

StateDict = dict[str, torch.Tensor]
Family = dict[str, StateDict]

#: clipping ratios tried per group by the quantizer at 4 bits and below (the best, by squared error)
CLIPS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)


@dataclass
class Result:
    """What one baseline needs for a family, and what it gives back."""

    method: str
    bytes: int  # members and held-out models together
    models: Family  # every member's and held-out model's reconstruction (original dtypes)
    note: str = ""
    lossless: bool = False


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _matrix(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.dim() >= 2


class Layout:
    """Which tensors a delta coder shares, codes, or keeps per model; fitted on the members."""

    def __init__(self, members: Family):
        first = next(iter(members.values()))
        ids = list(members)
        self.once = {n: first[n] for n in first
                     if len(ids) > 1 and all(torch.equal(members[i][n], first[n]) for i in ids[1:])}
        self.matrices = [n for n in first if n not in self.once and _matrix(first[n])]
        self.rest = [n for n in first if n not in self.once and n not in self.matrices]
        self.means = {n: torch.stack([sd[n].to(torch.float64) for sd in members.values()]).mean(0).to(torch.float32)
                      for n in self.matrices}

    def shared_bytes(self) -> int:
        """The tensors stored once and the float32 means."""
        return sum(map(_nbytes, self.once.values())) + sum(map(_nbytes, self.means.values()))

    def uncoded(self, sd: Mapping[str, torch.Tensor]) -> tuple[StateDict, int]:
        """One model's tensors that are not coded against the mean, and the bytes they add."""
        out, nbytes = {}, 0
        for n, v in self.once.items():
            out[n] = sd[n].clone()
            if not torch.equal(sd[n], v):  # a held-out model that changed a member-wide constant
                nbytes += _nbytes(sd[n])
        for n in self.rest:
            out[n] = sd[n].clone()
            nbytes += _nbytes(sd[n])
        return out, nbytes


def _code_deltas(members: Family, held_out: Family | None, code) -> tuple[Family, int]:
    """Every model's matrices as ``mean + code(delta)``; ``code(delta_2d) -> (decoded, bytes)``."""
    layout = Layout(members)
    nbytes = layout.shared_bytes()
    out: Family = {}
    for mid, sd in {**members, **(held_out or {})}.items():
        rec, b = layout.uncoded(sd)
        nbytes += b
        for n in layout.matrices:
            w = sd[n]
            mean = layout.means[n]
            back, b = code((w.to(torch.float32) - mean).reshape(w.shape[0], -1))
            rec[n] = (mean + back.reshape(w.shape)).to(w.dtype)
            nbytes += b
        out[mid] = rec
    return out, nbytes


def quantize_rows(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, int]:
    """Symmetric uniform quantization of each row of ``x`` (2-D), one float32 scale per row:
    (dequantized, bytes of codes + scales).

    3+ bits: ``2^(bits-1) - 1`` levels each side of an exact zero; 1-2 bits: all ``2^bits``
    levels, none at zero (``+-0.5, +-1.5`` times the scale at 2 bits). At 8 bits the scale is the
    row's absmax; at 4 bits and below, the clipping ratio of :data:`CLIPS` with the least
    squared error, per row (absmax is far from the best there).

    >>> back, nbytes = quantize_rows(torch.tensor([[1.0, -0.5, 0.25, 0.0]]), 8)
    >>> nbytes, round(float((back - torch.tensor([[1.0, -0.5, 0.25, 0.0]])).abs().max()), 3)
    (8, 0.004)
    """
    x = x.to(torch.float32)
    amax = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
    top = 2 ** (bits - 1) - (0.5 if bits <= 2 else 1.0)  # the largest level, in scale units
    best, best_err = None, None
    for c in CLIPS if bits <= 4 else (1.0,):
        s = c * amax / top
        if bits <= 2:
            back = (torch.floor(x / s).clamp(-top - 0.5, top - 0.5) + 0.5) * s
        else:
            back = torch.round(x / s).clamp(-top, top) * s
        err = (back - x).pow(2).sum(dim=1, keepdim=True)
        if best is None:
            best, best_err = back, err
        else:
            better = err < best_err
            best = torch.where(better, back, best)
            best_err = torch.minimum(err, best_err)
    return best, (x.numel() * bits + 7) // 8 + 4 * x.shape[0]


def quantize_groups(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, int]:
    """:func:`quantize_rows` along the axis that needs fewer scales: per row, or per column of a
    matrix taller than wide (LoRA ``B`` factors: 8 values a row would pay a scale per 8 values)."""
    if x.shape[0] > x.shape[1]:
        back, nbytes = quantize_rows(x.T, bits)
        return back.T, nbytes
    return quantize_rows(x, bits)


def delta_quant(members: Family, held_out: Family | None = None, bits: int = 8) -> Result:
    """Family mean (float32) + each model's delta quantized to ``bits`` (:func:`quantize_groups`)."""
    out, nbytes = _code_deltas(members, held_out, lambda d: quantize_groups(d, bits))
    clip = "absmax" if bits > 4 else "best clip"
    return Result(f"mean + {bits}-bit deltas (per-row scales, {clip})", nbytes, out)


def bitdelta(members: Family, held_out: Family | None = None) -> Result:
    """BitDelta: family mean + sign(delta) * one scale per matrix (mean |delta|): 1 bit per weight.

    The scale is BitDelta's initialisation, without its scale distillation (which needs
    training data)."""
    def code(d: torch.Tensor) -> tuple[torch.Tensor, int]:
        return torch.sign(d) * d.abs().mean(), (d.numel() + 7) // 8 + 4

    out, nbytes = _code_deltas(members, held_out, code)
    return Result("BitDelta (1 bit + scale per matrix)", nbytes, out)


#: Delta-CoMe's tiers: (bits, share of the matrix's byte budget); 2 bits take what is left
SVD_TIERS = ((8, 0.05), (3, 0.20), (2, 1.0))


def svd_plan(m: int, n: int, bits_per_weight: float) -> list[tuple[int, int]]:
    """Delta-CoMe-style allocation for an ``m x n`` delta: ``[(bits, directions), ...]`` in order of
    decreasing singular value, within ``bits_per_weight * m * n`` bits: the first directions with 8
    bits (5% of the budget, at least one), the next with 3 (20%), then 2 bits for as many as the
    rest of the budget pays for, the others dropped. A direction costs its U and V columns' codes
    and two float32 scales. (Delta-CoMe on 7B models: 2 directions at 8 bits, 32 at 3, the rest
    of a 1-bit budget at 2: most of the budget in 2-bit directions, as here.)

    >>> svd_plan(64, 64, 1.0)
    [(8, 1), (3, 1), (2, 8)]
    """
    budget = bits_per_weight * m * n / 8
    plan, used, left = [], 0.0, min(m, n)
    for bits, share in SVD_TIERS:
        cost = (m + n) * bits / 8 + 8
        k = min(left, int((min(share * budget, budget - used)) // cost))
        if bits == 8 and k == 0 and cost <= budget:
            k = 1
        if k > 0:
            plan.append((bits, k))
            used += k * cost
            left -= k
    return plan


def delta_svd(members: Family, held_out: Family | None = None, bits_per_weight: float = 1.0) -> Result:
    """Delta-CoMe-style mixed-precision low rank: per model and matrix, the SVD of the delta from
    the family mean, its top singular directions quantized with 8 bits, the next with 3, then 2
    (:func:`svd_plan`), the rest dropped. Each direction stores its U and V columns' codes and one
    float32 scale for each (the singular value folded into one of them). Rounding to the nearest
    level (Delta-CoMe uses GPTQ, which needs calibration data)."""
    def code(d: torch.Tensor) -> tuple[torch.Tensor, int]:
        u, s, vh = torch.linalg.svd(d.to(torch.float64), full_matrices=False)
        back = torch.zeros_like(d, dtype=torch.float64)
        nbytes, start = 0, 0
        for bits, k in svd_plan(*d.shape, bits_per_weight):
            cols = slice(start, start + k)
            uq, bu = quantize_rows((u[:, cols] * s[cols]).T, bits)
            vq, bv = quantize_rows(vh[cols], bits)
            back += uq.T.to(torch.float64) @ vq.to(torch.float64)
            nbytes += bu + bv
            start += k
        return back.to(torch.float32), nbytes

    out, nbytes = _code_deltas(members, held_out, code)
    return Result(f"Delta-CoMe-style SVD 8/3/2-bit ({bits_per_weight:g} bit/weight)", nbytes, out)


def zstd_bytes(data: bytes, level: int) -> int:
    try:
        import zstandard

        return len(zstandard.ZstdCompressor(level=level).compress(data))
    except ImportError:  # numcodecs ships with zarr
        from numcodecs import Zstd

        return len(Zstd(level=level).encode(data))


def safetensors_file(sd: Mapping[str, torch.Tensor]) -> bytes:
    return save({k: v.contiguous() for k, v in sd.items()})


def safetensors_bytes(models: Family) -> int:
    """Bytes of every model as its own safetensors file."""
    return sum(len(safetensors_file(sd)) for sd in models.values())


def _copies(members: Family, held_out: Family | None) -> Family:
    return {m: dict(sd) for m, sd in {**members, **(held_out or {})}.items()}


def zstd_safetensors(members: Family, held_out: Family | None = None, level: int = 19) -> Result:
    """Each model's safetensors file compressed with zstd (lossless)."""
    models = _copies(members, held_out)
    total = sum(zstd_bytes(safetensors_file(sd), level) for sd in models.values())
    return Result(f"zstd-{level} of safetensors", total, models, lossless=True)


def byte_planes(sd: Mapping[str, torch.Tensor]) -> list[bytes]:
    """ZipNN's byte grouping of one model: for each float dtype, the k-th byte of every value of
    every tensor of that dtype as one stream (sign + exponent bytes apart from mantissa bytes);
    the other tensors' raw bytes as one more stream."""
    streams: list[bytes] = []
    by_dtype: dict[torch.dtype, list[np.ndarray]] = {}
    other = []
    for t in sd.values():
        raw = t.contiguous().view(torch.uint8).reshape(-1).numpy() if t.numel() else np.zeros(0, np.uint8)
        (by_dtype.setdefault(t.dtype, []) if t.is_floating_point() else other).append(raw)
    for dtype, parts in by_dtype.items():
        width = torch.empty(0, dtype=dtype).element_size()
        values = np.concatenate(parts).reshape(-1, width)
        streams += [values[:, k].tobytes() for k in range(width)]
    if other:
        streams.append(np.concatenate(other).tobytes())
    return streams


def byte_grouped_zstd(members: Family, held_out: Family | None = None, level: int = 19) -> Result:
    """ZipNN-style lossless coding: each model's :func:`byte_planes`, each compressed with zstd
    (or kept raw where that is smaller), plus its safetensors header raw. ZipNN itself uses
    Huffman coding of the exponent bytes; zstd of the grouped streams compresses like it."""
    models = _copies(members, held_out)
    total = 0
    for sd in models.values():
        header = 8 + int.from_bytes(safetensors_file(sd)[:8], "little")
        total += header + sum(min(len(s), zstd_bytes(s, level)) for s in byte_planes(sd))
    return Result(f"byte-grouped zstd-{level} (ZipNN-style)", total, models, lossless=True)


def relative_errors(models: Family, rec: Family) -> np.ndarray:
    """(models, float tensors) relative Frobenius errors."""
    rows = []
    for mid, sd in models.items():
        row = []
        for n, w in sd.items():
            if not w.is_floating_point():
                continue
            w64, r64 = w.to(torch.float64), rec[mid][n].to(torch.float64)
            wn = float(w64.norm())
            row.append(float((r64 - w64).norm()) / wn if wn > 0 else float((r64 - w64).norm()))
        rows.append(row)
    return np.asarray(rows)


#: the baselines every family gets (the rank-k subspace is a store, added by the benchmark)
ALL = {
    "int8": lambda m, h: delta_quant(m, h, 8),
    "int4": lambda m, h: delta_quant(m, h, 4),
    "int2": lambda m, h: delta_quant(m, h, 2),
    "bitdelta": bitdelta,
    "svd1": lambda m, h: delta_svd(m, h, 1.0),
    "svd2": lambda m, h: delta_svd(m, h, 2.0),
    "zstd": zstd_safetensors,
    "zipnn": byte_grouped_zstd,
}
