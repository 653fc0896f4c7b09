"""Pure torch building blocks: matrix views, threads, TF32 off, thin GEMMs, norms, projection."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

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
def threads_for(numel: int) -> Iterator[None]:
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


def no_tf32() -> _NoTF32:
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


def orthonormal_columns(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the column space of ``y`` (float64 QR)."""
    q, _ = torch.linalg.qr(y, mode="reduced")
    return q
