"""The honest alternatives to a UWS store, measured the same way: bytes and reconstructions.

Every baseline gets a family ``{model_id: state_dict}`` and returns a :class:`Result`: the
bytes it needs for the whole family and each model's reconstructed state dict. Shared rules, so
that only the method differs:

- a tensor bit-identical in every model is stored once (any container can do that);
- "matrices" are float tensors with 2+ dimensions (viewed as first axis x the rest);
  everything else (biases, norms, integer buffers) is stored as-is per model;
- the family mean is stored once in float32; bytes count values only (no container
  overhead), which favours the baselines over the store, whose bytes are its size on disk.

Methods: plain delta quantization against the family mean (int8 / int4, symmetric, absmax
per-row scales); BitDelta (1-bit sign of the delta with one scale per matrix, the mean
absolute delta: BitDelta's initialisation, without its scale distillation, which needs training
data); lossless zstd of each model's safetensors file; and the pure rank-k subspace of the
paper (a UWS store with ``rank=k`` and no residual).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import save

Family = dict[str, dict[str, torch.Tensor]]


@dataclass
class Result:
    method: str
    bytes: int
    models: Family  # reconstructed state dicts (original dtypes)
    note: str = ""


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _identical(fam: Family, name: str) -> bool:
    ids = list(fam)
    first = fam[ids[0]][name]
    return all(torch.equal(fam[i][name], first) for i in ids[1:])


def _matrix(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.dim() >= 2


def _split(fam: Family):
    """(names stored once, matrix names, names stored per model)."""
    names = list(next(iter(fam.values())))
    once = [n for n in names if len(fam) > 1 and _identical(fam, n)]
    mats = [n for n in names if n not in once and _matrix(fam[next(iter(fam))][n])]
    rest = [n for n in names if n not in once and n not in mats]
    return once, mats, rest


def _mean(fam: Family, name: str) -> torch.Tensor:
    return torch.stack([sd[name].to(torch.float64) for sd in fam.values()]).mean(0).to(torch.float32)


def quantize_rows(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, int]:
    """Plain symmetric absmax quantization with one float32 scale per row: (dequantized, bytes)."""
    m = x.shape[0]
    x2 = x.reshape(m, -1).to(torch.float32)
    q = (1 << (bits - 1)) - 1
    s = x2.abs().amax(dim=1, keepdim=True) / q
    s = torch.where(s > 0, s, torch.ones_like(s))
    back = torch.round(x2 / s).clamp(-q, q) * s
    return back.reshape(x.shape), (x2.numel() * bits + 7) // 8 + 4 * m


def _assemble(fam: Family, once, rest) -> tuple[Family, int]:
    first = next(iter(fam.values()))
    nbytes = sum(_nbytes(first[n]) for n in once)
    out: Family = {}
    for mid, sd in fam.items():
        rec = {n: sd[n].clone() for n in once}
        for n in rest:
            rec[n] = sd[n].clone()
            nbytes += _nbytes(sd[n])
        out[mid] = rec
    return out, nbytes


def delta_quant(fam: Family, bits: int) -> Result:
    """Family mean (float32) + per-model delta, quantized to ``bits`` with per-row scales."""
    once, mats, rest = _split(fam)
    out, nbytes = _assemble(fam, once, rest)
    for n in mats:
        mean = _mean(fam, n)
        nbytes += _nbytes(mean)
        for mid, sd in fam.items():
            back, b = quantize_rows(sd[n].to(torch.float32) - mean, bits)
            out[mid][n] = (mean + back).to(sd[n].dtype)
            nbytes += b
    return Result(f"delta int{bits} (per-row absmax)", nbytes, out)


def bitdelta(fam: Family) -> Result:
    """Family mean + sign(delta) * one scale per matrix (mean |delta|): 1 bit per weight."""
    once, mats, rest = _split(fam)
    out, nbytes = _assemble(fam, once, rest)
    for n in mats:
        mean = _mean(fam, n)
        nbytes += _nbytes(mean)
        for mid, sd in fam.items():
            d = sd[n].to(torch.float32) - mean
            scale = d.abs().mean()
            out[mid][n] = (mean + torch.sign(d) * scale).to(sd[n].dtype)
            nbytes += (d.numel() + 7) // 8 + 4
    return Result("BitDelta (1-bit, scale per matrix)", nbytes, out)


def zstd_bytes(data: bytes, level: int) -> int:
    try:
        import zstandard

        return len(zstandard.ZstdCompressor(level=level).compress(data))
    except ImportError:  # numcodecs ships with zarr
        from numcodecs import Zstd

        return len(Zstd(level=level).encode(data))


def zstd_safetensors(fam: Family, level: int = 19) -> Result:
    """Each model's safetensors file compressed with zstd (lossless)."""
    total = sum(zstd_bytes(save({k: v.contiguous() for k, v in sd.items()}), level) for sd in fam.values())
    return Result(f"zstd-{level} of safetensors (lossless)", total, {m: dict(sd) for m, sd in fam.items()})


def safetensors_bytes(fam: Family) -> int:
    return sum(len(save({k: v.contiguous() for k, v in sd.items()})) for sd in fam.values())


def uws_store(fam: Family, workdir: str | None = None, label: str | None = None, **convert_kw) -> Result:
    """A UWS store built with ``convert_kw``; bytes = its size on disk (metadata included)."""
    import uwsfmt
    from uwsfmt.report import store_bytes

    own = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="uws-bench-")
    path = os.path.join(workdir, f"{label or 'store'}-{abs(hash(tuple(sorted(convert_kw.items())))) % 10**8}.uws")
    store = uwsfmt.convert(fam, path, overwrite=True, **convert_kw)
    out = {m: store.state_dict(m) for m in store.model_ids}
    nbytes = store_bytes(path)
    choices = [e.get("budget") for e in store.manifest["tensors"] if e.get("budget")]
    note = ", ".join(f"{b['mode']}:{b['rank']}/{b['residual_bits']}" if b["rank"] is not None else "dense" for b in choices)
    store.close()
    if own:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return Result(label or f"UWS store {convert_kw}", nbytes, out, note)


def rank_subspace(fam: Family, rank: int = 16, workdir: str | None = None, **kw) -> Result:
    """The paper's setting: mean + rank-``rank`` subspace per tensor, no residual."""
    return uws_store(fam, workdir, label=f"pure rank-{rank} subspace (paper)", rank=rank, **kw)


def relative_errors(fam: Family, rec: Family) -> np.ndarray:
    """(models, float tensors) relative Frobenius errors."""
    rows = []
    for mid, sd in fam.items():
        row = []
        for n, w in sd.items():
            if not w.is_floating_point():
                continue
            w64, r64 = w.to(torch.float64), rec[mid][n].to(torch.float64)
            wn = float(w64.norm())
            row.append(float((r64 - w64).norm()) / wn if wn > 0 else float((r64 - w64).norm()))
        rows.append(row)
    return np.asarray(rows)
