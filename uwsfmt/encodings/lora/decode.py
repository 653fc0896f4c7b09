"""Reading LoRA modules back as factors (batched, straight into a module where it can) and the registered Encoding."""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import torch

from uwsfmt.encodings import subspace
from uwsfmt.encodings.base import EntryContext, ReadContext, register
from uwsfmt.encodings.lora.records import factor_names, model_ranks, rank_of, stored_rank
from uwsfmt.encodings.lora.stats import factor_cores, factors
from uwsfmt.encodings.slots import take
from uwsfmt.errors import SourceError
from uwsfmt.format import dtypes

#: factor dtypes whose range needs no balancing: a full-rank read returns the basis itself as one
#: factor (no SVD, one GEMM per module instead of two; float16 factors get the balanced split)
BASIS_FACTOR_DTYPES = (torch.float32, torch.float64)


def read(store, entries: list[dict], idx: int, rows: dict[str, torch.Tensor], dev: torch.device,
         dtype: torch.dtype | None = None, into: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Factor tensors of the LoRA ``entries`` for model ``idx`` under their source names.

    Modules the adapter did not have are left out; kohya-style alpha tensors are given back
    equal to the new rank (so the scale alpha / r is 1: the factors carry it). ``into``: the
    caller's tensors (``load_into``); a factor whose tensor there has the right shape, dtype and
    device is computed straight into it (one small GEMM each, no full-size temporary and no copy)
    and that tensor is returned.
    """
    ranks = model_ranks(store, idx)
    out: dict[str, torch.Tensor] = {}
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for e in entries:  # grouped independently of which modules this adapter has: stable cache keys
        groups[(tuple(e["view"]), tuple(e["rank"]))].append(e)
    for key, group in groups.items():
        _, left, right = store.group_arrays(("lora",) + subspace.batch_key(group[0]) + tuple(x["name"] for x in group), group, dev)
        cshape = group[0]["coefficients"]["shape"]
        cw = torch.stack([take(rows, x["coefficients"]).reshape(cshape) for x in group]).to(dev)  # as stored
        kl, kr = key[1][0] or 0, key[1][1] or 0
        k = min(kl, kr)
        todo = []  # (entry, its rank, its dtype, basis factors?) for the modules this adapter has
        for i, e in enumerate(group):
            r = stored_rank(store, ranks, e)
            if r == 0:
                continue  # the adapter did not have this module
            rk = rank_of(e, r)
            want = dtype if dtype is not None else dtypes.torch_dtype(e["dtype"])
            todo.append((i, e, rk, want, rk == k and want in BASIS_FACTOR_DTYPES))
        # the k x k factorisations in float64; the out x k and k x in products in the bases' compute
        # dtype (float64 products of the wide bases were most of a read's time and memory traffic)
        direct = into is not None and k > 0 and cw.numel() > 0
        if any(not plain for *_, plain in todo):
            c = cw.to(torch.float64)
            if direct:  # per factor, one GEMM into the caller's tensor
                xb, xa = (x.to(left.dtype) for x in factor_cores(c, k))
            else:
                bb, aa = factors(left, right, c, k, dtype=left.dtype)
        cs = cw.to(left.dtype)  # the cores in the bases' dtype, for the basis factors (one conversion)
        rt = right.transpose(1, 2)
        # one factor is the store's basis itself, the other its product with the core
        _basis_factors(into if direct else None, todo, left, cs, rt, kl <= kr, out)
        for i, e, rk, want, plain in todo:
            rec = e["lora"]
            b_shape, a_shape = [e["view"][0], rk] + rec["b_tail"], [rk] + rec["a_tail"]
            if plain:  # written above
                pass
            elif direct:  # balanced factors, one GEMM each straight into the caller's tensor
                out[rec["b"]] = _product_into(into, rec["b"], b_shape, left[i], xb[i, :, :rk], want)
                out[rec["a"]] = _product_into(into, rec["a"], a_shape, xa[i, :rk], rt[i], want)
            else:
                out[rec["a"]] = aa[i, :rk].reshape(a_shape).to(want).contiguous()
                out[rec["b"]] = bb[i, :, :rk].reshape(b_shape).to(want).contiguous()
            if rec.get("alpha"):
                adt = dtype if dtype is not None else dtypes.torch_dtype(rec.get("alpha_dtype") or "float32")
                out[rec["alpha"]] = torch.tensor(float(rk), dtype=adt, device=dev)
    return out


#: modules per batched GEMM of :func:`_basis_factors` (its scratch: 8 MiB for 4096 x 16 factors)
PRODUCT_BATCH = 32


def _fitting(into: dict[str, torch.Tensor] | None, name: str, shape: list[int], want: torch.dtype,
             like: torch.Tensor) -> torch.Tensor | None:
    """The caller's tensor ``name`` when a factor of this shape and dtype can be written straight into it."""
    d = None if into is None else into.get(name)
    if d is not None and d.dtype == like.dtype == want and d.device == like.device and d.is_contiguous() and list(d.shape) == shape:
        return d
    return None


def _basis_factors(into: dict[str, torch.Tensor] | None, todo: list, left: torch.Tensor, cs: torch.Tensor,
                   rt: torch.Tensor, core_right: bool, out: dict[str, torch.Tensor]) -> None:
    """The factors of the ``plain`` modules of ``todo`` into ``out``: one is the basis (copied),
    the other its product with the core, from one batched GEMM per run of up to
    :data:`PRODUCT_BATCH` consecutive modules (through a scratch, then copied: 128 modules of
    4096 x 16 x 16 take ~3.0 ms instead of ~4.6 ms as single GEMMs on 2 cores). ``core_right``:
    B' = L and A' = C R^T, else B' = L C and A' = R^T. Each factor is written straight into the
    caller's tensor where that fits (``load_into``), else into a new one: either way the same
    numbers (the same GEMM)."""
    plain = [(i, e, rk, want) for i, e, rk, want, p in todo if p]
    runs: list[list] = []
    for t in plain:
        if runs and runs[-1][-1][0] + 1 == t[0] and len(runs[-1]) < PRODUCT_BATCH:
            runs[-1].append(t)
        else:
            runs.append([t])
    shape = (cs.shape[1], rt.shape[2]) if core_right else (left.shape[1], cs.shape[2])
    scratch = torch.empty((min(PRODUCT_BATCH, len(plain)),) + shape, dtype=left.dtype, device=left.device) if plain else None
    for run in runs:
        lo, hi = run[0][0], run[-1][0] + 1
        assert scratch is not None  # runs of plain modules
        prod = scratch[: hi - lo]
        torch.bmm(cs[lo:hi], rt[lo:hi], out=prod) if core_right else torch.bmm(left[lo:hi], cs[lo:hi], out=prod)
        for (i, e, rk, want), p in zip(run, prod):
            rec = e["lora"]
            b_shape, a_shape = [e["view"][0], rk] + rec["b_tail"], [rk] + rec["a_tail"]
            b, a = (left[i], p) if core_right else (p, rt[i])
            out[rec["b"]] = _copy_into(into, rec["b"], b_shape, b, want)
            out[rec["a"]] = _copy_into(into, rec["a"], a_shape, a, want)


def _copy_into(into: dict[str, torch.Tensor] | None, name: str, shape: list[int], x: torch.Tensor,
               want: torch.dtype) -> torch.Tensor:
    """``x`` as factor ``name``: copied into the caller's tensor when it fits, else a new tensor in ``want``."""
    d = _fitting(into, name, shape, want, x)
    if d is not None:
        d.view(x.shape).copy_(x)
        return d
    return x.reshape(shape).to(want, copy=True, memory_format=torch.contiguous_format)


def _product_into(into: dict[str, torch.Tensor] | None, name: str, shape: list[int], lhs: torch.Tensor,
                  rhs: torch.Tensor, want: torch.dtype) -> torch.Tensor:
    """``lhs @ rhs`` as factor ``name``: written straight into the caller's tensor (and that tensor
    returned) when it has this shape, dtype and device, else a new tensor in ``want``."""
    d = _fitting(into, name, shape, want, lhs)
    if d is not None:
        torch.mm(lhs, rhs, out=d.view(lhs.shape[0], rhs.shape[1]))
        return d
    return (lhs @ rhs).reshape(shape).to(want)


def delta(store, model, module: str, *, device=None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense s * B @ A of one module in the adapted weight's layout (transposed when the layer
    stores W transposed: fan_in_fan_out), rebuilt as L C R^T; zeros for a module the adapter lacks."""
    e = store.tensor_entry(module)
    if e.get("lora") is None:
        raise SourceError(f"{store.path}: {module!r} is not a LoRA module of this store")
    w = store.tensor(model, e["name"], device=device, dtype=dtype or torch.float32)
    if e["lora"].get("fan_in_fan_out"):
        w = w.reshape(e["view"]).T.contiguous()
    return w


class Lora(subspace.Subspace):
    """A LoRA module: a product basis with a small core per adapter; read back as factors."""

    name = "lora"

    @property
    def format_name(self) -> str:
        return "subspace"  # a subspace entry with a ``lora`` record (spec §6.7)

    def write_entry(self, e: dict, fit: subspace.Fit, ctx: EntryContext) -> None:
        """The product basis as a subspace entry (no residual: the cores are exact in it) with the module's ``lora`` record."""
        super().write_entry(e, fit, dataclasses.replace(ctx, residual_bits=None))
        mp = ctx.lora  # the module's plan: factor names and the shapes around the rank, A (r, *a_tail), B (out, r, *b_tail)
        e["lora"] = mp.record(tuple(mp.shape[1:]), mp.b_tail)

    def reads_single(self, e: dict) -> bool:
        return True  # the module's own name: its dense update, from its core alone

    def output_names(self, e: dict) -> list[str]:
        return factor_names(e)

    def read(self, ctx: ReadContext, entries: list[dict]) -> dict[str, torch.Tensor]:
        if ctx.single:  # Store.tensor(model, module): the dense update s*B*A, as a subspace tensor
            return subspace.SUBSPACE.read(ctx, entries)
        return read(ctx.reader, entries, ctx.idx, ctx.rows, ctx.device, ctx.dtype, into=ctx.into)


LORA = register(Lora())
