"""Torch devices: the one a user names, checked, and the default."""

from __future__ import annotations

import torch

from uwsfmt.errors import ConfigError


def resolve_device(device: str | torch.device | None, default: str = "cpu") -> torch.device:
    """The torch device ``device`` names (``default`` when None), checked: a name torch does not
    know, or a GPU it cannot see, is a clear ConfigError rather than torch's own assertion."""
    if device is None:
        device = default
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ConfigError(f"device {device!r} is not a torch device; use 'cpu' or 'cuda' (or 'cuda:N')") from e
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError(f"device {device!r}: torch {torch.__version__} sees no CUDA GPU on this machine; use 'cpu' "
                              "(or install a CUDA build of torch where there is a GPU)")
        if dev.index is not None and dev.index >= n:
            raise ConfigError(f"device {device!r}: torch sees {n} CUDA GPU(s), cuda:0 to cuda:{n - 1}")
    return dev


def default_device() -> str:
    """"cuda" when torch sees a GPU, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"
