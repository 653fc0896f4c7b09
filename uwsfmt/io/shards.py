"""Direct readers: one row of a pack array straight from its shard file (Zarr v3
``sharding_indexed``), and a whole per-tensor array (mean, basis, spectrum, shared value)
straight from its chunk files.

A pack row is one shard (spec: one shard per model row). zarr-python reads it correctly but
pays a fixed cost per call (codec pipeline, event-loop hop, an extra copy) that dominates when
a model's row is small and models are switched often. This reader does the same thing with a
few system calls: it reads the shard index at the end of the file, checks its crc32c, reads
each inner chunk into the caller's buffer (``preadv``: no intermediate copy, so the buffer may
be pinned memory for a GPU copy) and checks each chunk's crc32c. The bytes are the ones
zarr-python returns; any layout it does not recognise exactly (another codec chain, several
shards per row, a non-zero fill value, a store that is not a local directory) makes
:func:`row_reader` return None and the caller uses zarr-python.

>>> reader = row_reader(store._zstore, "packs/float32", store.array("packs/float32"))  # doctest: +SKIP
>>> reader.read_into(3, np.empty(reader.width, reader.dtype))  # doctest: +SKIP

The per-tensor arrays are small and many (3-4 per tensor: a model with 2,000 tensors has
8,000), and zarr-python spends ~0.8 ms opening and reading each one, so the first read of a
store's bases took seconds. :func:`chunked_reader` reads arrays laid out as uwsfmt writes them
(``bytes`` little endian + ``crc32c``, a regular grid of whole-row blocks, ``/`` chunk keys, fill
value 0) from their files: the chunks go straight into the caller's buffer, each checked with
its crc32c. Metadata in any other form is left to zarr-python.
"""

from __future__ import annotations

import json
import math
import os
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor

import crc32c
import numpy as np

from uwsfmt.errors import FormatError

#: compressed rows of at least this many frames are decompressed by several threads (zstd
#: releases the GIL: 2 threads decompress a 2.6 MB row of 4-bit codes 1.8x faster on 2 cores)
PARALLEL_FRAMES = 32
_pool: dict[str, tuple[ThreadPoolExecutor, int]] = {}
_pool_lock = threading.Lock()


def _decompress_pool() -> tuple[ThreadPoolExecutor, int] | None:
    """Threads for decompressing one row, and how many (None on a single core)."""
    n = min(4, os.cpu_count() or 1)
    if n < 2:
        return None
    with _pool_lock:
        if "pool" not in _pool:
            _pool["pool"] = (ThreadPoolExecutor(n, thread_name_prefix="uwsfmt-zstd"), n)
        return _pool["pool"]


def _forget_pool() -> None:
    _pool.clear()  # a forked child has none of its parent's threads: it starts its own pool


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


#: an index entry of a chunk that was never written (it reads as the fill value)
EMPTY = 2**64 - 1


class RowReader:
    """Reads rows of one 2-D sharded array whose shards span whole rows."""

    def __init__(self, root: str, path: str, shape: tuple[int, int], dtype: np.dtype, chunk: int, shard: int, key,
                 zstd: bool = False):
        self.root, self.path = root, path
        self.zstd = zstd  # inner chunks are zstd frames (integer packs)
        self.rows, self.width = shape
        self.dtype = np.dtype(dtype)
        self.chunk = chunk  # elements per inner chunk
        self.n_chunks = shard // chunk  # inner chunks per shard
        self._key = key  # (row, 0) -> chunk key of the shard

    def shard_file(self, index: int) -> str:
        return os.path.join(self.root, *self.path.split("/"), *self._key((index, 0)).split("/"))

    def read_into(self, index: int, out: np.ndarray) -> np.ndarray:
        """Row ``index`` into ``out`` (1-D, ``width`` elements of ``dtype``, C-contiguous)."""
        if not (0 <= index < self.rows):
            raise FormatError(f"{self.path}: row {index} is outside the array's {self.rows} rows")
        if out.dtype != self.dtype or out.shape != (self.width,) or not out.flags.c_contiguous:
            raise ValueError(f"{self.path}: the row buffer must be a contiguous {self.dtype} array of {self.width} elements")
        item = self.dtype.itemsize
        payload = self.chunk * item
        path = self.shard_file(index)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            out[...] = 0  # a shard never written reads as the fill value (checked to be 0)
            return out
        try:
            size = os.fstat(fd).st_size
            index_bytes = self.n_chunks * 16 + 4
            if size < index_bytes:
                raise FormatError(f"{path}: shard of {size} bytes is shorter than its index; the store is damaged")
            raw = os.pread(fd, index_bytes, size - index_bytes)
            if len(raw) != index_bytes or crc32c.crc32c(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
                raise FormatError(f"{path}: the shard index fails its crc32c check; the store is damaged")
            entries = np.frombuffer(raw, dtype="<u8", count=2 * self.n_chunks).reshape(self.n_chunks, 2)
            dest = out.view(np.uint8)
            if not self.zstd and self._packed(entries, payload, size - index_bytes):
                self._read_packed(fd, path, dest, payload)
                return out
            if self.zstd and self._frames_in_order(entries, size - index_bytes):
                self._read_frames(fd, path, entries, dest, payload)
                return out
            tail = np.empty(payload + 4, dtype=np.uint8)  # what lies beyond the row's end, and the checksum
            for j, (offset, nbytes) in enumerate(entries.tolist()):
                start = j * payload
                stop = min(start + payload, self.width * item)
                if start >= stop:
                    break
                if offset == EMPTY and nbytes == EMPTY:
                    dest[start:stop] = 0
                    continue
                if self.zstd:
                    self._read_compressed(fd, path, j, offset, nbytes, size - index_bytes, dest[start:stop], payload)
                    continue
                if nbytes != payload + 4 or offset + nbytes > size - index_bytes:
                    raise FormatError(f"{path}: inner chunk {j} has {nbytes} bytes at offset {offset}, not the "
                                      f"{payload + 4} an uncompressed chunk with its checksum takes; the store is damaged")
                extra = payload - (stop - start)
                bufs = [memoryview(dest[start:stop]), memoryview(tail[: extra + 4])]  # type: ignore[arg-type]  # numpy stubs: no __buffer__ < 3.12
                got = os.preadv(fd, bufs, offset)
                if got != nbytes:
                    raise FormatError(f"{path}: inner chunk {j} is truncated ({got} of {nbytes} bytes); the store is damaged")
                crc = crc32c.crc32c(tail[:extra], crc32c.crc32c(dest[start:stop]))  # type: ignore[arg-type]  # numpy stubs: no __buffer__ < 3.12
                if crc != int.from_bytes(tail[extra: extra + 4].tobytes(), "little"):
                    raise FormatError(f"{path}: inner chunk {j} fails its crc32c check; the store is damaged")
        finally:
            os.close(fd)
        return out

    def _packed(self, entries: np.ndarray, payload: int, end: int) -> bool:
        """Whether the shard holds every inner chunk in order, back to back, uncompressed: the
        layout :meth:`write` (and zarr-python, for a fully written row) produces."""
        step = payload + 4
        n = self.n_chunks
        return ((n - 1) * payload < self.width * self.dtype.itemsize <= n * payload and n * step <= end and bool((entries[:, 1] == step).all())
                and bool((entries[:, 0] == np.arange(n, dtype=np.uint64) * step).all()))

    #: iovecs per preadv call (POSIX guarantees at least 16; Linux allows 1024)
    IOV_BATCH = 1020

    def _read_packed(self, fd: int, path: str, dest: np.ndarray, payload: int) -> None:
        """A packed shard in a few preadv calls straight into ``dest`` (each chunk's bytes, then its
        checksum into a side buffer), then every chunk's crc32c checked."""
        n, nbytes = self.n_chunks, dest.size
        last = nbytes - (n - 1) * payload  # the last chunk's bytes that belong to the row
        crcs = np.empty(4 * n, dtype=np.uint8)
        pad = np.empty(payload - last, dtype=np.uint8)  # the last chunk's fill beyond the row's end
        views = []
        for j in range(n):
            start = j * payload
            views.append(memoryview(dest[start: min(start + payload, nbytes)]))  # type: ignore[arg-type]  # numpy stubs: no __buffer__ < 3.12
            if j == n - 1 and pad.size:
                views.append(memoryview(pad))  # type: ignore[arg-type]
            views.append(memoryview(crcs[4 * j: 4 * j + 4]))  # type: ignore[arg-type]
        offset = 0
        for b in range(0, len(views), self.IOV_BATCH):
            batch = views[b: b + self.IOV_BATCH]
            want = sum(v.nbytes for v in batch)
            got = os.preadv(fd, batch, offset)
            if got != want:
                raise FormatError(f"{path}: the shard is truncated ({offset + got} of {offset + want} bytes); the store is damaged")
            offset += want
        stored = crcs.view("<u4")
        for j in range(n):
            start = j * payload
            if j < n - 1:
                crc = crc32c.crc32c(dest[start: start + payload])  # type: ignore[arg-type]
            else:
                crc = crc32c.crc32c(pad, crc32c.crc32c(dest[start:]))  # type: ignore[arg-type]
            if crc != int(stored[j]):
                raise FormatError(f"{path}: inner chunk {j} fails its crc32c check; the store is damaged")

    def write(self, index: int, row: np.ndarray) -> None:
        """Write row ``index`` (``width`` values) as its shard file, as zarr-python lays it out:
        every inner chunk (the last padded with the fill value 0) followed by its crc32c, then
        the index (offset, nbytes per chunk, little-endian u64) and its crc32c. Every chunk is
        written, even one of zeros (zarr would skip it; readers read both the same). zarr-python
        encodes a shard chunk by chunk through its codec pipeline, ~20 us per chunk: a 9.6 MB row
        of 16 KiB chunks took 320 ms, this takes a few ms. Plain (uncompressed) packs only."""
        if self.zstd:
            raise ValueError(f"{self.path}: compressed packs are written by zarr-python")
        if not (0 <= index < self.rows):
            raise ValueError(f"{self.path}: row {index} is outside the array's {self.rows} rows")
        row = np.ascontiguousarray(row, dtype=self.dtype.newbyteorder("<")).reshape(-1)
        if row.size != self.width:
            raise ValueError(f"{self.path}: a row has {self.width} values, not {row.size}")
        payload = self.chunk * self.dtype.itemsize
        n = self.n_chunks
        step = payload + 4
        buf = np.zeros(n * step + n * 16 + 4, dtype=np.uint8)
        body = buf[: n * step].reshape(n, step)
        data = row.view(np.uint8)
        full, rest = divmod(data.size, payload)
        body[:full, :payload] = data[: full * payload].reshape(full, payload)
        if rest:
            body[full, :rest] = data[full * payload:]
        crcs = body[:, payload:].view("<u4").reshape(n)
        for j in range(n):
            crcs[j] = crc32c.crc32c(body[j, :payload])  # type: ignore[arg-type]  # numpy stubs: no __buffer__ < 3.12
        index_view = buf[n * step: n * step + n * 16].view("<u8").reshape(n, 2)
        index_view[:, 0] = np.arange(n, dtype=np.uint64) * step
        index_view[:, 1] = step
        buf[-4:] = np.frombuffer(crc32c.crc32c(buf[n * step: -4]).to_bytes(4, "little"), dtype=np.uint8)  # type: ignore[arg-type]  # numpy stubs: no __buffer__ < 3.12
        path = self.shard_file(index)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(memoryview(buf))  # type: ignore[arg-type]  # numpy stubs: no __buffer__ < 3.12

    def _frames_in_order(self, entries: np.ndarray, end: int) -> bool:
        """Whether every inner chunk is present, one after the other from offset 0 (as written)."""
        offsets, sizes = entries[:, 0], entries[:, 1]
        if (offsets == EMPTY).any() or (sizes < 4).any():
            return False
        return bool((offsets == np.cumsum(sizes) - sizes).all()) and int(sizes.sum()) <= end

    def _read_frames(self, fd: int, path: str, entries: np.ndarray, dest: np.ndarray, payload: int) -> None:
        """Compressed chunks stored back to back (:meth:`_frames_in_order`): one read, then each
        chunk decoded by :meth:`_decode_chunk`."""
        total = int(entries[:, 1].sum())
        raw = os.pread(fd, total, 0)
        if len(raw) != total:
            raise FormatError(f"{path}: the shard is truncated ({len(raw)} of {total} bytes); the store is damaged")
        view, nbytes, spans = memoryview(raw), dest.size, entries.tolist()

        def run(part: range) -> None:
            for j in part:
                start = j * payload
                if start < nbytes:  # (chunks wholly beyond the row: none as written)
                    at, size = spans[j]
                    self._decode_chunk(path, j, view[at: at + size], dest[start: start + payload], payload)

        n = self.n_chunks
        threads = _decompress_pool() if n >= PARALLEL_FRAMES else None
        if threads is None:
            run(range(n))
            return
        pool, k = threads
        for f in [pool.submit(run, range(i, n, k)) for i in range(k)]:
            f.result()  # re-raises a worker's FormatError

    @classmethod
    def _read_compressed(cls, fd: int, path: str, j: int, offset: int, nbytes: int, end: int, dest: np.ndarray, payload: int) -> None:
        if nbytes < 4 or offset + nbytes > end:
            raise FormatError(f"{path}: inner chunk {j} has {nbytes} bytes at offset {offset}, outside the shard; the store is damaged")
        raw = os.pread(fd, nbytes, offset)
        if len(raw) != nbytes:
            raise FormatError(f"{path}: inner chunk {j} is truncated ({len(raw)} of {nbytes} bytes); the store is damaged")
        cls._decode_chunk(path, j, memoryview(raw), dest, payload)

    @staticmethod
    def _decode_chunk(path: str, j: int, chunk: memoryview, dest: np.ndarray, payload: int) -> None:
        """Inner chunk ``j`` (a zstd frame and its crc32c) checked, decompressed (on its own: its
        size is checked before it is kept) and its first ``dest.size`` bytes put in ``dest``."""
        from numcodecs import zstd

        if crc32c.crc32c(chunk[:-4]) != int.from_bytes(chunk[-4:], "little"):
            raise FormatError(f"{path}: inner chunk {j} fails its crc32c check; the store is damaged")
        try:
            full = np.frombuffer(zstd.decompress(chunk[:-4]), dtype=np.uint8)
        except Exception as e:
            raise FormatError(f"{path}: inner chunk {j} is not a valid zstd frame ({e}); the store is damaged") from e
        if full.size != payload:
            raise FormatError(f"{path}: inner chunk {j} decompresses to {full.size} bytes, not {payload}; the store is damaged")
        dest[...] = full[: dest.size]


def write_row(zstore, arr, index: int, row: np.ndarray) -> None:
    """Row ``index`` of the pack array ``arr`` := ``row``: straight into its shard file where
    :func:`row_reader` knows the layout and the store is a writable local folder of a plain
    (uncompressed) pack, else through zarr-python."""
    rr = row_reader(zstore, arr.path, arr) if not getattr(zstore, "read_only", True) else None
    if rr is not None and not rr.zstd and 0 <= index < rr.rows:
        rr.write(index, row)
    else:
        arr[index, :] = row


def row_reader(zstore, path: str, arr) -> RowReader | None:
    """A :class:`RowReader` for the zarr array ``arr`` at ``path``, or None when its layout is not
    exactly: a local directory store, 2-D, one ``sharding_indexed`` codec with inner codecs
    ``bytes`` (little endian) [+ ``zstd``] + ``crc32c``, index codecs ``bytes`` + ``crc32c``, index at the end, one shard
    per row spanning all its columns, fill value 0."""
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
    from zarr.codecs.sharding import ShardingCodecIndexLocation
    from zarr.storage import LocalStore

    try:
        if type(zstore) is not LocalStore:
            return None
        md = arr.metadata
        if getattr(md, "zarr_format", None) != 3 or len(md.shape) != 2 or len(md.codecs) != 1:
            return None
        sc = md.codecs[0]
        if not isinstance(sc, ShardingCodec) or sc.index_location != ShardingCodecIndexLocation.end:
            return None

        def plain(codecs) -> bool:
            return (len(codecs) == 2 and isinstance(codecs[0], BytesCodec) and isinstance(codecs[1], Crc32cCodec)
                    and (codecs[0].endian is None or codecs[0].endian.value == "little"))

        inner = list(sc.codecs)
        zstd = len(inner) == 3 and isinstance(inner[1], ZstdCodec) and not inner[1].checksum
        if zstd:
            del inner[1]
        if not (plain(inner) and plain(sc.index_codecs)):
            return None
        shard = tuple(md.chunk_grid.chunk_shape)
        chunk = tuple(sc.chunk_shape)
        rows, width = md.shape
        if shard[0] != 1 or chunk[0] != 1 or shard[1] < width or shard[1] % chunk[1]:
            return None
        dtype = np.dtype(arr.dtype)
        if dtype.byteorder == ">" or dtype.kind not in "fiub" or float(np.asarray(md.fill_value, dtype=dtype)) != 0:
            return None
        return RowReader(str(zstore.root), path, (rows, width), dtype, chunk[1], shard[1], md.encode_chunk_key, zstd)
    except Exception:  # any metadata this reader does not know: zarr-python reads it
        return None


class ChunkedReader:
    """Reads a whole array whose chunks are blocks of whole rows (chunk shape ``(r, *shape[1:])``),
    each stored as its little-endian bytes (the edge chunk padded to full size) and a crc32c:
    from the files under ``folder``, or, with ``zip`` (an open ``zipfile.ZipFile``), from the
    members under the name ``folder``."""

    def __init__(self, folder: str, shape: tuple[int, ...], dtype: np.dtype, rows: int, zip=None):
        self.folder, self.shape, self.dtype, self.rows, self.zip = folder, shape, np.dtype(dtype), rows, zip

    def read_into(self, out: np.ndarray) -> np.ndarray:
        """The array into ``out`` (``shape``, ``dtype``, C-contiguous); a chunk never written
        reads as the fill value 0, as in zarr."""
        if out.dtype != self.dtype or out.shape != self.shape or not out.flags.c_contiguous:
            raise ValueError(f"{self.folder}: the buffer must be a contiguous {self.dtype} array of shape {list(self.shape)}")
        if out.size == 0:
            return out
        dest = out.reshape(-1).view(np.uint8)
        payload = self.rows * (dest.size // self.shape[0])
        tail = np.empty(payload + 4, dtype=np.uint8)  # the edge chunk's padding, and the checksum
        keys = (len(self.shape) - 1) * ["0"]
        for j in range(-(-self.shape[0] // self.rows)):
            start, stop = j * payload, min((j + 1) * payload, dest.size)
            key = "/".join(["c", str(j), *keys])
            extra = payload - (stop - start)
            got = self._read_zip(key, dest[start:stop], tail[: extra + 4]) if self.zip else self._read_file(key, dest[start:stop], tail[: extra + 4])
            if not got:
                dest[start:stop] = 0
                continue
            crc = crc32c.crc32c(tail[:extra], crc32c.crc32c(dest[start:stop]))  # type: ignore[arg-type]  # numpy stubs: no __buffer__ < 3.12
            if crc != int.from_bytes(tail[extra: extra + 4].tobytes(), "little"):
                raise FormatError(f"{self._name(key)}: chunk fails its crc32c check; the store is damaged")
        return out

    def _name(self, key: str) -> str:
        return f"{self.folder}/{key}" if self.zip else os.path.join(self.folder, *key.split("/"))

    def _check_size(self, key: str, size: int, want: int) -> None:
        if size != want:
            raise FormatError(f"{self._name(key)}: chunk of {size} bytes, not the {want} an uncompressed chunk with "
                              "its checksum takes; the store is damaged")

    def _read_file(self, key: str, dest: np.ndarray, tail: np.ndarray) -> bool:
        """The chunk's bytes into ``dest`` then ``tail``; False when it was never written."""
        path = self._name(key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        except OSError as e:
            raise FormatError(f"{path}: chunk cannot be read ({e.strerror or e}); the store is damaged") from e
        try:
            size = os.fstat(fd).st_size
            self._check_size(key, size, dest.size + tail.size)
            got = os.preadv(fd, [memoryview(dest), memoryview(tail)], 0)  # type: ignore[arg-type]  # numpy stubs: no __buffer__ < 3.12
        finally:
            os.close(fd)
        if got != size:
            raise FormatError(f"{path}: chunk is truncated ({got} of {size} bytes); the store is damaged")
        return True

    def _read_zip(self, key: str, dest: np.ndarray, tail: np.ndarray) -> bool:
        try:
            info = self.zip.getinfo(self._name(key))
        except KeyError:
            return False
        self._check_size(key, info.file_size, dest.size + tail.size)
        try:
            raw = self.zip.read(info)
        except Exception as e:  # zipfile's own CRC, a truncated archive, ...
            raise FormatError(f"{self._name(key)}: chunk cannot be read ({e}); the store is damaged") from e
        dest[...] = np.frombuffer(raw, np.uint8, count=dest.size)
        tail[...] = np.frombuffer(raw, np.uint8, offset=dest.size)
        return True


#: keys of an array's zarr.json that the direct reader understands; any other sends it to zarr
_DOC_KEYS = frozenset({"zarr_format", "node_type", "shape", "data_type", "chunk_grid", "chunk_key_encoding",
                       "fill_value", "codecs", "attributes", "dimension_names", "storage_transformers"})


def chunked_reader(folder: str, doc: dict, dtypes: frozenset, max_chunk_bytes: int, zip: zipfile.ZipFile | None = None) -> ChunkedReader | None:
    """A :class:`ChunkedReader` for the array in ``folder`` (of ``zip``) whose parsed zarr.json is ``doc``, or
    None when the document is not exactly the plain layout (the caller then uses zarr-python,
    which applies its own checks). ``dtypes``: the data types allowed; a chunk above
    ``max_chunk_bytes`` is left to the caller's checks too."""
    try:
        if not isinstance(doc, dict) or not set(doc) <= _DOC_KEYS or doc.get("storage_transformers"):
            return None
        if doc.get("zarr_format") != 3 or doc.get("node_type") != "array" or doc.get("data_type") not in dtypes:
            return None
        dtype = np.dtype(doc["data_type"])
        shape, grid = doc.get("shape"), doc.get("chunk_grid")
        if not isinstance(grid, dict) or grid != {"name": "regular", "configuration": {"chunk_shape": grid["configuration"]["chunk_shape"]}}:
            return None
        chunks = grid["configuration"]["chunk_shape"]
        if (not isinstance(shape, list) or not isinstance(chunks, list) or not shape or len(chunks) != len(shape)
                or not all(type(x) is int and x >= 0 for x in shape) or not all(type(x) is int and x >= 1 for x in chunks)):
            return None
        if chunks[1:] != shape[1:] or doc.get("chunk_key_encoding") != {"name": "default", "configuration": {"separator": "/"}}:
            return None
        fill = doc.get("fill_value")
        if type(fill) not in (int, float, bool) or fill != 0:
            return None
        codecs = doc.get("codecs")
        if not isinstance(codecs, list) or len(codecs) != 2:
            return None
        b, c = codecs
        if b.get("name") != "bytes" or set(b) - {"name", "configuration"} or c.get("name") != "crc32c" or set(c) - {"name", "configuration"}:
            return None
        if (b.get("configuration") or {}) not in ({}, {"endian": "little"}) or (c.get("configuration") or {}) != {}:
            return None
        if (b.get("configuration") or {}).get("endian") is None and dtype.itemsize > 1:
            return None
        if math.prod(chunks) * dtype.itemsize > max_chunk_bytes:
            return None
        return ChunkedReader(folder, tuple(shape), dtype, chunks[0], zip)
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def read_doc(path: str, limit: int, zip: zipfile.ZipFile | None = None) -> dict | None:
    """The parsed JSON document at ``path`` (a member of ``zip`` when given); None when absent.
    Raises FormatError when it is larger than ``limit`` bytes (before reading it) or not JSON."""

    def size_ok(size: int) -> None:
        if size > limit:
            raise FormatError(f"{path} is {size} bytes, above the {limit}-byte limit for array metadata; refusing to "
                              "parse it (the store is damaged or hostile)")

    try:
        if zip is not None:
            info = zip.getinfo(path)
            size_ok(info.file_size)
            raw = zip.read(info)
        else:
            with open(path, "rb") as f:
                size_ok(os.fstat(f.fileno()).st_size)
                raw = f.read(limit + 1)
    except (KeyError, FileNotFoundError):
        return None
    except FormatError:
        raise
    except Exception as e:  # a directory in its place, a damaged archive, ...
        raise FormatError(f"{path} cannot be read ({e}); the store is damaged") from e
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{path} is not valid JSON ({e}); the store is damaged") from e
