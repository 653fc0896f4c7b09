"""The views' ES modules and stylesheet, shipped as plain files next to this package.

``static/inspector.js`` and ``static/converter.js`` are bundles of the view sources in
``labextension/src/views`` (the same modules the JupyterLab panels import), made by
``jlpm build`` in ``labextension/`` (esbuild); anywidget loads one self-contained module per widget.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

STATIC = Path(__file__).resolve().parent / "static"


@cache
def esm(*names: str) -> str:
    """The named files of ``static/`` joined into one ES module (the last one exports).

    >>> "export" in esm("inspector.js")
    True
    """
    return "\n".join((STATIC / n).read_text(encoding="utf-8") for n in names)


@cache
def css() -> str:
    return (STATIC / "uws.css").read_text(encoding="utf-8")
