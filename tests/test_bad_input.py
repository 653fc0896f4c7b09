"""Hostile and broken input, one test per kind, through the API and the CLI.

Each refused input must give the library's own error naming what was wrong and where, a
non-zero CLI exit with one line on stderr (no traceback), and damage nothing: sources are
unchanged, no store (or temporary folder) appears, an existing store still validates.
Inputs that are merely unusual (one model, integer tensors, odd names) must work exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import uwsfmt
from uwsfmt import cli

from .conftest import write_family as write

# ---------------------------------------------------------------------------- helpers


def family(n: int = 3, seed: int = 0, **extra) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(32, 32, generator=g)
    u = torch.linalg.qr(torch.randn(32, 2, generator=g))[0]
    fam = {}
    for i in range(n):
        fam[f"m{i}"] = {"w": base + 0.1 * u @ torch.randn(2, 32, generator=g), "b": torch.randn(8, generator=g), **extra}
    return fam


def digest(paths) -> dict[str, str]:
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths if Path(p).is_file()}


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def refused(capsys, api, argv, error, *fragments, rc=2):
    """``api()`` raises ``error`` and ``uwsfmt argv`` exits ``rc`` with one line; both name every fragment."""
    with pytest.raises(error) as e:
        api()
    msg = str(e.value)
    for f in fragments:
        assert str(f) in msg, (f, msg)
    code, out, err = run_cli(capsys, *argv)
    assert code == rc, (code, out, err)
    assert "Traceback" not in err and "internal error" not in err
    for f in fragments:
        assert str(f) in err, (f, err)
    return msg


@pytest.fixture
def srcs(tmp_path):
    return write(tmp_path / "src", family())


@pytest.fixture
def store(tmp_path, srcs):
    uwsfmt.convert(srcs, tmp_path / "s.uws", rank=2).close()
    return tmp_path / "s.uws"


@pytest.fixture(autouse=True)
def nothing_damaged(request, tmp_path):
    """After each test: every file it wrote before the refusal is unchanged, no temporary folder is left."""
    yield
    left = [p for p in tmp_path.rglob(".*uws-building-*")] + [p for p in tmp_path.rglob("*.uws-convert.lock")]
    assert not left, left


def assert_no_store(path: Path):
    assert not path.exists()
    assert not list(path.parent.glob(f".{path.name}*"))


# ---------------------------------------------------------------------------- broken checkpoints


def _truncations(data: bytes) -> dict[str, tuple[bytes, str]]:
    (n,) = struct.unpack("<Q", data[:8])
    return {
        "inside the length field": (data[:5], "shorter than its 8-byte header length"),
        "inside the header": (data[: 8 + n // 2], "does not fit the file"),
        "inside the data": (data[:-10], "tensor data ends past the end of the file"),
    }


@pytest.mark.parametrize("where", ["inside the length field", "inside the header", "inside the data"])
def test_truncated_safetensors(tmp_path, srcs, capsys, where):
    bad = tmp_path / "src" / "m1.safetensors"
    data, expect = _truncations(bad.read_bytes())[where]
    bad.write_bytes(data)
    before = digest(srcs)
    out = tmp_path / "out.uws"
    refused(capsys, lambda: uwsfmt.convert(srcs, out), ["convert", *srcs, "-o", out, "-q"], uwsfmt.SourceError, bad, expect)
    assert_no_store(out) or True
    assert digest(srcs) == before


@pytest.mark.parametrize("header, expect", [
    (b"{\xff\xfe not json", "corrupt safetensors header"),
    (b"[1, 2, 3]", "not a JSON object"),
    (b'{"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": ["a", 16]}}', "data_offsets"),
    (b'{"w": {"dtype": "F32", "shape": [-2, 2], "data_offsets": [0, 16]}}', "shape"),
    (b'{"w": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 16]}}', "do not hold shape"),
    (b'{"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 0]}}', "data_offsets"),
    (b'{"w": {"dtype": "C64", "shape": [2, 2], "data_offsets": [0, 16]}}', "unsupported dtype C64"),
    (b'{"__metadata__": [1], "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}', "__metadata__"),
    (b"[" * 100000 + b"]" * 100000, "corrupt safetensors header"),
])
def test_corrupt_safetensors_header(tmp_path, srcs, capsys, header, expect):
    bad = tmp_path / "src" / "m1.safetensors"
    bad.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    out = tmp_path / "out.uws"
    refused(capsys, lambda: uwsfmt.convert(srcs, out), ["convert", *srcs, "-o", out, "-q"], uwsfmt.SourceError, bad, expect)
    assert_no_store(out)


@pytest.mark.parametrize("name, data, expect", [
    ("png.safetensors", b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "not a valid safetensors file"),
    ("zip.safetensors", b"PK\x03\x04" + b"\0" * 64, "not a valid safetensors file"),
    ("random.pt", b"\x17\x99garbage" * 8, "refused to load"),
    ("notes.txt", b"hello", "not a checkpoint uwsfmt recognises"),
])
def test_wrong_magic_sources(tmp_path, srcs, capsys, name, data, expect):
    bad = tmp_path / "src" / name
    bad.write_bytes(data)
    out = tmp_path / "out.uws"
    refused(capsys, lambda: uwsfmt.convert([*srcs, str(bad)], out), ["convert", *srcs, bad, "-o", out, "-q"],
            uwsfmt.SourceError, bad, expect)
    assert_no_store(out)


@pytest.mark.parametrize("kind", ["png file", "garbage zarr.json", "zarr v2 group", "zarr group without uws", "empty folder"])
def test_wrong_magic_stores(tmp_path, capsys, kind):
    p = tmp_path / "x.uws"
    if kind == "png file":
        p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
        expect = "not a UWS store"
    else:
        p.mkdir()
        expect = {"garbage zarr.json": "not a readable Zarr v3 group", "zarr v2 group": "no zarr.json",
                  "zarr group without uws": "not a UWS store (no 'uws' attribute", "empty folder": "no zarr.json"}[kind]
        if kind == "garbage zarr.json":
            (p / "zarr.json").write_bytes(b"\x00\x01{{{")
        elif kind == "zarr v2 group":
            (p / ".zgroup").write_text('{"zarr_format": 2}')
        elif kind == "zarr group without uws":
            (p / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    for cmd in (["info", p], ["validate", p], ["export", p, "m0", "-o", tmp_path / "o.safetensors"], ["append", p, p]):
        refused(capsys, lambda: uwsfmt.open(p), cmd, uwsfmt.FormatError, p, expect)
    assert not (tmp_path / "o.safetensors").exists()


# ---------------------------------------------------------------------------- values


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("tensor", ["w", "b"])  # a subspace tensor, a dense one
def test_nonfinite_weights_refused_by_default(tmp_path, capsys, value, tensor):
    fam = family()
    fam["m1"][tensor] = fam["m1"][tensor].clone()
    fam["m1"][tensor].view(-1)[3] = value
    srcs = write(tmp_path / "src", fam)
    out = tmp_path / "out.uws"
    refused(capsys, lambda: uwsfmt.convert(srcs, out, rank=2), ["convert", *srcs, "-o", out, "-q", "--rank", "2"],
            uwsfmt.SourceError, srcs[1], repr(tensor), "'m1'", "NaN or Inf", "--allow-nonfinite")
    assert_no_store(out)
    # the option stores them dense, bit-exact
    st = uwsfmt.convert(srcs, out, rank=2, allow_nonfinite=True)
    e = st.tensor_entry(tensor)
    assert e["encoding"] == "dense"
    got = st.state_dict("m1")[tensor]
    assert torch.equal(got.view(torch.int32), fam["m1"][tensor].contiguous().view(torch.int32))
    assert st.validate(deep=True) == []
    st.close()
    code, _, err = run_cli(capsys, "convert", *srcs, "-o", tmp_path / "cli.uws", "-q", "--rank", "2", "--allow-nonfinite")
    assert code == 0, err
    # appending a model with NaN into a store built without the option is refused, store intact
    fam2 = family(n=4)
    fam2["m3"]["w"][0, 0] = value
    late = write(tmp_path / "late", {"m3": fam2["m3"]})[0]
    clean = tmp_path / "clean.uws"
    uwsfmt.convert(write(tmp_path / "ok", family()), clean, rank=2).close()
    refused(capsys, lambda: uwsfmt.append(str(clean), late), ["append", clean, late], uwsfmt.SourceError, late, "NaN or Inf")
    assert uwsfmt.validate(str(clean)) == [] and uwsfmt.open(clean).n_models == 3


# ---------------------------------------------------------------------------- families that do not fit


def test_shape_conflicts(tmp_path, store, capsys):
    fam = family()
    fam["m1"]["w"] = fam["m1"]["w"][:, :16].contiguous()
    srcs = write(tmp_path / "varying", fam)
    out = tmp_path / "out.uws"
    # a shape that varies is allowed (stored dense per model) unless an encoding forces otherwise
    refused(capsys, lambda: uwsfmt.convert(srcs, out, encodings={"w": "subspace"}),
            ["convert", *srcs, "-o", out, "-q", "--encoding", "w=subspace"], uwsfmt.ConflictError, "'w'", "different shapes")
    assert_no_store(out)
    late = write(tmp_path / "late", {"m9": fam["m1"]})[0]
    refused(capsys, lambda: uwsfmt.append(str(store), late), ["append", store, late], uwsfmt.ConflictError,
            late, "'w'", "[32, 16]", "[32, 32]")
    base = write(tmp_path / "base", {"base": fam["m1"]})[0]
    good = write(tmp_path / "good", family())
    refused(capsys, lambda: uwsfmt.convert(good, out, base=base), ["convert", *good, "-o", out, "-q", "--base", base],
            uwsfmt.ConflictError, base, "'w'", "not the base")
    assert_no_store(out)
    assert uwsfmt.validate(str(store)) == [] and uwsfmt.open(store).n_models == 3


def test_dtype_and_missing_tensor_conflicts(tmp_path, capsys):
    fam = family()
    fam["m1"]["w"] = fam["m1"]["w"].half()
    del fam["m2"]["b"]
    srcs = write(tmp_path / "src", fam)
    out = tmp_path / "out.uws"
    msg = refused(capsys, lambda: uwsfmt.convert(srcs, out), ["convert", *srcs, "-o", out, "-q"], uwsfmt.ConflictError,
                  "'w' has different dtypes", "'b' is missing from 1 model(s): m2")
    assert msg.count("\n  - ") == 2  # every conflict listed at once
    assert_no_store(out)


def test_duplicate_model_ids(tmp_path, store, capsys):
    a = write(tmp_path / "a", {"m": family()["m0"]})
    b = write(tmp_path / "b", {"m": family()["m1"]})
    out = tmp_path / "out.uws"
    refused(capsys, lambda: uwsfmt.convert(a + b, out), ["convert", *a, *b, "-o", out, "-q"], uwsfmt.ConflictError,
            "model id 'm' is used by 2 sources")
    assert_no_store(out)
    late = write(tmp_path / "late", {"m0": family(seed=5)["m0"]})[0]
    refused(capsys, lambda: uwsfmt.append(str(store), late), ["append", store, late], uwsfmt.ConflictError,
            "'m0' is already in the store", "--id")
    assert uwsfmt.open(store).n_models == 3


def test_empty_source_lists(tmp_path, capsys):
    out = tmp_path / "out.uws"
    for empty in ([], {}, ()):
        with pytest.raises(uwsfmt.SourceError, match="no source checkpoints given"):
            uwsfmt.convert(empty, out)
    (tmp_path / "empty").mkdir()
    refused(capsys, lambda: uwsfmt.convert([str(tmp_path / "empty")], out), ["convert", tmp_path / "empty", "-o", out],
            uwsfmt.SourceError, tmp_path / "empty", "holds no checkpoint")
    pattern = str(tmp_path / "nothing-*.safetensors")
    refused(capsys, lambda: uwsfmt.convert([pattern], out), ["convert", pattern, "-o", out], uwsfmt.SourceError, pattern,
            "matches no file")
    with pytest.raises(SystemExit) as e:  # argparse: sources are required
        cli.main(["convert", "-o", str(out)])
    assert e.value.code == 2
    assert "the following arguments are required: sources" in capsys.readouterr().err
    assert_no_store(out)


# ---------------------------------------------------------------------------- unusual but valid


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def test_a_family_of_one_model(tmp_path, capsys):
    fam = {"only": family()["m0"]}
    srcs = write(tmp_path / "src", fam)
    st = uwsfmt.convert(srcs, tmp_path / "s.uws")
    sd = st.state_dict("only")
    assert all(_same(sd[k], v) for k, v in fam["only"].items())  # the mean is the model: exact
    assert st.validate(deep=True) == []
    late = write(tmp_path / "late", {"late": family()["m1"]})[0]
    st.append(late)
    assert st.n_models == 2 and uwsfmt.validate(str(tmp_path / "s.uws"), deep=True) == []
    code, _, err = run_cli(capsys, "convert", *srcs, "-o", tmp_path / "cli.uws", "-q")
    assert code == 0, err


def test_integer_bool_zero_and_empty_tensors(tmp_path, capsys):
    extra = {"i8": torch.arange(-5, 5, dtype=torch.int8), "i32": torch.arange(40, dtype=torch.int32).reshape(5, 8),
             "i64": torch.tensor([2**62, -(2**62)]), "u8": torch.arange(200, 256, dtype=torch.uint8),
             "mask": torch.tensor([True, False, True]), "zeros": torch.zeros(32, 32), "empty": torch.zeros(0, 4),
             "scalar": torch.tensor(3.5), "half": torch.full((4, 4), 0.5, dtype=torch.float16)}
    fam = family(**extra)
    fam["m1"] = dict(fam["m1"], mask=torch.tensor([False, False, True]), i32=fam["m1"]["i32"] + 1)
    srcs = write(tmp_path / "src", fam)
    for st in (uwsfmt.convert(srcs, tmp_path / "s.uws", rank=2), uwsfmt.convert(fam, tmp_path / "mem.uws", rank=2)):
        for mid, sd in fam.items():
            got = st.state_dict(mid)
            for k, v in sd.items():
                if k == "w":
                    assert torch.allclose(got[k], v, atol=1e-5)
                else:
                    assert _same(got[k], v), (mid, k)
        assert st.validate(deep=True) == []
        st.close()
    code, _, err = run_cli(capsys, "convert", *srcs, "-o", tmp_path / "cli.uws", "-q", "--rank", "2")
    assert code == 0, err
    code, _, err = run_cli(capsys, "export", tmp_path / "cli.uws", "m1", "-o", tmp_path / "m1.safetensors")
    assert code == 0, err
    back = load_file(str(tmp_path / "m1.safetensors"))
    assert all(_same(back[k], fam["m1"][k]) for k in extra)


def test_a_rank_larger_than_possible(tmp_path, srcs, capsys):
    st = uwsfmt.convert(srcs, tmp_path / "s.uws", rank=10**6)
    e = st.tensor_entry("w")
    assert max(r or 0 for r in e["rank"]) <= 2  # 3 models around their mean: 2 directions at most
    assert st.validate(deep=True) == []
    code, _, err = run_cli(capsys, "convert", *srcs, "-o", tmp_path / "cli.uws", "-q", "--rank", "1000000")
    assert code == 0, err
    refused(capsys, lambda: uwsfmt.convert(srcs, tmp_path / "neg.uws", rank=-1),
            ["convert", *srcs, "-o", tmp_path / "neg.uws", "--rank", "-1"], uwsfmt.ConfigError, "rank must be a non-negative integer")


@pytest.mark.parametrize("device, expect", [("gpu0", "is not a torch device"), ("cuda:past-the-last", "CUDA GPU")])
def test_a_device_torch_does_not_have(tmp_path, srcs, store, capsys, device, expect):
    if device == "cuda:past-the-last":  # one index past the GPUs torch sees (cuda:0 where it sees none)
        device = f"cuda:{torch.cuda.device_count()}"
    before = digest(store.rglob("*"))
    refused(capsys, lambda: uwsfmt.convert(srcs, tmp_path / "d.uws", rank=2, device=device),
            ["convert", *srcs, "-o", tmp_path / "d.uws", "--rank", "2", "-q", "--device", device], uwsfmt.ConfigError, device, expect)
    assert_no_store(tmp_path / "d.uws")
    refused(capsys, lambda: uwsfmt.open(store, mode="a").append(srcs[0], id="again", device=device),
            ["append", store, srcs[0], "--id", "again", "--device", device], uwsfmt.ConfigError, device, expect)
    with uwsfmt.open(store) as st:
        for read in (lambda: st.state_dict(0, device=device), lambda: st.tensor(0, "w", device=device)):
            with pytest.raises(uwsfmt.ConfigError, match=expect):
                read()
        assert st.n_models == 3
    assert digest(store.rglob("*")) == before


def test_appending_models_that_do_not_fit_the_store(tmp_path, store, capsys):
    """Every problem of every source at once, before anything is written; a tensor the store does
    not hold is refused, not silently dropped."""
    fam = family()
    extra = {**fam["m0"], "new.head": torch.randn(4, 4)}
    narrow = {**fam["m1"], "w": torch.randn(32, 16)}
    paths = write(tmp_path / "more", {"x1": extra, "x2": narrow})
    content = lambda: digest(p for p in store.rglob("*") if p.name != ".uws.lock")  # noqa: E731 (the lock file is not content)
    before = content()
    refused(capsys, lambda: uwsfmt.open(store, mode="a").extend(paths), ["append", store, *paths], uwsfmt.ConflictError,
            "2 of the 2 source(s) do not fit", "'new.head'", "would be lost", "has shape [32, 16], the store holds [32, 32]")
    with pytest.raises(uwsfmt.ConflictError, match="would be lost"):
        uwsfmt.open(store).project(paths[0])
    assert content() == before and uwsfmt.validate(store, deep=True) == []
    # the dry run says the same from the headers, exit 1
    rep = uwsfmt.open(store).plan_append(paths)
    assert rep["new"] == ["x1", "x2"] and len(rep["conflicts"]) == 2 and "would be lost" in rep["conflicts"][0]
    code, out, _ = run_cli(capsys, "append", store, *paths, "--dry-run")
    assert code == 1 and "2 new, 0 already in" in out and out.count("CONFLICT") == 2
    assert content() == before


# ---------------------------------------------------------------------------- broken stores


def edit_manifest(store: Path, change) -> None:
    doc = json.loads((store / "zarr.json").read_text())
    change(doc["attributes"]["uws"])
    (store / "zarr.json").write_text(json.dumps(doc))


def test_a_tampered_rank_larger_than_possible(store, capsys):
    def bump(m):
        e = next(t for t in m["tensors"] if t["name"] == "w")
        side = 0 if e["left"] else 1
        e["rank"][side] = 1000
    edit_manifest(store, bump)
    refused(capsys, lambda: uwsfmt.open(store).state_dict("m0"), ["export", store, "m0", "-o", store.parent / "o.safetensors"],
            uwsfmt.FormatError, store, "the manifest implies")
    assert any("does not match ranks" in p or "shape" in p for p in uwsfmt.validate(str(store)))
    assert not (store.parent / "o.safetensors").exists()


@pytest.mark.parametrize("version, error, expect", [
    ("2.0", uwsfmt.VersionError, "UWS format 2.0 is not readable by this uwsfmt (it reads 1.x)"),
    ("99.1", uwsfmt.VersionError, "format 99.x"),
    ("banana", uwsfmt.FormatError, "not of the form 'MAJOR.MINOR'"),
    (None, uwsfmt.FormatError, "not of the form 'MAJOR.MINOR'"),
])
def test_unknown_format_version(store, capsys, version, error, expect):
    edit_manifest(store, lambda m: m.update(format_version=version))
    for cmd in (["info", store], ["validate", store], ["append", store, store]):
        refused(capsys, lambda: uwsfmt.open(store), cmd, error, store, expect)


@pytest.mark.parametrize("what", ["basis", "pack", "shared value"])
def test_missing_arrays(tmp_path, capsys, what):
    fam = family(frozen=torch.ones(4, 4))
    st = uwsfmt.convert(fam, tmp_path / "s.uws", rank=2)
    e = st.tensor_entry("w")
    path = {"basis": e["left"] or e["right"], "pack": "packs/float32", "shared value": st.tensor_entry("frozen")["data"]["path"]}[what]
    st.close()
    store = tmp_path / "s.uws"
    shutil.rmtree(store / path)
    refused(capsys, lambda: uwsfmt.open(store).state_dict("m0"), ["export", store, "m0", "-o", tmp_path / "o.safetensors"],
            uwsfmt.FormatError, store, path, "missing")
    problems = uwsfmt.validate(str(store))
    assert any(path in p and "missing" in p for p in problems), problems
    code, _, err = run_cli(capsys, "validate", store)
    assert code == 1 and "INVALID" in err and path in err
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("change, where", [
    (lambda m: m["tensors"][0].update(encoding=3), "tensors/0"),  # a name this uwsfmt does not know is §12's case, not the schema's
    (lambda m: m["models"][0].update(error="x"), "models/0/error"),
    (lambda m: m["packs"]["float32"].update(width=-1), "packs/float32/width"),
    (lambda m: m.pop("tensors"), "(root)"),
    (lambda m: m["tensors"][0].update(node="../../etc"), "tensors/0/node"),
    (lambda m: m["models"].append(dict(m["models"][0])), "the same id twice"),
    (lambda m: m["models"][0].update(error=m["models"][0]["error"][:-1]), "error values for"),
    (lambda m: m.update(state="building"), "'building'"),
])
def test_schema_invalid_metadata(store, capsys, change, where):
    edit_manifest(store, change)
    refused(capsys, lambda: uwsfmt.open(store), ["validate", store], uwsfmt.FormatError, store, where)
    refused(capsys, lambda: uwsfmt.open(store), ["info", store], uwsfmt.FormatError, store, where)


def test_oversized_metadata(store, capsys):
    arr = store / "packs" / "float32" / "zarr.json"
    doc = json.loads(arr.read_text())
    doc["attributes"] = {"pad": " " * (2 << 20)}
    arr.write_text(json.dumps(doc))
    refused(capsys, lambda: uwsfmt.open(store).state_dict("m0"), ["export", store, "m0", "-o", store.parent / "o.safetensors"],
            uwsfmt.FormatError, "packs/float32/zarr.json", "limit for array metadata")
    root = store / "zarr.json"
    with open(root, "r+b") as f:  # a sparse 300 MiB root document: refused before it is read
        f.truncate(300 << 20)
    refused(capsys, lambda: uwsfmt.open(store), ["info", store], uwsfmt.FormatError, store, "above the 268435456-byte limit")


@pytest.mark.parametrize("what", ["basis shape", "pack width", "pack dtype", "shared shape", "huge chunks"])
def test_tampered_array_shapes(tmp_path, capsys, what):
    fam = family(frozen=torch.ones(4, 4))
    st = uwsfmt.convert(fam, tmp_path / "s.uws", rank=2)
    e = st.tensor_entry("w")
    basis = e["left"] or e["right"]
    shared = st.tensor_entry("frozen")["data"]["path"]
    st.close()
    store = tmp_path / "s.uws"
    path = {"basis shape": basis, "pack width": "packs/float32", "pack dtype": "packs/float32", "shared shape": shared,
            "huge chunks": basis}[what]
    meta = store / path / "zarr.json"
    doc = json.loads(meta.read_text())
    if what == "pack dtype":
        doc["data_type"] = "int32"
    elif what == "huge chunks":
        doc["chunk_grid"]["configuration"]["chunk_shape"] = [2**40, 2**20]
    else:
        doc["shape"][-1] += 3
        doc["chunk_grid"]["configuration"]["chunk_shape"] = list(doc["shape"])
    meta.write_text(json.dumps(doc))
    expect = {"huge chunks": "limit"}.get(what, "manifest")
    refused(capsys, lambda: uwsfmt.open(store).state_dict("m0"), ["export", store, "m0", "-o", tmp_path / "o.safetensors"],
            uwsfmt.FormatError, store, path, expect)
    assert uwsfmt.validate(str(store))
    assert not (tmp_path / "o.safetensors").exists()
    if what in ("basis shape", "shared shape"):  # appending reads the bases too: checked the same way, nothing added
        with pytest.raises(uwsfmt.FormatError, match="manifest implies"):
            uwsfmt.open(store, mode="a").append(fam["m0"], id="again")
        assert json.loads((store / "zarr.json").read_text())["attributes"]["uws"]["models"][-1]["id"] == "m2"


def test_a_tampered_spectrum_length_is_refused_before_reading(tmp_path):
    st = uwsfmt.convert(family(), tmp_path / "s.uws", rank=2)
    e = st.tensor_entry("w")
    path = next(iter(e["spectrum"].values()))
    st.close()
    meta = tmp_path / "s.uws" / path / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["shape"], doc["chunk_grid"]["configuration"]["chunk_shape"] = [10**12], [1024]
    meta.write_text(json.dumps(doc))
    with uwsfmt.open(tmp_path / "s.uws") as st, pytest.raises(uwsfmt.FormatError, match="more than the 1024 values"):
        st.spectrum("w")


# ---------------------------------------------------------------------------- outputs


def test_output_path_already_exists(tmp_path, store, srcs, capsys):
    before = digest(store.rglob("*"))
    refused(capsys, lambda: uwsfmt.convert(srcs, store), ["convert", *srcs, "-o", store, "-q"], uwsfmt.StoreExistsError,
            store, "already exists", "--overwrite")
    (tmp_path / "file.uws").write_text("precious")
    refused(capsys, lambda: uwsfmt.convert(srcs, tmp_path / "file.uws"), ["convert", *srcs, "-o", tmp_path / "file.uws", "-q"],
            uwsfmt.StoreExistsError, "file.uws", "already exists")
    assert (tmp_path / "file.uws").read_text() == "precious"
    out = tmp_path / "m0.safetensors"
    out.write_text("precious")
    code, _, err = run_cli(capsys, "export", store, "m0", "-o", out)
    assert code == 2 and "exists" in err and out.read_text() == "precious"
    zipped = tmp_path / "s.zip"
    uwsfmt.pack(str(store), str(zipped))
    refused(capsys, lambda: uwsfmt.pack(str(store), str(zipped)), ["pack", store, zipped], uwsfmt.StoreExistsError, zipped, "already exists")
    refused(capsys, lambda: uwsfmt.unpack(str(zipped), str(store)), ["unpack", zipped, store], uwsfmt.StoreExistsError, store, "already exists")
    assert digest(store.rglob("*")) == before


# ---------------------------------------------------------------------------- names and ids

ODD = ["a/b", "../../evil", "..", ".", "/abs/path", "%", "%2e%2e%2f", "a%2Fb", "Ω≈ç√∫", "🦙 llama", "\u202eRTL", "zero\u200bwidth",
       "e\u0301", "x" * 1000, "A", "a", "con", "sp ace", "tab\tnew\nline", "back\\slash", "", "~1", "a~1", ".hidden", "__dunder"]


def _odd_family() -> dict:
    g = torch.Generator().manual_seed(1)
    base = {n: torch.randn(4, 4, generator=g) for n in ODD}
    base["big/../w"] = torch.randn(40, 40, generator=g)
    ids = ["id/with/slash", "../../id", "%41", "Ω-id", "y" * 1000]
    return {mid: {k: v + 0.01 * i * torch.ones_like(v) for k, v in base.items()} for i, mid in enumerate(ids)}


def _inside(root: Path, before: set[str]) -> None:
    """Everything new under ``root.parent`` is inside ``root``."""
    after = {str(p) for p in root.parent.rglob("*")}
    escaped = [p for p in after - before if not (p == str(root) or p.startswith(str(root) + os.sep))]
    assert not escaped, escaped


def test_odd_tensor_names_and_model_ids_round_trip(tmp_path, capsys):
    fam = _odd_family()
    out = tmp_path / "work" / "s.uws"
    out.parent.mkdir()
    before = {str(p) for p in tmp_path.rglob("*")}
    st = uwsfmt.convert(fam, out, rank=2, min_numel=100)
    assert st.model_ids == list(fam)
    for mid, sd in fam.items():
        got = st.state_dict(mid)
        assert set(got) == set(sd)
        for k, v in sd.items():
            assert torch.allclose(got[k], v, atol=1e-5), (mid, k)
        assert torch.allclose(st.tensor(mid, "big/../w"), sd["big/../w"], atol=1e-5)
    with pytest.raises(uwsfmt.SourceError, match="a state dict maps tensor names"):
        st.append({"../../late": fam["%41"]})  # a family where one state dict is expected
    st.append(fam["%41"], id="../../late/..")
    assert uwsfmt.validate(str(out), deep=True) == []
    st.close()
    _inside(out, before)
    # a zipped copy keeps every name; its entries are plain relative paths
    import zipfile

    uwsfmt.pack(str(out), str(tmp_path / "s.zip"))
    names = zipfile.ZipFile(tmp_path / "s.zip").namelist()
    assert all(not n.startswith("/") and ".." not in n.split("/") for n in names)
    with uwsfmt.open(tmp_path / "s.zip") as z:
        assert z.model_ids[-1] == "../../late/.." and set(z.state_dict("Ω-id")) == set(ODD) | {"big/../w"}


def test_odd_names_through_the_cli(tmp_path, capsys):
    fam = _odd_family()
    src = tmp_path / "src"
    src.mkdir()
    paths = []
    for i, sd in enumerate(fam.values()):
        paths.append(src / f"m{i}.safetensors")
        save_file({k: v.contiguous() for k, v in sd.items()}, str(paths[-1]))
    out = tmp_path / "work" / "s.uws"
    out.parent.mkdir()
    before = {str(p) for p in tmp_path.rglob("*")}
    code, _, err = run_cli(capsys, "convert", *paths[:-1], "-o", out, "-q", "--rank", "2", "--min-numel", "100")
    assert code == 0, err
    for mid in ("../../evil", "a/b", "%2e%2e", "🦙", "z" * 1000):
        code, _, err = run_cli(capsys, "append", out, paths[-1], "--id", mid)
        assert code == 0, err
    _inside(out, before)
    code, _, err = run_cli(capsys, "export", out, "../../evil", "-o", tmp_path / "e.safetensors")
    assert code == 0, err
    back = load_file(str(tmp_path / "e.safetensors"))
    assert set(back) == set(ODD) | {"big/../w"}
    code, _, err = run_cli(capsys, "validate", out, "--deep")
    assert code == 0, err


def test_names_and_ids_beyond_the_limits(tmp_path, capsys):
    fam = family()
    fam["m0"] = dict(fam["m0"], **{"n" * 5000: torch.ones(2)})
    for sd in fam.values():
        sd["n" * 5000] = torch.ones(2)
    out = tmp_path / "s.uws"
    with pytest.raises(uwsfmt.ConflictError, match="5000 characters long; the format allows at most 4096"):
        uwsfmt.convert(fam, out)
    with pytest.raises(uwsfmt.ConflictError, match="model id .* is empty"):
        uwsfmt.convert({"": family()["m0"]}, out)
    with pytest.raises(uwsfmt.ConflictError, match="not valid Unicode"):
        uwsfmt.convert({"bad\ud800": family()["m0"]}, out)
    assert_no_store(out)
    srcs = write(tmp_path / "src", family())
    uwsfmt.convert(srcs, out, rank=2).close()
    refused(capsys, lambda: uwsfmt.append(str(out), srcs[0], id="q" * 5000), ["append", out, srcs[0], "--id", "q" * 5000],
            uwsfmt.ConflictError, "at most 4096")
    assert uwsfmt.open(out).n_models == 3
