"""Inspector: look into a UWS store without its source checkpoints.

Summary, sortable/filterable tensor table, per-tensor spectrum against the null baseline,
per-model x per-tensor error heatmap, model list and export of one model. Opening reads
metadata only; a tensor's spectrum is read when that tensor is selected.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import anywidget
import traitlets as t

import uwsfmt

from . import jobs, payload
from .messages import default_export_path, describe_error  # noqa: F401  (re-exported: converter imports it from here)
from .static_files import css, esm

log = logging.getLogger("jupyter_ext")

EXPORT_FORMATS = ("safetensors", "peft")
_SPECTRUM_CACHE = 64


class Inspector(anywidget.AnyWidget):
    """Inspect a UWS store: ``Inspector("family.uws")`` (a path or an opened store).

    A store that cannot be opened shows the library's message in the widget instead of raising.

    >>> Inspector("family.uws")  # doctest: +SKIP
    """

    _esm = esm("inspector.js")
    _css = css()

    path = t.Unicode("").tag(sync=True)
    summary = t.Dict().tag(sync=True)
    tensors = t.List().tag(sync=True)
    models = t.List().tag(sync=True)
    #: float32 little-endian, row-major (rows = models, possibly max-pooled; see ``heatmap``)
    errors = t.Bytes(b"").tag(sync=True)
    heatmap = t.Dict().tag(sync=True)
    tab = t.Unicode("overview").tag(sync=True)
    selected_tensor = t.Unicode("").tag(sync=True)
    selected_model = t.Unicode("").tag(sync=True)
    spectrum = t.Dict().tag(sync=True)
    export_format = t.Unicode("safetensors").tag(sync=True)
    export_formats = t.List(list(EXPORT_FORMATS)).tag(sync=True)
    export_path = t.Unicode("").tag(sync=True)
    export_state = t.Unicode("idle").tag(sync=True)  # idle | running | done | error
    export_message = t.Unicode("").tag(sync=True)
    message = t.Unicode("").tag(sync=True)
    message_kind = t.Unicode("").tag(sync=True)  # "" | info | error
    open_seconds = t.Float(0.0).tag(sync=True)

    def __init__(self, store: Any = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.store = None
        self._spectra: dict[str, dict] = {}
        self._auto_export_path = ""
        self._task = None
        self.on_msg(self._on_msg)
        if store is not None:
            self.load(store)

    # ------------------------------------------------------------------ loading
    def load(self, store: Any) -> None:
        """Show another store (a path or an opened store)."""
        t0 = time.perf_counter()
        self._spectra.clear()
        self.spectrum = {}
        try:
            if isinstance(store, (str, os.PathLike)):

                self.path = os.fspath(store)
                store = uwsfmt.open(store)
            self.path = str(getattr(store, "path", self.path) or self.path)
            view, data = payload.store_view(store)
            formats = payload.export_formats(store)
        except Exception as e:  # noqa: BLE001
            self.store = None
            self.summary, self.tensors, self.models, self.errors, self.heatmap = {}, [], [], b"", {}
            self._say(f"Cannot open {self.path or 'the store'}: {describe_error(e)}", "error")
            return
        self.store = store
        with self.hold_sync():
            self.summary, self.tensors, self.models = view["summary"], view["tensors"], view["models"]
            self.errors = data
            self.heatmap = view["heatmap"]
            self.export_formats = formats
            if self.export_format not in formats:
                self.export_format = formats[0]
            self.selected_tensor = ""
            self.selected_model = ""
            self.export_state, self.export_message = "idle", ""
            self._say("", "")
        self.open_seconds = time.perf_counter() - t0

    def _say(self, message: str, kind: str = "info") -> None:
        self.message, self.message_kind = message, kind

    # ------------------------------------------------------------------ selection
    def select_tensor(self, name: str) -> None:
        self.selected_tensor = name

    def select_model(self, model_id: str) -> None:
        self.selected_model = model_id

    @t.observe("selected_tensor")
    def _load_spectrum(self, change: dict) -> None:
        name = change["new"]
        if not name or self.store is None:
            self.spectrum = {}
            return
        if name not in self._spectra:
            row = next((x for x in self.tensors if x.get("name") == name), None)
            if row is not None and row.get("encoding") != "subspace":
                self._spectra[name] = {"name": name, "unavailable": (
                    f"{name} is stored {row.get('encoding')}: it has no basis, so no spectrum.")}
            else:
                try:
                    self._spectra[name] = payload.spectrum(name, self.store.spectrum(name))
                except Exception as e:  # noqa: BLE001
                    self._spectra[name] = {"name": name, "unavailable": describe_error(e)}
            while len(self._spectra) > _SPECTRUM_CACHE:
                self._spectra.pop(next(iter(self._spectra)))
        self.spectrum = self._spectra[name]

    @t.observe("selected_model", "export_format")
    def _default_export_path(self, change: dict) -> None:
        # Suggest a path unless the user typed one of their own.
        if not self.selected_model:
            return
        if self.export_path and self.export_path != self._auto_export_path:
            return
        self._auto_export_path = default_export_path(self.selected_model, self.export_format)
        self.export_path = self._auto_export_path
        if change["name"] == "selected_model":
            self.export_state, self.export_message = "idle", ""
            if self.store is not None and callable(getattr(self.store, "export_formats", None)):
                try:  # a model from a Hugging Face folder can go back to one ("hf")
                    self.export_formats = payload.export_formats(self.store, self.selected_model)
                except Exception as e:  # noqa: BLE001 - keep the store's formats
                    log.debug("export formats of %s unavailable", self.selected_model, exc_info=e)
                if self.export_format not in self.export_formats and self.export_formats:
                    self.export_format = self.export_formats[0]

    # ------------------------------------------------------------------ export
    def export(self, model_id: str | None = None, path: str | None = None, format: str | None = None):
        """Export one model (default: the selected one) in the background; returns the task."""
        model_id = model_id or self.selected_model
        fmt = format or self.export_format
        path = (path or self.export_path).strip()
        if self.store is None:
            return self._export_failed("No store is open.")
        if not model_id:
            return self._export_failed("Select a model in the list first.")
        if fmt not in self.export_formats:
            return self._export_failed(f"Unknown export format {fmt!r}; choose one of {', '.join(self.export_formats)}.")
        if not path:
            return self._export_failed("Enter the path to export to.")
        if self.export_state == "running":
            return None  # the button is disabled meanwhile; a second call is ignored
        self.export_state = "running"
        self.export_message = f"Exporting {model_id} as {fmt} to {path} …"
        store = self.store
        t0 = time.perf_counter()

        def work():
            return store.export(model_id, path, format=fmt)

        def done(result: Any) -> None:
            where = os.fspath(result) if isinstance(result, (str, os.PathLike)) else path
            self.export_state = "done"
            self.export_message = f"Exported {model_id} ({fmt}) to {where} in {time.perf_counter() - t0:.1f} s."

        def failed(e: BaseException) -> None:
            self._export_failed(describe_error(e))

        self._task = jobs.start(work, on_result=done, on_error=failed)
        return self._task

    def _export_failed(self, message: str) -> None:
        self.export_state, self.export_message = "error", message

    # ------------------------------------------------------------------ messages from the view
    def _on_msg(self, _widget: Any, content: dict, _buffers: list) -> None:
        if not isinstance(content, dict):
            return
        if content.get("action") == "export":
            self.export()
