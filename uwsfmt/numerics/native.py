"""A fused CPU kernel for rebuilding subspace tensors: ``out = mean + a @ b`` in one pass.

With BLAS the rebuild is two passes over memory (copy the mean into the output, then a GEMM of
inner dimension k that reads and writes it again); for a ViT-B model that is ~30 ms of a 2-core
CPU's memory bandwidth. ``native_expand.c`` computes each output tile in registers, adds the mean
and writes it once (streaming stores where the output is aligned), in float32 or rounded to
bfloat16 / float16 on the way out (a module in half precision: no float32 temporary and no cast
pass; the bits of torch's cast of the float32 result).

The C file is compiled on first use with the system C compiler (``$CC``, else ``cc``/``gcc``/
``clang``) into the user's cache (``$UWSFMT_CACHE_DIR``, else ``$XDG_CACHE_HOME/uwsfmt``, else
``~/.cache/uwsfmt``) and loaded with ctypes; it picks AVX-512 or AVX2 + FMA at run time. Where
that is impossible (no compiler, another CPU architecture, a failed self-test) :func:`expand`
returns False and callers use torch, so the kernel is an accelerator, never a requirement.
``UWSFMT_NATIVE=0`` turns it off; ``UWSFMT_NATIVE=require`` makes its absence an error (CI).
:func:`status` says which it is and why.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from uwsfmt.errors import ConfigError
from uwsfmt.numerics import quantize

SOURCE = Path(__file__).with_name("native_expand.c")
ISA_NAMES = {2: "avx512", 1: "avx2"}
#: output dtypes the kernel writes (factors are always float32), and their codes in ``uws_job``
OUT_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
#: dtypes of the mean the kernel reads (float16: converted to float32 exactly as it is read)
MEAN_TYPES = {torch.float32: 0, torch.float16: 2}
#: rows of output per thread below which the work is not split between threads
ROWS_PER_THREAD = 64


class _Job(ctypes.Structure):
    _fields_ = [(f, ctypes.c_int64) for f in ("mean", "a", "b", "out", "m", "n", "k", "stream", "otype", "mtype",
                                               "res", "rscale", "rbits", "raxis")]


class _Kernel:
    def __init__(self, lib: ctypes.CDLL):
        self.isa = int(lib.uws_isa())
        self.fn = lib.uws_expand
        self.fn.argtypes = [ctypes.POINTER(_Job), ctypes.c_int64, ctypes.c_int, ctypes.c_int]
        self.fn.restype = None
        self.openmp = bool(lib.uws_openmp())
        # the C struct this library was compiled with: a source edited (or a package upgraded)
        # under a running process must not meet this process's older ctypes layout
        self.job_size = int(lib.uws_job_size()) if hasattr(lib, "uws_job_size") else -1


_lock = threading.Lock()
_state: dict = {}  # "kernel": _Kernel | None, "reason": str
_suspended = [False]
_forked = [False]


def _after_fork() -> None:
    _forked[0] = True  # GNU OpenMP cannot run in a child forked after the parent used it (torch hangs too)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def _mode() -> str:
    v = os.environ.get("UWSFMT_NATIVE", "auto").strip().lower()
    if v in ("0", "off", "false", "no"):
        return "off"
    if v == "require":
        return "require"
    return "auto"


def _cache_dir() -> Path:
    if os.environ.get("UWSFMT_CACHE_DIR"):
        return Path(os.environ["UWSFMT_CACHE_DIR"]) / "native"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "uwsfmt" / "native"


def _private(d: Path) -> bool:
    """Only load code from a folder this user owns and others cannot write to."""
    try:
        st = d.stat()
    except OSError:
        return False
    return (not hasattr(os, "getuid") or st.st_uid == os.getuid()) and not st.st_mode & 0o022


def _compiler() -> list[str] | None:
    cc = os.environ.get("CC")
    if cc:
        return shlex.split(cc)
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return [found]
    return None


def _build(cc: list[str], out: Path) -> None:
    """Compile SOURCE into ``out`` (atomically: a reader never loads half a file)."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    cmd = [*cc, "-O3", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off", "-o", str(tmp), str(SOURCE), "-lm"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise OSError(f"{' '.join(cmd)} failed: {(r.stderr or r.stdout).strip()[-500:]}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _self_test(k: _Kernel) -> str | None:
    """Compare the kernel with torch on shapes that take every path (tiles, narrow, masked tails),
    and its half-precision outputs with torch's cast of its float32 one."""
    g = torch.Generator().manual_seed(0)
    # rounding ties and range edges of bfloat16 / float16 (with zero products: the output is the mean)
    edges = torch.tensor([1.00390625, 1.01171875, -2.00390625, 1.00048828125, 65519.99, 65520.0, 2.9802322e-8, 1e-40])
    for m, n, r in ((7, 83, 3), (9, 200, 17), (4, 16, 1), (3, 40, 0)):
        a, b, mean = (torch.randn(s, generator=g) for s in ((m, r), (r, n), (m, n)))
        if r == 0:
            mean = edges.repeat(m * n // len(edges) + 1)[: m * n].reshape(m, n)
        out = torch.empty(m, n)
        _run(k, [(out, mean, a, b)], threads=2)
        want = mean.double() + a.double() @ b.double()
        if not torch.allclose(out.double(), want, rtol=1e-5, atol=1e-5):
            return f"self-test failed on {m}x{n} (rank {r}): the compiled kernel disagrees with torch"
        for dt in (torch.bfloat16, torch.float16):
            half = torch.empty(m, n, dtype=dt)
            _run(k, [(half, mean, a, b)], threads=2)
            if not torch.equal(half.view(torch.int16), out.to(dt).view(torch.int16)):
                return f"self-test failed on {m}x{n} (rank {r}): the kernel's {dt} output is not torch's rounding"
        mean16 = mean.to(torch.float16)  # a float16 mean: the same as its float32 conversion
        _run(k, [(out, mean16, a, b)], threads=2)
        ref = torch.empty(m, n)
        _run(k, [(ref, mean16.float(), a, b)], threads=2)
        if not torch.equal(out, ref):
            return f"self-test failed on {m}x{n} (rank {r}): a float16 mean is not read as its float32 value"
    for bits in (1, 2, 4, 8):  # a residual: what adding the dequantized one afterwards gives, bit for bit
        for m, n, r, axis in ((9, 37, 3, 0), (37, 6, 2, 1), (5, 3, 0, 0)):
            a, b, mean = (torch.randn(s, generator=g) for s in ((m, r), (r, n), (m, n)))
            codes, scales = quantize.quantize_view(torch.randn(m, n, generator=g), bits, axis)
            out, ref = torch.empty(m, n), torch.empty(m, n)
            _run(k, [(out, mean, a, b, (codes, scales, bits, axis))], threads=2)
            _run(k, [(ref, mean, a, b)], threads=2)
            ref.add_(quantize.dequantize_view(codes, scales, (m, n), bits, axis))
            if not torch.equal(out, ref):
                return f"self-test failed on {m}x{n} (rank {r}): the kernel's {bits}-bit residual (axis {axis}) is not the dequantized one"
    return None


def _load() -> tuple[_Kernel | None, str]:
    if _mode() == "off":
        return None, "turned off by UWSFMT_NATIVE=0"
    if platform.machine().lower() not in ("x86_64", "amd64") or sys.platform == "win32":
        return None, f"no native kernel for {platform.machine()} on {sys.platform}"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found (set CC, or install gcc/clang)"
    key = hashlib.sha256(SOURCE.read_bytes() + repr(cc).encode() + platform.machine().encode()).hexdigest()[:16]
    folder = _cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not _private(folder):
            raise OSError(f"{folder} is not private to this user")
    except OSError:
        folder = Path(tempfile.mkdtemp(prefix="uwsfmt-native-"))  # this process only
    path = folder / f"expand-{key}.so"
    try:
        if not path.exists():
            _build(cc, path)
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:  # a damaged cache entry: build it again
            _build(cc, path)
            lib = ctypes.CDLL(str(path))
        kernel = _Kernel(lib)
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"could not build the native kernel: {e}"
    if kernel.isa not in ISA_NAMES:
        return None, "this CPU has neither AVX-512 nor AVX2 + FMA"
    if not kernel.openmp:
        return None, "the kernel was built without OpenMP (it would run on one core)"
    if kernel.job_size != ctypes.sizeof(_Job):
        return None, (f"the kernel's job layout ({kernel.job_size} bytes) is not this uwsfmt's ({ctypes.sizeof(_Job)}): "
                      "its source changed after this process imported uwsfmt; restart the process")
    bad = _self_test(kernel)
    if bad:
        return None, bad
    return kernel, f"{ISA_NAMES[kernel.isa]} kernel {path}"


def kernel() -> _Kernel | None:
    """The loaded kernel, or None (built and self-tested on the first call)."""
    if "kernel" not in _state:
        with _lock:
            if "kernel" not in _state:
                _state["kernel"], _state["reason"] = _load()
    k = _state["kernel"]
    if k is None and _mode() == "require":
        raise ConfigError(f"UWSFMT_NATIVE=require but the native kernel is unavailable: {_state['reason']}; "
                          "install a C compiler or unset UWSFMT_NATIVE")
    return k


def status() -> dict:
    """{"available": bool, "isa": "avx512" | "avx2" | None, "detail": why or where}."""
    try:
        k = kernel()
    except ConfigError:
        k = None
    return {"available": k is not None, "isa": ISA_NAMES.get(k.isa) if k else None, "detail": _state["reason"]}


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """Within this block (process-wide) :func:`expand` leaves everything to torch: to compare the
    two paths, as ``bench/`` does."""
    before = _suspended[0]
    _suspended[0] = True
    try:
        yield
    finally:
        _suspended[0] = before


#: a residual the kernel adds: (packed codes uint8, float32 scales, bits 1/2/4/8, scale axis 0/1)
Residual = tuple[torch.Tensor, torch.Tensor, int, int]


def _fits_residual(out: torch.Tensor, res: Residual) -> bool:
    codes, scales, bits, axis = res
    m, n = out.shape
    if out.dtype != torch.float32 or bits not in (1, 2, 4, 8) or axis not in (0, 1):
        return False
    if codes.dtype != torch.uint8 or scales.dtype != torch.float32 or codes.device.type != "cpu" or scales.device.type != "cpu":
        return False
    if not (codes.is_contiguous() and scales.is_contiguous()):
        return False
    return codes.numel() >= (m * n * bits + 7) // 8 and scales.numel() == (n if axis else m)


def _fits(out: torch.Tensor, mean: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, res: Residual | None = None) -> bool:
    if res is not None and (out.dim() != 2 or not _fits_residual(out, res)):
        return False
    ts = (out, a, b) if mean is None else (out, mean, a, b)
    if any(t.device.type != "cpu" or not t.is_contiguous() for t in ts) or out.dtype not in OUT_TYPES:
        return False
    if a.dtype != torch.float32 or b.dtype != torch.float32 or (mean is not None and mean.dtype not in MEAN_TYPES):
        return False
    if out.dim() != 2 or a.dim() != 2 or b.dim() != 2:
        return False
    m, n = out.shape
    if a.shape[0] != m or b.shape[1] != n or a.shape[1] != b.shape[0] or (mean is not None and mean.shape != out.shape):
        return False
    o = out.untyped_storage().data_ptr()
    return all(t.untyped_storage().data_ptr() != o for t in ts[1:])  # no output that is also an input


def _jobs(items: list[tuple], stream: bool):
    """The C array of jobs for ``(out, mean, a, b[, residual])`` items (the tensors must outlive the call)."""
    jobs = (_Job * len(items))()
    for job, (out, mean, a, b, *rest) in zip(jobs, items):
        res = rest[0] if rest else None
        if res is not None:
            job.res, job.rscale, job.rbits, job.raxis = res[0].data_ptr(), res[1].data_ptr(), res[2], res[3]
        job.mean = 0 if mean is None else mean.data_ptr()
        job.a, job.b, job.out = a.data_ptr(), b.data_ptr(), out.data_ptr()
        job.m, job.n, job.k, job.stream = out.shape[0], out.shape[1], a.shape[1], int(stream)
        job.otype = OUT_TYPES[out.dtype]
        job.mtype = 0 if mean is None else MEAN_TYPES[mean.dtype]
    return jobs


def _run(k: _Kernel, items: list[tuple], *, threads: int, stream: bool = True) -> None:
    rows = sum(out.shape[0] for out, *_ in items)
    # OpenMP threads: torch's own (its libgomp is the one the loader resolves), so the kernel does
    # not compete with torch's spinning workers as a pool of its own threads would; ctypes lets
    # other Python threads run meanwhile. In a forked child (a DataLoader worker): one thread.
    k.fn(_jobs(items, stream), len(items), 1 if _forked[0] else max(1, min(threads, rows // ROWS_PER_THREAD)), k.isa)


def expand(items: list[tuple], *, stream: bool = True) -> bool:
    """``out = mean + a @ b`` (``mean`` may be None) for every ``(out, mean, a, b)`` in ``items``,
    split over torch's thread count. ``a``, ``b`` float32, ``mean`` float32 or float16 (read as its
    exact float32 value), ``out`` float32, bfloat16 or float16 (the float32 result rounded as
    ``Tensor.to`` does); all contiguous, on the CPU, ``out`` none of the inputs.
    An item ``(out, mean, a, b, residual)`` also adds a quantized residual (:data:`Residual`, spec
    section 6.4; None: none) to its float32 ``out``: ``out + fl(scale * q)``, bit for bit what
    :func:`uwsfmt.numerics.quantize.dequantize_view` added afterwards gives, in the same pass.
    Returns False, having written nothing, when the kernel is unavailable or an item does not fit;
    the caller then computes them itself."""
    if _suspended[0] or not items or not all(_fits(*it) for it in items):
        return False
    k = kernel()
    if k is None:
        return False
    _run(k, items, threads=torch.get_num_threads(), stream=stream)
    return True
