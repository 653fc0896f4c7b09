"""Overlapping I/O with compute during a build: read ahead, write behind, hash in the background.

A build alternates reading a tensor (a ``pread``, which releases the GIL), computing on it
(torch, which releases the GIL) and writing arrays (zarr, which waits on its own I/O thread).
Done one after the other, the cores idle during reads and writes; these helpers run them on one
background thread each, with at most one item in flight, so memory stays bounded by one extra
tensor (read ahead) or one extra tensor's arrays (write behind).

Overlap only pays where a core is free for it: with the GPU doing the math, or when torch uses
fewer threads than there are cores (:func:`useful`). Measured on 2 cores with torch on both
(ViT-B family, sketch build, 3 runs each): reading ahead and writing behind made builds 5-15%
slower warm and cold (page-cache copies and zarr's encoding stall torch's parallel GEMMs), so
there they are off. Hashing the sources in the background at low priority is kept everywhere:
it made the same builds ~5% faster warm and ~10% faster cold (it also reads the files ahead).
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


def background_priority() -> None:
    """Lower the calling thread's scheduling priority (Linux: per-thread nice 19), so that it
    runs on cores the compute leaves idle instead of stalling torch's parallel regions (measured
    on 2 cores: a normal-priority reader or hasher next to two GEMM threads slowed builds by
    10-25%). A no-op where the platform has no per-thread priority."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


def useful(device: object) -> bool:
    """Whether overlapping threads have a core to run on: the math is on a GPU, or torch's CPU
    threads leave a core free."""
    if getattr(device, "type", str(device)) != "cpu":
        return True
    import torch

    return (os.cpu_count() or 1) > torch.get_num_threads()


def read_ahead(thunks: Iterable[Callable[[], T]], enabled: bool = True) -> Iterator[T]:
    """Call each thunk in order and yield its result; the next one runs on a background thread
    while the caller works on the current one (``enabled=False``: all inline). Exceptions surface
    where their item is consumed.

    >>> list(read_ahead(lambda i=i: i * i for i in range(4)))
    [0, 1, 4, 9]
    """
    if not enabled:
        for thunk in thunks:
            yield thunk()
        return
    it = iter(thunks)
    first = next(it, None)
    if first is None:
        return
    with ThreadPoolExecutor(1, thread_name_prefix="uwsfmt-read", initializer=background_priority) as pool:
        pending: Future = pool.submit(first)
        try:
            for thunk in it:
                current = pending
                pending = pool.submit(thunk)
                yield current.result()
            yield pending.result()
        finally:
            pending.cancel()


class Lookahead:
    """Ask the sources to prefetch the tensors a build will need next, a byte window ahead.

    A build works tensor by tensor, reading one tensor of every model per sweep. Only the first
    sweep of a tensor reads from disk (the later ones find it in the page cache), so without
    help the disk idles during the later sweeps and the compute idles during the first.
    :meth:`advance` (called as tensor ``j`` starts) hints tensors ``j + 1, j + 2, ...`` of every
    checkpoint until ``window`` bytes are hinted ahead of ``j``: the kernel reads them while the
    compute runs (``posix_fadvise(WILLNEED)``: no thread, no CPU). Costs page cache only.

    >>> class Ck:
    ...     def __init__(self): self.asked = []
    ...     def prefetch(self, name): self.asked.append(name)
    >>> ck = Ck(); ahead = Lookahead([ck], [("a", 10), ("b", 10), ("c", 10)], window=15)
    >>> ahead.advance(0); ck.asked
    ['b', 'c']
    """

    def __init__(self, checkpoints: list, tensors: list[tuple[str, int]], window: int = 256 << 20):
        self.checkpoints = checkpoints
        self.tensors = tensors  # (name, bytes per model) in the order the build reads them
        self.window = window
        self._next = 0  # first tensor not hinted yet
        self._before = [0, *itertools.accumulate(b for _, b in tensors)]  # bytes of the tensors before each

    def advance(self, j: int) -> None:
        """Tensor ``j`` starts: hint what follows it, up to ``window`` bytes (all models)."""
        self._next = max(self._next, j + 1)
        ahead = (self._before[self._next] - self._before[min(j + 1, self._next)]) * len(self.checkpoints)
        while self._next < len(self.tensors) and ahead < self.window:
            name, b = self.tensors[self._next]
            for ck in self.checkpoints:
                ck.prefetch(name)
            ahead += b * len(self.checkpoints)
            self._next += 1


class WriteBehind:
    """Run write jobs on one background thread, at most ``depth`` queued; :meth:`drain` waits for
    them all and re-raises the first failure. Used as a context manager, leaving it drains (and
    on an exception already raising, waits without masking it).

    >>> out = []
    >>> with WriteBehind() as wb:
    ...     wb.submit(out.append, 1)
    >>> out
    [1]
    """

    def __init__(self, depth: int = 2, enabled: bool = True):
        self.enabled = enabled
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="uwsfmt-write") if enabled else None
        self._slots = threading.Semaphore(depth)
        self._futures: list[Future] = []

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Queue ``fn(*args, **kwargs)`` (run it now when not enabled)."""
        if not self.enabled:
            fn(*args, **kwargs)
            return
        self._raise_failed()
        self._slots.acquire()
        assert self._pool is not None  # enabled
        try:
            fut = self._pool.submit(fn, *args, **kwargs)
        except BaseException:
            self._slots.release()
            raise
        fut.add_done_callback(lambda _f: self._slots.release())
        self._futures.append(fut)

    def _raise_failed(self) -> None:
        keep = []
        for f in self._futures:
            if f.done():
                f.result()  # raises the job's exception
            else:
                keep.append(f)
        self._futures = keep

    def drain(self) -> None:
        futures, self._futures = self._futures, []
        for f in futures:
            f.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.drain()
        finally:
            self.close()


class Background:
    """One function run on a daemon thread from now on; :meth:`result` waits for it (and raises
    what it raised). For work whose result is needed only at the end (the sources' sha256)."""

    def __init__(self, fn: Callable[[], T]):
        self._result: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), name="uwsfmt-background", daemon=True)
        self._thread.start()

    def _run(self, fn) -> None:
        background_priority()
        try:
            self._result = fn()
        except BaseException as e:  # re-raised in result()
            self._error = e

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result
