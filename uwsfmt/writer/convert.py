"""convert(): plan -> statistics pass -> bases -> coefficients pass -> commit."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import torch

from uwsfmt.errors import BudgetError, ConfigError, ConflictError, StoreError, StoreExistsError, os_reason
from uwsfmt.format import dtypes
from uwsfmt.io import layout, overlap
from uwsfmt.io.commit import BuildLock, replace_dir
from uwsfmt.numerics import allocator
from uwsfmt.numerics.device import default_device, resolve_device
from uwsfmt.reader.manifest import BUILDING_MARK, REPLACED_MARK
from uwsfmt.sources import Checkpoint, StateDictCheckpoint, discover, open_checkpoint, provenance
from uwsfmt.sources.registry import Source, Sources
from uwsfmt.writer.build import StoreBuild, TensorFit, encode_one, fit_unit, fit_units, utc_now, write_model
from uwsfmt.writer.folder_files import FilePolicy, FolderFiles
from uwsfmt.writer.holdings import Holdings
from uwsfmt.writer.means import check_base
from uwsfmt.writer.options import BuildOptions, Fidelity, from_keywords
from uwsfmt.writer.plan import FamilyPlan, TensorPlan, plan_family
from uwsfmt.writer.progress import Progress
from uwsfmt.writer.settings import FactorsAreSmaller, Settings

__all__ = ["Fingerprints", "convert", "os_reason", "source_record", "utc_now"]


def source_record(ck: Checkpoint, source_root: str | None = None) -> dict:
    """The manifest's ``source`` record of ``ck``: by name, never by absolute path (see
    :mod:`uwsfmt.sources.provenance`)."""
    return provenance.source_record(ck, source_root)


def convert(
    sources: Sources,
    out: str | os.PathLike,
    *,
    fidelity: Fidelity | None = None,
    options: BuildOptions | None = None,
    base: Source | None = None,
    format: str | None = None,
    device: str | None = None,
    overwrite: bool = False,
    progress: bool | Callable[[int, int, str], None] | None = False,
    cancel: threading.Event | None = None,
    files: FilePolicy | bool | None = None,
    source_root: str | os.PathLike | None = None,
    client: Any = None,
    **legacy: Any,
) -> str:
    """Build a UWS store at ``out`` from a family of checkpoints; returns its path (:func:`uwsfmt.convert` opens it).

    ``sources``: paths, folders, globs, Checkpoint objects, or ``{model_id: state_dict}``.
    ``fidelity`` (:class:`~uwsfmt.writer.options.Fidelity`): a fixed rank, an explained-variance
    threshold, or an error budget (``max_error``: ||W - W_hat|| / ||W||, ``max_delta_error``:
    ||W - W_hat|| / ||W - M|| per tensor and model; per tensor the side, rank and residual bits with
    the fewest bytes that meet it are chosen, dense when nothing smaller does, 0 = lossless). The
    choice, the bytes of the alternatives and the achieved errors are recorded in the store.
    ``options`` (:class:`~uwsfmt.writer.options.BuildOptions`): basis side, centre, residual bits,
    encoding overrides, basis method (``sketch``: a randomised range finder, checked a-posteriori,
    exact where the check fails), mean dtype, LoRA mode (``product``: one basis over s*B*A per
    module with a small core per adapter; ``factors``: A and B as ordinary tensors; ``auto``: the
    product basis, except under an error budget where it would take more bytes than the
    adapters' own factors), seed, allow_nonfinite.

    ``base``: the checkpoint the family was fine-tuned from (a path, a ``{name: tensor}`` state
    dict or a Checkpoint); with ``center="auto"`` (the default) deviations are taken from it.
    ``device``: where the math runs (default: "cuda" when torch sees a GPU). ``progress``: True (a
    bar) or a callback ``(done, total, message)``; ``cancel``: a ``threading.Event`` that stops
    the build, leaving nothing at ``out``.

    Model folders (Hugging Face, PEFT): ``files`` (a :class:`~uwsfmt.writer.folder_files.FilePolicy`;
    default: keep) keeps each folder's other files (config, tokenizer, chat template, model
    card...; spec section 15) so that ``export(..., format="hf")`` gives the folder back: each at
    most ``max_size`` bytes (a larger one refuses the build), remote code (``*.py``) only with
    ``remote_code=True``; data, never executed. ``files=False`` keeps none.

    Provenance: each model's source is recorded by name, format, sha256 and size, never by its
    absolute path; ``source_root`` (a folder holding every source) also records each source's
    path relative to it, which ``evaluate`` and ``validate(deep=True)`` use with their own
    ``source_root``.

    ``client``: build on a Dask cluster (a ``dask.distributed.Client``, a scheduler address
    ``"tcp://host:8786"``, or ``"local"``: worker processes on this machine; needs the ``dask``
    extra): workers fit the tensors and encode the models, reading the sources and writing into
    the output's folder themselves, so both must be on a file system every worker shares. The
    store is the same as this process would build (:mod:`uwsfmt.writer.distributed`).

    Compatibility: the older one-by-one keywords (``rank``, ``tau``, ``max_rank``, ``max_error``,
    ``max_delta_error``; ``mode`` = side, ``center``, ``residual_bits``, ``encodings``,
    ``min_numel``, ``basis`` = basis_method, ``mean_dtype``, ``lora_mode``, ``seed``,
    ``allow_nonfinite``) are still taken and mapped onto the two objects; mixing them with
    ``fidelity=`` / ``options=`` is refused.

    >>> fam = {f"m{i}": {"w": torch.randn(64, 64)} for i in range(4)}
    >>> convert(fam, "/tmp/doc.uws", fidelity=Fidelity(rank=2), overwrite=True)  # doctest: +SKIP
    '/tmp/doc.uws'
    """
    fid, opts = from_keywords(fidelity, options, legacy)
    s = Settings.from_options(fid, opts, has_base=base is not None)
    s.check()
    out = os.fspath(out)
    if os.path.exists(out) and not overwrite:
        raise StoreExistsError(f"{out}: already exists; choose another output path or pass overwrite=True (CLI: --overwrite)")
    cks = discover(sources, format=format)
    root = provenance.check_root(source_root)
    kept = FolderFiles(FilePolicy.of(files), cks)  # every folder's files checked before any heavy work
    base_ck = None
    if base is not None:
        if isinstance(base, Checkpoint):
            base_ck = base
        elif isinstance(base, dict):  # a state dict in memory
            base_ck = StateDictCheckpoint("base", base)
        elif isinstance(base, (str, os.PathLike)):
            base_ck = open_checkpoint(os.fspath(base), id="base")
        else:
            raise ConfigError(f"base must be a checkpoint path, a state dict or a Checkpoint, not {type(base).__name__}")
    fam = plan_family(cks, s)
    factors_plan = None  # lora_mode="auto": the family planned in the factors mode, to build it that way if it is smaller
    if s.lora_mode == "auto" and s.error_budget is not None and any(tp.encoding == "lora" for tp in fam.tensors):
        # the factors mode needs every module in every adapter: where it cannot hold them, the product mode it is
        try:
            factors_plan = plan_family(cks, dataclasses.replace(s, lora_mode="factors"))
        except ConflictError as e:
            s.lora_mode = "product"
            s.lora_choice = f"auto: product (the factors mode cannot hold these adapters: {e.problems[0] if e.problems else e})"
        else:
            if s.error_budget.exact:
                s.lora_mode, s.lora_choice, fam = "factors", "auto: factors (a budget of 0 needs the factors' exact bits)", factors_plan
    elif s.lora_mode == "auto":
        s.lora_mode = "product"  # without a budget (or LoRA modules) there is nothing to weigh
    if s.error_budget is not None and s.error_budget.exact and any(tp.encoding == "lora" for tp in fam.tensors):
        raise BudgetError(
            f"{out}: a budget of 0 (exact bits) cannot hold LoRA modules in the product mode: a reader rebuilds new factors "
            "from the shared bases, exact only to rounding. Give a budget above 0 (e.g. --max-error 1e-6), or convert "
            "with --lora-mode factors (A and B stored as ordinary tensors, exact where the budget says so)")
    if base_ck is not None:
        check_base(fam, base_ck)
    if root is not None:  # every source inside the root, before anything is computed
        for ck in [*cks, *([base_ck] if base_ck is not None else [])]:
            if ck.path:
                provenance.relative_path(ck.path, root)
    # the build runs here, or on a Dask cluster (whose workers resolve ``device`` themselves)
    dev = resolve_device(device, default_device()) if client is None else torch.device("cpu")
    parent, name = os.path.split(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise StoreError(f"{out}: the parent folder {parent} does not exist")
    # The store is built in a hidden sibling and renamed into place at the end, so a killed
    # convert never leaves a store at ``out``; converts to one target serialise on a lock, under
    # which the leftovers of killed ones are removed.
    with contextlib.ExitStack() as cluster, BuildLock(out):
        run = _build if client is None else _on_cluster(client, device, cluster)
        _remove_stale_builds(parent, name)
        if os.path.lexists(out) and not overwrite:  # another convert finished it while we waited
            raise StoreExistsError(f"{out}: already exists; choose another output path or pass overwrite=True (CLI: --overwrite)")
        tmp = os.path.join(parent, f".{name}{BUILDING_MARK}{uuid.uuid4().hex[:8]}")
        try:
            with allocator.reuse_freed_memory():  # fewer page faults on the build's temporaries
                try:
                    run(fam, tmp, s, dev, base_ck, progress, cancel, kept, root)
                except FactorsAreSmaller as e:  # lora_mode="auto": build again with the adapters' factors
                    shutil.rmtree(tmp, ignore_errors=True)
                    s.lora_mode = "factors"
                    s.lora_choice = (f"auto: factors (under the budget the product basis needed {e.product:,} bytes, "
                                     f"more than the adapters' own factors, {e.factors:,})")
                    assert factors_plan is not None  # planned whenever FactorsAreSmaller can be raised
                    run(factors_plan, tmp, s, dev, base_ck, progress, cancel, kept, root)
            _replace(tmp, out, overwrite, os.path.join(parent, f".{name}{REPLACED_MARK}{uuid.uuid4().hex[:8]}"))
        except OSError as e:
            _remove_build(tmp)
            left = "the existing store there is unchanged" if os.path.exists(out) else "nothing was written there"
            raise StoreError(f"{out}: could not write the store ({os_reason(e)}); {left}") from e
        except BaseException:
            _remove_build(tmp)
            raise
        finally:
            for c in cks:
                c.close()
    return out


def _remove_build(tmp: str) -> None:
    """Remove a failed build's folder. When one chunk write of an array fails, zarr's I/O thread
    may still finish that array's other chunks after the error reached us, re-creating folders
    under ``tmp``: remove it again until it stays gone (at most about 1.5 s)."""
    for wait in (0.0, 0.05, 0.1, 0.2, 0.4, 0.8):
        time.sleep(wait)
        shutil.rmtree(tmp, ignore_errors=True)
        time.sleep(0.02)
        if not os.path.lexists(tmp):
            return


def distributed_module(what: str) -> Any:
    """:mod:`uwsfmt.writer.distributed`, imported here only when ``what`` (a build, an append) is
    given a Dask client: dask is an optional dependency and a heavy import. A clear ConfigError
    where dask is not installed."""
    try:
        from uwsfmt.writer import distributed
    except ImportError as e:
        if (e.name or "").split(".")[0] not in ("dask", "distributed"):
            raise
        raise ConfigError(f"{what} on a Dask cluster (client=..., CLI: --dask) needs dask.distributed, which is not installed: "
                          "pip install 'uwsfmt[dask]'") from e
    return distributed


def _on_cluster(client: Any, device: str | None, stack: contextlib.ExitStack) -> Callable[..., None]:
    """The Dask build on ``client`` (connected for as long as ``stack`` is open). dask is an
    optional dependency, and a heavy import: only builds given a client import it."""
    distributed = distributed_module("a build")
    return functools.partial(distributed.build, client=stack.enter_context(distributed.connect(client)), device=device)


def _remove_stale_builds(parent: str, name: str) -> None:
    """Delete the temporary folders of killed converts to ``parent/name``, and replaced stores a
    killed convert did not finish deleting (caller holds its BuildLock)."""
    prefixes = (f".{name}{BUILDING_MARK}", f".{name}{REPLACED_MARK}")
    for entry in os.listdir(parent):
        if entry.startswith(prefixes):
            p = os.path.join(parent, entry)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.remove(p)


def _replace(tmp: str, out: str, overwrite: bool, trash: str) -> None:
    if os.path.lexists(out) and not overwrite:
        raise StoreExistsError(f"{out}: appeared while building; the new store was not moved there")
    old = replace_dir(tmp, out, trash)  # atomic swap where the OS has one: ``out`` is always a whole store
    if old is not None:
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.remove(old)


def _build(fam: FamilyPlan, path: str, s: Settings, dev: torch.device, base: Checkpoint | None, progress, cancel,
           kept: FolderFiles | None = None, source_root: str | None = None) -> None:
    """The build in this process: the steps of :mod:`uwsfmt.writer.build`, with the sources read
    ahead of the compute and the arrays written behind it."""
    cks = fam.checkpoints
    N = len(cks)
    prog = Progress(len(fam.tensors) * N + N, progress, cancel, "uwsfmt convert")
    # overlap: the sources' sha256 on a background thread, array writes behind the compute
    stop = threading.Event()
    fingerprints = Fingerprints(cks, stop)
    hashes = overlap.Background(fingerprints.work)
    wb = overlap.WriteBehind(enabled=overlap.useful(dev))
    try:
        sb = StoreBuild(fam, path, s, lambda where, data: wb.submit(layout.write_array, sb.zstore, where, data))
        # the next tensors' bytes come from disk while this one is computed (cold builds)
        ahead = overlap.Lookahead(cks, [(tp.name, _model_bytes(tp)) for tp in fam.tensors])
        unit_of = {tp.name: unit for unit in fit_units(fam.tensors, s, dev) for tp in unit}
        hold = Holdings()  # pass 2's results that pass 1 found on the way (sketched tensors)
        fitted: dict[str, TensorFit] = {}
        for j, tp in enumerate(fam.tensors):
            ahead.advance(j)
            if tp.name not in fitted:  # a batch's first tensor: all of it at once
                fitted.update(fit_unit(unit_of[tp.name], cks, s, dev, base, prog, hold))
            sb.record(tp, fitted.pop(tp.name))
        sb.choose_lora_mode()
        packs = sb.start_models()
        nodes = {e["name"]: e["node"] for e in sb.entries}
        models = []
        stacks: dict = {}  # pass 2's stacked means and bases of small same-kind tensors, for every model
        for i, ck in enumerate(cks):
            m = encode_one(i, ck, sb.entries, sb.fits, sb.packs.widths, s, path, read_ahead=overlap.useful(dev), stacks=stacks, hold=hold)
            write_model(sb.zstore, packs, sb.entries, nodes, i, m, wb.submit)  # one writer thread: no shard has two writers
            models.append(m.record)
            prog.step(ck.id)
        fingerprints.work()  # the sources the background thread has not reached yet
        hashes.result()
        if kept is not None:
            kept.written.clear()  # a second build (lora_mode="auto") writes into a fresh folder
        sources = [source_record(ck, source_root) for ck in cks]
        wb.drain()
        sb.commit(models, sources, str(dev), source_record(base, source_root) if base is not None else None, kept)
    finally:
        stop.set()
        wb.close()  # waits for writes in flight (the caller may remove the folder next)
        prog.close()


def _model_bytes(tp: TensorPlan) -> int:
    """Bytes of one model's copy of a tensor (0 where its shape varies between models, and for
    LoRA modules, whose factors are read by name as they go)."""
    if tp.shape is None or tp.encoding == "lora":
        return 0
    return math.prod(tp.shape) * dtypes.torch_dtype(tp.dtype).itemsize


class Fingerprints:
    """Every source's sha256 (cached on the checkpoint), taken one source at a time by whichever
    thread asks next: the low-priority background thread during the build, and the build's own
    thread once its work is done (instead of waiting while a core idles). Stops with ``stop``."""

    def __init__(self, cks: list[Checkpoint], stop: threading.Event):
        self._todo = iter(cks)
        self._lock = threading.Lock()
        self._stop = stop

    def work(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                ck = next(self._todo, None)
            if ck is None:
                return
            ck.fingerprint()
