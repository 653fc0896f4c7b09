"""Shared fixtures. Families are tiny and deterministic; stores go to pytest's tmp_path."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHAPES = {
    "blocks.0.attn.qkv.weight": (96, 32),
    "blocks.0.mlp.fc1.weight": (64, 32),
    "blocks.0.mlp.fc2.weight": (32, 64),
    "conv.weight": (16, 8, 3, 3),
}


@pytest.fixture
def small_family():
    from uwsfmt.testing.families import synthetic_family

    return synthetic_family(n_models=6, shapes=SHAPES, rank=3, noise=0.0, seed=1, return_truth=True)


@pytest.fixture
def family_files(tmp_path, small_family):
    from uwsfmt.testing.families import write_family

    fam, _ = small_family
    return [str(p) for p in write_family(fam, tmp_path / "src")]


@pytest.fixture(scope="session")
def peft_family(tmp_path_factory):
    """(base TinyNet, adapter folders): real PEFT LoRA adapters trained once per session on one
    tiny base, ranks 4 and 8, rsLoRA / rank_pattern / missing-module variants (tests/peft_family.py)."""
    pytest.importorskip("peft")
    from tests.peft_family import train_adapters

    return train_adapters(tmp_path_factory.mktemp("peft_family"))


def write_family(folder, fam: dict) -> list[str]:
    """Save ``{model_id: state_dict}`` as one safetensors file per model in ``folder`` (made if
    missing); the files' paths, in the family's order."""
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for mid, sd in fam.items():
        p = folder / f"{mid}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(p))
        out.append(str(p))
    return out
