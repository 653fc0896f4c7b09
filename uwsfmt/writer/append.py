"""Add models to a store: project each new checkpoint onto the store's bases, write its rows
into new shards, commit the manifest once (spec section 10). Also ``project``: the same
projection with nothing written.

Existing data is never rewritten; the bases never change (a family whose new members the bases
miss gets per-model exceptions under an error budget, and ``info`` suggests a refit).
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from uwsfmt import encodings
from uwsfmt.encodings import budget
from uwsfmt.encodings import coefficients as coef_enc
from uwsfmt.encodings import lora as lora_enc
from uwsfmt.errors import ConflictError, SourceError, StoreError
from uwsfmt.format import naming
from uwsfmt.io import overlap
from uwsfmt.io.commit import Writing
from uwsfmt.numerics.device import default_device, resolve_device
from uwsfmt.reader.manifest import open_zarr_store, read_manifest
from uwsfmt.reader.store import StoreReader
from uwsfmt.sources import Checkpoint, StateDictCheckpoint, discover, provenance
from uwsfmt.sources.registry import Source, Sources
from uwsfmt.writer.adding import Appending, fits_from_store, grow_packs
from uwsfmt.writer.convert import Fingerprints, distributed_module, os_reason, source_record, utc_now
from uwsfmt.writer.encode import encode_model
from uwsfmt.writer.folder_files import FilePolicy, FolderFiles
from uwsfmt.writer.progress import Progress


def fit_problems(entries: list[dict], ck: Checkpoint) -> list[str]:
    """Why checkpoint ``ck`` does not fit a store with tensor table ``entries``, from its header
    alone: a tensor the store holds is missing or has another dtype or shape, or the checkpoint
    has tensors the store does not hold (they would be lost: a store's tensors are fixed when it
    is built), or LoRA modules the store has no basis for."""
    infos = ck.infos()
    where = ck.path or ck.id
    out = []
    if ck.lora_pairs() or any(e.get("lora") is not None for e in entries):
        try:
            lora_enc.model_record(entries, ck)
        except ConflictError as err:
            out.append(str(err))
    plain = [e for e in entries if e.get("lora") is None]
    for e in plain:
        info = infos.get(e["name"])
        if info is None:
            out.append(f"{where}: lacks tensor {e['name']!r}")
        elif info.dtype != e["dtype"]:
            out.append(f"{where}: tensor {e['name']!r} is {info.dtype}, the store holds {e['dtype']}")
        elif not encodings.for_entry(e, where).shape_may_vary(e) and tuple(info.shape) != tuple(e["shape"]):
            out.append(f"{where}: tensor {e['name']!r} has shape {list(info.shape)}, the store holds {e['shape']}")
    factors = {n for pair in ck.lora_pairs().values() for n in (pair.a, pair.b, pair.alpha) if n}  # not extra tensors
    extra = sorted(set(infos) - {e["name"] for e in plain} - factors)
    if extra:
        shown = ", ".join(map(repr, extra[:5])) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        out.append(f"{where}: has tensor(s) the store does not hold, which would be lost: {shown}")
    return out


def _id_problems(cks: list[Checkpoint]) -> tuple[list[tuple[Checkpoint, str]], list[str]]:
    """(checkpoints whose id a store may not hold, with why; ids more than one source would get)."""
    bad = [(ck, why[0]) for ck in cks if (why := naming.check_string(ck.id, "model id"))]
    counts = Counter(ck.id for ck in cks)
    return bad, sorted(i for i, n in counts.items() if n > 1)


def plan_append(store: StoreReader, sources: Sources, *, format: str | None = None, skip_existing: bool = False) -> dict:
    """What appending ``sources`` to ``store`` would do, from the checkpoints' headers (nothing is
    read beyond them, nothing written): ``{"n_models", "models", "formats", "total_bytes", "new",
    "existing", "conflicts"}``; ``conflicts`` lists every reason the append would be refused.

    >>> uwsfmt.open("family.uws").plan_append("ft/new/")["new"]  # doctest: +SKIP
    ['task-41', 'task-42']
    """
    cks = discover(sources, format=format)
    have = set(store.model_ids)
    ids = [ck.id for ck in cks]
    existing = [i for i in ids if i in have]
    todo = [ck for ck in cks if not (skip_existing and ck.id in have)]
    conflicts = [f"model id {i!r} is already in the store (append with skip_existing / --skip-existing to leave it out)"
                 for i in existing if not skip_existing]
    bad, twice = _id_problems(cks)
    conflicts += [f"{ck.path or ck.id}: {why}" for ck, why in bad]
    conflicts += [f"model id {i!r} is given by {ids.count(i)} sources" for i in twice]
    for ck in todo:
        conflicts += fit_problems(store.manifest["tensors"], ck)
    formats = dict(Counter(ck.format for ck in cks))
    total = 0
    for ck in cks:
        total += sum(info.nbytes for info in ck.infos().values())
        ck.close()
    return {"store": store.path, "n_models": len(cks), "models": ids, "formats": formats, "total_bytes": total,
            "new": [ck.id for ck in todo if ck.id not in have], "existing": existing, "conflicts": conflicts}


def _refuse_misfits(store: StoreReader, entries: list[dict], cks: list[Checkpoint]) -> None:
    found = [fit_problems(entries, ck) for ck in cks]
    problems = [p for ps in found for p in ps]
    if problems:
        bad = sum(1 for ps in found if ps)
        raise ConflictError(f"{store.path}: {bad} of the {len(cks)} source(s) do not fit the store's tensors (nothing was "
                            "added; the tensors are fixed when a store is built: rebuild it with these models, or "
                            "give checkpoints of the family's architecture):", problems)


def project(store: StoreReader, source: Source, *, format: str | None = None, device: str | None = None) -> dict:
    """Coefficients and errors of an unseen checkpoint against the store's bases (nothing written).

    Returns ``{"id", "coefficients": {name: tensor}, "error": {name: float}, "delta_error": {...}}``.
    """
    ck = _one_checkpoint(source, format=format)
    dev = resolve_device(device, default_device())
    widths = {p: info["width"] for p, info in store.manifest["packs"].items()}
    entries = store.manifest["tensors"]
    _refuse_misfits(store, entries, [ck])
    rows, _, errs, derrs = encode_model(entries, fits_from_store(store, dev), ck, widths,
                                        allow_nonfinite=False, store_path=store.path)
    coefs = {}
    for e in entries:
        if e.get("coefficients") is not None:
            coefs[e["name"]] = coef_enc.decode(e["coefficients"], {p: torch.from_numpy(v) for p, v in rows.items()}).clone()
    names = [e["name"] for e in entries]
    return {"id": ck.id, "coefficients": coefs, "error": dict(zip(names, errs)), "delta_error": dict(zip(names, derrs))}


def _one_checkpoint(source, *, format: str | None, id: str | None = None) -> Checkpoint:
    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, dict):

        return StateDictCheckpoint(id or "model", source)
    cks = discover([source], format=format)
    if len(cks) != 1:
        raise SourceError(f"{source}: expected one checkpoint, found {len(cks)}")
    if id is not None:
        cks[0].id = id
    return cks[0]


def append(store: StoreReader, source, *, id: str | None = None, format: str | None = None, progress: bool | Callable | None = False,
           device: str | None = None, max_error: float | None = None, max_delta_error: float | None = None,
           source_root: str | os.PathLike | None = None) -> dict:
    """Add one model to a directory store (see :func:`append_checkpoints`); its manifest entry."""
    ck = _one_checkpoint(source, format=format, id=id)
    return append_checkpoints(store, [ck], progress=progress, device=device, max_error=max_error,
                              max_delta_error=max_delta_error, source_root=source_root)[0]


def extend(store: StoreReader, sources: Sources, *, format: str | None = None, progress: bool | Callable | None = False,
           device: str | None = None, max_error: float | None = None, max_delta_error: float | None = None,
           cancel: threading.Event | None = None, skip_existing: bool = False,
           source_root: str | os.PathLike | None = None, client: Any = None) -> list[dict]:
    """Add every checkpoint ``sources`` names (paths, folders, globs, Checkpoint objects or
    ``{model_id: state_dict}``, as for :func:`convert`) with one commit; their manifest entries.
    ``client``: encode the models on a Dask cluster (see :func:`append_checkpoints`)."""
    return append_checkpoints(store, discover(sources, format=format), progress=progress, device=device,
                              max_error=max_error, max_delta_error=max_delta_error, cancel=cancel,
                              skip_existing=skip_existing, source_root=source_root, client=client)


def append_checkpoints(store: StoreReader, cks: list[Checkpoint], *, progress: bool | Callable | None = False, device: str | None = None,
                       max_error: float | None = None, max_delta_error: float | None = None,
                       cancel: threading.Event | None = None, skip_existing: bool = False,
                       source_root: str | os.PathLike | None = None, client: Any = None) -> list[dict]:
    """Add models to a directory store: project each onto the bases, write its rows, then commit
    the manifest once (all of them become visible together, or none does).

    ``client`` (a ``dask.distributed.Client``, a scheduler address or ``"local"``): each model is
    encoded by a Dask worker, which reads its source, writes its rows (one writer per row) and
    hashes it; this process holds the lock, makes room in the packs first and commits last, as
    without a cluster. The workers must see the sources at the same paths, and the store at the
    same path (or URL).

    The store's error budget (``max_error`` / ``max_delta_error`` of its build, or those given here) holds for the
    new models too: a tensor whose projection misses it gets a per-model exception (a quantized
    correction, or the tensor itself), listed in the model's entry, and ``info`` suggests a refit.

    Existing data is never rewritten: the new models' rows go into new shards, and the
    manifest (root zarr.json) is replaced atomically last. A lock serialises appenders. The
    means and bases are read once for all the models. ``progress``: True (a tqdm bar) or a
    callback ``(done, total, model id)``; setting ``cancel`` stops before the next model and
    commits nothing (:class:`Cancelled`). ``skip_existing``: leave out the checkpoints whose id
    the store already has (a folder synced into its store again) instead of refusing them all;
    nothing to add commits nothing and returns [].

    Model folders keep their small files as the store's build did (``build.files``: the same
    size limit and remote-code choice); sources are recorded by name, or relative to
    ``source_root`` where one is given (as for :func:`uwsfmt.convert`).
    """

    where = store.location
    if not (where.remote or where.url is not None and os.path.isdir(where.url)):
        raise StoreError(f"{store.path}: only directory stores and stores on object storage can be appended to; "
                         "unpack a zipped store first (uwsfmt unpack)")
    dev = resolve_device(device, default_device())  # before the lock: a bad device touches nothing
    root = provenance.check_root(source_root)
    if root is not None:
        for ck in cks:
            if ck.path:
                provenance.relative_path(ck.path, root)
    hint = "pass another id (CLI: --id)" if len(cks) == 1 else "rename the sources, or append them one by one with --id"
    bad, twice = _id_problems(cks)
    if bad:
        ck, why = bad[0]
        raise ConflictError(f"{store.path}: cannot append {ck.path or ck.id!r}: {why}; {hint}")
    if twice:
        raise ConflictError(f"{store.path}: these sources would get the same model id: {', '.join(map(repr, twice))}; {hint}")
    prog = Progress(len(cks), progress, cancel, "append",
                    stopped=f"{store.path}: cancelled by the user; the store keeps its previous committed state")
    stop = threading.Event()  # the sources' sha256 on a background thread, as in convert
    all_cks = cks
    try:
        assert where.url is not None  # checked above
        zstore = open_zarr_store(where.url, "w", where.storage_options)
        with Writing(zstore, store.path) as writing:
            current = read_manifest(zstore, store.path)  # re-read under the lock: another writer may have committed
            have = {m["id"] for m in current["models"]}
            if skip_existing:
                cks = [ck for ck in cks if ck.id not in have]
                if not cks:
                    return []
                prog.total = len(cks)
            taken = sorted(have & {ck.id for ck in cks})
            if taken:
                raise ConflictError(f"{store.path}: {'a model with id' if len(taken) == 1 else 'models with ids'} "
                                    f"{', '.join(map(repr, taken))} {'is' if len(taken) == 1 else 'are'} already in the store; {hint}")
            _refuse_misfits(store, current["tensors"], cks)  # every problem of every source, before anything is written
            # the folders' small files, as the build kept them; contents a committed model names are there already
            # (others may be a killed append's partial writes: written again)
            committed = {f["sha256"] for m in current["models"] for f in ((m.get("folder") or {}).get("files") or {}).values()}
            kept = FolderFiles(FilePolicy.from_record(current["build"].get("files")), cks, committed)
            fingerprints = Fingerprints([] if client is not None else cks, stop)  # on a cluster the workers hash
            hashes = overlap.Background(fingerprints.work)
            fresh = StoreReader(store.path, zstore, current)
            widths = {p: info["width"] for p, info in current["packs"].items()}
            if max_error is None and max_delta_error is None:
                built = current["build"]["settings"]
                max_error, max_delta_error = built.get("max_error"), built.get("max_delta_error")
            error_budget = None if (max_error, max_delta_error) == (None, None) else budget.Budget(max_error, max_delta_error)
            first = len(current["models"])
            try:
                grow_packs(zstore, current, first + len(cks))
            except OSError as e:
                raise StoreError(f"{store.path}: could not make room for {len(cks)} model(s) ({os_reason(e)}); the store keeps "
                                 f"its previous committed state ({first} models)") from e
            job = Appending(store.path, current, widths, error_budget)
            if client is not None:
                entries = _on_cluster(client, device, where, job, cks, first, root, prog, cancel)
            else:
                fits = fits_from_store(fresh, dev)
                entries = []
                for k, ck in enumerate(cks):
                    prog.step(ck.id, 0)  # a cancel stops here, before the model
                    entries.append(job.encode_and_write(zstore, fits, ck, first + k))
                    ck.close()
                    prog.step(ck.id)
            fingerprints.work()  # the sources the background thread has not reached yet (on a cluster: none left)
            hashes.result()
            for ck, entry in zip(cks, entries):
                if entry["source"] is None:  # a worker's entry carries the record its worker hashed
                    entry["source"] = source_record(ck, root)
                try:
                    folder = kept.write(zstore, ck)  # new files only, before the commit
                except OSError as e:
                    raise StoreError(f"{store.path}: could not write the files of model {ck.id!r} ({os_reason(e)}); the store "
                                     f"keeps its previous committed state ({first} models)") from e
                if folder is not None:
                    entry["folder"] = folder
            new = dict(current)
            new["models"] = current["models"] + entries
            new["generation"] = int(current.get("generation", 0)) + 1
            new["updated"] = utc_now()
            writing.commit(new)
    finally:
        stop.set()
        prog.close()
        for ck in all_cks:
            ck.close()
    store.committed(new)
    return entries


def _on_cluster(client: Any, device: str | None, where: Any, job: Appending, cks: list[Checkpoint], first: int,
                root: str | None, prog: Progress, cancel: threading.Event | None) -> list[dict]:
    """Encode and write ``cks`` as models ``first``, ``first + 1``, ... on the Dask cluster
    ``client``; their entries, in order, with their sources' records. dask is optional and a
    heavy import: only appends given a client import it."""
    distributed = distributed_module("an append")
    with distributed.connect(client) as c:
        return distributed.append(c, device, where, job, cks, first, root, prog, cancel)
