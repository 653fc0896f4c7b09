"""Diffusers LoRA files (``pytorch_lora_weights.safetensors``, or a folder holding one).

Keys are ``<component>.<module path>`` + one of the pair suffixes of
:mod:`.lora_layout` (``lora_A/lora_B`` since diffusers 0.24; ``lora.down/up``,
``_lora.down/up`` and ``lora_linear_layer.down/up`` before). Scale per module: alpha / r
from a ``<module>.alpha`` tensor when present, else from the ``lora_adapter_metadata`` JSON in
the safetensors metadata (PEFT config fields prefixed by the component, e.g. ``unet.r``),
else 1 (what diffusers applies to such files). A bare PEFT-style ``lora_A``/``lora_B`` file
without its adapter_config.json is read by this format too.
"""

from __future__ import annotations

import json
import os

from uwsfmt.errors import SourceError
from uwsfmt.sources.base import Format, LoraPair
from uwsfmt.sources.kohya import read_scalar
from uwsfmt.sources.lora_layout import DIFFUSERS_SUFFIXES, KOHYA_SUFFIXES, find_pairs, peft_scale
from uwsfmt.sources.registry import register_format
from uwsfmt.sources.safetensors_file import SafetensorsCheckpoint, read_header

WEIGHTS = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"


def adapter_metadata(meta: dict, where: str) -> dict:
    raw = meta.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise SourceError(f"{where}: safetensors metadata {METADATA_KEY!r} is not JSON ({e})") from e
    return value if isinstance(value, dict) else {}


def component_config(adapter_meta: dict, module: str) -> dict:
    """The PEFT-style config of the component (``unet``, ``text_encoder``, ...) holding ``module``."""
    comp = module.split(".", 1)[0]
    prefixed = {k[len(comp) + 1:]: v for k, v in adapter_meta.items() if k.startswith(comp + ".")}
    return prefixed or {k: v for k, v in adapter_meta.items() if "." not in k}


class DiffusersLoraCheckpoint(SafetensorsCheckpoint):
    format = "diffusers"

    def __init__(self, path: str, id: str):
        if os.path.isdir(path):
            path = os.path.join(path, WEIGHTS)
        super().__init__(path, id)
        self._pairs: dict[str, LoraPair] | None = None

    def lora_pairs(self) -> dict[str, LoraPair]:
        if self._pairs is None:
            infos = self.infos()
            meta = adapter_metadata(super().metadata(), self.path)
            self._pairs = {}
            for module, (a, b, fifo) in find_pairs(infos, DIFFUSERS_SUFFIXES, self.path).items():
                r = infos[a].shape[0]
                alpha_name: str | None = module + ".alpha"
                if alpha_name in infos:
                    scale = read_scalar(self, alpha_name) / r
                else:
                    alpha_name = None
                    cfg = component_config(meta, module)
                    key = module.split(".", 1)[1] if "." in module else module
                    scale = peft_scale(key, r, cfg) if cfg.get("lora_alpha") is not None else 1.0
                self._pairs[module] = LoraPair(module, a, b, scale, fifo, alpha_name)
        return self._pairs

    def metadata(self) -> dict:
        meta = super().metadata()
        cfg = adapter_metadata(meta, self.path)
        return {"safetensors_metadata": meta, "base_model": cfg.get("base_model_name_or_path")}


def _has_pairs(keys) -> bool:
    sa = tuple(s[0] for s in DIFFUSERS_SUFFIXES)
    return any(k.endswith(sa) for k in keys) and not any(k.endswith(KOHYA_SUFFIXES[0][0]) for k in keys)


def _detect(path: str) -> bool:
    if os.path.isdir(path):
        path = os.path.join(path, WEIGHTS)
        if not os.path.isfile(path) or len([f for f in os.listdir(os.path.dirname(path)) if f.endswith(".safetensors")]) != 1:
            return False
    if not (os.path.isfile(path) and path.endswith(".safetensors")):
        return False
    try:
        return _has_pairs([k for k in read_header(path) if k != "__metadata__"])
    except SourceError:
        return False


register_format(Format("diffusers", _detect, lambda p, i: DiffusersLoraCheckpoint(p, i), priority=25,
                       description="a diffusers LoRA .safetensors (or a folder with pytorch_lora_weights.safetensors)",
                       extensions=(".safetensors",)))
