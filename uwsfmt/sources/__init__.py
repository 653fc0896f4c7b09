"""Checkpoint formats. Importing this package registers every built-in format."""

from uwsfmt.sources import diffusers, hf_folder, kohya, peft, remote_safetensors, safetensors_file, torch_file  # noqa: F401  (registration side effects)
from uwsfmt.sources.base import Checkpoint, LoraPair, StateDictCheckpoint, TensorInfo
from uwsfmt.sources.registry import discover, formats, model_id_for, open_checkpoint, register_format

__all__ = [
    "Checkpoint", "LoraPair", "StateDictCheckpoint", "TensorInfo",
    "discover", "formats", "model_id_for", "open_checkpoint", "register_format",
]
