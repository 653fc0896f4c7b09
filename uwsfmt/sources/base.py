"""What a checkpoint is to uwsfmt: named tensors with headers readable before any data.

A :class:`Checkpoint` lists tensor headers (name, shape, dtype) cheaply and loads one tensor at
a time on demand, so a build never needs a whole model in memory. Each checkpoint format is a
small module in this package that registers a :class:`Format` (see :mod:`.registry`).
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from uwsfmt.errors import SourceError
from uwsfmt.format.dtypes import name_of, to_storage, torch_dtype


@dataclass(frozen=True)
class TensorInfo:
    """Header of one tensor: enough to plan a build without reading data."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # logical dtype name, see uwsfmt.dtypes

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=_torch_dtype(self.dtype)).element_size()


def _torch_dtype(name: str) -> torch.dtype:

    return torch_dtype(name)


@dataclass(frozen=True)
class LoraPair:
    """A LoRA module inside an adapter checkpoint: delta W = scale * B @ A.

    ``a`` and ``b`` are tensor names in the checkpoint (A: r x in, B: out x r; conv LoRAs:
    A: r x in x kh x kw, B: out x r x 1 x 1). ``fan_in_fan_out`` means the adapted layer stores
    W transposed (GPT-2 Conv1D, PEFT embedding LoRAs). ``alpha`` names a tensor the pair
    consumes (kohya's per-module ``.alpha``): its value is folded into ``scale``.
    """

    module: str
    a: str
    b: str
    scale: float
    fan_in_fan_out: bool = False
    alpha: str | None = None


class Checkpoint(ABC):
    """One model of a family. Subclasses implement :meth:`infos` and :meth:`get`."""

    #: format name, e.g. "safetensors"
    format: str = "unknown"

    def __init__(self, id: str, path: str | None = None):
        self.id = id
        self.path = path
        self._fingerprint: dict | None = None

    @abstractmethod
    def infos(self) -> dict[str, TensorInfo]:
        """Headers of every tensor, in file order. Must not read tensor data."""

    @abstractmethod
    def get(self, name: str) -> torch.Tensor:
        """One tensor, on CPU, in its source dtype."""

    def lora_pairs(self) -> dict[str, LoraPair]:
        """LoRA modules (for adapter formats); empty for ordinary checkpoints."""
        return {}

    def metadata(self) -> dict:
        """Format-specific metadata worth keeping in the store (JSON-serialisable)."""
        return {}

    def folder_layout(self) -> dict | None:
        """Checkpoints read from a model folder: ``{"index": the shard index's file name or None,
        "shards": [weights file names]}`` (how an export lays the weights out again); else None."""
        return None

    def files(self) -> list[str]:
        """Files this checkpoint was read from (for sha256 and size)."""
        return [self.path] if self.path and os.path.isfile(self.path) else []

    def fingerprint(self) -> dict:
        """``{"sha256": ..., "size": ...}`` of the source files (computed once, streamed)."""
        if self._fingerprint is None:
            files = self.files()
            h = hashlib.sha256()
            size = 0
            buf = bytearray(1 << 22)  # one buffer for every read, not a fresh 4 MiB (page faults) per chunk
            view = memoryview(buf)
            for f in sorted(files):
                with open(f, "rb", buffering=0) as fh:
                    while n := fh.readinto(buf):
                        h.update(view[:n])
                        size += n
            self._fingerprint = {"sha256": h.hexdigest() if files else None, "size": size}
        return self._fingerprint

    def prefetch(self, name: str) -> None:  # noqa: B027  (optional hook)
        """Hint that tensor ``name`` will be read soon (formats with files: ask the kernel to
        start reading it in the background). Never fails; a no-op by default."""

    def close(self) -> None:  # noqa: B027  (optional hook: most formats hold nothing open)
        """Release file handles; the checkpoint may be reopened lazily."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, path={self.path!r})"


class StateDictCheckpoint(Checkpoint):
    """An in-memory ``{name: tensor}`` mapping.

    >>> ck = StateDictCheckpoint("m0", {"w": torch.zeros(2, 3)})
    >>> ck.infos()["w"].shape
    (2, 3)
    """

    format = "state_dict"

    def __init__(self, id: str, tensors: dict[str, torch.Tensor], lora: dict[str, LoraPair] | None = None):
        super().__init__(id, None)
        for k, v in tensors.items():
            if not isinstance(k, str) or not isinstance(v, torch.Tensor):

                raise SourceError(f"model {id!r}: entry {k!r} is a {type(k).__name__} -> {type(v).__name__}; a state dict "
                                  "maps tensor names (str) to tensors (a family is {model_id: state_dict})")
        self._tensors = tensors
        self._lora = dict(lora or {})

    def infos(self) -> dict[str, TensorInfo]:
        return {
            k: TensorInfo(k, tuple(v.shape), name_of(v.dtype)) for k, v in self._tensors.items()
        }

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name].detach().cpu()

    def lora_pairs(self) -> dict[str, LoraPair]:
        return self._lora

    def fingerprint(self) -> dict:
        if self._fingerprint is None:
            h = hashlib.sha256()
            size = 0

            for k in sorted(self._tensors):
                b = to_storage(self._tensors[k]).tobytes()
                h.update(k.encode())
                h.update(b)
                size += len(b)
            self._fingerprint = {"sha256": h.hexdigest(), "size": size}
        return self._fingerprint


@dataclass
class Format:
    """A registered checkpoint format: how to recognise a path and how to open it."""

    name: str
    detect: Callable[[str], bool]
    open: Callable[[str, str], Checkpoint]  # (path, id) -> Checkpoint
    priority: int = 0
    description: str = ""
    extensions: tuple[str, ...] = field(default_factory=tuple)
