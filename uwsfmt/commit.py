"""The commit protocol: one writer at a time (a lock file), manifest replaced atomically."""

from __future__ import annotations

import errno
import fcntl
import os
import time

import zarr

from .errors import LockError, StoreError
from .layout import LOCK_FILE


class StoreLock:
    """Exclusive advisory lock on ``<store>/.uws.lock`` (flock: released if the writer dies).

    Waits up to ``timeout`` seconds, then raises :class:`LockError`.
    """

    def __init__(self, path: str, timeout: float = 30.0):
        self.path = os.path.join(path, LOCK_FILE)
        self.timeout = timeout
        self._fd: int | None = None

    def __enter__(self) -> StoreLock:
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StoreError(f"{self.path}: cannot create the store's lock file ({e.strerror}); is the store read-only?") from None
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    os.close(self._fd)
                    self._fd = None
                    raise LockError(
                        f"{os.path.dirname(self.path)}: another process is writing to this store "
                        f"(waited {self.timeout:.0f} s for its lock); try again when it has finished"
                    ) from None
                time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def commit_manifest(zstore, path: str, manifest: dict) -> None:
    """Validate and atomically replace the root zarr.json with ``manifest`` (the commit point)."""
    from .schema import validate_manifest

    validate_manifest(manifest, path)
    try:
        root = zarr.open_group(zstore, mode="r+")
        root.attrs.put({"uws": manifest})
    except OSError as e:
        raise StoreError(f"{path}: could not commit ({e.strerror or e}); the store keeps its previous committed state") from None
