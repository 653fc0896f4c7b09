"""Converter: turn a family of checkpoints into a UWS store from a notebook, or add new
checkpoints to an existing store.

Sources (paths, folders, globs) -> "Plan" (headers only) -> options -> "Run" (uwsfmt.convert, or
Store.extend for "add to an existing store", in a worker thread driven from the kernel's asyncio
loop) with progress, ETA, Cancel and a log -> summary -> "Open in Inspector".
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import anywidget
import ipywidgets
import traitlets as t

import uwsfmt

from . import jobs, options, payload
from .inspector import Inspector, describe_error
from .static_files import css, esm

LOG_LINES = 400
RESIDUAL_BITS, MODES, MEAN_DTYPES = options.RESIDUAL_BITS, options.MODES, options.MEAN_DTYPES
available_devices = options.available_devices


def split_sources(text: str) -> list[str]:
    """One source per line (commas also separate); blank lines and ``#`` comments are skipped.

    >>> split_sources("a/*.safetensors\\n\\n# old\\nb.pt, c.pt")
    ['a/*.safetensors', 'b.pt', 'c.pt']
    """
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        out.extend(p.strip() for p in line.split(",") if p.strip())
    return [os.path.expanduser(p) for p in out]


#: the options of the form, sent again with each button's message (see Converter._apply_form)
FORM_TRAITS = ("sources", "output", "action", "skip_existing", "rank_mode", "tau", "rank", "center", "mode", "residual_bits",
               "max_error", "basis", "mean_dtype", "device", "overwrite")


class Converter(anywidget.AnyWidget):
    """Convert checkpoints into a UWS store: ``Converter(sources="ckpts/", output="family.uws")``.

    Displaying it shows the form and, once "Open in Inspector" is pressed, an :class:`Inspector`
    of the new store below it (``.inspector``).

    >>> Converter(sources="adapters/*", output="adapters.uws")  # doctest: +SKIP
    """

    _esm = esm("converter.js")
    _css = css()

    sources = t.Unicode("").tag(sync=True)
    output = t.Unicode("").tag(sync=True)
    action = t.Unicode("create").tag(sync=True)  # create (a new store) | add (to the store at output)
    skip_existing = t.Bool(True).tag(sync=True)  # add: leave out sources whose model id the store has
    rank_mode = t.Unicode("auto").tag(sync=True)  # auto | tau | rank
    tau = t.Float(0.99).tag(sync=True)
    rank = t.Int(16).tag(sync=True)
    center = t.Bool(True).tag(sync=True)
    mode = t.Unicode("auto").tag(sync=True)  # basis side: auto | left | right | both | flat
    modes = t.List(list(MODES)).tag(sync=True)
    residual_bits = t.Int(0).tag(sync=True)
    residual_choices = t.List(list(RESIDUAL_BITS)).tag(sync=True)
    max_error = t.Float(None, allow_none=True).tag(sync=True)
    basis = t.Unicode("exact").tag(sync=True)  # how bases are found: exact | sketch
    mean_dtype = t.Unicode("auto").tag(sync=True)  # how family means are stored: auto | float16 | compute
    device = t.Unicode("cpu").tag(sync=True)
    devices = t.List(["cpu"]).tag(sync=True)
    overwrite = t.Bool(False).tag(sync=True)

    # idle | planning | planned | running | cancelling | done | cancelled | error
    status = t.Unicode("idle").tag(sync=True)
    plan_report = t.Dict().tag(sync=True)
    progress = t.Dict().tag(sync=True)  # done, total, message, elapsed, eta (seconds or None)
    log = t.List().tag(sync=True)
    summary = t.Dict().tag(sync=True)
    message = t.Unicode("").tag(sync=True)
    message_kind = t.Unicode("").tag(sync=True)  # "" | info | error | success

    def __init__(self, sources: str | list[str] = "", output: str = "", **kwargs: Any):
        if isinstance(sources, (list, tuple)):
            sources = "\n".join(os.fspath(s) for s in sources)
        devices = available_devices()
        kwargs.setdefault("devices", devices)
        kwargs.setdefault("device", devices[-1])
        super().__init__(sources=os.fspath(sources), output=os.fspath(output), **kwargs)
        self.store = None
        self.inspector: Inspector | None = None
        self._task = None
        self._cancel: threading.Event | None = None
        self._t0 = 0.0
        self._slot = ipywidgets.VBox()
        self._layout = ipywidgets.VBox([self, self._slot])
        self.on_msg(self._on_msg)

    def _repr_mimebundle_(self, **kwargs: Any):
        # Shown together with the slot where "Open in Inspector" puts the Inspector.
        return self._layout._repr_mimebundle_(**kwargs)

    @t.observe("sources")
    def _sources_changed(self, _change: Any) -> None:
        if self.status != "planning":  # the report was about the sources before
            self.plan_report = {}

    # ------------------------------------------------------------------ helpers
    def _say(self, message: str, kind: str = "info") -> None:
        self.message, self.message_kind = message, kind

    def _busy(self) -> bool:
        if self.status in ("planning", "running", "cancelling"):
            self._say(f"Still {self.status}: wait for it to finish (or await the task plan()/run() returned).", "info")
            return True
        return False

    def _source_list(self) -> list[str] | None:
        sources = split_sources(self.sources)
        if not sources:
            self.status = "error"
            self._say("Enter at least one source: a checkpoint file, a folder of checkpoints or a glob "
                      "such as adapters/*/adapter_model.safetensors.", "error")
            return None
        return sources

    def _form(self) -> dict:
        return {name: getattr(self, name) for name in FORM_TRAITS}

    def convert_kwargs(self) -> dict:
        """The keyword arguments the form passes to ``uwsfmt.convert`` (besides sources/out)."""

        return options.convert_kwargs(self._form())

    def add_kwargs(self) -> dict:
        """The keyword arguments the form passes to ``Store.extend`` when adding to a store (the
        store's own bases decide ranks, sides and residuals; only these apply)."""
        return options.add_kwargs(self._form())

    def _check_options(self) -> str | None:
        out = os.path.expanduser(self.output.strip())
        return options.problem(self._form(), devices=list(self.devices), modes=tuple(self.modes), output=out,
                               output_is_dir=bool(out) and os.path.isdir(out), output_is_file=bool(out) and os.path.isfile(out))

    # ------------------------------------------------------------------ plan
    def plan(self):
        """Read the sources' headers and show the planning report; returns the task."""
        if self._busy():
            return None
        sources = self._source_list()
        if sources is None:
            return None

        self.status = "planning"
        self.plan_report = {}
        self._say(f"Reading the headers of {len(sources)} source(s) …", "info")

        def done(report: dict) -> None:
            self.plan_report = payload.jsonable(report)
            conflicts = self.plan_report.get("conflicts") or []
            self.status = "planned"
            if conflicts:
                self._say(f"These sources do not form one family ({len(conflicts)} conflict(s) below). "
                          "Fix or remove the offending checkpoints before Run.", "error")
            else:
                self._say(f"{self.plan_report.get('n_models', '?')} models form one family. "
                          "Choose the options and Run.", "success")

        def done_add(report: dict) -> None:
            self.plan_report = payload.jsonable(report)
            conflicts = self.plan_report.get("conflicts") or []
            self.status = "planned"
            counts = f"{len(report['new'])} new model(s), {len(report['existing'])} already in the store"
            if conflicts:
                self._say(f"{counts}; {len(conflicts)} conflict(s) below would stop the run. Fix or remove those sources.", "error")
            else:
                self._say(f"{counts}: the sources fit the store. Run adds them.", "success")

        if self.action == "add":
            out = os.path.expanduser(self.output.strip())
            if not os.path.isdir(out):
                self.status = "error"
                self._say(self._check_options() or f"{out} is not a store directory to add to.", "error")
                return None
            skip = bool(self.skip_existing)

            def plan_add():
                with uwsfmt.open(out) as st:
                    return st.plan_append(sources, skip_existing=skip)

            self._task = jobs.start(plan_add, on_result=done_add, on_error=self._failed)
            return self._task
        self._task = jobs.start(lambda: uwsfmt.plan(sources), on_result=done, on_error=self._failed)
        return self._task

    # ------------------------------------------------------------------ run
    def run(self):
        """Start the conversion in the background; returns the task (None if it did not start)."""
        if self._busy():
            return None
        sources = self._source_list()
        if sources is None:
            return None
        problem = self._check_options()
        if problem:
            self.status = "error"
            self._say(problem, "error")
            return None

        adding = self.action == "add"
        kwargs = self.add_kwargs() if adding else self.convert_kwargs()
        out = os.path.expanduser(self.output.strip())
        cancel = threading.Event()
        relay = jobs.ProgressRelay(self._show_progress)
        self._cancel = cancel
        self._t0 = time.monotonic()
        self.store = None
        with self.hold_sync():
            self.status = "running"
            self.summary = {}
            self.log = [f"{'add' if adding else 'convert'} {len(sources)} source(s) -> {out}  "
                        + " ".join(f"{k}={v}" for k, v in kwargs.items() if v is not None)]
            self.progress = {"done": 0, "total": 0, "message": "starting", "elapsed": 0.0, "eta": None}
            self._say("Adding to the store …" if adding else "Converting …", "info")

        def work():
            if not adding:
                return uwsfmt.convert(sources, out, progress=relay, cancel=cancel, **kwargs)
            store = uwsfmt.open(out, mode="a")
            try:
                added = store.extend(sources, progress=relay, cancel=cancel, **kwargs)
            except BaseException:
                store.close()
                raise
            return store, added

        self._task = jobs.start(work, on_result=self._added if adding else self._converted, on_error=self._failed,
                                on_finally=relay.flush)
        return self._task

    def cancel(self) -> None:
        """Ask a running conversion to stop; the library leaves nothing at the output path."""
        if self.status == "running" and self._cancel is not None:
            self._cancel.set()
            self.status = "cancelling"
            self._say("Cancelling at the next step …", "info")

    def _show_progress(self, done: int, total: int, message: str, lines: list[str]) -> None:
        elapsed = time.monotonic() - self._t0
        eta = elapsed * (total - done) / done if 0 < done <= total else None
        with self.hold_sync():
            self.progress = {"done": done, "total": total, "message": message,
                             "elapsed": round(elapsed, 2), "eta": None if eta is None else round(eta, 1)}
            if lines:
                self.log = (list(self.log) + [f"[{done}/{total}] {ln}" for ln in lines])[-LOG_LINES:]

    def _added(self, result: tuple) -> None:
        store, added = result
        if not added:
            self._converted(store, done="Nothing to add (the store already has every model these sources name)")
            return
        errs = [x for e in added for x in e.get("error") or () if x is not None]
        fixed = sum(1 for e in added if e.get("exceptions"))
        extra = f" The new models' max relative error: {max(errs):.3g}." if errs else ""
        if fixed:
            extra += f" {fixed} of them needed per-model exceptions to meet the error budget (the Inspector suggests a refit)."
        self._converted(store, done=f"Added {len(added)} model(s)", extra=extra)

    def _converted(self, store: Any, done: str = "Done", extra: str = "") -> None:
        self.store = store
        try:
            summary = payload.jsonable(store.summary())
        except Exception as e:  # noqa: BLE001
            summary = {}
            self.log = [*self.log, f"summary unavailable: {describe_error(e)}"]
        elapsed = time.monotonic() - self._t0
        with self.hold_sync():
            self.summary = summary
            p = dict(self.progress)
            if p.get("total"):
                p["done"] = p["total"]
            p.update(elapsed=round(elapsed, 2), eta=0.0, message="done")
            self.progress = p
            self.status = "done"
            ratio = summary.get("ratio")
            emax = summary.get("error_max")
            bits = [f"{summary.get('n_models', '?')} models", f"{summary.get('n_tensors', '?')} tensors"]
            if ratio:
                bits.append(f"{ratio:.2f}x smaller")
            if emax is not None:
                bits.append(f"max relative error {emax:.3g}")
            self.log = [*self.log, f"done in {elapsed:.1f} s"]
            self._say(f"{done} in {elapsed:.1f} s: {', '.join(bits)}.{extra}", "success")

    def _failed(self, e: BaseException) -> None:
        cancelled = type(e).__name__ == "Cancelled" or (
            self._cancel is not None and self._cancel.is_set() and self.status in ("running", "cancelling"))
        with self.hold_sync():
            if cancelled:
                self.status = "cancelled"
                out = self.output.strip()
                self.log = [*self.log, "cancelled"]
                self._say(f"Cancelled. Nothing was written at {out}." if out and not os.path.exists(out) and self.action != "add"
                          else f"Cancelled: {describe_error(e)}", "info")
            else:
                self.status = "error"
                msg = describe_error(e)
                self.log = [*self.log, f"error: {msg}"]
                self._say(msg, "error")

    # ------------------------------------------------------------------ inspector
    def open_inspector(self) -> Inspector | None:
        """Show an Inspector of the converted store below the form (and return it)."""
        target = self.store if self.store is not None else self.output.strip()
        if not target:
            self._say("Convert first, or enter the path of an existing store as output.", "error")
            return None
        self.inspector = Inspector(target)
        self._slot.children = (self.inspector,)
        return self.inspector

    # ------------------------------------------------------------------ messages from the view
    def _on_msg(self, _widget: Any, content: dict, _buffers: list) -> None:
        action = content.get("action") if isinstance(content, dict) else None
        handler = {"plan": self.plan, "run": self.run, "cancel": self.cancel,
                   "open_inspector": self.open_inspector}.get(action)
        if handler is None:
            return
        form = content.get("form")
        if isinstance(form, dict) and not self._apply_form(form):
            return
        handler()

    def _apply_form(self, form: dict) -> bool:
        """Take the form's values as the view had them when its button was pressed. The view's
        trait updates can still be queued behind an earlier one (ipywidgets sends one at a time
        and buffers the rest until the kernel answers) while a button's message goes at once, so
        an option changed just before "Run" would otherwise be missed. False (and a message)
        when a value does not fit its option."""
        try:
            with self.hold_trait_notifications():
                for name in FORM_TRAITS:
                    if name in form and form[name] != getattr(self, name):
                        setattr(self, name, form[name])
        except t.TraitError as e:
            self.status, self.message = "error", f"An option of the form could not be taken: {e}"
            return False
        return True
