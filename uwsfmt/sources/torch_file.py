"""PyTorch ``.bin/.pt/.pth`` state dicts, loaded with ``weights_only=True`` only.

Arbitrary unpickling is refused: a file that needs it is reported, never executed.
"""

from __future__ import annotations

import os
import pickle
import zipfile

import torch

from uwsfmt.errors import SourceError
from uwsfmt.format.dtypes import name_of
from uwsfmt.sources.base import Checkpoint, Format, TensorInfo
from uwsfmt.sources.registry import register_format


def _reason(e: Exception) -> str:
    """The line of torch's weights_only message that says what was refused."""
    lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
    for x in lines:
        if "Unsupported global" in x or "Unsupported operand" in x or "GLOBAL" in x:
            return x
    return lines[0] if lines else type(e).__name__


class TorchCheckpoint(Checkpoint):
    format = "torch"
    path: str

    def __init__(self, path: str, id: str):
        super().__init__(id, path)
        self._sd: dict[str, torch.Tensor] | None = None

    def _load(self) -> dict[str, torch.Tensor]:
        if self._sd is None:
            try:
                # mmap needs the zip container of torch.save; legacy pickles are read whole
                obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(self.path))
            except (pickle.UnpicklingError, RuntimeError, AttributeError, ValueError, EOFError, TypeError, KeyError) as e:
                first = _reason(e)
                raise SourceError(
                    f"{self.path}: refused to load: the file is not a plain tensor state dict "
                    f"loadable with weights_only=True ({first}). uwsfmt never unpickles arbitrary "
                    "objects; re-save the weights with safetensors or torch.save(state_dict)."
                ) from e
            if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
                obj = obj["state_dict"]
            if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
                raise SourceError(
                    f"{self.path}: expected a dict of tensors (a state dict); found {type(obj).__name__} "
                    "with non-tensor values"
                )
            self._sd = obj
        return self._sd

    def infos(self) -> dict[str, TensorInfo]:
        return {k: TensorInfo(k, tuple(v.shape), name_of(v.dtype)) for k, v in self._load().items()}

    def get(self, name: str) -> torch.Tensor:
        return self._load()[name]

    def close(self) -> None:
        self._sd = None


def _detect(path: str) -> bool:
    return os.path.isfile(path) and path.endswith((".bin", ".pt", ".pth"))


register_format(Format("torch", _detect, lambda p, i: TorchCheckpoint(p, i), priority=5,
                       description="a PyTorch state dict (.bin/.pt/.pth), weights_only", extensions=(".bin", ".pt", ".pth")))
