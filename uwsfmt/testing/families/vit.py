"""ViT-B-shaped families, streamed one model at a time (128 copies never sit in memory together)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal, overload

import torch

from uwsfmt.errors import ConfigError
from uwsfmt.testing.families.common import Entry, Family, StateDict, check_count
from uwsfmt.testing.families.synthetic import FamilyTruth, LowRankSpec


def _vit_spec(
    n_models: int,
    blocks: int,
    width: int,
    rank: int,
    noise: float,
    dtype: torch.dtype,
    seed: int,
    mlp_ratio: int,
    patch: int,
    image_size: int,
    base_scale: float,
    delta_scale: float,
) -> LowRankSpec:
    for what, value in (("n_models", n_models), ("blocks", blocks), ("width", width),
                        ("mlp_ratio", mlp_ratio), ("patch", patch)):
        check_count(what, value)
    check_count("rank", rank, 0)
    if image_size % patch:
        raise ConfigError(f"image_size {image_size} must be a multiple of patch {patch}")
    w, h = width, width * mlp_ratio
    e: dict[str, Entry] = {
        "cls_token": Entry("dense", (1, 1, w)),
        "pos_embed": Entry("dense", (1, (image_size // patch) ** 2 + 1, w)),
        "patch_embed.proj.weight": Entry("lowrank", (w, 3, patch, patch)),
        "patch_embed.proj.bias": Entry("dense", (w,)),
    }
    for b in range(blocks):
        p = f"blocks.{b}."
        e[p + "norm1.weight"] = Entry("dense", (w,), center=1.0)
        e[p + "norm1.bias"] = Entry("dense", (w,))
        e[p + "attn.qkv.weight"] = Entry("lowrank", (3 * w, w))
        e[p + "attn.qkv.bias"] = Entry("dense", (3 * w,))
        e[p + "attn.proj.weight"] = Entry("lowrank", (w, w))
        e[p + "attn.proj.bias"] = Entry("dense", (w,))
        e[p + "norm2.weight"] = Entry("dense", (w,), center=1.0)
        e[p + "norm2.bias"] = Entry("dense", (w,))
        e[p + "mlp.fc1.weight"] = Entry("lowrank", (h, w))
        e[p + "mlp.fc1.bias"] = Entry("dense", (h,))
        e[p + "mlp.fc2.weight"] = Entry("lowrank", (w, h))
        e[p + "mlp.fc2.bias"] = Entry("dense", (w,))
    e["norm.weight"] = Entry("dense", (w,), center=1.0)
    e["norm.bias"] = Entry("dense", (w,))
    return LowRankSpec(e, n_models, rank, noise, base_scale, delta_scale, 0.8, dtype, seed)


def iter_vit_like_family(
    n_models: int,
    blocks: int = 12,
    width: int = 768,
    rank: int = 8,
    noise: float = 1e-3,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    *,
    mlp_ratio: int = 4,
    patch: int = 16,
    image_size: int = 224,
    base_scale: float = 0.05,
    delta_scale: float = 5e-3,
) -> Iterator[tuple[str, StateDict]]:
    """Yield ``(model_id, state_dict)`` of a ViT-B-shaped family, one model at a time.

    timm names: ``patch_embed.proj.*``, ``cls_token``, ``pos_embed``, then per block
    ``blocks.{b}.attn.qkv.weight`` (3w x w), ``attn.proj.weight`` (w x w),
    ``mlp.fc1.weight`` (4w x w), ``mlp.fc2.weight`` (w x 4w), their biases and
    ``norm1``/``norm2``, then ``norm.*``. Defaults give ViT-B/16 without its head (~86M
    parameters, ~344 MB per fp32 model). Weight matrices and the patch-embedding conv follow
    the :func:`synthetic_family` model (shared base + rank-``rank`` delta + iid ``noise``);
    biases, norms and embeddings get small dense per-model deltas. Only the shared parts
    (bases of all tensors, about one model's worth) are kept between models.

    >>> ids = [i for i, sd in iter_vit_like_family(3, blocks=1, width=16, image_size=32)]
    >>> ids
    ['model-000', 'model-001', 'model-002']
    """
    return _vit_spec(
        n_models, blocks, width, rank, noise, dtype, seed, mlp_ratio, patch, image_size,
        base_scale, delta_scale,
    ).models()


@overload
def vit_like_family(
    n_models: int,
    blocks: int = ...,
    width: int = ...,
    rank: int = ...,
    noise: float = ...,
    dtype: torch.dtype = ...,
    seed: int = ...,
    *,
    mlp_ratio: int = ...,
    patch: int = ...,
    image_size: int = ...,
    base_scale: float = ...,
    delta_scale: float = ...,
    return_truth: Literal[False] = ...,
) -> Family: ...


@overload
def vit_like_family(
    n_models: int,
    blocks: int = ...,
    width: int = ...,
    rank: int = ...,
    noise: float = ...,
    dtype: torch.dtype = ...,
    seed: int = ...,
    *,
    mlp_ratio: int = ...,
    patch: int = ...,
    image_size: int = ...,
    base_scale: float = ...,
    delta_scale: float = ...,
    return_truth: Literal[True],
) -> tuple[Family, FamilyTruth]: ...


def vit_like_family(
    n_models: int,
    blocks: int = 12,
    width: int = 768,
    rank: int = 8,
    noise: float = 1e-3,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    *,
    mlp_ratio: int = 4,
    patch: int = 16,
    image_size: int = 224,
    base_scale: float = 0.05,
    delta_scale: float = 5e-3,
    return_truth: bool = False,
) -> Family | tuple[Family, FamilyTruth]:
    """:func:`iter_vit_like_family` collected into a dict (and optionally its truth).

    Use the iterator with :func:`write_family` for large families.

    >>> fam = vit_like_family(2, blocks=1, width=16, image_size=32)
    >>> fam["model-001"]["blocks.0.mlp.fc1.weight"].shape
    torch.Size([64, 16])
    """
    spec = _vit_spec(
        n_models, blocks, width, rank, noise, dtype, seed, mlp_ratio, patch, image_size,
        base_scale, delta_scale,
    )
    family = dict(spec.models())
    return (family, spec.truth()) if return_truth else family
