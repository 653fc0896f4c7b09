"""convert(): plan -> statistics pass -> bases -> coefficients pass -> commit."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import math
import os
import shutil
import threading
import uuid
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
import zarr
from zarr.storage import LocalStore

from uwsfmt.encodings import coefficients as coef_enc
from uwsfmt.encodings import lora as lora_enc
from uwsfmt.encodings import residual as residual_enc
from uwsfmt.encodings import subspace
from uwsfmt.encodings.shared import same_bits
from uwsfmt.encodings.slots import PackLayout
from uwsfmt.errors import BudgetError, ConfigError, ConflictError, StoreError, StoreExistsError
from uwsfmt.format import dtypes, naming
from uwsfmt.format.schema import validate_manifest
from uwsfmt.io import layout, overlap
from uwsfmt.io.commit import BuildLock, put_manifest, replace_dir
from uwsfmt.numerics import allocator, linalg
from uwsfmt.numerics.device import default_device, resolve_device
from uwsfmt.reader.manifest import BUILDING_MARK, REPLACED_MARK
from uwsfmt.sources import Checkpoint, StateDictCheckpoint, discover, open_checkpoint, provenance
from uwsfmt.sources.registry import Source, Sources
from uwsfmt.version import __version__
from uwsfmt.writer.encode import encode_model, write_exceptions
from uwsfmt.writer.fit import budget_tensor, fit_batch, fit_batches, fit_tensor, tensor_settings
from uwsfmt.writer.folder_files import FilePolicy, FolderFiles
from uwsfmt.writer.holdings import Holdings
from uwsfmt.writer.means import check_base
from uwsfmt.writer.options import BuildOptions, Fidelity, from_keywords
from uwsfmt.writer.plan import FamilyPlan, TensorPlan, plan_family
from uwsfmt.writer.progress import Progress
from uwsfmt.writer.settings import DEFAULT_TAU, FactorsAreSmaller, Settings


def utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


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
    dev = resolve_device(device, default_device())
    parent, name = os.path.split(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise StoreError(f"{out}: the parent folder {parent} does not exist")
    # The store is built in a hidden sibling and renamed into place at the end, so a killed
    # convert never leaves a store at ``out``; converts to one target serialise on a lock, under
    # which the leftovers of killed ones are removed.
    with BuildLock(out):
        _remove_stale_builds(parent, name)
        if os.path.lexists(out) and not overwrite:  # another convert finished it while we waited
            raise StoreExistsError(f"{out}: already exists; choose another output path or pass overwrite=True (CLI: --overwrite)")
        tmp = os.path.join(parent, f".{name}{BUILDING_MARK}{uuid.uuid4().hex[:8]}")
        try:
            with allocator.reuse_freed_memory():  # fewer page faults on the build's temporaries
                try:
                    _build(fam, tmp, s, dev, base_ck, progress, cancel, kept, root)
                except FactorsAreSmaller as e:  # lora_mode="auto": build again with the adapters' factors
                    shutil.rmtree(tmp, ignore_errors=True)
                    s.lora_mode = "factors"
                    s.lora_choice = (f"auto: factors (under the budget the product basis needed {e.product:,} bytes, "
                                     f"more than the adapters' own factors, {e.factors:,})")
                    assert factors_plan is not None  # planned whenever FactorsAreSmaller can be raised
                    _build(factors_plan, tmp, s, dev, base_ck, progress, cancel, kept, root)
            _replace(tmp, out, overwrite, os.path.join(parent, f".{name}{REPLACED_MARK}{uuid.uuid4().hex[:8]}"))
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            left = "the existing store there is unchanged" if os.path.exists(out) else "nothing was written there"
            raise StoreError(f"{out}: could not write the store ({os_reason(e)}); {left}") from e
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            for c in cks:
                c.close()
    return out


def os_reason(e: OSError) -> str:
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    return f"{e.strerror or e}{where}"


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
    cks = fam.checkpoints
    N = len(cks)
    zstore = LocalStore(path)
    root = zarr.open_group(zstore, mode="w", attributes={"uws": {"format_version": layout.version_for(False), "state": "building"}})
    layout.create_group(zstore, layout.TENSORS)
    nodes = naming.unique_nodes([t.name for t in fam.tensors])
    prog = Progress(len(fam.tensors) * N + N, progress, cancel, "uwsfmt convert")
    packs = PackLayout()
    lora_bytes = [0, 0]  # under a budget: bytes of the LoRA modules' product bases, of the adapters' own factors
    entries: list[dict] = []
    fits: dict[str, Any] = {}
    # overlap: the sources' sha256 on a background thread, array writes behind the compute
    stop = threading.Event()
    fingerprints = Fingerprints(cks, stop)
    hashes = overlap.Background(fingerprints.work)
    wb = overlap.WriteBehind(enabled=overlap.useful(dev))

    def write(path, data):
        wb.submit(layout.write_array, zstore, path, data)

    # the next tensors' bytes come from disk while this one is computed (cold builds)
    ahead = overlap.Lookahead(cks, [(tp.name, _model_bytes(tp)) for tp in fam.tensors])
    batched = fit_batches(fam.tensors, s, dev)  # small same-kind tensors: pass 1 in batches
    hold = Holdings()  # pass 2's results that pass 1 found on the way (sketched tensors)
    batch_fits: dict[str, tuple] = {}
    try:
        for j, (tp, node) in enumerate(zip(fam.tensors, nodes)):
            ahead.advance(j)
            npath = layout.tensor_node(node)
            layout.create_group(zstore, npath, {"uws_tensor": tp.name})
            e: dict[str, Any] = {"name": tp.name, "node": npath, "dtype": tp.dtype}
            enc, reason = tp.encoding, tp.reason
            if tp.shape is None:
                e.update(shape=None, encoding="dense", data={"per_model": True}, reason=reason)
                prog.step(tp.name, N)
            elif enc == "lora":  # one LoRA module: product basis, per-adapter cores (encodings/lora.py)
                if s.error_budget is not None:  # the cheapest ranks at which every adapter meets the budget
                    fit, e["budget"] = lora_enc.fit_budgeted(tp, cks, s, dev, prog)
                    reason = f"{reason}; error budget ({s.error_budget.describe()}): rank {e['budget']['rank']}"
                    lora_bytes[0] += e["budget"]["bytes"]
                    assert tp.lora is not None  # a LoRA module's plan
                    lora_bytes[1] += tp.lora.factor_bytes()
                else:
                    fit = lora_enc.fit(tp, cks, s, dev, prog)
                e["shape"] = list(tp.shape)
                _add_subspace(e, fit, npath, packs, dataclasses.replace(s, residual_bits=None), tp, write)
                e.update(encoding="subspace", reason=reason, lora=lora_enc.entry_record(tp))
                fits[tp.name] = fit
            elif enc == "subspace":
                if tp.name in batched and tp.name not in batch_fits:  # this tensor's batch: all of it at once
                    batch_fits.update(fit_batch(batched[tp.name], cks, s, dev, base, prog))
                if tp.name in batch_fits:
                    enc, fit, reason = batch_fits.pop(tp.name)
                else:
                    with linalg.threads_for(math.prod(tp.shape)):
                        enc, fit, reason = fit_tensor(tp, cks, tensor_settings(s, tp), dev, base, prog, hold)
                e["shape"] = list(tp.shape)
                ts = tensor_settings(s, tp)
                if enc == "subspace" and s.error_budget is not None:
                    enc, fit, reason, ts = budget_tensor(e, tp, fit, cks, s, dev, prog, base)
                if enc == "subspace":
                    _add_subspace(e, fit, npath, packs, ts, tp, write)
                    fits[tp.name] = fit
                elif enc == "shared":
                    _add_shared(e, fit, npath, write)
                    fits[tp.name] = fit
                else:
                    e["data"] = packs.add(dtypes.storage_dtype(tp.dtype), int(np.prod(tp.shape)))
                e["encoding"], e["reason"] = enc, reason
            else:
                e["shape"] = list(tp.shape)
                first = cks[0].get(tp.name)
                identical = False
                if N > 1 and reason != "override" or enc == "shared":
                    identical = True
                    for i, ck in enumerate(cks[1:], 1):
                        if not same_bits(ck.get(tp.name), first):
                            identical = False
                            break
                prog.step(tp.name, N)
                if enc == "shared" and not identical and N > 1:
                    raise ConflictError(f"tensor {tp.name!r} is forced to 'shared' but differs between models; use 'dense' or 'subspace'")
                if identical:
                    _add_shared(e, first, npath, write)
                    fits[tp.name] = first
                    e["encoding"], e["reason"] = "shared", "bit-identical in every model"
                else:
                    e["encoding"], e["reason"] = "dense", reason
                    e["data"] = packs.add(dtypes.storage_dtype(tp.dtype), int(np.prod(tp.shape)))
            entries.append(e)

        if s.lora_mode == "auto" and lora_bytes[1]:
            if lora_bytes[0] > lora_bytes[1]:
                raise FactorsAreSmaller(*lora_bytes)
            s.lora_mode = "product"
            s.lora_choice = (f"auto: product (under the budget the product basis needs {lora_bytes[0]:,} bytes, "
                             f"the adapters' own factors {lora_bytes[1]:,})")
        pack_arrays = {p: layout.create_pack(zstore, p, N, w) for p, w in packs.widths.items() if w > 0}
        manifest_packs = {p: {"path": layout.pack_path(p), "dtype": p, "width": w} for p, w in packs.widths.items() if w > 0}
        models = []
        stacks: dict = {}  # pass 2's stacked means and bases of small same-kind tensors, for every model
        for i, ck in enumerate(cks):
            fixes: dict = {}
            rows, per_model, errs, derrs = encode_model(entries, fits, ck, packs.widths, allow_nonfinite=s.allow_nonfinite, store_path=path,
                                                        error_budget=s.error_budget, corrections=fixes,
                                                        read_ahead=overlap.useful(dev), stacks=stacks, index=i, hold=hold)
            for p, arr in pack_arrays.items():  # one shard per row, one writer thread: no shard has two writers
                wb.submit(arr.__setitem__, (i, slice(None)), rows[p])
            for name, w in per_model.items():
                e = entries[[x["name"] for x in entries].index(name)]
                write(f"{e['node']}/models/{i}", dtypes.to_storage(w))
            models.append({"id": ck.id, "added": utc_now(), "source": None, "error": errs, "delta_error": derrs,
                           **lora_enc.model_record(entries, ck)})
            if fixes:  # the budget's emulation and pass 2 disagreed by rounding: keep the promise anyway
                models[-1]["exceptions"] = write_exceptions(zstore, entries, i, fixes)
            prog.step(ck.id)
        fingerprints.work()  # the sources the background thread has not reached yet
        hashes.result()
        if kept is not None:
            kept.written.clear()  # a second build (lora_mode="auto") writes into a fresh folder
        for rec, ck in zip(models, cks):
            rec["source"] = source_record(ck, source_root)
            folder = kept.write(zstore, ck) if kept is not None else None
            if folder is not None:  # the folder's small files (written before the commit below)
                rec["folder"] = folder
        wb.drain()
        manifest: dict[str, Any] = {
            "format_version": layout.version_for(any(isinstance(f, subspace.Fit) and f.mean is not None and f.mean.dtype == torch.float16
                                                     for f in fits.values()),
                                                 any(coef_enc.quantized(e.get("coefficients") or {}) for e in entries)),
            "state": "complete",
            "generation": 1,
            "writer": f"uwsfmt {__version__}",
            "created": utc_now(),
            "updated": utc_now(),
            "build": {
                "device": str(dev),
                "settings": {k: v for k, v in asdict(s).items()},
                "default_tau": DEFAULT_TAU,
                "n_models": N,
                "base": source_record(base, source_root) if base is not None else None,
                **({"files": kept.policy.record()} if kept is not None else {}),
            },
            "packs": manifest_packs,
            "tensors": entries,
            "models": models,
        }

        validate_manifest(manifest, path)
        put_manifest(root, manifest)
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


def _add_shared(e: dict, value: torch.Tensor, npath: str, write) -> None:
    write(f"{npath}/value", dtypes.to_storage(value))
    e["data"] = {"path": f"{npath}/value"}


def _add_subspace(e: dict, fit: subspace.Fit, npath: str, packs: PackLayout, s: Settings, tp: TensorPlan, write) -> None:
    """Write a subspace tensor's shared arrays with ``write(path, array)`` and fill its manifest entry."""
    assert tp.shape is not None  # a tensor of varying shape is dense
    m, n = linalg.matrix_view(tp.shape)
    view = (m * n, 1) if fit.mode == "flat" else (m, n)
    e.update(view=list(view), mode=fit.mode, center=fit.center)
    if fit.mean is not None:
        write(f"{npath}/mean", fit.mean.reshape(view).cpu().numpy())
        e["mean"] = f"{npath}/mean"
    else:
        e["mean"] = None
    e["left"] = e["right"] = None
    if fit.left is not None:
        write(f"{npath}/left", fit.left.cpu().numpy())
        e["left"] = f"{npath}/left"
    if fit.right is not None:
        write(f"{npath}/right", fit.right.cpu().numpy())
        e["right"] = f"{npath}/right"
    e["spectrum"] = {}
    for side, vals in fit.spectra.items():
        write(f"{npath}/spectrum_{side}", vals.cpu().numpy().astype(np.float64))
        e["spectrum"][side] = f"{npath}/spectrum_{side}"
    e["rank"] = fit.rank
    if fit.method:
        e["basis"] = fit.method
    ex = fit.explained()
    e["explained_variance"] = {k: float(v) for k, v in ex.items()}
    e["energy"] = float(next(iter(fit.spectra.values())).sum()) if fit.spectra else 0.0
    r = fit.left.shape[1] if fit.left is not None else view[0]
    c = fit.right.shape[1] if fit.right is not None else view[1]
    e["coefficients"] = coef_enc.plan(packs, (r, c), s.coefficient_scheme, fit.mode)
    e["residual"] = residual_enc.plan(packs, view[0], view[1], s.residual_bits) if s.residual_bits else None
