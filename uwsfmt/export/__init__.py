"""Store -> files people load. One module per format, each registering itself in ``registry``."""

from uwsfmt.export import hf, lora, safetensors  # noqa: F401  (register the exporters)
from uwsfmt.export.registry import EXPORTERS, export, exporter

__all__ = ["EXPORTERS", "export", "exporter"]
