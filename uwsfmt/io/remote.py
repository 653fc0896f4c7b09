"""Stores on object storage and HTTP (spec section 11.4): zarr's own ``FsspecStore`` under a URL,
the object store's conditional writes, and the writer lock built on them.

Reading needs nothing but ranged GETs, so any fsspec URL reads (``s3://``, ``gs://``,
``https://``, ``memory://`` ...). Writing needs what a rename and ``flock`` give on a disk:
a lock only one writer can take, and a commit that fails when another writer committed first.
An object store gives both with conditional writes: put-if-absent (``If-None-Match: *``) takes
the lock object, put-if-match (``If-Match: <etag>``) renews or breaks it and replaces the root
``zarr.json`` only when it is still the one the writer read. uwsfmt writes where it can make
them (S3 and S3-compatible servers, through s3fs) and refuses to write elsewhere, rather than
promise what it cannot keep.

Credentials come from where fsspec finds them (the environment, config files, the instance's
role) or from ``storage_options``; uwsfmt never records them: messages name a URL without its
user, password or query string (:func:`redact`).
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import zarr.storage
from zarr.core.sync import sync

from uwsfmt.errors import ConflictError, LockError, StoreError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
#: schemes served read-only (plain HTTP has no writes uwsfmt could make safe)
READ_ONLY_SCHEMES = frozenset({"http", "https"})
#: schemes whose file systems make conditional writes (put-if-absent, put-if-match)
CONDITIONAL_SCHEMES = frozenset({"s3", "s3a"})
#: the writer lock object, next to the root zarr.json (the same name as the local lock file)
LOCK_OBJECT = ".uws.lock"
#: written first by a convert to an object store and deleted after its commit: objects under a
#: prefix without a root zarr.json are a killed build's only when this marker is among them
BUILDING_OBJECT = ".uws-building"
#: seconds a writer's lock is valid without renewal (environment: UWSFMT_LOCK_LEASE); a killed
#: writer's lock may be taken over this long after its last renewal
DEFAULT_LEASE = 60.0
#: bytes uploaded per batch of concurrent PUTs when a build is published
UPLOAD_BATCH_BYTES = 64 << 20


def scheme(path: Any) -> str | None:
    """The URL scheme of ``path`` ("s3", "https", ...), or None for a local path."""
    m = _SCHEME.match(path) if isinstance(path, str) else None
    return m.group(1).lower() if m else None


def is_url(path: Any) -> bool:
    """Whether ``path`` names a store by URL (anything but a local path or ``file://``)."""
    s = scheme(path)
    return s is not None and s not in ("file", "local")


def local_path(path: str) -> str:
    """A ``file://`` URL as a local path (other paths unchanged)."""
    return urlsplit(path).path if scheme(path) in ("file", "local") else path


def redact(url: str) -> str:
    """``url`` without user, password, query string or fragment (signed URLs carry their
    credentials in the query): what messages and logs may show."""
    if not is_url(url):
        return url
    p = urlsplit(url)
    host = p.hostname or ""
    if p.port:
        host = f"{host}:{p.port}"
    return urlunsplit((p.scheme, host, p.path, "", ""))


def check_url(url: str) -> None:
    """Refuse a URL whose path escapes its prefix (``..``) or names nothing."""
    p = urlsplit(url)
    parts = [x for x in p.path.split("/")]
    if any(x in ("..", ".") for x in parts):
        raise StoreError(f"{redact(url)}: a store URL may not contain '.' or '..' segments (it would name a place outside "
                         "the prefix it appears to); give the store's own prefix")
    if not (p.netloc or p.path.strip("/")):
        raise StoreError(f"{url!r}: names no bucket or path; give the store's URL, e.g. s3://bucket/family.uws")


def open_store(url: str, mode: str, storage_options: dict | None = None) -> zarr.storage.FsspecStore:
    """zarr's FsspecStore for the store at ``url``; ``mode`` "r" (read only) or anything else
    (writable: only where conditional writes exist, see :func:`writable`)."""
    check_url(url)
    s = scheme(url)
    if mode != "r":
        if s in READ_ONLY_SCHEMES:
            raise StoreError(f"{redact(url)}: stores over {s}:// are read-only; write to the bucket or folder the URL "
                             "serves (e.g. s3://...) and read it back over HTTP")
        if s not in CONDITIONAL_SCHEMES:
            raise StoreError(f"{redact(url)}: uwsfmt writes to object storage only where it can make conditional writes "
                             f"({', '.join(sorted(CONDITIONAL_SCHEMES))}://); {s}:// is read-only here. Build the store "
                             "locally and copy it (a whole store is valid once its root zarr.json is there)")
    try:
        return zarr.storage.FsspecStore.from_url(url.rstrip("/"), storage_options=storage_options, read_only=(mode == "r"))
    except ImportError as e:
        need = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
                "http": "aiohttp", "https": "aiohttp"}.get(s or "", f"the fsspec implementation of {s}://")
        raise StoreError(f"{redact(url)}: reading {s}:// needs {need} (pip install 'uwsfmt[remote]' or pip install {need})") from e
    except (ValueError, TypeError, OSError) as e:
        raise StoreError(f"{redact(url)}: cannot open it ({reason(e)})") from e


def reason(e: BaseException) -> str:
    """A short, credential-free description of a storage error for a message."""
    if isinstance(e, PermissionError):
        return ("access denied: check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE, "
                "storage_options) and the bucket's permissions")
    if isinstance(e, FileNotFoundError):
        return "no such bucket or object"
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    text = re.sub(r"(?i)(signature|credential|x-amz-[a-z-]+|access[_ ]?key[_ a-z]*)=\S+", r"\1=...", text)
    return text[:300]


def size(zstore: zarr.storage.FsspecStore, key: str) -> int | None:
    """Bytes of the object ``key`` under the store (None: absent). Errors other than absence are
    a :class:`StoreError` saying what to check."""
    try:
        return int(sync(zstore.getsize(key)))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise StoreError(f"{display(zstore)}: cannot read {key} ({reason(e)})") from e


def display(zstore: zarr.storage.FsspecStore) -> str:
    """The store's URL as messages show it."""
    proto = zstore.fs.protocol
    proto = proto[0] if isinstance(proto, (tuple, list)) else proto
    path = zstore.path
    return redact(path if "://" in path else f"{proto}://{path}")


def total_bytes(zstore: zarr.storage.FsspecStore) -> int | None:
    """Bytes of every object under the store (None where the server cannot list, e.g. HTTP)."""
    try:
        found = sync(zstore.fs._find(zstore.path, detail=True))
    except (NotImplementedError, OSError, ValueError):
        return None
    return sum(int(v.get("size") or 0) for v in found.values()) or None


class ObjectFS:
    """The conditional-write side of a store on S3 (or an S3-compatible server): objects under
    the store's prefix, read with their ETags, written only if absent or only if unchanged."""

    def __init__(self, zstore: zarr.storage.FsspecStore):
        self.zstore = zstore
        self.fs = zstore.fs
        self.root = zstore.path.rstrip("/")
        self.where = display(zstore)
        if not hasattr(self.fs, "_call_s3"):  # s3fs: the only file system here with If-Match / If-None-Match
            raise StoreError(f"{self.where}: this file system has no conditional writes; uwsfmt writes only to S3 and "
                             "S3-compatible stores")

    def check(self) -> None:
        """Fail early, before a build, when the bucket is missing or the credentials do not open it."""
        bucket = self._split("")[0]
        try:
            sync(self.fs._call_s3("head_bucket", Bucket=bucket))
        except FileNotFoundError as e:
            raise StoreError(f"{self.where}: the bucket {bucket!r} does not exist (or these credentials cannot see it); "
                             "create it first") from e
        except PermissionError as e:
            raise StoreError(f"{self.where}: cannot write ({reason(e)})") from e
        except OSError as e:
            raise StoreError(f"{self.where}: cannot reach the bucket ({reason(e)})") from e

    def key(self, name: str) -> str:
        return f"{self.root}/{name}" if name else self.root

    def _split(self, name: str) -> tuple[str, str]:
        bucket, key, _ = self.fs.split_path(self.key(name))
        return bucket, key

    def _call(self, what: str, name: str, **kw: Any) -> Any:
        bucket, key = self._split(name)
        try:
            return sync(self.fs._call_s3(what, Bucket=bucket, Key=key, **kw))
        except PermissionError as e:
            raise StoreError(f"{self.where}: cannot write {name} ({reason(e)})") from e

    def get(self, name: str) -> tuple[bytes, str] | None:
        """(content, etag) of object ``name``, or None when absent."""
        try:
            r = self._call("get_object", name)
        except FileNotFoundError:
            return None
        body = r["Body"]
        data = sync(body.read())
        body.close()
        return data, r["ETag"]

    def exists(self, name: str) -> bool:
        try:
            self._call("head_object", name)
            return True
        except FileNotFoundError:
            return False

    def put_if_absent(self, name: str, data: bytes) -> bool:
        """Write ``name`` unless it exists (If-None-Match: *); whether it was written."""
        return self._put_if(name, data, IfNoneMatch="*") is not None

    def put_if_match(self, name: str, data: bytes, etag: str) -> str | None:
        """Replace ``name`` only if its ETag is still ``etag`` (If-Match); the new ETag, or None
        when another writer replaced or deleted it first."""
        return self._put_if(name, data, IfMatch=etag)

    def _put_if(self, name: str, data: bytes, **condition: str) -> str | None:
        """A conditional PUT: the new ETag, or None when the condition failed (the object exists,
        changed, or is gone)."""
        try:
            r = self._call("put_object", name, Body=data, **condition)
        except FileExistsError:
            return None
        except FileNotFoundError:
            if "IfMatch" in condition:  # the object is gone; for a put-if-absent it means no bucket
                return None
            raise
        except OSError as e:
            if _precondition(e):
                return None
            raise
        self.fs.invalidate_cache(self.key(name))
        return r["ETag"]

    def put(self, name: str, data: bytes) -> None:
        self._call("put_object", name, Body=data)

    def delete(self, name: str) -> None:
        try:
            self._call("delete_object", name)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(self.key(name))

    def names(self) -> list[str]:
        """Every object under the prefix, relative to it."""
        self.fs.invalidate_cache(self.root)
        try:
            found = sync(self.fs._find(self.root))
        except FileNotFoundError:
            return []
        except PermissionError as e:
            raise StoreError(f"{self.where}: cannot list the store ({reason(e)})") from e
        n = len(self.root) + 1
        return [p[n:] for p in found if p.startswith(self.root + "/")]

    def upload(self, files: Iterator[tuple[str, str]]) -> None:
        """PUT local files (``(local path, name)`` pairs), many at a time, in batches of about
        :data:`UPLOAD_BATCH_BYTES`."""
        batch: dict[str, bytes] = {}
        held = 0
        for local, name in files:
            with open(local, "rb") as f:
                batch[self.key(name)] = f.read()
            held += len(batch[self.key(name)])
            if held >= UPLOAD_BATCH_BYTES:
                self._pipe(batch)
                batch, held = {}, 0
        if batch:
            self._pipe(batch)

    def _pipe(self, batch: dict[str, bytes]) -> None:
        try:
            sync(self.fs._pipe(batch))
        except (PermissionError, FileNotFoundError) as e:
            raise StoreError(f"{self.where}: cannot write the store ({reason(e)})") from e


def _precondition(e: OSError) -> bool:
    text = f"{e} {e.__cause__ or ''}"
    return "PreconditionFailed" in text or "412" in text or "ConditionalRequestConflict" in text


def lease_seconds() -> float:
    try:
        return max(1.0, float(os.environ.get("UWSFMT_LOCK_LEASE", DEFAULT_LEASE)))
    except ValueError:
        return DEFAULT_LEASE


class ObjectLock:
    """The writer lock of a store on object storage: the object ``.uws.lock``, created only if
    absent, holding its owner and the time its lease ends. A thread renews the lease (If-Match
    on the lock's ETag) every third of it; a writer that finds an expired lease takes the lock
    over with If-Match, so of two writers that find the same dead lock one wins. :meth:`check`
    raises if the lease was lost (the writer must not commit). Clocks of writers must agree to
    well within the lease (spec section 11.4)."""

    def __init__(self, ofs: ObjectFS, timeout: float, lease: float | None = None):
        self.ofs = ofs
        self.timeout = timeout
        self.lease = lease_seconds() if lease is None else lease
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self.etag: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._mutex = threading.Lock()

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "expires": time.time() + self.lease}).encode()

    def __enter__(self) -> ObjectLock:
        deadline = time.monotonic() + self.timeout
        while True:
            body = self._body()
            if self.ofs.put_if_absent(LOCK_OBJECT, body):
                got = self.ofs.get(LOCK_OBJECT)
                if got is not None and got[0] == body:
                    self.etag = got[1]
                    break
            else:
                held = self.ofs.get(LOCK_OBJECT)
                if held is not None and _expired(held[0]):
                    etag = self.ofs.put_if_match(LOCK_OBJECT, body, held[1])
                    if etag is not None:
                        self.etag = etag
                        break
            if time.monotonic() > deadline:
                raise LockError(f"{self.ofs.where}: another process is writing to this store (waited {self.timeout:.0f} s "
                                f"for its lock, {LOCK_OBJECT}); try again when it has finished. A writer that died "
                                f"leaves a lock that expires {self.lease:.0f} s after its last renewal")
            time.sleep(0.2)
        self._renewer = threading.Thread(target=self._renew, name="uwsfmt-lock-lease", daemon=True)
        self._renewer.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.lease / 3):
            with self._mutex:
                if self.lost or self.etag is None:
                    return
                try:
                    etag = self.ofs.put_if_match(LOCK_OBJECT, self._body(), self.etag)
                except (OSError, StoreError):
                    continue  # a network hiccup: try again before the lease ends
                if etag is None:
                    self.lost = True
                    return
                self.etag = etag

    def check(self) -> None:
        """Raise if this writer no longer holds the lock (its lease ran out and another took it)."""
        if self.lost:
            raise LockError(f"{self.ofs.where}: this writer's lock expired and another writer took it over; nothing of "
                            "this write is committed. Run it again")

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        with self._mutex:
            if not self.lost and self.etag is not None:
                held = self.ofs.get(LOCK_OBJECT)
                if held is not None and held[1] == self.etag:
                    self.ofs.delete(LOCK_OBJECT)
            self.etag = None


def _expired(body: bytes) -> bool:
    try:
        return float(json.loads(body)["expires"]) < time.time()
    except (ValueError, KeyError, TypeError):
        return True  # not a lock any writer of ours wrote: a damaged one, taken over


def root_document(ofs: ObjectFS) -> tuple[dict, str]:
    """The root zarr.json (parsed) and its ETag, as a committing writer must read them."""
    got = ofs.get("zarr.json")
    if got is None:
        raise StoreError(f"{ofs.where}: the store has no root zarr.json; it is not a UWS store")
    return json.loads(got[0]), got[1]


def commit(ofs: ObjectFS, lock: ObjectLock, manifest: dict, etag: str) -> None:
    """Replace the root zarr.json's manifest, only if the root is still the one read under the lock
    (ETag ``etag``): the commit point of an append on object storage."""
    lock.check()
    doc, _ = root_document(ofs)
    doc.setdefault("attributes", {})["uws"] = manifest
    if ofs.put_if_match("zarr.json", json.dumps(doc, separators=(",", ":"), allow_nan=False).encode(), etag) is None:
        raise ConflictError(f"{ofs.where}: another writer committed to this store while this one was writing; nothing of "
                            "this write is committed. Run it again")


def publish(local: str, url: str, storage_options: dict | None, timeout: float) -> None:
    """Upload the complete store built in the local folder ``local`` to ``url``: under the writer
    lock, the marker :data:`BUILDING_OBJECT` first, every object but the root zarr.json next, the
    root zarr.json last and only if absent (the commit), the marker deleted. A reader sees no
    store until the commit; a killed upload leaves objects a later convert to the URL removes."""
    zstore = open_store(url, "w", storage_options)
    ofs = ObjectFS(zstore)
    with ObjectLock(ofs, timeout) as lock:
        names = [n for n in ofs.names() if n != LOCK_OBJECT]
        if "zarr.json" in names:
            raise ConflictError(f"{ofs.where}: a store (or other Zarr data) is already there; choose another URL, or "
                                "delete it first (uwsfmt does not replace a store on object storage: that cannot be atomic)")
        if names and BUILDING_OBJECT not in names:
            raise StoreError(f"{ofs.where}: the prefix holds {len(names)} objects but no store (e.g. {names[0]}); "
                             "convert to an empty prefix")
        if names:  # a killed convert's objects (its marker is among them): removed before building again
            for n in names:
                if n != BUILDING_OBJECT:
                    ofs.delete(n)
        else:
            ofs.put(BUILDING_OBJECT, json.dumps({"owner": lock.owner}).encode())
        ofs.upload(_files(local))
        lock.check()
        with open(os.path.join(local, "zarr.json"), "rb") as f:
            root = f.read()
        if not ofs.put_if_absent("zarr.json", root):
            raise ConflictError(f"{ofs.where}: another writer created a store here while this convert uploaded; this one "
                                "is not committed")
        ofs.delete(BUILDING_OBJECT)


def _files(local: str) -> Iterator[tuple[str, str]]:
    for folder, _, files in os.walk(local):
        for f in sorted(files):
            p = os.path.join(folder, f)
            name = os.path.relpath(p, local).replace(os.sep, "/")
            if name not in ("zarr.json", LOCK_OBJECT):
                yield p, name
