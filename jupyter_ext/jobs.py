"""Long calls (convert, plan, export) from a widget without freezing the kernel.

ipykernel 7 does not reliably deliver widget updates made from a background thread, so the call
runs in a worker thread (``asyncio.to_thread``) inside a task on the kernel's own asyncio loop,
and everything that touches a widget (results, errors, progress) runs back on that loop.
Without a running loop (a plain script, a test) the call simply runs inline.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("jupyter_ext")


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def start(
    fn: Callable[[], Any],
    *,
    on_result: Callable[[Any], None],
    on_error: Callable[[BaseException], None],
    on_finally: Callable[[], None] | None = None,
) -> asyncio.Task | None:
    """Run ``fn()`` in a worker thread; the callbacks run on the caller's loop.

    Returns the task (keep a reference; await it in tests), or None when ``fn`` ran inline
    because no loop was running.
    """
    loop = _running_loop()
    if loop is None:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - shown in the widget, never as a traceback
            _finish(on_finally)
            on_error(e)
        else:
            _finish(on_finally)
            on_result(result)
        return None

    async def job() -> None:
        try:
            result = await asyncio.to_thread(fn)
        except Exception as e:  # noqa: BLE001
            _finish(on_finally)
            on_error(e)
        else:
            _finish(on_finally)
            on_result(result)

    return loop.create_task(job())


def _finish(on_finally: Callable[[], None] | None) -> None:
    if on_finally is not None:
        on_finally()


class ProgressRelay:
    """A ``progress(done, total, message)`` callback for a worker thread.

    The worker only stores the newest state under a lock; ``apply(done, total, message, lines)``
    runs on the loop, at most every ``interval`` seconds (coalescing the calls in between, so a
    build reporting thousands of steps does not flood the browser). ``flush()`` applies what is
    pending now; call it when the job ends.
    """

    def __init__(self, apply: Callable[[int, int, str, list[str]], None], *, interval: float = 0.1):
        self._apply = apply
        self._interval = interval
        self._loop = _running_loop()
        self._lock = threading.Lock()
        self._state: tuple[int, int, str] | None = None
        self._lines: list[str] = []
        self._scheduled = False
        self._last = 0.0

    def __call__(self, done: int, total: int, message: str = "") -> None:
        with self._lock:
            self._state = (int(done), int(total), str(message))
            if message and (not self._lines or self._lines[-1] != message):
                self._lines.append(str(message))
            if self._scheduled:
                return
            self._scheduled = True
        if self._loop is None:  # inline mode: we are on the caller's thread already
            if time.monotonic() - self._last >= self._interval or done >= total:
                self.flush()
            else:
                with self._lock:
                    self._scheduled = False
            return
        self._loop.call_soon_threadsafe(self._schedule)

    def _schedule(self) -> None:
        delay = max(0.0, self._last + self._interval - time.monotonic())
        self._loop.call_later(delay, self.flush)

    def flush(self) -> None:
        with self._lock:
            state, lines = self._state, self._lines
            self._state, self._lines = None, []
            self._scheduled = False
            self._last = time.monotonic()
        if state is not None:
            self._apply(*state, lines)
