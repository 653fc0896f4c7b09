"""Randomised sketches of a family (range finder, Ritz values, a-posteriori checks): bases without the full Gram."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from uwsfmt.numerics.gram import eig_desc
from uwsfmt.numerics.linalg import CENTERS, delta, sq_norm, thin_mm, tmm


class FlatSketch:
    """Streaming randomized range finder for flat PCA over vectorised tensors.

    The exact Gram of vectorised tensors (numel x numel) cannot be formed; instead
    Y = sum_i (w_i - ref) g_i^T with a Gaussian g_i in R^s per model. The centred range is
    span(Y - N mu g_bar^T). With s >= number of models the range is captured exactly.
    """

    def __init__(self, numel: int, width: int, reference: torch.Tensor, seed: int = 0):
        self.reference = reference.to(torch.float64).reshape(-1)
        dev = self.reference.device
        self.width = width
        self.y = torch.zeros(numel, width, dtype=torch.float64, device=dev)
        self.g_sum = torch.zeros(width, dtype=torch.float64, device=dev)
        self.d_sum = torch.zeros(numel, dtype=torch.float64, device=dev)
        self.count = 0
        self._gen = torch.Generator(device="cpu").manual_seed(seed)

    def add(self, w: torch.Tensor) -> None:
        d = w.to(device=self.reference.device, dtype=torch.float64).reshape(-1) - self.reference
        g = torch.randn(self.width, generator=self._gen, dtype=torch.float64).to(d.device)
        self.y.addr_(d, g)
        self.g_sum += g
        self.d_sum += d
        self.count += 1

    def range(self, center: str) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(M or None, orthonormal Q spanning the sketched range of the deviations)."""
        n = max(self.count, 1)
        mu = self.d_sum / n
        y = self.y
        if center == "mean":
            mean = self.reference + mu
            y = y - torch.outer(mu, self.g_sum)
        elif center == "base":
            mean = self.reference
        else:
            mean = None
            y = y + torch.outer(self.reference, self.g_sum)
        q, _ = torch.linalg.qr(y, mode="reduced")
        return mean, q


def flat_basis(q: torch.Tensor, projections: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Basis (numel x s, best first) and spectrum from Q and the stacked Q^T d_i (s x N)."""
    u, s, _ = torch.linalg.svd(projections, full_matrices=False)
    return q @ u, s * s


#: basis="sketch" with tau and no max_rank: directions sketched per side (tau must be met within them)
SKETCH_RANK = 64


#: fresh Gaussian probes of the a-posteriori check
SKETCH_PROBES = 8


class GramSketch:
    """Map-reduce products of one tensor's Gram matrices with fixed thin matrices.

    For each side in ``xs`` (``"left"``: X is m x t, ``"right"``: n x t) it accumulates
    ``sum_i D_i D_i^T X`` (left) or ``sum_i D_i^T D_i X`` (right) with D_i = W_i - reference,
    without forming the Gram: two thin GEMMs per model instead of one m x m (or n x n) GEMM.
    :meth:`products` applies the centring, exactly as :meth:`GramStats.center` does for the Gram.
    ``sums=False`` skips the sums (count, mean, energies) when an earlier sweep has them.

    Precision: a sketch only has to find a subspace (the a-posteriori check judges it), so the
    per-model work is done in the *compute dtype* (float32, or float64 for float64 tensors): D_i,
    its thin GEMMs and its norms. What is summed over models is accumulated in float64: the
    products, the energies, and the sum of the deltas (float32 partial sums over at most
    :data:`SUM_BLOCK` models, flushed into float64). Full-size work once per tensor (the mean,
    the centring) is done in the compute dtype too: each full-size float64 pass costs about as
    much as a model's GEMMs (measured: the float64 mean and centring took ~12 ms of a 768 x 3072
    tensor's ~60 ms on 2 cores). The centring's thin product mu^T X comes from the models' own
    D_i^T X, summed as they go.

    >>> ref = torch.zeros(4, 3, dtype=torch.float64)
    >>> sk = GramSketch(4, 3, {"left": torch.eye(4, 2, dtype=torch.float64)}, ref)
    >>> _ = sk.add(torch.ones(4, 3)); sk.products("base")[1]["left"].shape
    torch.Size([4, 2])
    """

    #: models summed in float32 before the partial sum is added into the float64 sum of deltas
    SUM_BLOCK = 16

    def __init__(self, m: int, n: int, xs: dict[str, torch.Tensor], reference: torch.Tensor, *, sums: bool = True,
                 w_norms: bool = True):
        self.cdt = torch.float64 if reference.dtype == torch.float64 else torch.float32
        self.w_norms = w_norms  # sum ||W_i||^2 too (centring "none" needs it)
        #: the reference as given (no float64 copy); ``reference_c``: in the compute dtype, which
        #: the later sweeps' GramSketch / GramRitz get so that they compute in the same dtype
        self.reference = reference.reshape(m, n)
        self.reference_c = reference.to(self.cdt).reshape(m, n)
        dev = self.reference.device
        self.xs = {side: x.to(device=dev, dtype=torch.float64) for side, x in xs.items()}
        self._xs_c = {side: x.to(self.cdt) for side, x in self.xs.items()}
        self.y = {side: torch.zeros_like(x) for side, x in self.xs.items()}
        #: per side, sum_i D_i^T X (left, n x t) or sum_i D_i X (right, m x t): n mu^T X, for the centring
        self.v = {side: torch.zeros(n if side == "left" else m, x.shape[1], dtype=torch.float64, device=dev)
                  for side, x in self.xs.items()}
        self.sums = sums
        self.count = 0
        self._delta_sum: torch.Tensor | None = None  # float64, from the first flush on (float64 tensors: from the start)
        self._block: torch.Tensor | None = None  # float32 partial sum of the last < SUM_BLOCK deltas
        self._in_block = 0
        self.sq_norm = 0.0  # sum ||W_i||^2
        self.delta_sq = 0.0  # sum ||D_i||^2
        self._mu: torch.Tensor | None = None
        self._mean: tuple[torch.Tensor, torch.Tensor] | None = None

    def _sum_c(self) -> torch.Tensor:
        """Sum of the deltas in the compute dtype (the float32 partial sum itself while there is no float64 one)."""
        if self._delta_sum is None and self._block is not None:
            return self._block
        ds = self.delta_sum
        assert ds is not None  # no partial sum: summing
        return ds.to(self.cdt)

    def mean_delta(self) -> torch.Tensor:
        """mu = the mean of the deltas, in the compute dtype (cached until the next add)."""
        if self._mu is None:
            self._mu = self._sum_c().mul(1.0 / max(self.count, 1))
        return self._mu

    def family_mean(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, E): the family mean reference + mu rounded to the compute dtype, and what the
        rounding left out (the exact mean - M), in the compute dtype. E is exact to far below M's
        rounding where the deltas are small against the reference (a family of fine-tunes: mu's
        own rounding is then far below M's); elsewhere to about M's rounding. Three element-wise
        passes, no float64 copy (cached until the next add)."""
        if self._mean is None:
            mu = self.mean_delta()
            mean = torch.add(self.reference_c, mu)
            err = torch.sub(mean, self.reference_c)  # what of mu the rounded mean holds (exact for small deltas)
            self._mean = (mean, torch.sub(mu, err, out=err))
        return self._mean

    @property
    def delta_sum(self) -> torch.Tensor | None:
        """Sum of the deltas (float64), partial sums included; None without sums."""
        if not self.sums:
            return None
        self._flush()
        if self._delta_sum is None:
            self._delta_sum = torch.zeros_like(self.reference_c, dtype=torch.float64)
        return self._delta_sum

    def _flush(self) -> None:
        """Add the float32 partial sum into the float64 one (made from it the first time)."""
        if self._block is not None and self._in_block:
            if self._delta_sum is None:
                self._delta_sum = self._block.to(torch.float64)
            else:
                self._delta_sum.add_(self._block)  # cast on the fly: no float64 copy of the block
            self._block.zero_()
            self._in_block = 0

    def add(self, w: torch.Tensor) -> float | None:
        """Add one model's tensor. When summing, returns ||W - reference||^2: NaN/Inf when W has
        such values (the reference is a checked model or the base), or when the float32 delta
        overflows (callers then check the values themselves)."""
        w = w.to(device=self.reference.device).reshape(self.reference.shape)
        d = delta(w, self.reference_c)
        self.count += 1
        self._mu = self._mean = None
        sq = None
        if self.sums:
            dsq = sq_norm(d)
            if self.w_norms:  # only the uncentred energy ("none") needs it: a pass over W
                self.sq_norm += sq_norm(w)
            if self.cdt == torch.float64:
                assert self.delta_sum is not None  # self.sums
                self.delta_sum.add_(d)
            else:
                if self._block is None:
                    self._block = torch.zeros_like(d)
                self._block.add_(d)
                self._in_block += 1
                if self._in_block >= self.SUM_BLOCK:
                    self._flush()
            self.delta_sq += dsq
            sq = dsq
        for side, x in self._xs_c.items():
            if side == "left":
                v = tmm(d, x)  # D^T X
                self.y[side].add_(thin_mm(d, v).to(torch.float64))
            else:
                v = thin_mm(d, x)
                self.y[side].add_(tmm(d, v).to(torch.float64))
            self.v[side].add_(v.to(torch.float64))
        return sq

    def merge(self, other: GramSketch) -> None:
        if not torch.equal(self.reference, other.reference):
            raise ValueError("GramSketch.merge needs statistics taken against the same reference")
        self.count += other.count
        self._mu = self._mean = None
        if self.sums:
            assert self.delta_sum is not None and other.delta_sum is not None  # both summing
            self.delta_sum.add_(other.delta_sum)
            self.sq_norm += other.sq_norm
            self.delta_sq += other.delta_sq
        for side in self.y:
            self.y[side] += other.y[side]
            self.v[side] += other.v[side]

    def products(self, how: str, sums: GramSketch | None = None
                 ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor], float]:
        """(M, {side: G_c X}, total energy trace(G_c)) for the centring ``how``; M: the family
        mean in the compute dtype (:meth:`family_mean`), the reference, or None.

        ``sums``: the sketch holding the sums (this one unless it was built with ``sums=False``).
        The centring terms are thin products with full-size factors (mu, the reference): done in
        the compute dtype, added to the float64 products.
        """
        s = sums or self
        n = max(s.count, 1)
        ref = self.reference_c
        mu = s.mean_delta() if how == "mean" else None
        sd = s._sum_c() if how == "none" else None
        out = {}
        for side, x in self._xs_c.items():
            y = self.y[side]
            a, r = (mu, ref) if side == "left" else (None if mu is None else mu.T, ref.T)
            sdx = None if sd is None else (sd if side == "left" else sd.T)
            if how == "mean":  # n mu mu^T X = mu (sum_i D_i^T X)
                assert a is not None
                y = y - (a @ self.v[side].to(self.cdt)).to(torch.float64)
            elif how == "none":
                assert sdx is not None
                y = y + (sdx @ tmm(r, x) + r @ tmm(sdx, x) + n * (r @ tmm(r, x))).to(torch.float64)
            elif how != "base":
                raise ValueError(f"unknown centring {how!r}; use one of {CENTERS}")
            out[side] = y
        if how == "mean":
            assert mu is not None
            return s.family_mean()[0], out, max(s.delta_sq - n * sq_norm(mu), 0.0)
        if how == "base":
            return self.reference, out, s.delta_sq
        if not s.w_norms:
            raise ValueError("centring 'none' needs the sketch built with w_norms=True")
        return None, out, s.sq_norm


class GramRitz:
    """The last sweep of the sketch: Rayleigh-Ritz matrices and the probes' images, per side.

    For each side with an orthonormal Q (dim x t) and probe block U (dim x p, orthogonal to Q)
    it accumulates ``H = Q^T G Q`` (t x t) from Z_i = Q^T D_i (left; D_i Q for the right side),
    and ``G U`` (dim x p), with G the uncentred Gram of D_i = W_i - reference; :meth:`centred`
    applies the centring. One GEMM with t + p columns and one with p columns per model and side,
    where ``G [Q, U]`` would take two with t + p: H is all Rayleigh-Ritz needs, and the probes'
    check needs G U only. Per-model work is in the compute dtype, sums in float64 (as
    :class:`GramSketch`).

    ``reference`` need not be the sums' reference: for centring "mean", ``mean_offset`` is the
    family mean minus ``reference`` (compute dtype; default: the sums' mean delta, for the sums'
    own reference). With ``keep``, each model's Z_i (compute dtype, n x t for the left side,
    m x t for the right), ||D_i||^2 and ||W_i||^2 are kept in :attr:`kept`: with the reference
    the readers' mean, they give every model's coefficients and error without another pass
    (:func:`uwsfmt.writer.holdings.coefficients_from_ritz`).
    """

    def __init__(self, m: int, n: int, qs: dict[str, torch.Tensor], us: dict[str, torch.Tensor], reference: torch.Tensor,
                 *, mean_offset: torch.Tensor | None = None, keep: bool = False):
        self.cdt = torch.float64 if reference.dtype == torch.float64 else torch.float32
        self._ref_c = reference.to(self.cdt).reshape(m, n)
        self._offset = mean_offset
        self.qs = {side: q.to(torch.float64) for side, q in qs.items()}
        self.us = {side: us[side].to(torch.float64) for side in qs}
        self._qu_c = {side: torch.cat([self.qs[side], self.us[side]], 1).to(self.cdt) for side in qs}
        self.h = {side: torch.zeros(q.shape[1], q.shape[1], dtype=torch.float64, device=q.device) for side, q in self.qs.items()}
        self.gu = {side: torch.zeros_like(u) for side, u in self.us.items()}
        #: per side, sum_i D_i^T [Q, U] (left, n x (t + p)) or sum_i D_i [Q, U] (right): n mu^T [Q, U], for the centring
        self.zsum = {side: torch.zeros(n if side == "left" else m, qu.shape[1], dtype=torch.float64, device=qu.device)
                     for side, qu in self._qu_c.items()}
        self.count = 0
        self.keep = keep
        #: per model, with ``keep``: ({side: Z_i}, ||D_i||^2, ||W_i||^2)
        self.kept: list[tuple[dict[str, torch.Tensor], float, float]] = []

    def add(self, w: torch.Tensor) -> None:
        w = w.to(device=self._ref_c.device).reshape(self._ref_c.shape)
        d = delta(w, self._ref_c)
        self.count += 1
        zs = {}
        for side, qu in self._qu_c.items():
            t = self.qs[side].shape[1]
            if side == "left":
                zv = tmm(d, qu)  # n x (t + p): Z^T and D^T U
                self.gu[side].add_(thin_mm(d, zv[:, t:]).to(torch.float64))
            else:
                zv = thin_mm(d, qu)  # m x (t + p)
                self.gu[side].add_(tmm(d, zv[:, t:]).to(torch.float64))
            zv64 = zv.to(torch.float64)
            self.zsum[side].add_(zv64)
            z = zv64[:, :t]
            self.h[side].addmm_(z.T, z)
            if self.keep:
                zs[side] = zv[:, :t].clone()
        if self.keep:
            self.kept.append((zs, sq_norm(d), sq_norm(w)))

    def centred(self, how: str, sums: GramSketch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{side: (H, G U)} of the Gram centred as ``how`` (``sums``: the sketch holding the sums)."""
        n = max(sums.count, 1)
        out = {}
        if how == "none":  # float64 sums and reference (given in the compute dtype)
            ds, ref = sums.delta_sum, sums.reference.to(torch.float64)
        for side in self.qs:
            q, u, h, gu = self.qs[side], self.us[side], self.h[side], self.gu[side]
            if how == "mean":
                # with S = sum_i D_i^T [Q, U] = n mu^T [Q, U] (summed as the models went):
                # n (Q^T mu)(Q^T mu)^T = S_Q^T S_Q / n, and n mu mu^T U = mu S_U, one thin GEMM with
                # the full-size mean offset (compute dtype)
                muc = sums.mean_delta() if self._offset is None else self._offset
                t = q.shape[1]
                sq_, su = self.zsum[side][:, :t], self.zsum[side][:, t:].to(self.cdt)
                h = h - (sq_.T @ sq_) / n
                gu = gu - (thin_mm(muc, su) if side == "left" else tmm(muc, su)).to(torch.float64)
            elif how == "none":
                if self._offset is not None:
                    raise ValueError("centring 'none' needs the sweep taken against the sums' reference")
                assert ds is not None  # the sums' sketch sums
                r, sd = (ref, ds) if side == "left" else (ref.T, ds.T)
                qr, qs_ = q.T @ r, q.T @ sd
                h = h + qs_ @ qr.T + qr @ qs_.T + n * (qr @ qr.T)
                gu = gu + sd @ (r.T @ u) + r @ (sd.T @ u) + n * (r @ (r.T @ u))
            elif how != "base":
                raise ValueError(f"unknown centring {how!r}; use one of {CENTERS}")
            out[side] = (h, gu)
        return out


def ritz_from_h(q: torch.Tensor, h: torch.Tensor, u: torch.Tensor, gu: torch.Tensor, total: float) -> SketchResult:
    """Rayleigh-Ritz on span(Q) from H = Q^T G Q, plus the residual estimate of probes U
    (orthogonal to Q) from G U: ||(I - QQ^T) G U_j|| / ||U_j||, a lower bound on, and for a
    flat tail close to, the largest eigenvalue span(Q) misses (as :func:`sketch_ritz`)."""
    vals, vecs = eig_desc(h)
    ru = gu - q @ (q.T @ gu)
    un = torch.linalg.vector_norm(u, dim=0)
    est = torch.linalg.vector_norm(ru, dim=0) / torch.where(un > 0, un, torch.ones_like(un))
    return SketchResult(vals, q @ vecs, float(total), float(est.max()) if est.numel() else 0.0, vecs)


@dataclass
class SketchResult:
    """Basis of one side from a sketch, with the a-posteriori check's numbers."""

    values: torch.Tensor  # Ritz values (exact energies of the found directions), descending
    vectors: torch.Tensor  # (dim, s) orthonormal, best first
    total: float  # trace of the centred Gram (exact)
    residual_top: float  # estimate of the largest eigenvalue the found directions miss (a lower bound)
    coords: torch.Tensor | None = None  # (t, s): the vectors in the sketch's basis Q (vectors = Q coords)

    def spectrum(self) -> torch.Tensor:
        """Ritz values followed by one entry holding all the energy outside the sketch, so that
        sums and explained-variance ratios over it are exact."""
        tail = max(self.total - float(self.values.sum()), 0.0)
        return torch.cat([self.values, self.values.new_tensor([tail])])

    def check(self, k: int, tolerance: float) -> dict:
        """Accept the top ``k`` directions when swapping any of them for a missed direction could
        lower the squared error by at most ``tolerance`` of it (judged with ``residual_top``)."""
        kept = self.values[:k]
        tail = max(self.total - float(kept.sum()), 0.0)
        gain = float(torch.clamp(self.residual_top - kept, min=0.0).sum())
        ok = gain <= tolerance * max(tail, 1e-300) or gain <= 1e-12 * self.total
        return {"ok": bool(ok), "residual_top": self.residual_top, "kept_min": float(kept[-1]) if k else None,
                "possible_gain": gain, "tail": tail}


def sketch_test_matrix(dim: int, width: int, seed: int, device: torch.device | str, salt: int = 0) -> torch.Tensor:
    """Gaussian dim x width test matrix, reproducible from ``seed`` (drawn on the CPU).

    Every tensor of one shape gets the same matrix, so the last few drawn are kept (drawing a
    4096 x 48 one takes ~1.2 ms: 0.6 s of a 128-module LoRA build). The matrix returned is
    shared: read it, never change it in place."""
    return _test_matrix(int(dim), int(width), int(seed) * 1_000_003 + salt).to(device)


@functools.lru_cache(maxsize=16)
def _test_matrix(dim: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(dim, width, generator=g, dtype=torch.float64)


def sketch_ritz(q: torch.Tensor, gq: torch.Tensor, probes: torch.Tensor, g_probes: torch.Tensor, total: float) -> SketchResult:
    """Rayleigh-Ritz of the centred Gram G on span(Q), from G Q, plus a residual estimate.

    ``probes`` are fresh Gaussian columns and ``g_probes`` = G @ probes. The parts of the probes
    outside span(Q), U, give ||(I - QQ^T) G U_j|| / ||U_j||: a lower bound on, and for a flat
    tail close to, the largest eigenvalue that span(Q) misses.
    """
    h = q.T @ gq
    vals, vecs = eig_desc(h)
    basis = q @ vecs
    qp = q.T @ probes
    u = probes - q @ qp
    gu = g_probes - gq @ qp
    ru = gu - q @ (q.T @ gu)
    un = torch.linalg.vector_norm(u, dim=0)
    est = torch.linalg.vector_norm(ru, dim=0) / torch.where(un > 0, un, torch.ones_like(un))
    return SketchResult(vals, basis, float(total), float(est.max()) if est.numel() else 0.0)
