"""Writing generated families to disk: one safetensors (or torch) file per model, PEFT adapter folders."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

import torch

from uwsfmt.errors import ConfigError
from uwsfmt.testing.families.common import StateDict
from uwsfmt.testing.families.lora import peft_adapter_config

_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _items(family: Mapping[str, StateDict] | Iterable[tuple[str, StateDict]]):
    return family.items() if isinstance(family, Mapping) else family


def _file_stem(model_id: str) -> str:
    if not _SAFE_ID.fullmatch(model_id):
        raise ConfigError(
            f"model id {model_id!r} is not a safe file name; use letters, digits, '.', '_', '-'"
        )
    return model_id


def write_family(
    family: Mapping[str, StateDict] | Iterable[tuple[str, StateDict]],
    folder: str | Path,
    fmt: Literal["safetensors", "pt"] = "safetensors",
) -> list[Path]:
    """Write each model to ``folder/<id>.safetensors`` (or ``.pt``), one model at a time.

    ``family`` is a dict or any iterable of ``(model_id, state_dict)`` (e.g.
    :func:`iter_vit_like_family`), so a large family is streamed, never held in memory.
    ``fmt="pt"`` writes ``torch.save`` pickles, for testing torch-checkpoint sources.
    Returns the paths written, in order.

    >>> import tempfile
    >>> from uwsfmt.testing.families import synthetic_family
    >>> paths = write_family(synthetic_family(2), tempfile.mkdtemp())
    >>> [p.name for p in paths]
    ['model-000.safetensors', 'model-001.safetensors']
    """
    if fmt not in ("safetensors", "pt"):
        raise ConfigError(f"fmt must be 'safetensors' or 'pt', got {fmt!r}")
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for model_id, sd in _items(family):
        path = folder / f"{_file_stem(model_id)}.{fmt}"
        tensors = {k: v.detach().contiguous() for k, v in sd.items()}
        if fmt == "safetensors":
            save_file(tensors, str(path), metadata={"format": "pt", "model_id": model_id})
        else:
            torch.save(tensors, path)
        paths.append(path)
    return paths


def write_peft_family(
    family: Mapping[str, StateDict] | Iterable[tuple[str, StateDict]],
    folder: str | Path,
    alpha: float | None = None,
) -> list[Path]:
    """Write each adapter as a PEFT folder ``folder/<id>/`` (weights + adapter_config.json).

    Rank and target modules are read from the tensors; ``alpha`` defaults to the rank.
    Returns the adapter folders written.

    >>> import tempfile
    >>> from uwsfmt.testing.families import lora_family
    >>> dirs = write_peft_family(lora_family(1, layers=1, width=16, rank=2), tempfile.mkdtemp())
    >>> sorted(p.name for p in dirs[0].iterdir())
    ['adapter_config.json', 'adapter_model.safetensors']
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    dirs = []
    for adapter_id, sd in _items(family):
        ranks = {v.shape[0] for k, v in sd.items() if k.endswith("lora_A.weight")}
        if len(ranks) != 1:
            raise ConfigError(
                f"adapter {adapter_id!r}: expected one LoRA rank across lora_A tensors, "
                f"found {sorted(ranks) or 'no lora_A tensors'}"
            )
        modules = {k.split(".")[-3] for k in sd if k.endswith("lora_A.weight")}
        out = folder / _file_stem(adapter_id)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous() for k, v in sd.items()}
        save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = peft_adapter_config(ranks.pop(), alpha, modules)
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        dirs.append(out)
    return dirs
