"""What every generated family shares: keyed random streams, model ids, low-rank building blocks."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from uwsfmt.errors import ConfigError

StateDict = dict[str, torch.Tensor]


Family = dict[str, StateDict]


DEFAULT_SHAPES: dict[str, tuple[int, ...]] = {
    "blocks.0.attn.qkv.weight": (96, 32),
    "blocks.0.mlp.fc1.weight": (64, 32),
    "blocks.0.mlp.fc2.weight": (32, 64),
    "conv.weight": (16, 8, 3, 3),
}


LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def keyed_generator(seed: int, *key: object) -> torch.Generator:
    """A torch generator keyed by ``(seed, *key)``: independent streams per tensor and model."""
    digest = hashlib.blake2b(repr((int(seed),) + key).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def make_model_id(prefix: str, index: int, n: int) -> str:
    """``prefix-007``: zero-padded to 3 digits, or more when ``n`` needs them."""
    width = max(3, len(str(max(n - 1, 0))))
    return f"{prefix}-{index:0{width}d}"


def model_ids(prefix: str, n: int) -> list[str]:
    return [make_model_id(prefix, i, n) for i in range(n)]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_count(what: str, value: int, minimum: int = 1) -> None:
    if int(value) != value or value < minimum:
        raise ConfigError(f"{what} must be an integer >= {minimum}, got {value!r}")


def orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """A (rows, cols) float64 matrix with orthonormal columns, uniformly random."""
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))
    # fix the sign ambiguity of QR so the result is a proper (Haar) draw
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1.0)


@dataclass(frozen=True)
class Entry:
    """How one tensor of a generated family is made.

    kind: "lowrank" (base + rank-r delta + noise), "dense" (per-model float, e.g. bias/norm),
    "shared" (float, bit-identical in every model), "int" (int64 arange buffer, identical),
    "mask" (bool, differs per model).
    """

    kind: str
    shape: tuple[int, ...]
    center: float = 0.0  # added to "dense" tensors: 1.0 for norm weights


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    return shape[0], math.prod(shape[1:])
