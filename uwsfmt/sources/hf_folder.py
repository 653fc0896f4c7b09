"""Hugging Face model folders: ``model.safetensors``, sharded ``model-0000x-of-0000n.safetensors``
with ``model.safetensors.index.json``, or the ``pytorch_model*.bin`` equivalents.

Planning reads the index and each shard's header only. Data is read lazily, one tensor at a
time, and each shard is opened once (the handle is kept until :meth:`close`).
"""

from __future__ import annotations

import json
import os

import torch

from uwsfmt.errors import SourceError
from uwsfmt.sources.base import Checkpoint, Format, TensorInfo
from uwsfmt.sources.registry import register_format
from uwsfmt.sources.safetensors_file import SafetensorsCheckpoint
from uwsfmt.sources.torch_file import TorchCheckpoint

SINGLE = ("model.safetensors", "pytorch_model.bin")
INDEX = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _index_file(folder: str) -> str | None:
    for name in INDEX:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    # other HF index names (e.g. diffusion_pytorch_model.safetensors.index.json)
    hits = sorted(f for f in os.listdir(folder) if f.endswith((".safetensors.index.json", ".bin.index.json")))
    return os.path.join(folder, hits[0]) if len(hits) == 1 else None


def _single_file(folder: str) -> str | None:
    for name in SINGLE:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def read_index(path: str) -> dict[str, str]:
    """``{tensor name: shard file name}`` from an HF ``*.index.json``."""
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
        wm = index["weight_map"]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise SourceError(f"{path}: not a valid shard index (needs a 'weight_map' object: {e})") from e
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise SourceError(f"{path}: 'weight_map' must map tensor names to shard file names")
    for shard in set(wm.values()):
        if os.path.isabs(shard) or ".." in shard.replace("\\", "/").split("/"):
            raise SourceError(f"{path}: shard name {shard!r} points outside the folder; refusing it")
    return wm


class HFFolderCheckpoint(Checkpoint):
    format = "hf_folder"
    path: str

    def __init__(self, path: str, id: str):
        super().__init__(id, path)
        index = _index_file(path)
        if index is not None:
            self.index: str | None = index
            wm = read_index(index)
            self._shard_of: dict[str, str] | None = wm
            shards = list(dict.fromkeys(wm.values()))
        else:
            single = _single_file(path)
            if single is None:
                raise SourceError(f"{path}: not a Hugging Face model folder (no {' / '.join(SINGLE + INDEX)})")
            self.index = None
            shards = [os.path.basename(single)]
            self._shard_of = None
        self._shards: dict[str, SafetensorsCheckpoint | TorchCheckpoint] = {}
        for s in shards:
            p = os.path.join(path, s)
            if not os.path.isfile(p):
                raise SourceError(f"{self.index}: lists shard {s!r}, which is missing from {path}")
            self._shards[s] = SafetensorsCheckpoint(p, id) if s.endswith(".safetensors") else TorchCheckpoint(p, id)
        self._infos: dict[str, TensorInfo] | None = None

    def infos(self) -> dict[str, TensorInfo]:
        if self._infos is None:
            out: dict[str, TensorInfo] = {}
            where: dict[str, str] = {}
            for s, ck in self._shards.items():
                for k, v in ck.infos().items():
                    if k in out:
                        raise SourceError(f"{self.path}: tensor {k!r} is in both shards {where[k]} and {s}")
                    out[k] = v
                    where[k] = s
            if self._shard_of is not None:
                missing = [k for k in self._shard_of if k not in out]
                wrong = [k for k, s in self._shard_of.items() if k in where and where[k] != s]
                if missing or wrong:
                    bad = missing[:3] + wrong[:3]
                    raise SourceError(
                        f"{self.index}: the index does not match the shards ({len(missing)} listed tensor(s) missing, "
                        f"{len(wrong)} in another shard than listed: {', '.join(map(repr, bad))}); re-save the model"
                    )
                self._shard_of = where
            else:
                self._shard_of = where
            self._infos = out
        return self._infos

    def get(self, name: str) -> torch.Tensor:
        if self._infos is None:
            self.infos()
        assert self._shard_of is not None  # set by infos()
        try:
            shard = self._shard_of[name]
        except KeyError as e:
            raise SourceError(f"{self.path}: no tensor {name!r} in this model folder") from e
        return self._shards[shard].get(name)

    def prefetch(self, name: str) -> None:
        shard = self._shard_of.get(name) if self._infos is not None and self._shard_of is not None else None
        if shard is not None:
            self._shards[shard].prefetch(name)

    def metadata(self) -> dict:
        cfg = os.path.join(self.path, "config.json")
        out: dict = {"shards": len(self._shards)}
        if os.path.isfile(cfg):
            try:
                with open(cfg, encoding="utf-8") as f:
                    c = json.load(f)
                out.update({k: c[k] for k in ("model_type", "architectures", "_name_or_path") if k in c})
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                pass
        return out

    def folder_layout(self) -> dict:
        return {"index": os.path.basename(self.index) if self.index else None, "shards": list(self._shards)}

    def files(self) -> list[str]:
        fs = [ck.path for ck in self._shards.values()]
        return fs + ([self.index] if self.index else [])

    def close(self) -> None:
        for ck in self._shards.values():
            ck.close()


def _detect(path: str) -> bool:
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "adapter_config.json")):
        return False
    return _index_file(path) is not None or _single_file(path) is not None


register_format(Format("hf_folder", _detect, lambda p, i: HFFolderCheckpoint(p, i), priority=35,
                       description="a Hugging Face model folder (model.safetensors, sharded with model.safetensors.index.json, or pytorch_model*.bin)"))
