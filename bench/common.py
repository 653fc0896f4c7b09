"""What every benchmark needs: the machine, timers, a module to load into, byte counting, peak RSS.

Benchmarks print figures and ratios against baselines measured in the same run; nothing here
asserts a speed. Timings on a shared machine are noisy: each figure is a median of repeats.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------- the machine


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _kernel() -> str:
    from uwsfmt.numerics import native

    st = native.status()
    return st["isa"] if st["available"] else f"none ({st['detail']})"


def machine(device: str) -> dict:
    """Where the figures come from: CPU / GPU names, cores, memory, library versions."""
    import safetensors
    import zarr

    import uwsfmt

    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    out = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": mem,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "zarr": zarr.__version__,
        "safetensors": safetensors.__version__,
        "uwsfmt": uwsfmt.__version__,
        "native_kernel": _kernel(),
        "device": device,
    }
    if device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(torch.device(device))
    try:
        out["load_average"] = os.getloadavg()
    except OSError:
        pass
    return out


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bandwidth(device: str, nbytes: int = 256 << 20, repeat: int = 7) -> float:
    """Memory bandwidth in bytes/s, counting what a copy reads plus what it writes (median)."""
    a = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    b = torch.zeros_like(a)
    times = []
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        b.copy_(a)
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * nbytes / statistics.median(times)


# ---------------------------------------------------------------------------- timing


def timed(fn: Callable[[], object], device: str | torch.device = "cpu") -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def summary(times: Iterable[float]) -> dict:
    """Median, p95, min, mean and count of a list of seconds."""
    ts = sorted(times)
    if not ts:
        return {"n": 0}
    p95 = ts[min(len(ts) - 1, max(0, round(0.95 * (len(ts) - 1))))]
    return {"median": statistics.median(ts), "p95": p95, "min": ts[0], "mean": statistics.fmean(ts), "n": len(ts)}


# ---------------------------------------------------------------------------- modules


def module_for(state_dict: dict[str, torch.Tensor], device: str | torch.device) -> nn.Module:
    """An ``nn.Module`` whose state dict has exactly these names, shapes and dtypes (values
    uninitialised, storage allocated and touched on ``device``), like a model built before
    loading its weights."""
    root = nn.Module()
    for name, t in state_dict.items():
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            child = mod._modules.get(part)
            if child is None:
                child = nn.Module()
                mod.add_module(part, child)
            mod = child
        value = torch.zeros(t.shape, dtype=t.dtype, device=device)
        if t.is_floating_point():
            mod.register_parameter(leaf, nn.Parameter(value, requires_grad=False))
        else:
            mod.register_buffer(leaf, value)
    return root


def nbytes(sd: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


# ---------------------------------------------------------------------------- storage


def dir_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def drop_cache(paths: Iterable[str]) -> None:
    """Ask the kernel to drop these files (or folders) from the page cache (no root needed;
    only clean, unmapped pages go)."""
    for p in paths:
        files = [p] if os.path.isfile(p) else [os.path.join(r, f) for r, _, fs in os.walk(p) for f in fs]
        for f in files:
            try:
                fd = os.open(f, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def counting_store(path: str):
    """A zarr ``LocalStore`` on ``path`` that records every byte it hands out, per key."""
    from zarr.storage import LocalStore

    class CountingStore(LocalStore):
        def __init__(self, root):
            super().__init__(root, read_only=True)
            self.reads: list[tuple[str, int]] = []

        async def get(self, key, prototype=None, byte_range=None):
            buf = await super().get(key, prototype, byte_range)
            if buf is not None:
                self.reads.append((key, len(buf)))
            return buf

        async def get_partial_values(self, prototype, key_ranges):
            out = await super().get_partial_values(prototype, key_ranges)
            for (key, _), buf in zip(key_ranges, out):
                if buf is not None:
                    self.reads.append((key, len(buf)))
            return out

        def reset(self) -> None:
            self.reads.clear()

    return CountingStore(path)


# ---------------------------------------------------------------------------- subprocesses


def run_json(script: str, *args: str, timeout: float = 3600) -> dict:
    """Run ``python script args...`` in a fresh process; it prints one JSON object last."""
    p = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
    if p.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} failed:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- output


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def table(rows: list[list[str]], header: list[str]) -> str:
    cols = [header] + rows
    widths = [max(len(str(r[i])) for r in cols) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)), line]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)
