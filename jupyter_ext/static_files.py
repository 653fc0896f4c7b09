"""The views' ES modules and stylesheet, shipped as plain files next to this package.

anywidget loads one ES module per widget, so the shared helpers (formatting, plots) are
concatenated in front of each widget's own module; no bundler, no build step.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

STATIC = Path(__file__).resolve().parent / "static"


@cache
def esm(*names: str) -> str:
    """The named files of ``static/`` joined into one ES module (the last one exports)."""
    return "\n".join((STATIC / n).read_text(encoding="utf-8") for n in names)


@cache
def css() -> str:
    return (STATIC / "uws.css").read_text(encoding="utf-8")
