"""Pure torch math of the UWS encodings. Device-agnostic; no I/O.

Conventions: a tensor's matrix view is D (m x n). The left basis L (m x kl) comes from the
eigenvectors of the left Gram sum_i D_i D_i^T, the right basis R (n x kr) from sum_i D_i^T D_i.
Reconstruction: W = M + L @ C @ R^T (+ residual), with an absent side meaning the identity.
Statistics are always accumulated in float64 (float32 Grams lose the small eigenvalues).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass

import torch

CENTERS = ("mean", "base", "none")
MODES = ("left", "right", "both", "flat")


def matrix_view(shape: tuple[int, ...]) -> tuple[int, int]:
    """(m, n) matrix view of a tensor: first axis x product of the rest; 0/1-D -> (1, numel),
    one row (so a quantized residual of a vector has one scale).

    >>> matrix_view((16, 8, 3, 3))
    (16, 72)
    """
    if len(shape) <= 1:
        return (1, shape[0] if shape else 1)
    n = 1
    for s in shape[1:]:
        n *= s
    return (shape[0], n)


#: tensors smaller than this (elements) are processed with one torch thread: the parallel regions
#: of tiny GEMMs / eigh cost more than they save, and up to ~100x more when the other cores are
#: busy (measured on a shared 2-core machine: a 64x64 float64 GEMM took 17 us on 1 thread, 4.7 ms on 2)
PARALLEL_MIN_ELEMENTS = 1 << 18


@contextlib.contextmanager
def threads_for(numel: int):
    """Run the block single-threaded when ``numel`` is small (see :data:`PARALLEL_MIN_ELEMENTS`)."""
    n = torch.get_num_threads()
    if numel >= PARALLEL_MIN_ELEMENTS or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def no_tf32():
    """Context that keeps TF32 out of float32 matmuls (restored on exit)."""
    return _NoTF32()


class _NoTF32:
    def __enter__(self):
        self._mm = torch.backends.cuda.matmul.allow_tf32
        self._cudnn = torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self._mm
        torch.backends.cudnn.allow_tf32 = self._cudnn


@dataclass
class GramStats:
    """Map-reduce statistics of one tensor across models: sums and Gram matrices in float64.

    Deltas are taken against a fixed reference (the base, or the first model seen) so that the
    centred Gram is computed without cancellation between large, nearly equal weights.
    ``add`` is the map step, ``merge`` the reduce step (both need the same reference).

    >>> s = GramStats.empty(3, 2, left=True, right=False, reference=torch.zeros(3, 2))
    >>> _ = s.add(torch.ones(3, 2)); s.count
    1
    """

    count: int
    reference: torch.Tensor  # (m, n) float64
    delta_sum: torch.Tensor  # (m, n) float64: sum of (W_i - reference)
    left: torch.Tensor | None  # (m, m) float64: sum of D D^T with D = W_i - reference, upper block triangle (gram_full)
    right: torch.Tensor | None  # (n, n), likewise
    sq_norm: float  # sum of ||W_i||^2

    @classmethod
    def empty(cls, m: int, n: int, *, left: bool, right: bool, reference: torch.Tensor) -> GramStats:
        ref = reference.to(torch.float64).reshape(m, n)
        dev = ref.device
        return cls(
            count=0,
            reference=ref,
            delta_sum=torch.zeros(m, n, dtype=torch.float64, device=dev),
            left=torch.zeros(m, m, dtype=torch.float64, device=dev) if left else None,
            right=torch.zeros(n, n, dtype=torch.float64, device=dev) if right else None,
            sq_norm=0.0,
        )

    def add(self, w: torch.Tensor) -> float:
        """Add one model's tensor; returns its squared norm (NaN/Inf exactly when W has such values)."""
        w = w.to(device=self.reference.device).reshape(self.reference.shape)
        sq = sq_norm(w)
        # one float64 copy, centred in place: each full-size temporary is a pass over memory
        d = w.to(torch.float64, copy=True).sub_(self.reference)
        self.count += 1
        self.delta_sum += d
        if self.left is not None:
            gram_upper_add_(self.left, d)
        if self.right is not None:
            gram_upper_add_(self.right, d.T)
        self.sq_norm += sq
        return sq

    def merge(self, other: GramStats) -> None:
        if not torch.equal(self.reference, other.reference):
            raise ValueError("GramStats.merge needs statistics taken against the same reference")
        self.count += other.count
        self.delta_sum += other.delta_sum
        if self.left is not None:
            self.left += other.left
        if self.right is not None:
            self.right += other.right
        self.sq_norm += other.sq_norm

    def center(self, how: str) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(M, left Gram, right Gram) of the deviations from the centre ``how``.

        ``mean``: M = mean of the models; ``base``: M = reference; ``none``: M = 0 (None).
        """
        n = max(self.count, 1)
        mu = self.delta_sum / n  # mean deviation from the reference
        gl = None if self.left is None else gram_full(self.left)
        gr = None if self.right is None else gram_full(self.right)
        if how == "mean":
            mean = self.reference + mu
            if gl is not None:
                gl = gl - n * (mu @ mu.T)
            if gr is not None:
                gr = gr - n * (mu.T @ mu)
            return mean, gl, gr
        if how == "base":
            return self.reference, gl, gr
        if how == "none":
            # Gram of W itself: expand (D + ref)(D + ref)^T around the reference.
            ref, s = self.reference, self.delta_sum
            if gl is not None:
                gl = gl + s @ ref.T + ref @ s.T + n * (ref @ ref.T)
            if gr is not None:
                gr = gr + s.T @ ref + ref.T @ s + n * (ref.T @ ref)
            return None, gl, gr
        raise ValueError(f"unknown centring {how!r}; use one of {CENTERS}")


#: row blocks of a Gram update: only the upper block triangle of sum_i D_i D_i^T is accumulated
#: (10 of 16 blocks), the rest mirrored once at the end; measured on 2 cores, float64: 23 ms
#: instead of 33 ms for a 768 x 3072 D (torch has no symmetric rank-k update)
GRAM_BLOCKS = 4


def _gram_edges(m: int) -> list[int]:
    nb = GRAM_BLOCKS if m >= 256 else 1
    return [round(i * m / nb) for i in range(nb + 1)]


def gram_upper_add_(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """g += a a^T on the upper block triangle of ``g`` (row blocks of :func:`_gram_edges`);
    :func:`gram_full` gives the whole symmetric matrix. The same float64 dot products as a full
    GEMM, about 2/3 of the work."""
    e = _gram_edges(a.shape[0])
    for i in range(len(e) - 1):
        ai = a[e[i]: e[i + 1]]
        for j in range(i, len(e) - 1):
            g[e[i]: e[i + 1], e[j]: e[j + 1]].addmm_(ai, a[e[j]: e[j + 1]].T)
    return g


def gram_full(g: torch.Tensor) -> torch.Tensor:
    """The symmetric Gram from one accumulated by :func:`gram_upper_add_` (a new tensor)."""
    out = g.clone()
    e = _gram_edges(g.shape[0])
    for i in range(len(e) - 1):
        for j in range(i + 1, len(e) - 1):
            out[e[j]: e[j + 1], e[i]: e[i + 1]] = g[e[i]: e[i + 1], e[j]: e[j + 1]].T
    return out


def eig_desc(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, clamped at 0) and eigenvectors of a symmetric PSD matrix."""
    g = (gram + gram.T) * 0.5
    vals, vecs = torch.linalg.eigh(g)
    vals = torch.flip(vals, (0,)).clamp_min(0.0)
    vecs = torch.flip(vecs, (1,))
    return vals, vecs


def numerical_rank(eigvals: torch.Tensor, size: int) -> int:
    """Number of eigenvalues above round-off (relative to the largest, float64)."""
    if eigvals.numel() == 0 or float(eigvals[0]) <= 0.0:
        return 0
    tol = float(eigvals[0]) * max(size, 1) * 1e-13
    return int((eigvals > tol).sum())


def explained(eigvals: torch.Tensor) -> torch.Tensor:
    """Cumulative explained-variance ratio; explained[k-1] is what the top k directions keep."""
    total = float(eigvals.sum())
    if total <= 0.0:
        return torch.ones_like(eigvals)
    return torch.cumsum(eigvals, 0) / total


def choose_rank(
    eigvals: torch.Tensor,
    *,
    rank: int | None = None,
    tau: float | None = None,
    max_rank: int | None = None,
    limit: int | None = None,
) -> int:
    """Kept rank: fixed ``rank`` or the smallest k with explained variance >= ``tau``.

    Never more than the numerical rank, ``max_rank`` or ``limit`` (a structural cap).

    >>> choose_rank(torch.tensor([4.0, 1.0, 0.0]), tau=0.75)
    1
    """
    possible = numerical_rank(eigvals, eigvals.numel())
    caps = [possible]
    if max_rank is not None:
        caps.append(max_rank)
    if limit is not None:
        caps.append(limit)
    cap = min(caps)
    if rank is not None:
        return max(0, min(rank, cap))
    if tau is None:
        return cap
    ev = explained(eigvals)
    hits = torch.nonzero(ev >= tau - 1e-12)
    k = int(hits[0]) + 1 if hits.numel() else eigvals.numel()
    return min(k, cap)


def project(d: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None) -> torch.Tensor:
    """Coefficients C = L^T D R (absent side = identity); also batched (stacked along a leading dimension)."""
    c = d
    if left is not None:
        c = tmm(c, left).mT if c.dim() == 2 else left.mT @ c
    if right is not None:
        c = thin_mm(c, right) if c.dim() == 2 else c @ right
    return c


def expand(c: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None) -> torch.Tensor:
    """L @ C @ R^T (absent side = identity)."""
    out = c
    if left is not None:
        out = left @ out
    if right is not None:
        out = out @ right.T
    return out


def relative_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """||W - W_hat||_F / ||W||_F in float64 (0 when both are 0)."""
    w = w.to(torch.float64)
    diff = float(torch.linalg.vector_norm(w - w_hat.to(torch.float64)))
    ref = float(torch.linalg.vector_norm(w))
    if ref == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / ref


# ---------------------------------------------------------------- residual quantization

RESIDUAL_BITS = (1, 2, 4, 8, 16)


def qmax(bits: int) -> int:
    """Largest code magnitude of a symmetric ``bits``-bit quantizer (2 -> 1, 4 -> 7, 8 -> 127)."""
    return (1 << (bits - 1)) - 1


#: clip factors tried per row (scale = c * max|row| / qmax); the decoder only sees the scale
CLIPS = {2: (1.0, 0.7, 0.5, 0.38), 4: (1.0, 0.85, 0.7), 8: (1.0,)}


def row_codes(r: torch.Tensor, bits: int, *, search: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed integer codes q (float32, m x n) and float32 row scales s of :func:`quantize_rows`;
    the dequantized matrix is ``q * s[:, None]``. 1 bit: q = +-1 (the sign bit, so -0.0 gives -1),
    s = mean|row|."""
    r = r.to(torch.float32)
    if bits == 1:  # s = mean|row| minimises the squared error of sign codes (BitDelta, per row)
        # copysign, not where(r >= 0, 1, -1): the same codes but for -0.0, 12x faster on the CPU
        # (torch.where over a full matrix: 4.5 ms against 0.38 ms for 768 x 3072)
        return torch.copysign(torch.ones_like(r), r), r.abs().mean(dim=1)
    q = qmax(bits)
    amax = r.abs().amax(dim=1)
    scales = amax / q
    if search and len(CLIPS[bits]) > 1:
        best = None
        buf = torch.empty_like(r)  # one scratch matrix for every clip (a 4096 x 4096 residual: 2x faster than fresh ones)
        for c in CLIPS[bits]:
            s = amax * (c / q)
            safe = torch.where(s > 0, s, torch.ones_like(s))[:, None]
            torch.div(r, safe, out=buf).round_().clamp_(-q, q).mul_(safe).sub_(r)
            err = torch.linalg.vector_norm(buf, dim=1)  # per-row error norm: ranks the clips as its square does
            if best is None:
                best, scales = err, s
            else:
                better = err < best
                best = torch.where(better, err, best)
                scales = torch.where(better, s, scales)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    return torch.round(r / safe[:, None]).clamp_(-q, q), scales


def quantize_rows(r: torch.Tensor, bits: int, *, search: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization of a matrix: (packed uint8 codes, float32 row scales).

    Row scale s = c * max|row| / qmax; q = round(x / s) in [-qmax, qmax]; code = q + 2^(bits-1),
    packed little-endian within each byte, elements in row-major order. ``search`` picks, per
    row, the clip factor c in :data:`CLIPS` with the smallest squared error (clipping a few
    outliers buys a finer step for all other values; at 2 bits it about halves the error of
    c = 1); ``search=False`` is plain absmax (c = 1). Decoding is the same either way. 1 bit:
    the sign, code 1 -> +s, 0 -> -s, with s = mean|row|.

    >>> codes, scales = quantize_rows(torch.tensor([[127.0, -64.0]]), 8)
    >>> dequantize_rows(codes, scales, (1, 2), 8)
    tensor([[127., -64.]])
    """
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"quantize_rows supports 1, 2, 4 or 8 bits, not {bits}")
    q, scales = row_codes(r, bits, search=search)
    codes = (q > 0) if bits == 1 else q.to(torch.int16) + (1 << (bits - 1))
    return pack_bits(codes.reshape(-1).to(torch.uint8), bits), scales


def fake_quantize_rows(r: torch.Tensor, bits: int) -> torch.Tensor:
    """``dequantize_rows(*quantize_rows(r, bits), r.shape, bits)`` without packing (bit-identical)."""
    q, scales = row_codes(r, bits)
    return q.mul_(scales[:, None])


def dequantize_rows(codes: torch.Tensor, scales: torch.Tensor, shape: tuple[int, int], bits: int) -> torch.Tensor:
    """Inverse of :func:`quantize_rows` (float32 result)."""
    m, n = shape
    q = unpack_bits(codes, bits, m * n).to(torch.float32)
    q = 2.0 * q - 1.0 if bits == 1 else q - (1 << (bits - 1))
    return q.reshape(m, n) * scales.to(torch.float32)[:, None]


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 values < 2^bits, ``8 // bits`` per byte, first element in the low bits."""
    if bits == 8:
        return values.contiguous()
    per = 8 // bits
    pad = (-values.numel()) % per
    if pad:
        values = torch.cat([values, values.new_zeros(pad)])
    v = values.reshape(-1, per).to(torch.int32)
    shifts = torch.arange(per, device=v.device, dtype=torch.int32) * bits
    return (v << shifts).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` values."""
    if bits == 8:
        return packed[:count]
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    v = (packed.to(torch.int32)[:, None] >> shifts) & ((1 << bits) - 1)
    return v.reshape(-1)[:count].to(torch.uint8)


def residual_nbytes(m: int, n: int, bits: int) -> int:
    """Bytes one model's residual of an (m, n) view takes (codes + scales)."""
    if bits == 16:
        return m * n * 2
    return (m * n * bits + 7) // 8 + 4 * m


# ---------------------------------------------------------------- flat (whole-tensor PCA)


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


# ---------------------------------------------------------------- randomised range finder (sketch)

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
        return self.delta_sum.to(self.cdt)

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
                y = y - (a @ self.v[side].to(self.cdt)).to(torch.float64)
            elif how == "none":
                y = y + (sdx @ tmm(r, x) + r @ tmm(sdx, x) + n * (r @ tmm(r, x))).to(torch.float64)
            elif how != "base":
                raise ValueError(f"unknown centring {how!r}; use one of {CENTERS}")
            out[side] = y
        if how == "mean":
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
    (:func:`uwsfmt.build._coefficients_from_ritz`).
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


#: full-size operands from this many elements go to oneDNN (see :func:`thin_mm`); below it the
#: primitive's set-up costs more than it saves
ONEDNN_MIN_ELEMENTS = 1 << 15

_onednn: bool | None = None  # decided on first use by _onednn_usable()


def _onednn_usable() -> bool:
    """Whether float32 CPU products may go through oneDNN: torch was built with it, its linear
    primitive gives the product of a small test case to float32 accuracy, and ``UWSFMT_ONEDNN``
    is not ``0``. Decided once per process, so that one machine always computes one way."""
    global _onednn
    if _onednn is None:
        _onednn = False
        if os.environ.get("UWSFMT_ONEDNN", "1") != "0" and torch.backends.mkldnn.is_available():
            try:
                g = torch.Generator().manual_seed(0)
                a, b = torch.randn(96, 80, generator=g), torch.randn(80, 7, generator=g)
                got = _onednn_linear(a, b.T)
                _onednn = bool(torch.allclose(got.double(), a.double() @ b.double(), rtol=1e-5, atol=1e-4))
            except (AttributeError, RuntimeError, NotImplementedError):
                pass
    return _onednn


def _onednn_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w^T by oneDNN's linear primitive (``w`` may be a transposed view: no copy is made)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def _by_onednn(full: torch.Tensor, thin: torch.Tensor) -> bool:
    return (full.device.type == "cpu" and full.dtype == thin.dtype == torch.float32 and full.dim() == thin.dim() == 2
            and full.is_contiguous() and full.numel() >= ONEDNN_MIN_ELEMENTS
            and not (torch.is_grad_enabled() and (full.requires_grad or thin.requires_grad)) and _onednn_usable())


def thin_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for a full-size ``a`` and a thin ``b`` (a sweep's D X).

    float32 on the CPU goes through oneDNN's linear primitive (``torch.ops.mkldnn``, the one
    torch's own compiler uses): torch's float32 GEMMs are MKL's, which on AMD CPUs runs its AVX2
    kernels, while oneDNN picks its kernels by the CPU's instruction sets (AVX-512 there). On the
    2-core AMD EPYC of the benchmarks, a 768 x 3072 ``a`` times 32 columns: 0.33 ms instead of
    0.76 ms. The same float32 products, summed in another order. Anything else: ``a @ b``.

    A ``b`` whose rows or columns are not packed (k columns sliced from a wider matrix, rows
    k apart) is copied first: oneDNN takes a strided path for it, 1.3 s instead of 0.9 ms for a
    4096 x 2048 ``a`` and 16 columns sliced from 64 (measured, same machine).
    """
    if _by_onednn(a, b):
        if not (b.is_contiguous() or b.T.is_contiguous()):
            b = b.contiguous()
        return _onednn_linear(a, b.T)
    return a @ b


def tmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a^T @ b for a full-size ``a`` and a thin ``b``, computed as (b^T a)^T: the same numbers,
    but BLAS then streams ``a`` row by row (measured with MKL-backed torch on 2 cores:
    3072 x 768 float32 ``a``, 8-column ``b``: 0.8 ms instead of 2.4 ms); float32 on the CPU
    through oneDNN, as :func:`thin_mm` (0.39 ms instead of 0.96 ms with 32 columns)."""
    if _by_onednn(a, b):
        return _onednn_linear(b.T.contiguous(), a.T).T
    return (b.T @ a).T


def delta(w: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """W - ref in ref's dtype, as a new tensor, in one pass (no separate cast copy when W has it)."""
    return torch.sub(w, ref) if w.dtype == ref.dtype else w.to(ref.dtype).sub_(ref)


#: elements per float32 partial sum of :func:`sq_norm`: ~1e-9 relative over millions of values
#: (blocks of 16k lost 2-9e-8, biased low, measured on ViT deltas) at the same speed
_SQ_BLOCK = 1 << 10


def sq_norm(x: torch.Tensor) -> float:
    """||x||^2 as a Python float, accurate to ~1e-9 relative, without a float64 copy of ``x``.

    float64 tensors are summed in float64. Others are summed in float32 blocks of
    :data:`_SQ_BLOCK` elements whose results are added in float64: a single float32 sum over
    millions of elements loses ~1e-4 (measured), and ``vector_norm(x, dtype=float64)`` costs a
    float64 pass (~8x slower). NaN/Inf in ``x`` give NaN/Inf; so does a float32 overflow of a
    block (values above ~1e19), which callers treat as "check the values" (and then fall back to
    float64).
    """
    if x.dtype == torch.float64:
        return float(torch.linalg.vector_norm(x)) ** 2
    f = x.reshape(-1)
    if not f.is_floating_point() or f.dtype != torch.float32:
        f = f.to(torch.float32)
    k = f.numel() // _SQ_BLOCK * _SQ_BLOCK
    if k == 0:  # one block: no float64 accumulator (small tensors call this thousands of times)
        out = float(torch.linalg.vector_norm(f)) ** 2
    else:
        total = torch.linalg.vector_norm(f[:k].view(-1, _SQ_BLOCK), dim=1).to(torch.float64).square().sum()
        if k < f.numel():
            total += float(torch.linalg.vector_norm(f[k:])) ** 2
        out = float(total)
    if not math.isfinite(out) and bool(torch.isfinite(x).all()):  # float32 overflow of finite values
        return float(torch.linalg.vector_norm(x, dtype=torch.float64)) ** 2
    return out


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


def sketch_test_matrix(dim: int, width: int, seed: int, device, salt: int = 0) -> torch.Tensor:
    """Gaussian dim x width test matrix, reproducible from ``seed`` (drawn on the CPU).

    Every tensor of one shape gets the same matrix, so the last few drawn are kept (drawing a
    4096 x 48 one takes ~1.2 ms: 0.6 s of a 128-module LoRA build). The matrix returned is
    shared: read it, never change it in place."""
    return _test_matrix(int(dim), int(width), int(seed) * 1_000_003 + salt).to(device)


@functools.lru_cache(maxsize=16)
def _test_matrix(dim: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(dim, width, generator=g, dtype=torch.float64)


def orthonormal_columns(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the column space of ``y`` (float64 QR)."""
    q, _ = torch.linalg.qr(y, mode="reduced")
    return q


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
