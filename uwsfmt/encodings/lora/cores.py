"""One adapter's modules -> cores in its pack rows, and the errors a reader will get back."""

from __future__ import annotations

import math
from typing import cast

import numpy as np
import torch

from uwsfmt.encodings import subspace
from uwsfmt.encodings.lora.decode import PRODUCT_BATCH
from uwsfmt.encodings.lora.records import rank_of
from uwsfmt.encodings.lora.stats import core, factors
from uwsfmt.errors import ConflictError
from uwsfmt.format import dtypes
from uwsfmt.numerics import linalg
from uwsfmt.sources.base import Checkpoint, LoraPair


def factor_matrices(ck: Checkpoint, pair: LoraPair, out: int, inp: int) -> tuple[torch.Tensor, torch.Tensor]:
    a = ck.get(pair.a)
    b = ck.get(pair.b)
    r = a.shape[0]
    a = a.reshape(r, -1)
    b = b.reshape(b.shape[0], r)
    if a.shape[1] != inp or b.shape[0] != out:
        raise ConflictError(f"{ck.path or ck.id}: LoRA module {pair.module!r} of {ck.id!r} adapts a {b.shape[0]}x{a.shape[1]} "
                            f"matrix but the family's is {out}x{inp}")
    return a, b


def encode(entries: list[dict], fits: dict[str, subspace.Fit], ck: Checkpoint, rows: dict[str, np.ndarray],
           stacks: dict | None = None) -> list[tuple[float, int]]:
    """Pass 2 for the LoRA modules ``entries`` of one adapter: write each core into ``rows``;
    return each module's (relative error, adapter rank), in order (0.0, 0 for a module the
    adapter lacks: a zero update, its core left zero).

    The error is that of the factors a reader gets back (cast to the source dtype) against
    the adapter's own s * B @ A, computed from r x r products only, in float64. Runs of
    consecutive modules of one kind (shapes, ranks, dtype) are computed together with batched
    GEMMs, a run's float64 operands kept to :data:`ENCODE_RUN_BYTES` (cache-sized; at most
    :data:`PRODUCT_BATCH` modules). Measured on 2 cores, 32 adapters x 128 modules, rank 16:
    pass 2 took 1.15-1.25 s instead of 1.57 s 1024 wide, 3.3-3.5 s instead of 3.6-3.75 s
    4096 wide (float64 products: the flops, not the calls, are most of it there). ``stacks``
    (a dict the caller keeps from one adapter to the next) holds runs' bases, stacked in
    float64, each module in one run at most.
    """
    stacks = {} if stacks is None else stacks
    pairs = ck.lora_pairs()
    infos = ck.infos()
    out: list[tuple[float, int] | None] = [None] * len(entries)
    runs: list[list[tuple[int, dict, LoraPair]]] = []
    run_key, most = None, 1
    for i, e in enumerate(entries):
        pair = pairs.get(e["name"])
        if pair is None:
            out[i] = (0.0, 0)
            continue
        fit = fits[e["name"]]
        assert fit.left is not None  # LoRA fits are two-sided
        r = int(infos[pair.a].shape[0])
        key = (tuple(e["view"]), tuple(e["rank"]), e["dtype"], r, infos[pair.a].dtype, infos[pair.b].dtype,
               fit.left.dtype, fit.left.device)
        if runs and key == run_key and runs[-1][-1][0] + 1 == i and len(runs[-1]) < most:
            runs[-1].append((i, e, pair))
        else:
            runs.append([(i, e, pair)])
            run_key = key
            out_dim, in_dim = e["view"]
            module_bytes = 8 * (out_dim + in_dim) * (r + max(e["rank"][0] or 0, e["rank"][1] or 0))
            most = max(1, min(PRODUCT_BATCH, ENCODE_RUN_BYTES // module_bytes))
    for run in runs:
        for (i, _, _), res in zip(run, _encode_run(run, fits, ck, rows, stacks)):
            out[i] = res
    return out  # type: ignore[return-value]


#: most bytes of float64 operands (A, B and the two bases) in one run of :func:`encode`: runs
#: of 32 4096-wide modules (64 MiB) were slower than runs of 4 (8 MiB)
ENCODE_RUN_BYTES = 8 << 20


def _encode_run(run: list[tuple[int, dict, LoraPair]], fits: dict[str, subspace.Fit], ck: Checkpoint,
                rows: dict[str, np.ndarray], stacks: dict) -> list[tuple[float, int]]:
    """:func:`encode` for one run of modules of one kind, batched over the run."""
    e0 = run[0][1]
    out, inp = e0["view"]
    f = torch.float64
    names = tuple(e["name"] for _, e, _ in run)
    bases = stacks.get(("lora",) + names)
    if bases is None:  # once per run of modules, not per adapter
        bases = (torch.stack([cast(torch.Tensor, fits[n].left) for n in names]).to(f),  # LoRA fits are two-sided
                 torch.stack([cast(torch.Tensor, fits[n].right) for n in names]).to(f))
        # kept for the next adapters, unless a module of it is kept in another run already (adapters
        # that lack different modules split the runs differently): one float64 copy per module at most
        covered = stacks.setdefault("lora_modules_kept", set())
        if covered.isdisjoint(names):
            stacks[("lora",) + names] = bases
            covered.update(names)
    left, right = bases
    dev = left.device
    mats = [factor_matrices(ck, pair, out, inp) for _, _, pair in run]
    r = mats[0][0].shape[0]
    a = torch.empty((len(run), r, inp), dtype=f, device=dev)
    b = torch.empty((len(run), out, r), dtype=f, device=dev)
    for j, (aj, bj) in enumerate(mats):
        a[j].copy_(aj)
        b[j].copy_(bj)
    del mats
    s = torch.tensor([float(pair.scale) for _, _, pair in run], dtype=f, device=dev)
    c, x2, err2 = read_back(left, right, a, b, s, rank_of(e0, r), e0["dtype"])
    if c.shape[1] * c.shape[2]:
        host = c.cpu().numpy()
        for j, (_, e, _) in enumerate(run):
            sl = e["coefficients"]
            rows[sl["pack"]][sl["offset"]: sl["offset"] + host[j].size] = host[j].reshape(-1)
    return [(_relative(x2j, e2j), r) for x2j, e2j in zip(x2.tolist(), err2.tolist())]


def read_back(left: torch.Tensor, right: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: torch.Tensor, rank: int,
              dtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a reader gets back for adapters' modules (batched over the leading dimension of
    ``a``, ``b``, ``s``; the bases batched alike, or one pair for all): the cores as stored
    (float32), each ||s B A||^2 and each squared error of the factors a reader returns (rank
    ``rank``, cast to ``dtype``) against s B A, from r x r products only, in float64."""
    f = torch.float64
    with linalg.no_tf32():
        c = core(left, right, a, b, s).to(torch.float32)
        bb, aa = factors(left, right, c.to(f), rank)
        want = dtypes.torch_dtype(dtype)
        bb, aa = bb.to(want).to(f), aa.to(want).to(f)
        x2 = s * s * torch.sum((a @ a.mT) * (b.mT @ b), dim=(1, 2))
        y2 = torch.sum((aa @ aa.mT) * (bb.mT @ bb), dim=(1, 2))
        xy = s * torch.sum((b.mT @ bb) * (a @ aa.mT), dim=(1, 2))  # <sBA, B'A'> = s tr((B^T B')(A' A^T))
    return c, x2, (x2 - 2 * xy + y2).clamp_min(0)


def _relative(x2: float, err2: float) -> float:
    """||X - X'|| / ||X|| from the squares (0 for a zero update rebuilt exactly, else inf)."""
    if x2 <= 0.0:
        return 0.0 if err2 <= 0.0 else math.inf
    return math.sqrt(err2 / x2)
