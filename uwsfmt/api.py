"""What users call: :class:`Store` (read, append, export, validate) and the functions around it.

The top of the house: it joins the reader (``reader/``), the writer (``writer/``), the exporters
(``export/``), reports and validation; none of those imports this module.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

from uwsfmt import report
from uwsfmt.errors import ConfigError, StoreExistsError
from uwsfmt.export.hf import export_formats
from uwsfmt.export.registry import export as export_model
from uwsfmt.io import remote
from uwsfmt.io.commit import lock_timeout
from uwsfmt.reader import files
from uwsfmt.reader.store import ModelRef, StoreLike, StoreReader, open_reader
from uwsfmt.sources.registry import Source, Sources
from uwsfmt.validate import validate_store
from uwsfmt.writer import append as appending
from uwsfmt.writer.convert import convert as build_store
from uwsfmt.writer.plan import plan

__all__ = ["OPEN_MODES", "Store", "append", "convert", "export", "extend", "open", "plan", "project"]

#: open() modes, as zarr means them; a store is only ever created by :func:`convert`
OPEN_MODES = {"r": "read only", "r+": "read and append (the store must exist)", "a": "read and append (the store must exist)"}
#: progress reporting: True (a bar), or a callback ``(done, total, name)``
ProgressArg = bool | Callable[[int, int, str], None] | None


class Store(StoreReader):
    """An open UWS store: read models and tensors, append models, export, validate.

    >>> store = uwsfmt.open("family.uws")  # doctest: +SKIP
    >>> sd = store.state_dict(store.model_ids[0])  # doctest: +SKIP
    """

    def append(self, source, *, id: str | None = None, format: str | None = None, progress: bool = False,
               max_error: float | None = None, max_delta_error: float | None = None, device: str | None = None,
               source_root: str | os.PathLike | None = None) -> dict:
        """Project a new checkpoint onto the existing bases and commit it as a new model.

        The store's error budget (or ``max_error`` / ``max_delta_error``) holds for it: what the bases miss is fixed
        by per-model exceptions (see ``summary()["refit_suggested"]``). ``device``: where the
        projection runs (default: "cuda" when torch sees a GPU, as for ``convert``).

        >>> store = uwsfmt.open("family.uws", mode="a")  # doctest: +SKIP
        >>> store.append("ft/task-41.safetensors")["id"]  # doctest: +SKIP
        'task-41'
        """
        return appending.append(self, source, id=id, format=format, progress=progress, max_error=max_error,
                                max_delta_error=max_delta_error, device=device, source_root=source_root)

    def extend(self, sources, *, format: str | None = None, progress: bool = False, max_error: float | None = None,
               max_delta_error: float | None = None, device: str | None = None, cancel=None,
               skip_existing: bool = False, source_root: str | os.PathLike | None = None, client: Any = None) -> list[dict]:
        """Append every checkpoint ``sources`` names (paths, folders, globs, Checkpoint objects or
        ``{model_id: state_dict}``, as for ``convert``) with one commit: all of them become visible
        together, or none does; the means and bases are read once. Their manifest entries.
        ``progress``: True or a callback ``(done, total, model id)``; ``cancel``: a
        ``threading.Event`` that stops before the next model (nothing is committed);
        ``skip_existing``: leave out checkpoints whose id the store already has (else they are
        refused, and nothing is added). ``client``: encode the models on a Dask cluster (a
        ``dask.distributed.Client``, a scheduler address, or ``"local"``); its workers must see the
        sources, and the store, at the same paths (docs/guide/distributed.md).

        >>> store = uwsfmt.open("family.uws", mode="a")  # doctest: +SKIP
        >>> [e["id"] for e in store.extend("ft/new/*.safetensors")]  # doctest: +SKIP
        ['task-41', 'task-42']
        """
        return appending.extend(self, sources, format=format, progress=progress, max_error=max_error,
                                max_delta_error=max_delta_error, device=device, cancel=cancel, skip_existing=skip_existing,
                                source_root=source_root, client=client)

    def plan_append(self, sources: Sources, *, format: str | None = None, skip_existing: bool = False) -> dict:
        """What ``extend(sources)`` would do, from the checkpoints' headers (nothing written): the
        new model ids, those already here, and every reason it would be refused (``conflicts``)."""
        return appending.plan_append(self, sources, format=format, skip_existing=skip_existing)

    def project(self, source: Source, *, format: str | None = None, device: str | None = None) -> dict:
        """Coefficients and errors of an unseen checkpoint, without adding it."""
        return appending.project(self, source, format=format, device=device)

    def export(self, model: ModelRef, out: str, *, format: str = "safetensors", **kw: Any) -> str:
        """Write one model to ``out`` in ``format`` (see :func:`uwsfmt.export`)."""
        return export_model(self, model, out, format=format, **kw)

    def export_formats(self, model: ModelRef) -> list[str]:
        """The export formats that apply to one model, e.g. ``["safetensors", "hf"]`` for a model
        read from a Hugging Face folder (``"peft"`` / ``"kohya"`` for adapters of those tools).

        >>> uwsfmt.open("family.uws").export_formats("ft2")  # doctest: +SKIP
        ['safetensors', 'hf']
        """
        return export_formats(self, model)

    def file_names(self, model: ModelRef) -> list[str]:
        """Names of the small files (config, tokenizer, ...) kept for one model (spec section 15)."""
        return files.file_names(self, model)

    def read_file(self, model: ModelRef, name: str) -> bytes:
        """The bytes of a small file kept for one model, checked against its SHA-256.

        >>> uwsfmt.open("family.uws").read_file("ft2", "config.json")[:1]  # doctest: +SKIP
        b'{'
        """
        return files.read_file(self, model, name)

    def validate(self, *, deep: bool = False, notes: list[str] | None = None,
                 source_root: str | os.PathLike | None = None) -> list[str]:
        """Problems found (empty: valid); see :func:`uwsfmt.validate`. ``notes`` receives what deep checking could not do."""
        return validate_store(self, deep=deep, notes=notes, source_root=source_root)

    def summary(self) -> dict:
        """Sizes, ratios, ranks, errors and warnings of the whole store (what ``uwsfmt info`` prints)."""
        return report.summary(self)

    def tensor_table(self) -> list[dict]:
        """One row per tensor: encoding, rank, explained variance, errors."""
        return report.tensor_table(self)

    def model_table(self) -> list[dict]:
        """One row per model: id, source, errors."""
        return report.model_table(self)


def open(path: StoreLike, *, mode: str = "r", storage_options: dict | None = None) -> Store:  # noqa: A001 - mirrors zarr.open
    """Open a UWS store lazily: only the manifest is read. ``path``: a directory, a .zip file, a
    URL (``s3://bucket/family.uws``, ``gs://...``, ``https://...`` read-only, any fsspec URL) or
    a zarr store object; ``storage_options``: fsspec's options for a URL (endpoint, credentials;
    by default they come from the environment as fsspec finds them). Never recorded anywhere.

    ``mode`` as in zarr: ``"r"`` read only (default); ``"r+"`` or ``"a"`` read and append (the
    store must exist: stores are created by :func:`convert`). ``"w"`` and ``"w-"`` (create) are
    refused with the call that does it.

    >>> store = uwsfmt.open("family.uws")  # doctest: +SKIP
    >>> store.model_ids[:2]  # doctest: +SKIP
    ['model-000', 'model-001']
    """
    if mode in ("w", "w-"):
        raise ConfigError(f"open(mode={mode!r}): a store is created by uwsfmt.convert(sources, {str(path)!r}) "
                          "(overwrite=True replaces one); open(mode='a') appends to an existing store")
    if mode not in OPEN_MODES:
        raise ConfigError(f"open(mode={mode!r}): unknown mode; use one of {', '.join(map(repr, OPEN_MODES))}")
    return open_reader(path, mode="r" if mode == "r" else "a", storage_options=storage_options, cls=Store)


def convert(sources: Sources, out: str | os.PathLike, *, client: Any = None, **options: Any) -> Store:
    """Build a UWS store at ``out`` from a family of checkpoints and return it opened.

    The options are those of :func:`uwsfmt.writer.convert.convert` (fidelity, encodings, device,
    progress, cancel, ...). ``client``: build on a Dask cluster (a ``dask.distributed.Client``,
    a scheduler address, or ``"local"``); the sources and the output's folder must be on a file
    system every worker shares (docs/guide/distributed.md).

    >>> fam = {f"m{i}": {"w": torch.randn(64, 64)} for i in range(4)}  # doctest: +SKIP
    >>> store = uwsfmt.convert(fam, "/tmp/doc.uws", rank=2, overwrite=True)  # doctest: +SKIP
    """
    if client is not None:
        options["client"] = client
    if remote.is_url(out):
        store = _convert_to_url(sources, os.fspath(out), options)
    else:
        store = open(build_store(sources, out, **options))
    for note in report.summary(store)["notes"]:
        if note.startswith("LARGER"):  # the one finding a build must not keep quiet about
            warnings.warn(f"{store.path}: {note}", UserWarning, stacklevel=2)
    return store


def _convert_to_url(sources: Sources, url: str, options: dict[str, Any]) -> Store:
    """Build in a local temporary folder (``UWSFMT_TMPDIR``, else the system's), then publish the
    complete store to ``url`` under its writer lock, the root zarr.json last (spec section 11.4)."""
    so = options.pop("storage_options", None)
    if options.get("overwrite"):
        raise ConfigError(f"{remote.redact(url)}: overwrite is not offered on object storage (replacing a store there cannot "
                          "be atomic); delete the old store first, or convert to a new URL")
    target = remote.open_store(url, "w", so)  # before any heavy work: a bad URL, scheme, bucket or credentials fail here
    remote.ObjectFS(target).check()
    if remote.size(target, "zarr.json") is not None:
        raise StoreExistsError(f"{remote.redact(url)}: a store is already there; choose another URL (or delete it first)")
    with tempfile.TemporaryDirectory(prefix="uwsfmt-convert-", dir=os.environ.get("UWSFMT_TMPDIR")) as tmp:
        local = build_store(sources, os.path.join(tmp, os.path.basename(url.rstrip("/")) or "store.uws"), **options)
        remote.publish(local, url, so, lock_timeout())
    return open(url, storage_options=so)


def _with_store(store: Store | str | os.PathLike, mode: str, call: Callable[[Store], Any]) -> Any:
    """``call(st)`` on ``store`` (a path, opened and closed here, or an open Store)."""
    if isinstance(store, Store):
        return call(store)
    with open(store, mode=mode) as st:
        return call(st)


def append(store, source, *, id=None, format=None, progress=False, max_error=None, max_delta_error=None, device=None,
           source_root=None) -> dict:
    """Add a model to a store (path or open Store) by projection onto its bases.

    >>> uwsfmt.append("family.uws", "ft/task-41.safetensors")["id"]  # doctest: +SKIP
    'task-41'
    """
    return _with_store(store, "a", lambda st: appending.append(st, source, id=id, format=format, progress=progress,
                                                               max_error=max_error, max_delta_error=max_delta_error,
                                                               device=device, source_root=source_root))


def extend(store, sources, *, format=None, progress=False, max_error=None, max_delta_error=None, device=None,
           skip_existing=False, source_root=None, client=None) -> list[dict]:
    """Add every checkpoint ``sources`` names to a store (path or open Store), with one commit
    (``client``: on a Dask cluster, as :meth:`Store.extend`)."""
    return _with_store(store, "a", lambda st: appending.extend(st, sources, format=format, progress=progress,
                                                               max_error=max_error, max_delta_error=max_delta_error,
                                                               device=device, skip_existing=skip_existing,
                                                               source_root=source_root, client=client))


def project(store: Store | str | os.PathLike, source: Source, *, format: str | None = None, device: str | None = None) -> dict:
    """Coefficients and errors of ``source`` against ``store``'s bases; nothing is written."""
    return _with_store(store, "r", lambda st: appending.project(st, source, format=format, device=device))


def export(store: Store | str | os.PathLike, model: ModelRef, out: str, *, format: str = "safetensors", **kw: Any) -> str:
    """Export one model of a store (path or open Store) to a file or folder; a store opened here is closed.

    >>> uwsfmt.export("family.uws", "task-07", "task-07.safetensors")  # doctest: +SKIP
    'task-07.safetensors'
    """
    return _with_store(store, "r", lambda st: export_model(st, model, out, format=format, **kw))
