"""Per-row quantization of residuals: 1-bit signs, 2/4/8-bit codes with float32 row scales, bit packing."""

from __future__ import annotations

import torch

RESIDUAL_BITS = (1, 2, 4, 8, 16)


def qmax(bits: int) -> int:
    """Largest code magnitude of a symmetric ``bits``-bit quantizer (2 -> 1, 4 -> 7, 8 -> 127)."""
    return (1 << (bits - 1)) - 1


#: clip factors tried per row (scale = c * max|row| / qmax); the decoder only sees the scale
CLIPS = {2: (1.0, 0.7, 0.5, 0.38), 4: (1.0, 0.85, 0.7), 8: (1.0,)}


def row_codes(r: torch.Tensor, bits: int, *, search: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed integer codes q (float32, m x n) and float32 row scales s of :func:`quantize_rows`;
    the dequantized matrix is ``q * s[:, None]``. 1 bit: q = +-1 (the sign bit, so -0.0 gives -1),
    s = mean|row|."""
    r = r.to(torch.float32)
    if bits == 1:  # s = mean|row| minimises the squared error of sign codes (BitDelta, per row)
        # copysign, not where(r >= 0, 1, -1): the same codes but for -0.0, 12x faster on the CPU
        # (torch.where over a full matrix: 4.5 ms against 0.38 ms for 768 x 3072)
        return torch.copysign(torch.ones_like(r), r), r.abs().mean(dim=1)
    q = qmax(bits)
    amax = r.abs().amax(dim=1)
    scales = amax / q
    if search and len(CLIPS[bits]) > 1:
        best = None
        buf = torch.empty_like(r)  # one scratch matrix for every clip (a 4096 x 4096 residual: 2x faster than fresh ones)
        for c in CLIPS[bits]:
            s = amax * (c / q)
            safe = torch.where(s > 0, s, torch.ones_like(s))[:, None]
            torch.div(r, safe, out=buf).round_().clamp_(-q, q).mul_(safe).sub_(r)
            err = torch.linalg.vector_norm(buf, dim=1)  # per-row error norm: ranks the clips as its square does
            if best is None:
                best, scales = err, s
            else:
                better = err < best
                best = torch.where(better, err, best)
                scales = torch.where(better, s, scales)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    return torch.round(r / safe[:, None]).clamp_(-q, q), scales


def quantize_rows(r: torch.Tensor, bits: int, *, search: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization of a matrix: (packed uint8 codes, float32 row scales).

    Row scale s = c * max|row| / qmax; q = round(x / s) in [-qmax, qmax]; code = q + 2^(bits-1),
    packed little-endian within each byte, elements in row-major order. ``search`` picks, per
    row, the clip factor c in :data:`CLIPS` with the smallest squared error (clipping a few
    outliers buys a finer step for all other values; at 2 bits it about halves the error of
    c = 1); ``search=False`` is plain absmax (c = 1). Decoding is the same either way. 1 bit:
    the sign, code 1 -> +s, 0 -> -s, with s = mean|row|.

    >>> codes, scales = quantize_rows(torch.tensor([[127.0, -64.0]]), 8)
    >>> dequantize_rows(codes, scales, (1, 2), 8)
    tensor([[127., -64.]])
    """
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"quantize_rows supports 1, 2, 4 or 8 bits, not {bits}")
    q, scales = row_codes(r, bits, search=search)
    codes = (q > 0) if bits == 1 else q.to(torch.int16) + (1 << (bits - 1))
    return pack_bits(codes.reshape(-1).to(torch.uint8), bits), scales


def fake_quantize_rows(r: torch.Tensor, bits: int) -> torch.Tensor:
    """``dequantize_rows(*quantize_rows(r, bits), r.shape, bits)`` without packing (bit-identical)."""
    q, scales = row_codes(r, bits)
    return q.mul_(scales[:, None])


_LUTS: dict[tuple[int, torch.device], torch.Tensor] = {}


def code_table(bits: int, device: torch.device) -> torch.Tensor:
    """(256, 8 // bits) float32: the signed values q of the codes packed in each byte value
    (first element in the low bits), so that decoding a packed row is one table lookup."""
    key = (bits, device)
    if key not in _LUTS:
        per = 8 // bits
        b = torch.arange(256, dtype=torch.int32)[:, None]
        v = ((b >> (torch.arange(per, dtype=torch.int32) * bits)) & ((1 << bits) - 1)).to(torch.float32)
        _LUTS[key] = (2.0 * v - 1.0 if bits == 1 else v - (1 << (bits - 1))).to(device)
    return _LUTS[key]


def dequantize_rows(codes: torch.Tensor, scales: torch.Tensor, shape: tuple[int, int], bits: int) -> torch.Tensor:
    """Inverse of :func:`quantize_rows` (float32 result): q * scale, one float32 rounding."""
    m, n = shape
    if bits == 8:
        q = codes[: m * n].to(torch.float32).sub_(128.0)
    else:  # a lookup per byte: the codes' values, unpacked and offset at once
        q = torch.nn.functional.embedding(codes.to(torch.int32), code_table(bits, codes.device)).reshape(-1)[: m * n]
    return q.reshape(m, n).mul_(scales.to(torch.float32)[:, None])


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 values < 2^bits, ``8 // bits`` per byte, first element in the low bits."""
    if bits == 8:
        return values.contiguous()
    per = 8 // bits
    pad = (-values.numel()) % per
    if pad:
        values = torch.cat([values, values.new_zeros(pad)])
    v = values.reshape(-1, per).to(torch.int32)
    shifts = torch.arange(per, device=v.device, dtype=torch.int32) * bits
    return (v << shifts).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` values."""
    if bits == 8:
        return packed[:count]
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    v = (packed.to(torch.int32)[:, None] >> shifts) & ((1 << bits) - 1)
    return v.reshape(-1)[:count].to(torch.uint8)


def scale_axis(m: int, n: int, bits: int) -> int:
    """Which axis of an (m, n) view a residual's scales run along: 1 (one scale per column,
    format 1.3) where the view is at least twice as tall as wide, so that it needs at most half
    as many scales (a LoRA ``B`` factor, out x 8, would otherwise pay a float32 scale per 8
    values: as many bytes as its 4-bit codes); else 0 (per row). Nearly square views keep per-row
    scales: there the scales cost a few percent either way, and fewer of them quantize a little
    more coarsely.

    >>> scale_axis(192, 8, 4), scale_axis(8, 192, 4), scale_axis(256, 192, 4), scale_axis(192, 8, 16)
    (1, 0, 0, 0)
    """
    return 1 if bits != 16 and m >= 2 * n else 0


def quantize_view(r: torch.Tensor, bits: int, axis: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_rows` of ``r`` (axis 0) or of ``r.T`` (axis 1: per-column scales, codes
    in row-major order of the transpose)."""
    return quantize_rows(r.T.contiguous() if axis else r, bits)


def dequantize_view(codes: torch.Tensor, scales: torch.Tensor, shape: tuple[int, int], bits: int,
                    axis: int = 0) -> torch.Tensor:
    """Inverse of :func:`quantize_view`: the (m, n) float32 matrix (a transposed view for axis 1)."""
    m, n = shape
    if axis:
        return dequantize_rows(codes, scales, (n, m), bits).T
    return dequantize_rows(codes, scales, (m, n), bits)


def residual_nbytes(m: int, n: int, bits: int) -> int:
    """Bytes one model's residual of an (m, n) view takes (codes + scales, along
    :func:`scale_axis`)."""
    if bits == 16:
        return m * n * 2
    return (m * n * bits + 7) // 8 + 4 * (n if scale_axis(m, n, bits) else m)
