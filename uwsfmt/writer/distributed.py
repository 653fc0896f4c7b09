"""The build on a Dask cluster: ``convert(sources, out, client=...)``, CLI ``--dask ADDRESS``.

The steps are those of the build in one process (:mod:`uwsfmt.writer.build`), spread out:

- pass 1: each unit (a tensor, or a batch of small same-kind tensors) is fitted by a worker,
  which opens the sources itself by path (the plan travels, never tensors); the fits come back
  to the driver, which writes the per-tensor arrays and the manifest entries in tensor order and
  creates the pack arrays;
- pass 2: each model is encoded by a worker, which writes its pack rows (a row is one shard:
  one writer per shard) and per-model arrays into the store's temporary folder, and returns its
  record (errors, exceptions) and its source's fingerprint;
- the driver commits the manifest; :func:`uwsfmt.writer.convert.convert` then moves the folder
  into place as for any build.

Every worker must see the sources and the output's folder at the same paths as the driver (a
shared file system). Same inputs, same functions: the store equals the local build's, bit for
bit, where both compute with the same number of torch threads (tests/test_dask_build.py; Dask
gives each worker one, and some BLAS/LAPACK reductions round differently with more). The one thing the local build decides across tensors, how many
of the sketch's pass-2 results pass 1 may keep (:class:`~uwsfmt.writer.holdings.Holdings`), is
replayed by the driver in tensor order.

Cancelling (``cancel``, or an error in any task) stops submitting, asks the running tasks to
stop (a Dask ``Event`` they check between reads and before writing) and waits for them, so
that the temporary folder is removed with no writer left in it.
"""

from __future__ import annotations

import contextlib
import os
import queue
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import dask.distributed as dd
import torch
import zarr
from zarr.storage import LocalStore

from uwsfmt.errors import ConfigError
from uwsfmt.io import layout, overlap
from uwsfmt.numerics.device import default_device, resolve_device
from uwsfmt.reader.manifest import open_zarr_store
from uwsfmt.reader.store import Location
from uwsfmt.sources import Checkpoint, formats, open_checkpoint, provenance
from uwsfmt.version import __version__
from uwsfmt.writer.adding import Appending
from uwsfmt.writer.build import StoreBuild, TensorFit, encode_one, fit_unit, fit_units, write_model
from uwsfmt.writer.folder_files import FolderFiles
from uwsfmt.writer.holdings import Holdings
from uwsfmt.writer.plan import FamilyPlan, TensorPlan
from uwsfmt.writer.progress import Progress
from uwsfmt.writer.settings import Cancelled, Settings

#: seconds to wait for a scheduler to answer, and for a cluster's first worker
CONNECT_TIMEOUT_S = 10
#: a worker asks the scheduler whether the build was stopped at most this often
STOP_POLL_S = 0.5
#: tasks in flight per worker thread (more keeps workers busy; fewer stops sooner)
TASKS_PER_THREAD = 2


# ------------------------------------------------------------------------------ the cluster


@contextlib.contextmanager
def connect(client: dd.Client | str) -> Iterator[dd.Client]:
    """A usable client for ``client``: a ``dask.distributed.Client`` (checked to be open), a
    scheduler address (``tcp://host:8786``), or ``"local"`` (a LocalCluster of worker processes
    on this machine, closed afterwards)."""
    if isinstance(client, dd.Client):
        if client.status not in ("running", "connecting", "newly-created"):
            raise ConfigError(f"the Dask client is {client.status}; pass an open dask.distributed.Client, or a scheduler "
                              "address (CLI: --dask tcp://HOST:8786, or --dask local)")
        yield client
        return
    if not isinstance(client, str) or not client:
        raise ConfigError(f"client must be a dask.distributed.Client, a scheduler address or 'local', not {client!r}")
    if client == "local":
        with dd.LocalCluster(processes=True, threads_per_worker=1, dashboard_address=":0") as cluster, dd.Client(cluster) as c:
            yield c
        return
    try:
        c = dd.Client(client, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, ValueError) as e:
        raise ConfigError(f"cannot reach the Dask scheduler at {client!r} ({e}); start one (`dask scheduler`, then "
                          "`dask worker ADDRESS` on each machine) or fix the address, or use --dask local") from e
    with c:
        yield c


def _worker_view(store_folder: str | None, source: str) -> dict:
    """What one worker sees (run on every worker before the build)."""
    return {"version": __version__, "store_folder": store_folder is None or os.path.isdir(store_folder),
            "source": os.path.exists(source)}


def _check_workers(client: dd.Client, path: str | None, refs: Sequence[SourceRef]) -> int:
    """The number of worker threads, after checking that every worker runs this uwsfmt and sees
    the store's folder (``path``; None: a store on object storage) and the sources where the
    driver does."""
    try:
        client.wait_for_workers(1, timeout=CONNECT_TIMEOUT_S)
    except TimeoutError as e:
        raise ConfigError(f"the Dask cluster at {client.scheduler.address} has no workers; start some (`dask worker ADDRESS`)") from e
    views = client.run(_worker_view, path, refs[0].path)
    for worker, v in views.items():
        if v["version"] != __version__:
            raise ConfigError(f"Dask worker {worker} runs uwsfmt {v['version']}, this process {__version__}; install the same "
                              "version on every worker")
        for what, where in (("store_folder", str(path)), ("source", refs[0].path)):
            if not v[what]:
                raise ConfigError(f"Dask worker {worker} cannot see {where}: the sources and the output's folder must be on a file "
                                  "system every worker shares, at the same paths as here")
    return max(1, sum(client.nthreads().values()))


@dataclass(frozen=True)
class SourceRef:
    """How a worker opens one checkpoint: by path, with its format and model id."""

    path: str
    format: str
    id: str

    @classmethod
    def of(cls, ck: Checkpoint) -> SourceRef:
        if not ck.path or ck.format not in formats():
            raise ConfigError(f"model {ck.id!r} ({type(ck).__name__}) is not a checkpoint file or folder: a Dask build reads "
                              "the sources on the workers; give paths on a file system every worker shares")
        return cls(os.path.abspath(ck.path), ck.format, ck.id)

    def open(self) -> Checkpoint:
        return open_checkpoint(self.path, format=self.format, id=self.id)


@contextlib.contextmanager
def _opened(refs: Sequence[SourceRef]) -> Iterator[list[Checkpoint]]:
    cks: list[Checkpoint] = []
    try:
        cks.extend(r.open() for r in refs)
        yield cks
    finally:
        for ck in cks:
            ck.close()


# -------------------------------------------------------------------------------- the tasks


@dataclass(frozen=True)
class _Family:
    """What every task of a build needs (sent to each worker once)."""

    refs: tuple[SourceRef, ...]
    base: SourceRef | None
    settings: Settings
    device: str | None
    stop: str  # name of the build's stop Event
    path: str
    source_root: str | None


class _Stop:
    """The build's stop flag as a worker sees it (the scheduler asked at most every STOP_POLL_S)."""

    def __init__(self, name: str):
        self._event = dd.Event(name)
        self._asked = -STOP_POLL_S
        self._set = False

    def is_set(self) -> bool:
        now = time.monotonic()
        if not self._set and now - self._asked >= STOP_POLL_S:
            self._asked, self._set = now, self._event.is_set()
        return self._set


def _task_progress(f: _Family) -> Progress:
    """A worker's Progress: no bar, only the stop flag (raises Cancelled once the build stops)."""
    prog = Progress(0, None, _Stop(f.stop), "uwsfmt convert", stopped="the build was stopped")  # type: ignore[arg-type]  # an Event-like flag
    prog.step("start", 0)
    return prog


class _Taken(Holdings):
    """A fresh Holdings that remembers what it granted: the driver replays the grants in tensor
    order against the build's one Holdings, as the local build takes them (:func:`_replay`)."""

    def __init__(self) -> None:
        super().__init__()
        self.granted = 0

    def take(self, nbytes: int) -> bool:
        ok = super().take(nbytes)
        self.granted += nbytes if ok else 0
        return ok


def _fit_task(unit: list[TensorPlan], f: _Family) -> tuple[str, dict[str, TensorFit], int]:
    """Pass 1 of one unit on a worker: (device, fits, bytes granted to keep pass-2 results)."""
    prog = _task_progress(f)
    dev = resolve_device(f.device, default_device())
    hold = _Taken()
    with _opened(f.refs) as cks, _opened([f.base] if f.base else []) as base:
        fitted = fit_unit(unit, cks, f.settings, dev, base[0] if base else None, prog, hold)
    return str(dev), fitted, hold.granted


@dataclass(frozen=True)
class _Models:
    """What pass 2 needs besides the family (sent to each worker once)."""

    entries: list[dict]
    fits: dict[str, Any]
    widths: dict[str, int]
    nodes: dict[str, str]


def _encode_task(i: int, f: _Family, m: _Models) -> tuple[dict, dict]:
    """Pass 2 of model ``i`` on a worker: encode it, write its rows and per-model arrays into the
    store's folder; (its record, its source record)."""
    prog = _task_progress(f)
    dev = resolve_device(f.device, default_device())
    with _opened([f.refs[i]]) as (ck,):
        enc = encode_one(i, ck, m.entries, m.fits, m.widths, f.settings, f.path, read_ahead=overlap.useful(dev), stacks={}, hold=None)
        prog.step(ck.id, 0)  # stopped meanwhile: nothing of this model is written
        zstore = LocalStore(f.path)
        packs = {p: zarr.open_array(zstore, path=layout.pack_path(p), mode="r+") for p, w in m.widths.items() if w > 0}
        write_model(zstore, packs, m.entries, m.nodes, i, enc, _now)
        return enc.record, provenance.source_record(ck, f.source_root)


def _now(fn: Callable[..., Any], *args: Any) -> None:
    fn(*args)


@dataclass(frozen=True)
class _Append:
    """What every task of an append needs (sent to each worker once)."""

    job: Appending
    url: str
    storage_options: dict | None
    device: str | None
    stop: str
    source_root: str | None
    token: str  # this append: a worker reads the bases once per append (:data:`_BASES`)


#: the bases a worker read for the append it last served: (token, fits)
_BASES: dict[str, Any] = {}


def _append_task(idx: int, ref: SourceRef, a: _Append) -> tuple[dict, dict]:
    """Encode one new model on a worker and write it as row ``idx``; (its entry, its source record)."""
    prog = Progress(0, None, _Stop(a.stop), "uwsfmt extend", stopped="the append was stopped")  # type: ignore[arg-type]
    prog.step("start", 0)
    dev = resolve_device(a.device, default_device())
    zstore = open_zarr_store(a.url, "w", a.storage_options)
    if _BASES.get("token") != a.token:
        _BASES.clear()
        _BASES.update(token=a.token, fits=a.job.fits(zstore, dev))
    with _opened([ref]) as (ck,):
        prog.step(ck.id, 0)  # stopped meanwhile: nothing of this model is written
        entry = a.job.encode_and_write(zstore, _BASES["fits"], ck, idx)
        return entry, provenance.source_record(ck, a.source_root)


def append(client: dd.Client, device: str | None, where: Location, job: Appending, cks: list[Checkpoint], first: int,
           root: str | None, prog: Progress, cancel) -> list[dict]:
    """:func:`uwsfmt.writer.append.append_checkpoints`'s models encoded on the workers of
    ``client``: model ``first + k`` by one task each, which writes its row (the packs were grown
    by the caller) and hashes its source; their entries in order, ``source`` filled in. The
    caller holds the lock and commits."""
    refs = [SourceRef.of(ck) for ck in cks]
    assert where.url is not None
    folder = None if where.remote else where.url
    window = TASKS_PER_THREAD * _check_workers(client, folder, refs)
    stop = dd.Event(f"uwsfmt-stop-{uuid.uuid4().hex}", client=client)
    a = client.scatter(_Append(job, where.url, where.storage_options, device, stop.name, root, uuid.uuid4().hex),
                       broadcast=True, hash=False)
    tasks = _Pass(client, _append_task, [(first + k, r, a) for k, r in enumerate(refs)], [(r.id, 1) for r in refs],
                  prog, cancel, stop, window)
    try:
        entries = []
        for k in range(len(refs)):
            entry, source = tasks.result(k)
            entry["source"] = source
            entries.append(entry)
        return entries
    except BaseException:
        tasks.close()
        raise
    finally:
        with contextlib.suppress(Exception):
            stop.clear()


# ------------------------------------------------------------------------------- the driver


class _Pass:
    """One pass's tasks: submitted in order, at most ``window`` unfinished at a time; progress
    steps as each completes; results taken in any order (:meth:`result`)."""

    def __init__(self, client: dd.Client, fn: Callable, args: list[tuple], steps: list[tuple[str, int]], prog: Progress,
                 cancel, stop: dd.Event, window: int):
        self.client, self.fn, self.args, self.steps, self.prog = client, fn, args, steps, prog
        self.cancel, self.stop, self.window = cancel, stop, window
        self.next = 0
        self.running: dict[int, dd.Future] = {}
        self.done: dict[int, Any] = {}
        self.finished: queue.Queue = queue.Queue()

    def result(self, k: int) -> Any:
        while k not in self.done:
            while self.next < len(self.args) and len(self.running) < self.window:
                self._submit(self.next)
                self.next += 1
            self._wait_one()
        return self.done.pop(k)

    def _submit(self, k: int) -> None:
        fut = self.client.submit(self.fn, *self.args[k], pure=False, key=f"uwsfmt-{self.fn.__name__.strip('_')}-{k}-{uuid.uuid4().hex[:8]}")
        self.running[k] = fut
        fut.add_done_callback(lambda _, k=k: self.finished.put(k))

    def _wait_one(self) -> None:
        while True:
            if self.cancel is not None and self.cancel.is_set():
                raise Cancelled(self.prog.stopped)
            try:
                k = self.finished.get(timeout=0.2)
                break
            except queue.Empty:
                continue
        fut = self.running.pop(k)
        self.done[k] = fut.result()  # a task's error is raised here, as the worker raised it
        fut.release()
        self.prog.step(*self.steps[k])

    def close(self) -> None:
        """Stop the tasks still running and wait until they have (no writer is left in the folder)."""
        if self.running:
            self.stop.set()
            dd.wait(list(self.running.values()))
            for fut in self.running.values():
                fut.release()
            self.running.clear()


def _replay(hold: Holdings, fit: Any, granted: int) -> None:
    """A worker kept a sketched tensor's pass-2 results (``granted`` bytes from its own, empty
    Holdings): keep them where the build's Holdings grants it at this point of the tensor order,
    as the local build would, else drop them (pass 2 computes them)."""
    pre = getattr(fit, "precomputed", None)
    if not granted or pre is None:
        return
    if hold.take(granted):
        hold.release(granted - sum(c.numel() * c.element_size() for c, _, _ in filter(None, pre)))
    else:
        fit.precomputed = None


def build(fam: FamilyPlan, path: str, s: Settings, dev: torch.device, base: Checkpoint | None, progress, cancel,
          kept: FolderFiles | None = None, source_root: str | None = None, *, client: dd.Client, device: str | None = None) -> None:
    """:func:`uwsfmt.writer.convert._build` on the workers of ``client`` (same arguments; ``device``:
    where the workers compute, resolved on each, default "cuda" where it sees a GPU)."""
    refs = tuple(SourceRef.of(ck) for ck in fam.checkpoints)
    base_ref = SourceRef.of(base) if base is not None else None
    n = len(refs)
    prog = Progress(len(fam.tensors) * n + n, progress, cancel, "uwsfmt convert (dask)")
    stop = dd.Event(f"uwsfmt-stop-{uuid.uuid4().hex}", client=client)
    f = _Family(refs, base_ref, s, device, stop.name, path, source_root)
    wb = overlap.WriteBehind(enabled=overlap.useful(dev))
    passes: list[_Pass] = []
    try:
        sb = StoreBuild(fam, path, s, lambda where, data: wb.submit(layout.write_array, sb.zstore, where, data))
        window = TASKS_PER_THREAD * _check_workers(client, path, refs)  # after the folder is made: can they see it?
        family = client.scatter(f, broadcast=True, hash=False)
        units = fit_units(fam.tensors, s, dev)
        unit_of = {tp.name: k for k, unit in enumerate(units) for tp in unit}
        fit_pass = _Pass(client, _fit_task, [(unit, family) for unit in units], [(u[-1].name, n * len(u)) for u in units],
                         prog, cancel, stop, window)
        passes.append(fit_pass)
        hold = Holdings()  # the local build's, replayed
        devices: set[str] = set()
        fitted: dict[str, TensorFit] = {}
        for tp in fam.tensors:
            if tp.name not in fitted:
                worker_dev, results, granted = fit_pass.result(unit_of[tp.name])
                devices.add(worker_dev)
                fitted.update(results)
                _replay(hold, results[tp.name].fit, granted)  # a unit that keeps any is a single tensor
            sb.record(tp, fitted.pop(tp.name))
        sb.choose_lora_mode()
        sb.start_models()
        wb.drain()
        models = client.scatter(_Models(sb.entries, sb.fits, sb.packs.widths, {e["name"]: e["node"] for e in sb.entries}),
                                broadcast=True, hash=False)
        encode_pass = _Pass(client, _encode_task, [(i, family, models) for i in range(n)], [(r.id, 1) for r in refs],
                            prog, cancel, stop, window)
        passes.append(encode_pass)
        records, sources = zip(*(encode_pass.result(i) for i in range(n))) if n else ((), ())
        if kept is not None:
            kept.written.clear()  # a second build (lora_mode="auto") writes into a fresh folder
        base_source = provenance.source_record(base, source_root) if base is not None else None
        sb.commit(list(records), list(sources), ",".join(sorted(devices)), base_source, kept)
    except BaseException:
        for p in passes:
            p.close()
        raise
    finally:
        wb.close()
        prog.close()
        with contextlib.suppress(Exception):
            stop.clear()


__all__ = ["SourceRef", "append", "build", "connect"]
