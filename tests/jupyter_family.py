"""A tiny family of checkpoints (plain torch tensors in safetensors files) for the Jupyter tests."""

from __future__ import annotations

from pathlib import Path

import torch

SHAPES = {"layer.0.weight": (64, 32), "layer.1.weight": (48, 64), "layer.0.bias": (64,)}


def family(n: int, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """``n`` models sharing a base plus rank-2 deviations (biases: small noise), ids m0, m1, ...

    >>> sorted(family(2))
    ['m0', 'm1']
    """
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    out = {}
    for i in range(n):
        sd = {}
        for k, s in SHAPES.items():
            if len(s) == 2:
                u, v = torch.randn(s[0], 2, generator=g), torch.randn(2, s[1], generator=g)
                sd[k] = base[k] + 0.1 * u @ v
            else:
                sd[k] = base[k] + 0.01 * torch.randn(s, generator=g)
        out[f"m{i}"] = sd
    return out


def write(folder: str | Path, fam: dict[str, dict[str, torch.Tensor]]) -> list[Path]:
    """One ``<id>.safetensors`` per model in ``folder`` (made if missing); the files."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for mid, sd in fam.items():
        save_file(sd, str(folder / f"{mid}.safetensors"))
        out.append(folder / f"{mid}.safetensors")
    return out
