"""Jupyter widgets for uwsfmt: convert checkpoints into a UWS store and inspect stores.

Thin views over :mod:`uwsfmt` built with anywidget (a Python class with synced traits and a small
ES module; no build step). All numbers come from the library; the widgets only lay them out.

>>> from jupyter_ext import Inspector, Converter
>>> Inspector("family.uws")          # doctest: +SKIP
>>> Converter(sources="ckpts/*.safetensors", output="family.uws")  # doctest: +SKIP
"""

from __future__ import annotations

from .converter import Converter
from .inspector import Inspector

__all__ = ["Converter", "Inspector"]
