"""PEFT-style LoRA adapter families that share the random init of A and a subspace of B."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Literal

import torch

from uwsfmt.errors import ConfigError
from uwsfmt.testing.families.common import (
    LORA_MODULES,
    Family,
    StateDict,
    check_count,
    keyed_generator,
    make_model_id,
    orthonormal,
)


def lora_key(layer: int, module: str, factor: Literal["A", "B"]) -> str:
    """PEFT's saved key of a LoRA factor of a LLaMA-style attention projection.

    >>> lora_key(3, "q_proj", "A")
    'base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight'
    """
    return f"base_model.model.model.layers.{layer}.self_attn.{module}.lora_{factor}.weight"


def iter_lora_family(
    n_adapters: int,
    layers: int = 32,
    modules: tuple[str, ...] = LORA_MODULES,
    width: int = 4096,
    rank: int = 16,
    shared_rank: int = 8,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    *,
    shared_init: bool = True,
    a_drift: float = 0.05,
    b_scale: float = 1e-2,
    noise: float = 1e-3,
) -> Iterator[tuple[str, StateDict]]:
    """Yield ``(adapter_id, state_dict)`` of a PEFT-style LoRA family, one adapter at a time.

    For each layer l and module m (``width x width`` projections), adapter i has
    ``lora_A`` (rank x width) and ``lora_B`` (width x rank), keyed as :func:`lora_key`:

    - ``A_i = A0 + a_drift * N(0, 1/width)``: ``A0`` is PEFT's kaiming-uniform init
      ``U(-1/sqrt(width), 1/sqrt(width))`` shared by all adapters (same init seed), as in
      real families; ``shared_init=False`` draws A0 per adapter (the "from scratch" null).
    - ``B_i = P @ G_i + noise * N(0, 1)``: ``P`` (width x shared_rank) is orthonormal and
      shared, ``G_i`` (shared_rank x rank) per adapter, scaled so B's RMS entry is
      ``b_scale``. ``shared_rank=0`` gives unstructured ``B_i ~ N(0, b_scale**2)``.

    So the products ``B_i A_i`` share a left space (``P``) and nearly a right space (rows of
    A0), while A and B decomposed separately look less shared than they are. Ids are
    ``adapter-000``, ...; only A0 and P are kept between adapters.

    >>> aid, sd = next(iter_lora_family(2, layers=1, modules=("q_proj",), width=32, rank=4))
    >>> aid, sd[lora_key(0, "q_proj", "B")].shape
    ('adapter-000', torch.Size([32, 4]))
    """
    for what, value in (("n_adapters", n_adapters), ("layers", layers), ("width", width),
                        ("rank", rank)):
        check_count(what, value)
    check_count("shared_rank", shared_rank, 0)
    if shared_rank > width:
        raise ConfigError(f"shared_rank {shared_rank} cannot exceed width {width}")
    if not modules:
        raise ConfigError("modules is empty; name at least one projection, e.g. ('q_proj',)")
    return _lora_models(
        n_adapters, layers, tuple(modules), width, rank, shared_rank, seed, dtype,
        shared_init, a_drift, b_scale, noise,
    )


def _lora_models(
    n_adapters: int, layers: int, modules: tuple[str, ...], width: int, rank: int,
    shared_rank: int, seed: int, dtype: torch.dtype, shared_init: bool, a_drift: float,
    b_scale: float, noise: float,
) -> Iterator[tuple[str, StateDict]]:
    bound = 1.0 / math.sqrt(width)
    statics: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor | None]] = {}
    for i in range(n_adapters):
        adapter_id = make_model_id("adapter", i, n_adapters)
        sd: StateDict = {}
        for layer in range(layers):
            for module in modules:
                if (layer, module) not in statics:
                    g = keyed_generator(seed, "lora", layer, module)
                    a0 = (torch.rand(rank, width, generator=g) * 2 - 1) * bound
                    p = orthonormal(width, shared_rank, g).float() if shared_rank else None
                    statics[layer, module] = (a0, p)
                a0, p = statics[layer, module]
                g = keyed_generator(seed, "lora-adapter", i, layer, module)
                if not shared_init:
                    a0 = (torch.rand(rank, width, generator=g) * 2 - 1) * bound
                a = a0 + torch.randn(rank, width, generator=g) * (a_drift * bound)
                if p is None:
                    b = torch.randn(width, rank, generator=g) * b_scale
                else:
                    gi = torch.randn(shared_rank, rank, generator=g)
                    b = p @ gi * (b_scale * math.sqrt(width / shared_rank))
                    if noise:
                        b = b + torch.randn(width, rank, generator=g) * noise
                sd[lora_key(layer, module, "A")] = a.to(dtype)
                sd[lora_key(layer, module, "B")] = b.to(dtype)
        yield adapter_id, sd


def lora_family(
    n_adapters: int,
    layers: int = 32,
    modules: tuple[str, ...] = LORA_MODULES,
    width: int = 4096,
    rank: int = 16,
    shared_rank: int = 8,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    *,
    shared_init: bool = True,
    a_drift: float = 0.05,
    b_scale: float = 1e-2,
    noise: float = 1e-3,
) -> Family:
    """:func:`iter_lora_family` collected into ``{adapter_id: state_dict}``.

    >>> fam = lora_family(3, layers=2, width=32, rank=4, shared_rank=2)
    >>> len(fam), len(fam["adapter-002"])
    (3, 16)
    """
    return dict(
        iter_lora_family(
            n_adapters, layers, modules, width, rank, shared_rank, seed, dtype,
            shared_init=shared_init, a_drift=a_drift, b_scale=b_scale, noise=noise,
        )
    )


def peft_adapter_config(
    rank: int,
    alpha: float | None = None,
    target_modules: Iterable[str] = LORA_MODULES,
    base_model_name_or_path: str = "uwsfmt/synthetic-llama",
) -> dict:
    """A minimal PEFT ``adapter_config.json`` for adapters of :func:`lora_family`.

    ``alpha`` defaults to ``rank`` (scale alpha/r = 1).

    >>> peft_adapter_config(16)["lora_alpha"]
    16
    """
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(rank),
        "lora_alpha": rank if alpha is None else alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
    }
