"""The benchmark families, written to disk once and reused (a marker file says a folder is complete).

- ``vit``: ViT-B-shaped (12 blocks of 768x2304 / 768x768 / 3072x768 / 768x3072 weights plus
  norms, biases, patch and position embeddings, ~344 MB fp32 per model); N fine-tunes = shared
  base + rank-8 deltas + iid noise (:func:`uwsfmt.testing.families.iter_vit_like_family`).
- ``lora``: PEFT adapters, 32 layers x 4 attention projections, 4096 wide, rank 16, sharing
  the init of A and a subspace of B (:func:`uwsfmt.testing.families.iter_lora_family`).
- ``trained``: small MLPs really trained on scikit-learn's digits, one base, one full
  fine-tune per task (:func:`uwsfmt.testing.families.trained_family`), with held-out accuracy.
- ``many``: thousands of small (64x64) tensors per model: per-tensor overhead, not bandwidth.
- ``memory``: ViT-shaped, narrower (width 384), N = 8, 32, 128: peak RSS of builds.

``--quick`` shrinks each family (fewer blocks / layers / tasks, narrower LoRA) so the whole
suite runs in a few minutes; the shapes in the report say what was measured.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

CONFIGS = {
    "vit": {"full": {"n": 8, "blocks": 12, "width": 768}, "quick": {"n": 8, "blocks": 2, "width": 768}},
    "lora": {"full": {"n": 32, "layers": 32, "width": 4096, "rank": 16}, "quick": {"n": 8, "layers": 4, "width": 1024, "rank": 16}},
    "trained": {"full": {"n": 40, "hidden": 256}, "quick": {"n": 8, "hidden": 128}},
    # thousands of small tensors: what per-tensor Python overhead costs
    "many": {"full": {"n": 8, "tensors": 2000, "side": 64}, "quick": {"n": 8, "tensors": 500, "side": 64}},
    # peak RSS of builds at N = 8, 32, 128: ViT-shaped, narrower so that 128 copies fit on disk
    "memory": {"full": {"ns": (8, 32, 128), "blocks": 12, "width": 384}, "quick": {"ns": (8, 32, 128), "blocks": 2, "width": 192}},
}


@dataclass
class Family:
    name: str
    title: str
    folder: str
    paths: list[str]  # one source per model, as convert() takes them
    ids: list[str]
    weights: list[str]  # the safetensors file of each model (the baseline loads these)
    config: dict
    evaluate: object = None  # trained family: (model_id, state_dict) -> accuracy %
    accuracies: dict = field(default_factory=dict)  # trained family: originals' accuracy

    @property
    def source_bytes(self) -> int:
        return sum(os.path.getsize(p) for p in self.weights)


def _done(folder: str, config: dict) -> bool:
    marker = os.path.join(folder, "complete.json")
    if not os.path.exists(marker):
        return False
    with open(marker) as f:
        return json.load(f) == config


def _mark(folder: str, config: dict) -> None:
    with open(os.path.join(folder, "complete.json"), "w") as f:
        json.dump(config, f)


def _safetensors_in(folder: str) -> tuple[list[str], list[str]]:
    """(paths, model ids = file stems) of the ``.safetensors`` files of a generated family folder."""
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors"))
    return paths, [os.path.basename(p)[: -len(".safetensors")] for p in paths]


def _key(config: dict) -> str:
    return "-".join(f"{k}{'x'.join(map(str, v)) if isinstance(v, (list, tuple)) else v}" for k, v in sorted(config.items()))


def vit(workdir: str, config: dict, n: int | None = None) -> Family:
    from uwsfmt.testing.families import iter_vit_like_family, write_family

    n = n or config["n"]
    cfg = {**config, "n": n}
    folder = os.path.join(workdir, f"vit-{_key(cfg)}")
    if not _done(folder, cfg):
        write_family(iter_vit_like_family(n, blocks=cfg["blocks"], width=cfg["width"]), folder)
        _mark(folder, cfg)
    paths, ids = _safetensors_in(folder)
    title = f"ViT-like ({cfg['blocks']} blocks, width {cfg['width']}), N={n}"
    return Family("vit", title, folder, paths, ids, paths, cfg)


def half_copy(fam: Family, dtype: str = "bfloat16") -> Family:
    """The family with its floating-point tensors cast to ``dtype`` (next to it, written once):
    how most fine-tunes are published today. Its store keeps float16 means (``mean_dtype="auto"``
    for 16-bit tensors) and float32 bases; readers round the float32 rebuild to the module's dtype."""
    import torch
    from safetensors.torch import load_file, save_file

    cfg = {**fam.config, "dtype": dtype}
    folder = f"{fam.folder}-{dtype}"
    if not _done(folder, cfg):
        os.makedirs(folder, exist_ok=True)
        for path in fam.weights:
            sd = load_file(path)
            save_file({k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v for k, v in sd.items()},
                      os.path.join(folder, os.path.basename(path)))
        _mark(folder, cfg)
    paths, ids = _safetensors_in(folder)
    return Family(fam.name, f"{fam.title}, {dtype}", folder, paths, ids, paths, cfg)


def lora(workdir: str, config: dict) -> Family:
    from uwsfmt.testing.families import iter_lora_family, write_peft_family

    folder = os.path.join(workdir, f"lora-{_key(config)}")
    if not _done(folder, config):
        write_peft_family(iter_lora_family(config["n"], layers=config["layers"], width=config["width"], rank=config["rank"]), folder)
        _mark(folder, config)
    dirs = sorted(os.path.join(folder, d) for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    ids = [os.path.basename(d) for d in dirs]
    title = f"LoRA ({config['layers']} layers x 4 modules, width {config['width']}, rank {config['rank']}), N={config['n']}"
    return Family("lora", title, folder, dirs, ids, [os.path.join(d, "adapter_model.safetensors") for d in dirs], config)


def trained(workdir: str, config: dict) -> Family:
    from bench.trained import trained_family
    from uwsfmt.testing.families import write_family

    fam = trained_family(n_tasks=config["n"], hidden=config["hidden"])  # deterministic, seconds
    folder = os.path.join(workdir, f"trained-{_key(config)}")
    if not _done(folder, config):
        write_family(fam.state_dicts, folder)
        _mark(folder, config)
    paths, ids = _safetensors_in(folder)
    title = f"trained MLPs (digits, hidden {config['hidden']}), N={config['n']}"
    return Family("trained", title, folder, paths, ids, paths, config, evaluate=fam.evaluate, accuracies=fam.accuracies())


def many(workdir: str, config: dict) -> Family:
    from uwsfmt.testing.families import synthetic_family, write_family

    folder = os.path.join(workdir, f"many-{_key(config)}")
    if not _done(folder, config):
        shapes = {f"layers.{i}.weight": (config["side"], config["side"]) for i in range(config["tensors"])}
        write_family(synthetic_family(n_models=config["n"], shapes=shapes, rank=4, noise=1e-3, extra=False, seed=0), folder)
        _mark(folder, config)
    paths, ids = _safetensors_in(folder)
    title = f"many small tensors ({config['tensors']} x {config['side']}x{config['side']}, rank-4 deltas + noise), N={config['n']}"
    return Family("many", title, folder, paths, ids, paths, config)


def memory_family(workdir: str, config: dict) -> Family:
    return vit(workdir, {"n": max(config["ns"]), "blocks": config["blocks"], "width": config["width"]})


MAKERS = {"vit": vit, "lora": lora, "trained": trained, "many": many}
