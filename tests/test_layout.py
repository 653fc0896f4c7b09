"""The direct array writer (uwsfmt.io.layout) writes what zarr-python would, byte for byte, and
the direct array reader (uwsfmt.io.shards.chunked_reader) reads what zarr-python reads."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import zarr
from zarr.storage import LocalStore, MemoryStore

import uwsfmt
from uwsfmt.io import layout, shards
from uwsfmt.reader.manifest import MAX_CHUNK_BYTES, STORAGE_DTYPES

ARRAYS = {
    "f32_multi_chunk_edge": np.random.default_rng(0).random((3001, 1000), dtype=np.float32),  # 2 row chunks, the last padded
    "f64_vector": np.random.default_rng(1).random(77),
    "f16_3d": np.random.default_rng(2).random((3, 4, 5)).astype(np.float16),
    "u16_bf16_bits": np.arange(50, dtype=np.uint16).reshape(5, 10),
    "scalar": np.float32(3.5),
    "empty": np.zeros((0, 5), np.float32),
    "zeros": np.zeros(10, np.float32),
}


def _files(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


@pytest.mark.parametrize("name", sorted(ARRAYS))
def test_direct_writer_matches_zarr_byte_for_byte(tmp_path, name):
    data = ARRAYS[name]
    ours = LocalStore(str(tmp_path / "ours"))
    layout.write_array(ours, f"t/{name}", data, attributes={"k": name})
    assert layout._local_root(ours) is not None and layout._array_template(str(np.asarray(data).dtype), max(1, np.ndim(data)))
    written = zarr.open_array(ours, path=f"t/{name}", mode="r")
    ref_store = LocalStore(str(tmp_path / "zarr"))
    flat = np.asarray(data).reshape(1) if np.ndim(data) == 0 else np.asarray(data)
    ref = zarr.create_array(ref_store, name=f"t/{name}", shape=flat.shape, dtype=flat.dtype, chunks=written.chunks,
                            compressors=layout._compressors(str(flat.dtype)), filters=None, fill_value=0,
                            attributes={"k": name}, config={"write_empty_chunks": True})
    if flat.size:
        ref[...] = flat
    a, b = _files(tmp_path / "ours"), _files(tmp_path / "zarr")
    assert sorted(a) == sorted(b)
    for key in a:
        if key.endswith("zarr.json"):
            assert json.loads(a[key]) == json.loads(b[key]), key
        else:
            assert a[key] == b[key], key
    assert np.array_equal(written[...], flat)


def test_negative_zero_keeps_its_sign(tmp_path):
    # zarr skips a chunk equal to the fill value (-0.0 == 0) and reads it back as +0.0
    st = LocalStore(str(tmp_path / "s"))
    layout.write_array(st, "z", np.full(6, -0.0, np.float32))
    back = zarr.open_array(st, path="z", mode="r")[...]
    assert np.signbit(back).all()


def test_rewriting_an_array_leaves_no_stale_chunks(tmp_path):
    st = LocalStore(str(tmp_path / "s"))
    big = np.ones((3001, 1000), np.float32)
    layout.write_array(st, "a", big)
    assert sorted(os.listdir(tmp_path / "s" / "a" / "c")) == ["0", "1"]
    small = np.arange(4, dtype=np.float64)
    layout.write_array(st, "a", small)
    assert os.listdir(tmp_path / "s" / "a" / "c") == ["0"]
    assert np.array_equal(zarr.open_array(st, path="a", mode="r")[...], small)


def test_create_group_replaces_the_node(tmp_path):
    st = LocalStore(str(tmp_path / "s"))
    layout.write_array(st, "g/old", np.ones(3, np.float32))
    layout.create_group(st, "g", {"uws_tensor": "w"})
    g = zarr.open_group(st, path="g", mode="r")
    assert dict(g.attrs) == {"uws_tensor": "w"} and list(g.keys()) == []


def test_other_stores_and_compressed_dtypes_go_through_zarr(tmp_path):
    mem = MemoryStore()
    layout.write_array(mem, "x", np.arange(5, dtype=np.float32))
    assert np.array_equal(zarr.open_array(mem, path="x", mode="r")[...], np.arange(5, dtype=np.float32))
    assert layout._array_template("int64", 1) is None  # zstd-compressed: zarr writes it
    st = LocalStore(str(tmp_path / "s"))
    layout.write_array(st, "i", np.arange(7))
    meta = json.loads((tmp_path / "s" / "i" / "zarr.json").read_text())
    assert [c["name"] for c in meta["codecs"]] == ["bytes", "zstd", "crc32c"]
    assert np.array_equal(zarr.open_array(st, path="i", mode="r")[...], np.arange(7))


# ---------------------------------------------------------------------------- direct reads


def _reader(folder):
    return shards.chunked_reader(str(folder), json.loads((folder / "zarr.json").read_text()), STORAGE_DTYPES, MAX_CHUNK_BYTES)


@pytest.mark.parametrize("writer", ["uwsfmt", "zarr"])
@pytest.mark.parametrize("name", sorted(ARRAYS))
def test_direct_reader_reads_what_zarr_reads(tmp_path, name, writer):
    flat = np.asarray(ARRAYS[name]).reshape(1) if np.ndim(ARRAYS[name]) == 0 else np.asarray(ARRAYS[name])
    st = LocalStore(str(tmp_path / "s"))
    if writer == "uwsfmt":
        layout.write_array(st, name, ARRAYS[name])
    else:  # another writer's array of the same layout (zarr skips chunks equal to the fill value)
        rows = max(1, min(flat.shape[0], 2000))
        arr = zarr.create_array(st, name=name, shape=flat.shape, dtype=flat.dtype, chunks=(rows, *flat.shape[1:]),
                                compressors=layout._compressors(str(flat.dtype)), filters=None, fill_value=0)
        if flat.size:
            arr[...] = flat
    reader = _reader(tmp_path / "s" / name)
    assert reader is not None and reader.shape == flat.shape
    got = reader.read_into(np.full(reader.shape, 7, reader.dtype))
    ref = zarr.open_array(st, path=name, mode="r")[...]
    assert got.shape == ref.shape and got.tobytes() == ref.tobytes() == flat.tobytes()


def test_direct_reader_refuses_damaged_chunks(tmp_path):
    st = LocalStore(str(tmp_path / "s"))
    data = ARRAYS["f32_multi_chunk_edge"]
    layout.write_array(st, "a", data)
    chunk = tmp_path / "s" / "a" / "c" / "1" / "0"
    good = chunk.read_bytes()
    reader = _reader(tmp_path / "s" / "a")
    out = np.empty(reader.shape, reader.dtype)
    for bad, why in [(good[:-1], "not the"), (good[:100] + bytes([good[100] ^ 1]) + good[101:], "crc32c"),
                     (good[:-8] + bytes([good[-8] ^ 1]) + good[-7:], "crc32c")]:  # in the data, in the padding
        chunk.write_bytes(bad)
        with pytest.raises(uwsfmt.FormatError, match=why):
            reader.read_into(out)
    chunk.unlink()  # a chunk never written reads as the fill value, as in zarr
    got = reader.read_into(np.ones(reader.shape, reader.dtype))
    ref = zarr.open_array(st, path="a", mode="r")[...]
    assert np.array_equal(got, ref) and not got[-1].any() and np.array_equal(got[:1500], data[:1500])


@pytest.mark.parametrize("change", ["unknown key", "not whole rows", "zstd", "big endian", "nan fill", "sharded"])
def test_other_layouts_are_left_to_zarr(tmp_path, change):
    st = LocalStore(str(tmp_path / "s"))
    data = np.arange(60, dtype=np.float32).reshape(6, 10)
    kw = {"chunks": (2, 10), "compressors": layout._compressors("float32"), "fill_value": 0}
    if change == "not whole rows":
        kw["chunks"] = (2, 5)
    elif change == "zstd":
        kw["compressors"] = [zarr.codecs.ZstdCodec(), zarr.codecs.Crc32cCodec()]
    elif change == "big endian":
        kw["serializer"] = zarr.codecs.BytesCodec(endian="big")
    elif change == "nan fill":
        kw["fill_value"] = float("nan")
    elif change == "sharded":
        kw["shards"] = (6, 10)
    zarr.create_array(st, name="a", shape=data.shape, dtype=data.dtype, filters=None, **kw)[...] = data
    folder = tmp_path / "s" / "a"
    if change == "unknown key":
        assert _reader(folder) is not None
        doc = json.loads((folder / "zarr.json").read_text())
        doc["future_extension"] = {"must_understand": False}
        (folder / "zarr.json").write_text(json.dumps(doc))
    assert _reader(folder) is None


def test_store_reads_arrays_zarr_wrote_in_another_layout(tmp_path, family_files):
    """A store whose per-tensor arrays another writer laid out differently reads back the same."""
    uwsfmt.convert(family_files, tmp_path / "s.uws", rank=2).close()
    with uwsfmt.open(tmp_path / "s.uws") as st:
        before = st.state_dict(1)
        e = next(t for t in st.manifest["tensors"] if t["encoding"] == "subspace" and t["left"])
        left = st.read_array(e["left"])
    zs = LocalStore(str(tmp_path / "s.uws"))
    arr = zarr.create_array(zs, name=e["left"], shape=left.shape, dtype=left.dtype, chunks=(3, 1),
                            compressors=layout._compressors(str(left.dtype)), filters=None, fill_value=0, overwrite=True)
    arr[...] = left
    with uwsfmt.open(tmp_path / "s.uws") as st:
        after = st.state_dict(1)
        assert st._chunked_reader(e["left"]) is None and st._chunked_reader(e["mean"]) is not None
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_oversized_array_metadata_is_refused_before_parsing(tmp_path, family_files):
    uwsfmt.convert(family_files, tmp_path / "s.uws", rank=2).close()
    with uwsfmt.open(tmp_path / "s.uws") as st:
        e = next(t for t in st.manifest["tensors"] if t["encoding"] == "subspace" and t["left"])
    meta = tmp_path / "s.uws" / e["left"] / "zarr.json"
    meta.write_bytes(meta.read_bytes()[:-1] + b" " * (2 << 20) + b"}")
    with uwsfmt.open(tmp_path / "s.uws") as st, pytest.raises(uwsfmt.FormatError, match="limit"):
        st.state_dict(0)


def _rezip(store_dir, out, change=None):
    """A zipped copy of a directory store, ``change(name, bytes) -> bytes`` applied to each member."""
    import zipfile
    from pathlib import Path

    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as z:
        for p in sorted(Path(store_dir).rglob("*")):
            if p.is_file() and p.name != ".uws.lock":
                name = p.relative_to(store_dir).as_posix()
                z.writestr(name, change(name, p.read_bytes()) if change else p.read_bytes())


def test_zip_stores_read_directly_and_check_their_chunks(tmp_path, family_files):
    """Zipped stores take the direct reader too (their directory parsed once, not per array)."""
    uwsfmt.convert(family_files, tmp_path / "s.uws", rank=2).close()
    uwsfmt.pack(str(tmp_path / "s.uws"), str(tmp_path / "s.zip"))
    with uwsfmt.open(tmp_path / "s.uws") as d, uwsfmt.open(tmp_path / "s.zip") as z:
        e = next(t for t in d.manifest["tensors"] if t["encoding"] == "subspace" and t["left"])
        for i in range(len(d.model_ids)):
            a, b = d.state_dict(i), z.state_dict(i)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert z._chunked_reader(e["left"]) is not None and z._chunked_reader(e["left"]).zip is z._zip

    def flip(name, raw):  # one bit of the basis's first chunk; the zip's own CRC is of the flipped bytes
        return raw[:8] + bytes([raw[8] ^ 4]) + raw[9:] if name == f"{e['left']}/c/0/0" else raw

    _rezip(tmp_path / "s.uws", tmp_path / "bad.zip", flip)
    with uwsfmt.open(tmp_path / "bad.zip") as z, pytest.raises(uwsfmt.FormatError, match="crc32c"):
        z.state_dict(0)
    _rezip(tmp_path / "s.uws", tmp_path / "short.zip", lambda name, raw: raw[:-1] if name == f"{e['mean']}/c/0/0" else raw)
    with uwsfmt.open(tmp_path / "short.zip") as z, pytest.raises(uwsfmt.FormatError, match="not the"):
        z.state_dict(0)


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64", "uint8"])
@pytest.mark.parametrize("width", [1, 3, 4096, 70_001])
def test_pack_rows_written_directly_are_zarrs_bytes(tmp_path, dtype, width):
    """A pack row written straight into its shard file (build pass 2, append) is byte for byte
    the shard zarr-python writes for the same row (no all-zero chunk: zarr skips those, and both
    read the same), reads back through zarr and through the direct reader; a compressed
    (integer) pack and a store zarr does not keep in a folder go through zarr."""
    g = np.random.default_rng(width)
    row = (g.random(width) * 100 + 1).astype(dtype)
    ours, theirs = LocalStore(tmp_path / "a"), LocalStore(tmp_path / "b")
    a, b = layout.create_pack(ours, dtype, 3, width), layout.create_pack(theirs, dtype, 3, width)
    shards.write_row(ours, a, 2, row)
    b[2, :] = row
    key = ("packs", dtype, "c", "2", "0")
    assert (tmp_path / "a").joinpath(*key).read_bytes() == (tmp_path / "b").joinpath(*key).read_bytes()
    back = zarr.open_array(ours, path=f"packs/{dtype}", mode="r")
    assert np.array_equal(back[2, :], row) and not back[1, :].any()
    if dtype != "uint8":  # plain packs: the direct reader too
        rr = shards.row_reader(ours, f"packs/{dtype}", back)
        assert rr is not None and np.array_equal(rr.read_into(2, np.empty(width, dtype)), row)
        with pytest.raises(ValueError, match="values, not"):
            rr.write(0, row[:-1] if width > 1 else np.zeros(2, dtype))
    mem = MemoryStore()
    m = layout.create_pack(mem, dtype, 3, width)
    shards.write_row(mem, m, 0, row)
    assert np.array_equal(m[0, :], row)
