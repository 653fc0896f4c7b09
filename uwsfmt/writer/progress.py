"""Progress bars, user callbacks and cancellation, in one place."""

from __future__ import annotations

import threading
from collections.abc import Callable

from uwsfmt.writer.settings import Cancelled


class Progress:
    """tqdm bar, user callback ``(done, total, message)``, and cancellation, in one place."""

    def __init__(self, total: int, progress: bool | Callable | None, cancel: threading.Event | None, desc: str,
                 stopped: str = "cancelled by the user; nothing was written at the target"):
        self.total, self.done, self.cancel, self.stopped = total, 0, cancel, stopped
        self.callback = progress if callable(progress) else None
        self.bar = None
        if progress is True:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="step", leave=False)

    def step(self, msg: str, n: int = 1) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled(self.stopped)
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix_str(msg[-40:], refresh=False)
        if self.callback is not None:
            self.callback(self.done, self.total, msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
