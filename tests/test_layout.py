"""The direct array writer (uwsfmt.layout) writes what zarr-python would, byte for byte."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import zarr
from zarr.storage import LocalStore, MemoryStore

from uwsfmt import layout

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
