"""Reading one row of a pack array straight from its shard file (Zarr v3 ``sharding_indexed``).

A pack row is one shard (spec: one shard per model row). zarr-python reads it correctly but
pays a fixed cost per call (codec pipeline, event-loop hop, an extra copy) that dominates when
a model's row is small and models are switched often. This reader does the same thing with a
few system calls: it reads the shard index at the end of the file, checks its crc32c, reads
each inner chunk into the caller's buffer (``preadv``: no intermediate copy, so the buffer may
be pinned memory for a GPU copy) and checks each chunk's crc32c. The bytes are the ones
zarr-python returns; any layout it does not recognise exactly (another codec chain, several
shards per row, a non-zero fill value, a store that is not a local directory) makes
:func:`row_reader` return None and the caller uses zarr-python.

>>> reader = row_reader(store._zstore, "packs/float32", store._array("packs/float32"))  # doctest: +SKIP
>>> reader.read_into(3, np.empty(reader.width, reader.dtype))  # doctest: +SKIP
"""

from __future__ import annotations

import os

import crc32c
import numpy as np

from .errors import FormatError

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
                bufs = [memoryview(dest[start:stop]), memoryview(tail[: extra + 4])]
                got = os.preadv(fd, bufs, offset)
                if got != nbytes:
                    raise FormatError(f"{path}: inner chunk {j} is truncated ({got} of {nbytes} bytes); the store is damaged")
                crc = crc32c.crc32c(tail[:extra], crc32c.crc32c(dest[start:stop]))
                if crc != int.from_bytes(tail[extra: extra + 4].tobytes(), "little"):
                    raise FormatError(f"{path}: inner chunk {j} fails its crc32c check; the store is damaged")
        finally:
            os.close(fd)
        return out

    @staticmethod
    def _read_compressed(fd: int, path: str, j: int, offset: int, nbytes: int, end: int, dest: np.ndarray, payload: int) -> None:
        from numcodecs import Zstd

        if nbytes < 4 or offset + nbytes > end:
            raise FormatError(f"{path}: inner chunk {j} has {nbytes} bytes at offset {offset}, outside the shard; the store is damaged")
        raw = os.pread(fd, nbytes, offset)
        if len(raw) != nbytes or crc32c.crc32c(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            raise FormatError(f"{path}: inner chunk {j} fails its crc32c check; the store is damaged")
        try:
            full = np.frombuffer(Zstd().decode(raw[:-4]), dtype=np.uint8)
        except Exception as e:
            raise FormatError(f"{path}: inner chunk {j} is not a valid zstd frame ({e}); the store is damaged") from None
        if full.size != payload:
            raise FormatError(f"{path}: inner chunk {j} decompresses to {full.size} bytes, not {payload}; the store is damaged")
        dest[...] = full[: dest.size]


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
