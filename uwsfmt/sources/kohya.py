"""Kohya / A1111 LoRA files: one ``.safetensors`` with ``<module>.lora_down.weight``,
``<module>.lora_up.weight`` and an optional scalar ``<module>.alpha`` per module.

Modules are named ``lora_unet_...`` / ``lora_te_...`` / ``lora_te1_...`` / ``lora_te2_...``
(the module path with ``.`` replaced by ``_``). Scale = alpha / r (1 when alpha is absent).
Conv LoRAs (down r x in x kh x kw, up out x r x 1 x 1) are products like linear ones; LoCon's
Tucker form (``lora_mid``) and other LyCORIS methods stay ordinary tensors.
"""

from __future__ import annotations

import os

from uwsfmt.errors import SourceError
from uwsfmt.sources.base import Format, LoraPair
from uwsfmt.sources.lora_layout import KOHYA_PREFIXES, KOHYA_SUFFIXES, find_pairs
from uwsfmt.sources.registry import register_format
from uwsfmt.sources.safetensors_file import SafetensorsCheckpoint, read_header


def read_scalar(ck: SafetensorsCheckpoint, name: str) -> float:
    t = ck.get(name)
    if t.numel() != 1:
        raise SourceError(f"{ck.path}: {name!r} should hold one value (the LoRA alpha), it has shape {list(t.shape)}")
    return float(t.reshape(()).float())


class KohyaCheckpoint(SafetensorsCheckpoint):
    format = "kohya"

    def __init__(self, path: str, id: str):
        super().__init__(path, id)
        self._pairs: dict[str, LoraPair] | None = None

    def lora_pairs(self) -> dict[str, LoraPair]:
        if self._pairs is None:
            infos = self.infos()
            self._pairs = {}
            for module, (a, b, _) in find_pairs(infos, KOHYA_SUFFIXES, self.path).items():
                r = infos[a].shape[0]
                alpha_name = module + ".alpha"
                alpha = read_scalar(self, alpha_name) if alpha_name in infos else float(r)
                self._pairs[module] = LoraPair(module, a, b, alpha / r, False, alpha_name if alpha_name in infos else None)
        return self._pairs

    def metadata(self) -> dict:
        meta = super().metadata()
        return {"safetensors_metadata": meta, "base_model": meta.get("ss_base_model_version")}


def _detect(path: str) -> bool:
    if not (os.path.isfile(path) and path.endswith(".safetensors")):
        return False
    try:
        keys = [k for k in read_header(path) if k != "__metadata__"]
    except SourceError:
        return False
    return any(k.endswith(".lora_down.weight") for k in keys) or any(k.startswith(KOHYA_PREFIXES) for k in keys)


register_format(Format("kohya", _detect, lambda p, i: KohyaCheckpoint(p, i), priority=30,
                       description="a kohya / A1111 LoRA .safetensors (lora_down / lora_up / alpha)", extensions=(".safetensors",)))
