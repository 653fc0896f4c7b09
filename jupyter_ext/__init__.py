"""Jupyter side of uwsfmt: notebook widgets, a JupyterLab extension and its server extension.

The widgets (``Inspector``, ``Converter``) are thin views over :mod:`uwsfmt` made with
anywidget; the JupyterLab extension (built from ``labextension/``, shipped under
``share/jupyter/labextensions/uwsfmt-jupyterlab``) opens the same views in main-area tabs,
served by :mod:`jupyter_ext.server`. All numbers come from the library.

>>> from jupyter_ext import Inspector, Converter
>>> Inspector("family.uws")          # doctest: +SKIP
>>> Converter(sources="ckpts/*.safetensors", output="family.uws")  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

# no __all__: the widgets are loaded on first use (below), and the API reference documents them
# from their modules (jupyter_ext.converter, jupyter_ext.inspector)

#: the labextension's npm name (folder under share/jupyter/labextensions)
LABEXTENSION = "uwsfmt-jupyterlab"


def __getattr__(name: str) -> Any:
    # the widgets import anywidget/ipywidgets: only when asked for, so that the server extension
    # (which imports this package) does not pay for them
    if name == "Converter":
        from .converter import Converter

        return Converter
    if name == "Inspector":
        from .inspector import Inspector

        return Inspector
    raise AttributeError(f"module 'jupyter_ext' has no attribute {name!r}")


def _jupyter_labextension_paths() -> list[dict]:
    return [{"src": "labextension", "dest": LABEXTENSION}]


def _jupyter_server_extension_points() -> list[dict]:
    return [{"module": "jupyter_ext.server"}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    from .server import load_jupyter_server_extension as load  # lazy: jupyter_ext imports no server code until a server loads it

    load(serverapp)
