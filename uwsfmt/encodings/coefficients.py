"""Coefficients of a subspace tensor: float32 (format 1.0), or quantized per direction (1.2).

A quantized coefficient slot (spec section 6.3.1) holds the codes of C, one symmetric per-row
quantizer per *direction* (a row of C when the directions are its rows, ``axis`` 0: left, both
and flat modes; a column when they are its columns, ``axis`` 1: right mode), with a bit width per
run of directions: the leading directions, which carry most of the energy, get more bits than the
tail (Delta-CoMe-style mixed precision). Each run is packed like a residual (section 6.4) and
starts at a byte boundary; the scales, one float32 per direction, sit in a second slot.

>>> c = torch.tensor([[4.0, -2.0, 1.0], [0.5, 0.25, -0.5]])
>>> spec = plan(PackLayout(), c.shape, "8/4")
>>> spec["bits"], spec["axis"]
([[1, 8], [1, 4]], 0)
>>> values, back = encode(spec, c)
>>> float((back - c).abs().max()) < 0.05
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from uwsfmt.encodings.slots import PackLayout, put, take
from uwsfmt.errors import FormatError
from uwsfmt.numerics import quantize

#: coefficient storage a build may choose: "float32" (format 1.0); "8" / "4": that many bits for
#: every direction; "8/4" and "8/4/2": mixed precision by direction (see :func:`runs`)
SCHEMES: tuple[str, ...] = ("float32", "8", "8/4", "4", "8/4/2")
#: bit widths a run may use (those of the per-row quantizer, section 6.4)
RUN_BITS = (1, 2, 4, 8)


def runs(scheme: str, k: int) -> list[list[int]]:
    """The ``[count, bits]`` runs of ``scheme`` over ``k`` directions (leading ones first).

    "8/4": a quarter of the directions (at least one) in 8 bits, the rest in 4; "8/4/2": an
    eighth in 8 bits, the next three eighths in 4, the rest in 2.

    >>> runs("8/4/2", 16), runs("8/4", 3), runs("4", 5)
    ([[2, 8], [6, 4], [8, 2]], [[1, 8], [2, 4]], [[5, 4]])
    """
    if scheme in ("8", "4", "2"):
        return [[k, int(scheme)]] if k else []
    if scheme == "8/4":
        a = min(k, max(1, math.ceil(k / 4)))
        out = [[a, 8], [k - a, 4]]
    elif scheme == "8/4/2":
        a = min(k, max(1, math.ceil(k / 8)))
        b = min(k - a, math.ceil(3 * k / 8))
        out = [[a, 8], [b, 4], [k - a - b, 2]]
    else:
        raise ValueError(f"unknown coefficient scheme {scheme!r}; one of {SCHEMES}")
    return [r for r in out if r[0] > 0]


def axis_for(mode: str) -> int:
    """Which axis of C runs over the directions: its rows (0) except in right mode (columns)."""
    return 1 if mode == "right" else 0


def quantizable(mode: str, shape: Sequence[int]) -> bool:
    """Whether quantized coefficients can pay: not flat mode (one value per direction, a scale
    each), not rank 0 (no coefficients)."""
    return mode != "flat" and min(shape) > 0


def run_nbytes(count: int, length: int, bits: int) -> int:
    return (count * length * bits + 7) // 8


def nbytes(shape: Sequence[int], mode: str, scheme: str) -> int:
    """Bytes one model's coefficients of ``shape`` take under ``scheme`` (codes and scales)."""
    r, c = int(shape[0]), int(shape[1])
    if scheme == "float32" or not quantizable(mode, shape):
        return 4 * r * c
    k, length = (r, c) if axis_for(mode) == 0 else (c, r)
    return sum(run_nbytes(n, length, b) for n, b in runs(scheme, k)) + 4 * k


def plan(layout: PackLayout, shape: Sequence[int], scheme: str, mode: str = "left") -> dict:
    """The ``coefficients`` record of a tensor whose C has ``shape``: a float32 slot, or (a
    scheme) the uint8 codes slot with ``bits``, ``axis`` and the float32 ``scales`` slot."""
    r, c = int(shape[0]), int(shape[1])
    if scheme == "float32" or not quantizable(mode, shape):
        return layout.add("float32", r * c, shape=[r, c])
    axis = axis_for(mode)
    k, length = (r, c) if axis == 0 else (c, r)
    bits = runs(scheme, k)
    total = sum(run_nbytes(n, length, b) for n, b in bits)
    return layout.add("uint8", total, shape=[r, c], bits=bits, axis=axis, scales=layout.add("float32", k))


def quantized(spec: dict) -> bool:
    return "bits" in spec


def _directions(spec: dict, c: torch.Tensor) -> torch.Tensor:
    return c if spec["axis"] == 0 else c.transpose(0, 1)


def fake(c: torch.Tensor, mode: str, scheme: str) -> torch.Tensor:
    """``c`` as a reader decodes it under ``scheme`` (float32), without packing: what the
    error sweep of an error budget measures."""
    if scheme == "float32" or not quantizable(mode, c.shape):
        return c
    d = c.to(torch.float32)
    d = d if axis_for(mode) == 0 else d.transpose(0, 1)
    parts, at = [], 0
    for count, bits in runs(scheme, d.shape[0]):
        parts.append(quantize.fake_quantize_rows(d[at: at + count], bits))
        at += count
    out = torch.cat(parts) if len(parts) > 1 else parts[0]
    return out if axis_for(mode) == 0 else out.transpose(0, 1).contiguous()


def encode(spec: dict, c: torch.Tensor) -> tuple[dict[str, np.ndarray], torch.Tensor]:
    """Quantize ``c`` by ``spec``: (codes and scales as pack values, C as a reader decodes it)."""
    d = _directions(spec, c.to(torch.float32))
    codes, scales, parts, at = [], [], [], 0
    for count, bits in spec["bits"]:
        block = d[at: at + count]
        cd, sc = quantize.quantize_rows(block, bits)
        codes.append(cd.cpu())
        scales.append(sc.cpu())
        parts.append(quantize.dequantize_rows(cd, sc, (count, block.shape[1]), bits).to(c.device))
        at += count
    back = torch.cat(parts) if len(parts) > 1 else parts[0]
    back = back if spec["axis"] == 0 else back.transpose(0, 1).contiguous()
    return {"codes": torch.cat(codes).numpy(), "scales": torch.cat(scales).numpy()}, back


def write(spec: dict, values: dict[str, np.ndarray], rows: dict[str, np.ndarray]) -> None:
    put(rows, spec, values["codes"])
    put(rows, spec["scales"], values["scales"])


def check(spec: dict, where: str) -> None:
    """A clear FormatError when a quantized record does not add up (spec section 6.3.1)."""
    r, c = spec["shape"]
    axis = spec.get("axis")
    if axis not in (0, 1):
        raise FormatError(f"{where}: coefficient axis {axis!r} is not 0 or 1")
    k, length = (r, c) if axis == 0 else (c, r)
    bits = spec["bits"]
    if (not isinstance(bits, list) or not all(isinstance(x, list) and len(x) == 2 for x in bits)
            or any(b not in RUN_BITS or n < 0 for n, b in bits) or sum(n for n, _ in bits) != k):
        raise FormatError(f"{where}: coefficient runs {bits!r} must be [count, bits] pairs with bits in {RUN_BITS} "
                          f"whose counts add up to {k} directions")
    if spec["pack"] != "uint8" or spec["length"] != sum(run_nbytes(n, length, b) for n, b in bits):
        raise FormatError(f"{where}: quantized coefficients must fill a uint8 slot of the runs' bytes")
    sc = spec.get("scales")
    if not isinstance(sc, dict) or sc.get("pack") != "float32" or sc.get("length") != k:
        raise FormatError(f"{where}: quantized coefficients need a float32 scales slot of {k} values")


def decode(spec: dict, rows: dict[str, torch.Tensor]) -> torch.Tensor:
    """C (float32, ``spec["shape"]``) from a model's pack rows."""
    r, c = spec["shape"]
    if not quantized(spec):
        return take(rows, spec).reshape(r, c)
    k, length = (r, c) if spec["axis"] == 0 else (c, r)
    codes, scales = take(rows, spec), take(rows, spec["scales"])
    parts, at, byte = [], 0, 0
    for count, bits in spec["bits"]:
        nb = run_nbytes(count, length, bits)
        parts.append(quantize.dequantize_rows(codes[byte: byte + nb], scales[at: at + count], (count, length), bits))
        at, byte = at + count, byte + nb
    out = torch.cat(parts) if len(parts) > 1 else parts[0] if parts else torch.zeros(k, length)
    return out if spec["axis"] == 0 else out.transpose(0, 1)


def slots(spec: dict) -> list[dict]:
    """The slots the record occupies (codes and scales, or the float32 values)."""
    return [spec, spec["scales"]] if quantized(spec) else [spec]


def describe(scheme: str) -> str:
    """ "float32" or e.g. "int8/4" (the coefficients' storage in reports)."""
    return scheme if scheme == "float32" else f"int{scheme}"
