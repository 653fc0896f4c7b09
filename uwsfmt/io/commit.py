"""The commit protocol: one writer at a time (a lock file), manifest replaced atomically."""

from __future__ import annotations

import errno
import fcntl
import os
import sys
import time

import zarr
from zarr.abc.store import Store
from zarr.storage import FsspecStore

from uwsfmt.errors import LockError, StoreError
from uwsfmt.format.schema import validate_manifest
from uwsfmt.io import remote
from uwsfmt.io.layout import LOCK_FILE

#: seconds a writer waits for another one's lock (environment: UWSFMT_LOCK_TIMEOUT)
DEFAULT_LOCK_TIMEOUT = 30.0


def lock_timeout() -> float:
    try:
        return float(os.environ.get("UWSFMT_LOCK_TIMEOUT", DEFAULT_LOCK_TIMEOUT))
    except ValueError:
        return DEFAULT_LOCK_TIMEOUT


class StoreLock:
    """Exclusive advisory lock on ``<store>/.uws.lock`` (flock: released if the writer dies).

    Waits up to ``timeout`` seconds (default: UWSFMT_LOCK_TIMEOUT, else 30), then raises :class:`LockError`.
    """

    def __init__(self, path: str, timeout: float | None = None):
        self.path = os.path.join(path, LOCK_FILE)
        self.timeout = lock_timeout() if timeout is None else timeout
        self._fd: int | None = None

    def __enter__(self) -> StoreLock:
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StoreError(f"{self.path}: cannot create the store's lock file ({e.strerror}); is the store read-only?") from e
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
                    ) from e
                time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class Writing:
    """One writer's hold on a store, local or on object storage: the lock on entry, then
    :meth:`commit` (at most once) replaces the manifest. On a directory: ``flock`` on
    ``.uws.lock`` and zarr's atomic replace of the root zarr.json. On object storage
    (spec section 11.4): the lock object with its lease, and a commit that is a put-if-match on
    the root zarr.json read under the lock, so no writer commits over another."""

    def __init__(self, zstore: Store, path: str):
        self.zstore = zstore
        self.path = path
        self._local: StoreLock | None = None
        self._object: remote.ObjectLock | None = None
        self._etag: str | None = None

    def __enter__(self) -> Writing:
        if isinstance(self.zstore, FsspecStore):
            ofs = remote.ObjectFS(self.zstore)
            self._object = remote.ObjectLock(ofs, lock_timeout()).__enter__()
            try:
                self._etag = remote.root_document(ofs)[1]
            except BaseException:
                self._object.__exit__(None, None, None)
                raise
        else:
            self._local = StoreLock(self.path).__enter__()
        return self

    def commit(self, manifest: dict) -> None:
        if self._object is not None:
            assert self._etag is not None  # read on entry
            validate_manifest(manifest, self.path)
            remote.commit(self._object.ofs, self._object, manifest, self._etag)
        else:
            commit_manifest(self.zstore, self.path, manifest)

    def __exit__(self, *exc) -> None:
        if self._object is not None:
            self._object.__exit__(*exc)
        if self._local is not None:
            self._local.__exit__(*exc)


def put_manifest(root: zarr.Group, manifest: dict) -> None:
    """Write ``manifest`` as the root group's ``uws`` attribute, as compact JSON: zarr's default
    two-space indentation makes a manifest of many models and tensors 2-3x larger on disk (a
    third of a small LoRA store's bytes), and readers parse either the same."""
    with zarr.config.set({"json_indent": None}):
        root.attrs.put({"uws": manifest})


def commit_manifest(zstore: Store, path: str, manifest: dict) -> None:
    """Validate and atomically replace the root zarr.json with ``manifest`` (the commit point)."""

    validate_manifest(manifest, path)
    try:
        root = zarr.open_group(zstore, mode="r+")
        put_manifest(root, manifest)
    except OSError as e:
        raise StoreError(f"{path}: could not commit ({e.strerror or e}); the store keeps its previous committed state") from e


class BuildLock:
    """Exclusive lock of one conversion target: ``<parent>/.<name>.uws-convert.lock``.

    Converts to the same target serialise on it, so a convert may remove the temporary folders
    that killed converts left (nobody else can be building them). The lock file is removed on
    release; an acquirer checks that the file it locked is still the one at the path.
    """

    def __init__(self, target: str, timeout: float | None = None):
        parent, name = os.path.split(os.path.abspath(target))
        self.path = os.path.join(parent, f".{name}.uws-convert.lock")
        self.target = target
        self.timeout = lock_timeout() if timeout is None else timeout
        self._fd: int | None = None

    def __enter__(self) -> BuildLock:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise StoreError(f"{self.target}: cannot create a lock file next to it ({e.strerror}); is the folder writable?") from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    raise LockError(f"{self.target}: another `uwsfmt convert` is writing this store (waited {self.timeout:.0f} s "
                                    "for its lock); try again when it has finished") from e
                time.sleep(0.05)
                continue
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return self
            os.close(fd)  # the holder removed it as we locked it: lock the new file instead

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def replace_dir(new: str, target: str, trash: str) -> str | None:
    """Move folder ``new`` to ``target``. Where ``target`` exists, swap the two atomically
    (Linux renameat2 RENAME_EXCHANGE; elsewhere two renames), move the old one to ``trash`` and
    return where it is, for the caller to delete. After the swap the old store is moved off
    ``new``'s name at once: a leftover under the build's name must only ever be the new store
    (killed before the swap), never the replaced one (killed while deleting it)."""
    if not os.path.lexists(target):
        os.rename(new, target)
        return None
    if _exchange(new, target):
        try:
            os.rename(new, trash)
        except OSError:
            return new
        return trash
    os.rename(target, trash)
    os.rename(new, target)
    return trash


def _exchange(a: str, b: str) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # old kernel or file system without it
    raise OSError(err, os.strerror(err), b)
