"""REST handlers of the uwsfmt server extension (under ``<base_url>/uwsfmt/``).

Every handler is a jupyter_server ``APIHandler``: the server's authentication and authorization
apply (``@web.authenticated`` + ``@authorized`` on the "contents" resource) and POST/DELETE need
the XSRF token the JupyterLab page sends. Paths are relative to the server's root and checked by
:mod:`.paths`. Bad input is answered with a JSON ``{"message": ...}`` and a 4xx status.

    GET    config                          devices, option choices and defaults for the converter
    GET    store?path=                     summary, tensor table, model table, error heatmap (base64 float32)
    GET    errors?path=&model=             one model's relative error per tensor
    GET    spectrum?path=&tensor=          a tensor's eigenvalues, null baseline, explained variance
    POST   validate  {path, deep}          problems found (empty: valid)
    POST   export    {path, model, format, output, overwrite}
    POST   plan      {sources, action, output, skip_existing}
    GET    jobs                            every job the server knows
    POST   jobs      {sources, output, options}       start a convert / add job
    GET    jobs/<id>                       progress, log, final report
    DELETE jobs/<id>                       cancel (nothing half-written is left)
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import threading
import time
from collections import OrderedDict
from typing import Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from tornado import web

import uwsfmt
from uwsfmt import ConfigError, NotFoundError, StoreExistsError, UWSError, validate

from .. import options, payload
from ..messages import default_export_path, describe_error
from . import paths
from .tasks import Job, JobConflict, Jobs

STORE_CACHE = 8


class StoreCache:
    """Opened stores by path, reopened when the store changed on disk (an append commits a new manifest)."""

    def __init__(self, size: int = STORE_CACHE):
        self._stores: OrderedDict[str, tuple[tuple, Any]] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    @staticmethod
    def _stamp(path: str) -> tuple:
        probe = os.path.join(path, "zarr.json") if os.path.isdir(path) else path
        st = os.stat(probe)
        return (st.st_mtime_ns, st.st_size)

    def open(self, path: str):

        if not os.path.exists(path):
            raise FileNotFoundError(2, "No such store", path)
        stamp = self._stamp(path)
        with self._lock:
            hit = self._stores.get(path)
            if hit is not None and hit[0] == stamp:
                self._stores.move_to_end(path)
                return hit[1]
        store = uwsfmt.open(path)
        with self._lock:
            old = self._stores.pop(path, None)
            self._stores[path] = (stamp, store)
            while len(self._stores) > self._size:
                _, (_, gone) = self._stores.popitem(last=False)
                gone.close()
        if old is not None:
            old[1].close()
        return store

    def forget(self, path: str) -> None:
        with self._lock:
            hit = self._stores.pop(path, None)
        if hit is not None:
            hit[1].close()

    def close(self) -> None:
        with self._lock:
            items, self._stores = list(self._stores.values()), OrderedDict()
        for _, st in items:
            st.close()


def _status(e: BaseException) -> int:
    if isinstance(e, paths.PathRefused):
        return 403
    if isinstance(e, (NotFoundError, FileNotFoundError)):
        return 404
    if isinstance(e, (StoreExistsError, JobConflict)):
        return 409
    if isinstance(e, (paths.BadRequest, ConfigError, UWSError, NotADirectoryError, IsADirectoryError)):
        return 400
    return 500


class UWSHandler(APIHandler):
    """Shared plumbing: the root, checked paths, JSON in and out, errors as messages."""

    auth_resource = "contents"

    @property
    def root(self) -> str:
        return self.settings.get("server_root_dir") or self.contents_manager.root_dir

    @property
    def allow_hidden(self) -> bool:
        return bool(getattr(self.contents_manager, "allow_hidden", False))

    @property
    def stores(self) -> StoreCache:
        return self.settings["uwsfmt_stores"]

    @property
    def jobs(self) -> Jobs:
        return self.settings["uwsfmt_jobs"]

    def path(self, rel: Any, what: str = "path", must_exist: bool = False) -> str:
        return paths.resolve(self.root, rel, what=what, allow_hidden=self.allow_hidden, must_exist=must_exist)

    def rel(self, path: str) -> str:
        return paths.relative(self.root, path)

    def arg(self, name: str) -> str:
        value = self.get_query_argument(name, None)
        if value is None or not value.strip():
            raise paths.BadRequest(f"the query parameter {name!r} is missing (e.g. ?{name}=...)")
        return value

    def body(self) -> dict:
        try:
            data = json.loads(self.request.body or b"null")
        except (ValueError, UnicodeDecodeError) as e:
            raise paths.BadRequest(f"the request body is not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise paths.BadRequest(f"the request body must be a JSON object, got {type(data).__name__}")
        return data

    def reply(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(payload.jsonable(data)))

    def fail(self, e: BaseException) -> None:
        status = _status(e)
        if status == 500:
            self.log.warning("uwsfmt: unexpected error in %s %s", self.request.method, self.request.path, exc_info=e)
        self.reply({"message": describe_error(e), "error": type(e).__name__}, status)

    async def guarded(self, fn, *args) -> None:
        """Run ``fn(*args)`` in a worker thread (reading stores must not block the server) and reply."""
        try:
            self.reply(await asyncio.to_thread(fn, *args))
        except Exception as e:  # noqa: BLE001 - every failure becomes a message
            self.fail(e)


class ConfigHandler(UWSHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.reply({"devices": options.available_devices(), "modes": list(options.MODES),
                    "residual_choices": list(options.RESIDUAL_BITS), "mean_dtypes": list(options.MEAN_DTYPES),
                    "defaults": options.DEFAULTS})


class StoreHandler(UWSHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        def work() -> dict:
            path = self.path(self.arg("path"), must_exist=True)
            t0 = time.perf_counter()
            store = self.stores.open(path)
            view, data = payload.store_view(store)
            view["errors"] = base64.b64encode(data).decode("ascii")
            view["path"] = self.rel(path)
            view["export_formats"] = payload.export_formats(store)
            view["export_dir"] = self.rel(os.path.dirname(path))
            view["open_seconds"] = round(time.perf_counter() - t0, 4)
            return view

        await self.guarded(work)


class ErrorsHandler(UWSHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        def work() -> dict:
            path = self.path(self.arg("path"), must_exist=True)
            model = self.arg("model")
            store = self.stores.open(path)
            i = store.model_index(model)
            errs = store.errors()[i]
            return {"model": store.model_ids[i], "tensors": store.tensor_names, "error": payload.jsonable(errs)}

        await self.guarded(work)


class SpectrumHandler(UWSHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        def work() -> dict:
            path = self.path(self.arg("path"), must_exist=True)
            name = self.arg("tensor")
            store = self.stores.open(path)
            entry = store.tensor_entry(name)
            if entry.get("encoding") != "subspace":
                return {"name": name, "unavailable": f"{name} is stored {entry.get('encoding')}: it has no basis, so no spectrum."}
            return payload.spectrum(name, store.spectrum(name))

        await self.guarded(work)


class ValidateHandler(UWSHandler):
    @web.authenticated
    @authorized
    async def post(self) -> None:
        def work() -> dict:
            body = self.body()
            path = self.path(body.get("path"), must_exist=True)
            deep = body.get("deep", False)
            if not isinstance(deep, bool):
                raise paths.BadRequest(f"deep: expected true or false, got {deep!r}")

            notes: list[str] = []
            problems = validate(path, deep=deep, notes=notes)
            return {"path": self.rel(path), "valid": not problems, "problems": problems, "notes": notes}

        await self.guarded(work)


class ExportHandler(UWSHandler):
    @web.authenticated
    @authorized
    async def post(self) -> None:
        def work() -> dict:
            body = self.body()
            path = self.path(body.get("path"), must_exist=True)
            model = body.get("model")
            if not isinstance(model, str) or not model:
                raise paths.BadRequest(f"model: expected a model id of the store, got {model!r}")
            fmt = body.get("format", "safetensors")
            overwrite = body.get("overwrite", False)
            if not isinstance(overwrite, bool):
                raise paths.BadRequest(f"overwrite: expected true or false, got {overwrite!r}")
            store = self.stores.open(path)
            store.model_index(model)  # an unknown model is a 404 before anything else
            formats = payload.export_formats(store, model)
            if fmt not in formats:
                raise ConfigError(f"format: {fmt!r} is not one this store can export model {model!r} to; "
                                  f"choose one of {', '.join(formats)}")
            out_rel = body.get("output") or "/".join(
                p for p in (self.rel(os.path.dirname(path)), default_export_path(model, fmt)) if p)
            out = self.path(out_rel, "output")
            if not os.path.isdir(os.path.dirname(out)):
                raise FileNotFoundError(2, "The folder to export into does not exist", self.rel(os.path.dirname(out)))
            if os.path.exists(out) and not overwrite:
                raise StoreExistsError(f"{self.rel(out)}: already exists; choose another path or tick overwrite")
            t0 = time.perf_counter()
            written = store.export(model, out, format=fmt, overwrite=overwrite)
            took = time.perf_counter() - t0
            shown = self.rel(os.fspath(written) if isinstance(written, (str, os.PathLike)) else out)
            return {"model": model, "format": fmt, "output": shown, "seconds": round(took, 3),
                    "message": f"Exported {model} ({fmt}) to {shown} in {took:.1f} s."}

        await self.guarded(work)


def _form_and_paths(handler: UWSHandler, body: dict) -> tuple[dict, list[str], str, dict]:
    """The checked options, sources and output of a plan/job request."""
    form = options.normalize(body.get("options", {}))
    srcs = paths.sources(handler.root, body.get("sources"), allow_hidden=handler.allow_hidden)
    output = body.get("output")
    out = handler.path(output, "output") if output not in (None, "") else ""
    shown = {"sources": [handler.rel(s) for s in srcs], "output": handler.rel(out) if out else ""}
    return form, srcs, out, shown


class PlanHandler(UWSHandler):
    @web.authenticated
    @authorized
    async def post(self) -> None:
        def work() -> dict:

            form, srcs, out, shown = _form_and_paths(self, self.body())
            if form["action"] == "add":
                if not out or not os.path.isdir(out):
                    raise ConfigError(f"{shown['output'] or 'output'}: not a store directory to add to; "
                                      "choose 'create a new store' to make one")
                with uwsfmt.open(out) as st:
                    report = st.plan_append(srcs, skip_existing=form["skip_existing"])
            else:
                report = uwsfmt.plan(srcs)
            return {**payload.jsonable(report), **shown}

        await self.guarded(work)


class JobsHandler(UWSHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.reply({"jobs": [j.state() for j in self.jobs.all()]})

    @web.authenticated
    @authorized
    async def post(self) -> None:
        try:
            job = await asyncio.to_thread(self._start)
        except Exception as e:  # noqa: BLE001
            self.fail(e)
            return
        self.reply(job.state(), 201)

    def _start(self) -> Job:
        form, srcs, out, shown = _form_and_paths(self, self.body())
        out_shown = shown["output"]
        why = options.problem(form, devices=options.available_devices(), output=out_shown,
                              output_is_dir=bool(out) and os.path.isdir(out), output_is_file=bool(out) and os.path.isfile(out))
        if why:
            raise ConfigError(why)
        if form["action"] == "create" and os.path.exists(out) and not form["overwrite"]:
            raise StoreExistsError(f"{out_shown}: already exists; choose another output or tick overwrite")
        if not os.path.isdir(os.path.dirname(out)):
            raise FileNotFoundError(2, "The folder of the output does not exist", self.rel(os.path.dirname(out)))
        job = Job(form["action"], srcs, out, {**shown, "options": form})
        stores = self.stores

        def work(job: Job) -> dict:

            t0 = time.monotonic()
            if job.action == "create":
                kw = options.convert_kwargs(form)
                store = uwsfmt.convert(srcs, out, progress=job.on_progress, cancel=job.cancel_event, **kw)
                done, extra = "Done", ""
            else:
                store = uwsfmt.open(out, mode="a")
                try:
                    added = store.extend(srcs, progress=job.on_progress, cancel=job.cancel_event, **options.add_kwargs(form))
                except BaseException:
                    store.close()
                    raise
                done = f"Added {len(added)} model(s)" if added else "Nothing to add (the store has every model these sources name)"
                errs = [x for e in added for x in e.get("error") or () if x is not None]
                extra = f" The new models' max relative error: {max(errs):.3g}." if errs else ""
            with store:
                summary = payload.jsonable(store.summary())
            stores.forget(out)
            summary["path"] = out_shown
            bits = [f"{summary.get('n_models', '?')} models", f"{summary.get('n_tensors', '?')} tensors"]
            if summary.get("ratio"):
                bits.append(f"{summary['ratio']:.2f}x smaller")
            if summary.get("error_max") is not None:
                bits.append(f"max relative error {summary['error_max']:.3g}")
            took = time.monotonic() - t0
            return {"summary": summary, "output": out_shown, "seconds": round(took, 2),
                    "message": f"{done} in {took:.1f} s: {', '.join(bits)}.{extra}"}

        return self.jobs.start(job, work)


class JobHandler(UWSHandler):
    def _job(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFoundError(f"job {job_id!r}: no such job on this server (it may have finished long ago or the "
                                "server was restarted)")
        return job

    @web.authenticated
    @authorized
    async def get(self, job_id: str) -> None:
        try:
            self.reply(self._job(job_id).state())
        except Exception as e:  # noqa: BLE001
            self.fail(e)

    @web.authenticated
    @authorized
    async def delete(self, job_id: str) -> None:
        try:
            self._job(job_id)
            self.reply(self.jobs.cancel(job_id).state())
        except Exception as e:  # noqa: BLE001
            self.fail(e)


ROUTES = [
    ("config", ConfigHandler), ("store", StoreHandler), ("errors", ErrorsHandler), ("spectrum", SpectrumHandler),
    ("validate", ValidateHandler), ("export", ExportHandler), ("plan", PlanHandler), ("jobs", JobsHandler),
    (r"jobs/([0-9a-f]{1,32})", JobHandler),
]
