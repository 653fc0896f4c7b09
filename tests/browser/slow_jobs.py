"""A test-only Jupyter server extension: jobs writing to ``*slow*`` outputs take their time.

The browser tests must press Cancel, and reload the page, while a convert job is still running on
the server. A real 4-model family converts in under a second, so this extension (loaded by the
harness next to ``jupyter_ext``, never installed) makes every progress step of such a job wait
:data:`STEP_DELAY_S` seconds. Nothing else about the job changes: the library call, its cancel
polling and its cleanup are the real ones.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

from jupyter_ext.server.tasks import Job

STEP_DELAY_S = float(os.environ.get("UWS_TEST_SLOW_STEP_S", "0.6"))


def _jupyter_server_extension_points() -> list[dict]:
    return [{"module": "tests.browser.slow_jobs"}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    original = Job.on_progress
    if getattr(original, "slowed", False):
        return

    @functools.wraps(original)
    def on_progress(self: Job, done: int, total: int, message: str = "") -> None:
        original(self, done, total, message)
        if "slow" in os.path.basename(str(self.output)):
            time.sleep(STEP_DELAY_S)

    on_progress.slowed = True  # type: ignore[attr-defined]
    Job.on_progress = on_progress  # type: ignore[method-assign]
    serverapp.log.info("uwsfmt browser tests: jobs writing to *slow* outputs wait %.2f s per step", STEP_DELAY_S)
