"""Convert / add jobs that live in the Jupyter server, not in a page or a kernel.

A job runs the library call in a worker thread; its state (status, progress, log, report) is a
plain record under a lock that any request can read, so a page that reloads finds the job again
by its id and goes on showing it. Cancel sets the event the library polls: ``uwsfmt.convert``
then removes its temporary build (nothing at the output path), ``Store.extend`` commits nothing.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable

from .. import payload
from ..messages import describe_error

LOG_LINES = 400
#: finished jobs kept for pages that reattach late
KEEP_FINISHED = 50
RUNNING = ("queued", "running", "cancelling")


class Job:
    """One convert/add run: its request, its live state and its final report."""

    def __init__(self, action: str, sources: list[str], output: str, shown: dict):
        self.id = uuid.uuid4().hex[:12]
        self.action = action
        self.sources = sources
        self.output = output
        self.shown = shown  # the request as the browser named it (paths relative to the root)
        self.cancel_event = threading.Event()
        self.lock = threading.Lock()
        self.status = "queued"  # queued | running | cancelling | done | cancelled | error
        self.progress = {"done": 0, "total": 0, "message": "starting", "elapsed": 0.0, "eta": None}
        self.log: list[str] = []
        self.report: dict = {}
        self.message = ""
        self.started = time.time()
        self._t0 = time.monotonic()
        self.finished: float | None = None
        self.thread: threading.Thread | None = None

    def on_progress(self, done: int, total: int, message: str = "") -> None:
        """The library's ``progress(done, total, message)`` callback (worker thread)."""
        elapsed = time.monotonic() - self._t0
        eta = elapsed * (total - done) / done if 0 < done <= total else None
        with self.lock:
            self.progress = {"done": int(done), "total": int(total), "message": str(message),
                             "elapsed": round(elapsed, 2), "eta": None if eta is None else round(eta, 1)}
            if message and (not self.log or not self.log[-1].endswith(str(message))):
                self.log.append(f"[{done}/{total}] {message}")
                del self.log[:-LOG_LINES]

    def state(self) -> dict:
        """A JSON-safe snapshot of the job."""
        with self.lock:
            p = dict(self.progress)
            if self.status in RUNNING:
                p["elapsed"] = round(time.monotonic() - self._t0, 2)
            return payload.jsonable({
                "id": self.id, "action": self.action, "status": self.status, "progress": p,
                "log": list(self.log), "report": self.report, "message": self.message,
                "started": self.started, "finished": self.finished, **self.shown,
            })


class Jobs:
    """The server's jobs: start, look up, cancel. One running job per output path."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def start(self, job: Job, work: Callable[[Job], dict]) -> Job:
        """Run ``work(job)`` in a thread; its return value becomes the job's report."""
        with self._lock:
            for other in self._jobs.values():
                if other.output == job.output and other.status in RUNNING:
                    raise JobConflict(f"{job.shown.get('output')}: job {other.id} is already writing there; "
                                      "wait for it or cancel it first")
            self._jobs[job.id] = job
            self._prune()

        def run() -> None:
            with job.lock:
                job.status = "running"
            try:
                report = work(job)
            except BaseException as e:  # noqa: BLE001 - reported to the page, never raised in the server
                cancelled = type(e).__name__ == "Cancelled" or job.cancel_event.is_set()
                with job.lock:
                    job.status = "cancelled" if cancelled else "error"
                    job.message = (f"Cancelled. {describe_error(e)}" if cancelled else describe_error(e))
                    job.log.append("cancelled" if cancelled else f"error: {job.message}")
            else:
                with job.lock:
                    job.report = payload.jsonable(report)
                    job.status = "done"
                    job.message = report.get("message", "Done.")
                    if job.progress.get("total"):
                        job.progress["done"] = job.progress["total"]
                    job.progress.update(eta=0.0, message="done", elapsed=round(time.monotonic() - job._t0, 2))
                    job.log.append(f"done in {time.monotonic() - job._t0:.1f} s")
            finally:
                with job.lock:
                    job.finished = time.time()

        job.thread = threading.Thread(target=run, name=f"uwsfmt-job-{job.id}", daemon=True)
        job.thread.start()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def all(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def cancel(self, job_id: str) -> Job | None:
        job = self.get(job_id)
        if job is None:
            return None
        with job.lock:
            if job.status in ("queued", "running"):
                job.cancel_event.set()
                job.status = "cancelling"
                job.log.append("cancel requested")
        return job

    def cancel_all(self, timeout: float = 10.0) -> None:
        """Stop every running job (server shutdown): nothing is left half-written."""
        jobs = self.all()
        for j in jobs:
            self.cancel(j.id)
        for j in jobs:
            if j.thread is not None:
                j.thread.join(timeout)

    def _prune(self) -> None:
        done = [j for j in self._jobs.values() if j.status not in RUNNING]
        for j in sorted(done, key=lambda j: j.finished or 0)[: max(0, len(done) - KEEP_FINISHED)]:
            self._jobs.pop(j.id, None)


class JobConflict(Exception):
    """Another job is writing to the same output."""


