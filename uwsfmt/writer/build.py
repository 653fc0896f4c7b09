"""The build's steps, shared by the one-process build (:mod:`uwsfmt.writer.convert`) and the Dask
build (:mod:`uwsfmt.writer.distributed`).

A build is a map-reduce over a planned family:

1. pass 1, per *unit* (one tensor, or a batch of small same-kind tensors): read every model's
   copy and fit a mean and basis, or find the tensor shared or dense (:func:`fit_unit`, pure:
   it reads the sources and returns :class:`TensorFit` records, writes nothing);
2. the store's per-tensor arrays and manifest entries, in tensor order (:meth:`StoreBuild.record`:
   pack slots are laid out in that order), then the pack arrays (:meth:`StoreBuild.start_models`);
3. pass 2, per model: project it on every basis (:func:`encode_one`) and write its pack rows and
   per-model arrays (:func:`write_model`; a row is one shard: one writer per model);
4. the manifest, committed last (:meth:`StoreBuild.commit`).

Whoever runs steps 1 and 3 (this process, or Dask workers), steps 2 and 4 run in one place, so
both builds write the same store.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import zarr
from zarr.abc.store import Store
from zarr.storage import LocalStore

from uwsfmt.encodings import REGISTRY, subspace
from uwsfmt.encodings import coefficients as coef_enc
from uwsfmt.encodings import lora as lora_enc
from uwsfmt.encodings import residual as residual_enc
from uwsfmt.encodings.base import EntryContext
from uwsfmt.encodings.shared import same_bits
from uwsfmt.encodings.slots import PackLayout
from uwsfmt.errors import ConflictError
from uwsfmt.format import dtypes, naming
from uwsfmt.format.schema import validate_manifest
from uwsfmt.io import layout, shards
from uwsfmt.io.commit import put_manifest
from uwsfmt.numerics import linalg
from uwsfmt.sources import Checkpoint
from uwsfmt.version import __version__
from uwsfmt.writer.encode import encode_model, write_exceptions
from uwsfmt.writer.fit import budget_tensor, fit_batch, fit_batches, fit_tensor, tensor_settings
from uwsfmt.writer.folder_files import FolderFiles
from uwsfmt.writer.holdings import Holdings
from uwsfmt.writer.plan import FamilyPlan, TensorPlan
from uwsfmt.writer.progress import Progress
from uwsfmt.writer.settings import DEFAULT_TAU, FactorsAreSmaller, Settings

#: ``write(path, array)``: where the driver's per-tensor arrays go (at once, or behind the compute)
Write = Callable[[str, Any], None]


def utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------ pass 1


@dataclass
class TensorFit:
    """Pass 1's result for one tensor: what the store records for it."""

    encoding: str  # subspace | shared | dense | lora (a LoRA module's product basis)
    fit: Any  # subspace.Fit; the shared value (a tensor); None (dense)
    reason: str
    settings: Settings | None = None  # subspace: the tensor's own (an error budget picks residual and coefficient bits)
    budget: dict | None = None  # the error budget's record (the pick and its alternatives)
    lora_bytes: tuple[int, int] = (0, 0)  # LoRA under a budget: bytes of the product basis, of the adapters' factors


def fit_units(tensors: list[TensorPlan], s: Settings, dev: torch.device) -> list[list[TensorPlan]]:
    """The family's tensors as units of pass 1, ordered by their first tensor: each a single
    tensor, or a batch of small same-kind tensors fitted together (:func:`fit_batches`)."""
    batched = fit_batches(tensors, s, dev)
    units: list[list[TensorPlan]] = []
    seen: set[str] = set()
    for tp in tensors:
        if tp.name not in seen:
            unit = batched.get(tp.name, [tp])
            seen.update(x.name for x in unit)
            units.append(unit)
    return units


def fit_unit(unit: list[TensorPlan], cks: list[Checkpoint], s: Settings, dev: torch.device, base: Checkpoint | None,
             prog: Progress, hold: Holdings | None = None) -> dict[str, TensorFit]:
    """Pass 1 of one unit (see :func:`fit_units`): tensor name -> :class:`TensorFit`. Reads the
    sources, writes nothing; ``hold``: memory pass 1 may keep pass-2 results in."""
    if len(unit) > 1:
        fitted = fit_batch(unit, cks, s, dev, base, prog)
        out = {}
        for tp in unit:
            enc, fit, reason = fitted[tp.name]
            out[tp.name] = _subspace_result(tp, enc, fit, reason, cks, s, dev, base, prog)
        return out
    tp = unit[0]
    n = len(cks)
    if tp.shape is None:
        prog.step(tp.name, n)
        return {tp.name: TensorFit("dense", None, tp.reason)}
    if tp.encoding == "lora":  # one LoRA module: product basis, per-adapter cores (encodings/lora.py)
        if s.error_budget is None:
            return {tp.name: TensorFit("lora", lora_enc.fit(tp, cks, s, dev, prog), tp.reason)}
        fit, record = lora_enc.fit_budgeted(tp, cks, s, dev, prog)  # the cheapest ranks at which every adapter meets it
        assert tp.lora is not None  # a LoRA module's plan
        return {tp.name: TensorFit("lora", fit, f"{tp.reason}; error budget ({s.error_budget.describe()}): rank {record['rank']}",
                                   budget=record, lora_bytes=(record["bytes"], tp.lora.factor_bytes()))}
    if tp.encoding == "subspace":
        with linalg.threads_for(math.prod(tp.shape)):
            enc, fit, reason = fit_tensor(tp, cks, tensor_settings(s, tp), dev, base, prog, hold)
        return {tp.name: _subspace_result(tp, enc, fit, reason, cks, s, dev, base, prog)}
    # dense or shared candidates: shared where every model holds the same bits
    first = cks[0].get(tp.name)
    identical = False
    if n > 1 and tp.reason != "override" or tp.encoding == "shared":
        identical = all(same_bits(ck.get(tp.name), first) for ck in cks[1:])
    prog.step(tp.name, n)
    if tp.encoding == "shared" and not identical and n > 1:
        raise ConflictError(f"tensor {tp.name!r} is forced to 'shared' but differs between models; use 'dense' or 'subspace'")
    if identical:
        return {tp.name: TensorFit("shared", first, "bit-identical in every model")}
    return {tp.name: TensorFit("dense", None, tp.reason)}


def _subspace_result(tp: TensorPlan, enc: str, fit, reason: str, cks: list[Checkpoint], s: Settings, dev: torch.device,
                     base: Checkpoint | None, prog: Progress) -> TensorFit:
    """A subspace candidate's fit, under an error budget checked (and its rank, residual and
    coefficient bits picked) by :func:`budget_tensor`."""
    ts = tensor_settings(s, tp)
    record = None
    if enc == "subspace" and s.error_budget is not None:
        scratch: dict[str, Any] = {}
        enc, fit, reason, ts = budget_tensor(scratch, tp, fit, cks, s, dev, prog, base)
        record = scratch["budget"]
    return TensorFit(enc, fit, reason, settings=ts, budget=record)


# ----------------------------------------------------------------------- the store, by the driver


class StoreBuild:
    """The store a build writes at ``path``: created here, filled with pass 1's results in
    tensor order (:meth:`record`), then the models' rows (written by whoever encodes them), then
    the manifest (:meth:`commit`). ``write`` writes a per-tensor array (default: at once)."""

    def __init__(self, fam: FamilyPlan, path: str, s: Settings, write: Write | None = None):
        self.fam, self.path, self.s = fam, path, s
        self.zstore = LocalStore(path)
        self.root = zarr.open_group(self.zstore, mode="w",
                                    attributes={"uws": {"format_version": layout.version_for(False), "state": "building"}})
        layout.create_group(self.zstore, layout.TENSORS)
        self.nodes = naming.unique_nodes([t.name for t in fam.tensors])
        self.packs = PackLayout()
        self.entries: list[dict] = []
        self.fits: dict[str, Any] = {}
        self.lora_bytes = [0, 0]  # under a budget: bytes of the LoRA modules' product bases, of the adapters' own factors
        self.write: Write = write or (lambda where, data: layout.write_array(self.zstore, where, data))

    def record(self, tp: TensorPlan, r: TensorFit) -> None:
        """Write the next tensor's shared arrays and add its manifest entry (tensors in plan order:
        pack slots are laid out in that order); its encoding fills in the rest (``write_entry``)."""
        npath = layout.tensor_node(self.nodes[len(self.entries)])
        layout.create_group(self.zstore, npath, {"uws_tensor": tp.name})
        e: dict[str, Any] = {"name": tp.name, "node": npath, "dtype": tp.dtype,
                             "shape": None if tp.shape is None else list(tp.shape)}
        self.entries.append(e)
        if r.budget is not None:
            e["budget"] = r.budget
        self.lora_bytes[0] += r.lora_bytes[0]
        self.lora_bytes[1] += r.lora_bytes[1]
        ts = r.settings or self.s
        enc = REGISTRY[r.encoding]
        enc.write_entry(e, r.fit, EntryContext(npath, tp.shape, tp.dtype, self.packs, self.write, ts.residual_bits,
                                               ts.coefficient_scheme, tp.lora))
        e["reason"] = r.reason
        if enc.keeps_fit:
            self.fits[tp.name] = r.fit

    def choose_lora_mode(self) -> None:
        """lora_mode="auto" under a budget, after pass 1: keep the product bases, or raise
        :class:`FactorsAreSmaller` (the caller builds again with the adapters' factors)."""
        s, (product, factors) = self.s, self.lora_bytes
        if s.lora_mode == "auto" and factors:
            if product > factors:
                raise FactorsAreSmaller(product, factors)
            s.lora_mode = "product"
            s.lora_choice = f"auto: product (under the budget the product basis needs {product:,} bytes, the adapters' own factors {factors:,})"

    def start_models(self) -> dict[str, zarr.Array]:
        """Create the pack arrays (one row per model, one shard per row) and the folders of
        per-model arrays, so that each model's writer only writes its own files."""
        n = len(self.fam.checkpoints)
        for e in self.entries:
            if e["shape"] is None:
                layout.create_group(self.zstore, f"{e['node']}/models")
        return {p: layout.create_pack(self.zstore, p, n, w) for p, w in self.packs.widths.items() if w > 0}

    def commit(self, models: list[dict], sources: list[dict], device: str, base_source: dict | None,
               kept: FolderFiles | None) -> None:
        """Complete each model's record (its ``source``, its folder's files) and commit the manifest."""
        for rec, ck, src in zip(models, self.fam.checkpoints, sources):
            rec["source"] = src
            folder = kept.write(self.zstore, ck) if kept is not None else None
            if folder is not None:  # the folder's small files (written before the commit below)
                rec["folder"] = folder
        s, entries = self.s, self.entries
        half = any(isinstance(f, subspace.Fit) and f.mean is not None and f.mean.dtype == torch.float16 for f in self.fits.values())
        manifest: dict[str, Any] = {
            "format_version": layout.version_for(half, any(coef_enc.quantized(e.get("coefficients") or {}) for e in entries),
                                                 any(residual_enc.uses_column_scales(e.get("residual")) for e in entries)),
            "state": "complete",
            "generation": 1,
            "writer": f"uwsfmt {__version__}",
            "created": utc_now(),
            "updated": utc_now(),
            "build": {
                "device": device,
                "settings": {k: v for k, v in asdict(s).items()},
                "default_tau": DEFAULT_TAU,
                "n_models": len(models),
                "base": base_source,
                **({"files": kept.policy.record()} if kept is not None else {}),
            },
            "packs": {p: {"path": layout.pack_path(p), "dtype": p, "width": w} for p, w in self.packs.widths.items() if w > 0},
            "tensors": entries,
            "models": models,
        }
        validate_manifest(manifest, self.path)
        put_manifest(self.root, manifest)


# ------------------------------------------------------------------------------------ pass 2


@dataclass
class EncodedModel:
    """Pass 2's result for one model: its pack rows, per-model arrays, corrections and record."""

    rows: dict[str, np.ndarray]
    per_model: dict[str, torch.Tensor]
    fixes: dict
    record: dict  # the manifest's model record (``source`` filled in at the commit)


def encode_one(i: int, ck: Checkpoint, entries: list[dict], fits: dict[str, Any], widths: dict[str, int], s: Settings,
               store_path: str, *, read_ahead: bool, stacks: dict, hold: Holdings | None) -> EncodedModel:
    """Pass 2 of model ``i``: project it on every basis (:func:`encode_model`)."""
    fixes: dict = {}
    rows, per_model, errs, derrs = encode_model(entries, fits, ck, widths, allow_nonfinite=s.allow_nonfinite, store_path=store_path,
                                                error_budget=s.error_budget, corrections=fixes, read_ahead=read_ahead,
                                                stacks=stacks, index=i, hold=hold)
    record = {"id": ck.id, "added": utc_now(), "source": None, "error": errs, "delta_error": derrs,
              **lora_enc.model_record(entries, ck)}
    return EncodedModel(rows, per_model, fixes, record)


def write_model(zstore: Store, packs: dict[str, zarr.Array], entries: list[dict], nodes: dict[str, str], i: int,
                m: EncodedModel, submit: Callable[..., None]) -> None:
    """Write model ``i``'s pack rows and per-model arrays with ``submit(fn, *args)`` (one writer
    per row: a row is one shard), its exceptions at once (they go into its record)."""
    for p, arr in packs.items():
        submit(shards.write_row, zstore, arr, i, m.rows[p])
    for name, w in m.per_model.items():
        submit(layout.write_array, zstore, f"{nodes[name]}/models/{i}", dtypes.to_storage(w))
    if m.fixes:  # the budget's emulation and pass 2 disagreed by rounding: keep the promise anyway
        m.record["exceptions"] = write_exceptions(zstore, entries, i, m.fixes)
