"""Key layouts of LoRA checkpoints: which tensors form (A, B) pairs, and their scales.

Shared by the adapter formats (PEFT folders, kohya / A1111 files, diffusers files). A pair is
found from its tensor names alone, so planning never reads tensor data (except kohya's scalar
``.alpha`` tensors, a few bytes each).

Layouts recognised (module = the name before the suffix):

=================================  ===================================  =====================
A (down)                           B (up)                               used by
=================================  ===================================  =====================
``.lora_A.weight``                 ``.lora_B.weight``                   PEFT, diffusers >= 0.24
``.lora_embedding_A``              ``.lora_embedding_B``                PEFT embeddings
``.lora_down.weight``              ``.lora_up.weight``                  kohya / A1111
``.lora.down.weight``              ``.lora.up.weight``                  diffusers (old)
``_lora.down.weight``              ``_lora.up.weight``                  diffusers attn processors
``.lora_linear_layer.down.weight`` ``.lora_linear_layer.up.weight``     diffusers text encoders
=================================  ===================================  =====================
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from uwsfmt.errors import SourceError
from uwsfmt.sources.base import TensorInfo

#: (A suffix, B suffix, the adapted layer stores W transposed)
PEFT_SUFFIXES = ((".lora_A.weight", ".lora_B.weight", False), (".lora_embedding_A", ".lora_embedding_B", True))
KOHYA_SUFFIXES = ((".lora_down.weight", ".lora_up.weight", False),)
DIFFUSERS_SUFFIXES = PEFT_SUFFIXES + (
    (".lora.down.weight", ".lora.up.weight", False),
    ("_lora.down.weight", "_lora.up.weight", False),
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight", False),
)
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")


def find_pairs(infos: dict[str, TensorInfo], suffixes: Sequence[tuple[str, str, bool]], where: str) -> dict[str, tuple[str, str, bool]]:
    """``{module: (a_name, b_name, fan_in_fan_out)}`` for every complete, well-shaped pair.

    A pair with a Tucker middle factor (``.lora_mid.weight``, LoCon) is not a plain product and
    is left alone (its tensors stay ordinary). A half pair, or factors whose ranks disagree, is
    an error naming both tensors.
    """
    out: dict[str, tuple[str, str, bool]] = {}
    for name in infos:
        for sa, sb, fifo in suffixes:
            if not name.endswith(sa):
                continue
            module = name[: -len(sa)]
            b = module + sb
            if b not in infos:
                raise SourceError(f"{where}: LoRA factor {name!r} has no matching {b!r}; the adapter is incomplete")
            if module + ".lora_mid.weight" in infos:
                break
            check_pair(infos[name], infos[b], where)
            out[module] = (name, b, fifo)
            break
    for name in infos:  # the other half: a B without its A
        for sa, sb, _ in suffixes:
            if name.endswith(sb) and name[: -len(sb)] not in out and name[: -len(sb)] + sa not in infos:
                raise SourceError(f"{where}: LoRA factor {name!r} has no matching {name[: -len(sb)] + sa!r}; the adapter is incomplete")
    return out


def check_pair(a: TensorInfo, b: TensorInfo, where: str) -> None:
    if len(a.shape) < 2 or len(b.shape) < 2:
        raise SourceError(f"{where}: LoRA factors {a.name!r} {list(a.shape)} and {b.name!r} {list(b.shape)} must be matrices or conv kernels")
    r = a.shape[0]
    if b.shape[1] != r or any(s != 1 for s in b.shape[2:]):
        raise SourceError(
            f"{where}: LoRA factors {a.name!r} {list(a.shape)} and {b.name!r} {list(b.shape)} do not chain: "
            f"B must be (out, {r}) or (out, {r}, 1, 1) for A of rank {r}"
        )


def product_shape(a: TensorInfo, b: TensorInfo) -> tuple[int, ...]:
    """Shape of B @ A in the adapted weight's layout before any fan_in_fan_out transpose."""
    return (b.shape[0],) + tuple(a.shape[1:])


def pattern_value(patterns: dict | None, key: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first pattern matching the end of ``key``."""
    for pat, value in (patterns or {}).items():
        try:
            if re.match(rf"(.*\.)?({pat})$", key):
                return value
        except re.error:
            if key == pat or key.endswith("." + pat):
                return value
    return default


def peft_scale(key: str, r: int, config: dict) -> float:
    """The scale PEFT applies to ``B @ A`` of module ``key``: alpha / r, or alpha / sqrt(r) (rsLoRA)."""
    alpha = float(pattern_value(config.get("alpha_pattern"), key, config.get("lora_alpha", r) or r))
    if r == 0:
        return 0.0
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def peft_rank(key: str, config: dict) -> int | None:
    r = pattern_value(config.get("rank_pattern"), key, config.get("r"))
    return None if r is None else int(r)
