"""PEFT adapter folders: ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``.bin``).

Every LoRA pair becomes a :class:`~uwsfmt.sources.base.LoraPair` whose scale follows the
config exactly as PEFT applies it: ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), with
``rank_pattern`` / ``alpha_pattern`` per module and ``fan_in_fan_out``. Everything else in the
weights file (``modules_to_save`` copies, LoRA biases, DoRA magnitudes) stays an ordinary
tensor. The config itself is kept (``metadata()["peft_config"]``) so that an export can write
an adapter PEFT loads again.
"""

from __future__ import annotations

import json
import os

import torch

from uwsfmt.errors import SourceError
from uwsfmt.sources.base import Checkpoint, Format, LoraPair, TensorInfo
from uwsfmt.sources.lora_layout import PEFT_SUFFIXES, find_pairs, peft_rank, peft_scale
from uwsfmt.sources.registry import register_format
from uwsfmt.sources.safetensors_file import SafetensorsCheckpoint
from uwsfmt.sources.torch_file import TorchCheckpoint

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
#: prefix PeftModel.save_pretrained puts before module names
PREFIX = "base_model.model."


def module_key(module: str) -> str:
    """The module's name inside the base model, as PEFT's patterns see it."""
    return module[len(PREFIX):] if module.startswith(PREFIX) else module


def read_config(folder: str) -> dict:
    path = os.path.join(folder, CONFIG)
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceError(f"{path}: cannot read the PEFT adapter config ({e}); re-save the adapter with save_pretrained") from e
    if not isinstance(config, dict):
        raise SourceError(f"{path}: the PEFT adapter config is not a JSON object")
    return config


class PeftCheckpoint(Checkpoint):
    format = "peft"
    path: str

    def __init__(self, path: str, id: str):
        super().__init__(id, path)
        self.config = read_config(path)
        weights = [os.path.join(path, w) for w in WEIGHTS if os.path.isfile(os.path.join(path, w))]
        if not weights:
            raise SourceError(f"{path}: PEFT adapter folder without {' or '.join(WEIGHTS)}")
        self.weights = weights[0]
        inner = SafetensorsCheckpoint if self.weights.endswith(".safetensors") else TorchCheckpoint
        self._inner = inner(self.weights, id)
        self._pairs: dict[str, LoraPair] | None = None

    def infos(self) -> dict[str, TensorInfo]:
        return self._inner.infos()

    def get(self, name: str) -> torch.Tensor:
        return self._inner.get(name)

    def lora_pairs(self) -> dict[str, LoraPair]:
        if self._pairs is None:
            self._pairs = {}
            if str(self.config.get("peft_type", "LORA")).upper() != "LORA":
                return self._pairs  # other PEFT methods (IA3, LoHa, ...): ordinary tensors
            infos = self.infos()
            fifo_cfg = bool(self.config.get("fan_in_fan_out", False))
            for module, (a, b, fifo) in find_pairs(infos, PEFT_SUFFIXES, self.weights).items():
                key = module_key(module)
                r = infos[a].shape[0]
                want = peft_rank(key, self.config)
                if want is not None and want != r:
                    raise SourceError(
                        f"{self.path}: {CONFIG} gives module {key!r} rank {want} but {a!r} has {r} rows; "
                        "the config and the weights do not belong together"
                    )
                self._pairs[module] = LoraPair(module, a, b, peft_scale(key, r, self.config), fifo or fifo_cfg)
        return self._pairs

    def metadata(self) -> dict:
        return {"peft_config": self.config, "base_model": self.config.get("base_model_name_or_path")}

    def folder_layout(self) -> dict:
        return {"index": None, "shards": [os.path.basename(self.weights)]}

    def files(self) -> list[str]:
        return [self.weights, os.path.join(self.path, CONFIG)]

    def close(self) -> None:
        self._inner.close()


def _detect(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG)) and any(
        os.path.isfile(os.path.join(path, w)) for w in WEIGHTS)


register_format(Format("peft", _detect, lambda p, i: PeftCheckpoint(p, i), priority=40,
                       description="a PEFT adapter folder (adapter_config.json + adapter_model.safetensors/.bin)"))
