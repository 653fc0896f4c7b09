"""Conformance with spec/uws-1.md: the checked-in examples, an independent reader, regeneration.

- the library reproduces ``spec/examples/expected`` exactly;
- ``independent_reader.py`` (tensorstore + the spec, no uwsfmt) reproduces the library's models,
  on the examples and on freshly built stores, directory or zip;
- ``make_example.py`` regenerates the same stores and expected tensors;
- both readers refuse what the spec says to refuse.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import shutil
from pathlib import Path

import jsonschema
import pytest
import torch
from safetensors import safe_open

import uwsfmt

from .independent_reader import SpecError, SpecReader

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "spec" / "examples"
STORES = ("example", "example-flat", "example-half")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny GEMMs on a shared 2-core machine: a second thread only adds contention
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def load_expected(folder: Path) -> list[tuple[dict[str, torch.Tensor], dict[str, str]]]:
    files = sorted(folder.glob("*.safetensors"), key=lambda p: int(p.stem))
    assert [int(p.stem) for p in files] == list(range(len(files))), f"{folder}: expected files must be 0..N-1"
    out = []
    for p in files:
        with safe_open(str(p), "pt") as f:
            out.append(({k: f.get_tensor(k) for k in f.keys()}, f.metadata()))
    return out


def assert_conforms(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], manifest: dict, where: str) -> None:
    """The spec's acceptance rule: exact bits except for subspace tensors, which may differ by
    float32 round-off (and one unit in the last place of the final cast)."""
    assert sorted(got) == sorted(want), where
    enc = {e["name"]: e["encoding"] for e in manifest["tensors"]}
    for name, w in want.items():
        g = got[name]
        assert (g.dtype, g.shape) == (w.dtype, w.shape), f"{where}: {name!r} is {g.dtype} {tuple(g.shape)}, expected {w.dtype} {tuple(w.shape)}"
        if enc[name] != "subspace" or torch.equal(g, w):
            assert torch.equal(g, w), f"{where}: {name!r} ({enc[name]}) is not bit-identical"
            continue
        x, y = g.double(), w.double()
        big = float(y.abs().max())
        tol = 16 * torch.finfo(torch.float32).eps * big + torch.finfo(w.dtype).eps * torch.maximum(x.abs(), y.abs())
        worst = float(((x - y).abs() - tol).max())
        assert worst <= 0, f"{where}: {name!r} differs beyond float32 round-off (by {worst:.3g} over the tolerance)"


# ---------------------------------------------------------------------------- (a) the library


@pytest.mark.parametrize("name", STORES)
def test_library_reproduces_expected_tensors_exactly(name):
    expected = load_expected(EXAMPLES / "expected" / name)
    with uwsfmt.open(EXAMPLES / f"{name}.uws") as store:
        assert store.n_models == len(expected)
        for i, (want, meta) in enumerate(expected):
            assert meta["uws.model_id"] == store.model_ids[i]
            got = store.state_dict(i)
            assert sorted(got) == sorted(want)
            for k, w in want.items():
                assert got[k].dtype == w.dtype and torch.equal(got[k], w), f"{name} model {i}: {k!r} differs from expected/"
        assert store.validate(deep=True) == []


def test_examples_cover_the_spec():
    me = _make_example_module()
    paths = {n: str(EXAMPLES / f"{n}.uws") for n in STORES}
    assert me.REQUIRED <= me.coverage(paths)
    m = json.loads((EXAMPLES / "example.uws" / "zarr.json").read_text())["attributes"]["uws"]
    assert "../not-a-path" in [x["id"] for x in m["models"]]
    assert not (EXAMPLES / "example.uws" / ".uws.lock").exists()


# ---------------------------------------------------------------------------- (b) an independent reader


def test_independent_reader_does_not_import_uwsfmt():
    tree = ast.parse((ROOT / "tests" / "independent_reader.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert "uwsfmt" not in imported and imported <= {"__future__", "json", "os", "re", "zipfile", "pathlib", "jsonschema",
                                                      "numpy", "tensorstore", "torch"}


@pytest.mark.parametrize("name", STORES)
def test_independent_reader_reconstructs_the_examples(name):
    reader = SpecReader(EXAMPLES / f"{name}.uws")
    expected = load_expected(EXAMPLES / "expected" / name)
    assert len(reader.model_ids) == len(expected)
    for i, (want, meta) in enumerate(expected):
        assert reader.model_ids[i] == meta["uws.model_id"]
        assert_conforms(reader.model(i), want, reader.manifest, f"{name} model {i}")


def test_independent_reader_reads_a_zipped_store_in_place(tmp_path):
    z = uwsfmt.pack(str(EXAMPLES / "example.uws"), str(tmp_path / "example.zip"))
    reader = SpecReader(z)
    for i, (want, _) in enumerate(load_expected(EXAMPLES / "expected" / "example")):
        assert_conforms(reader.model(i), want, reader.manifest, f"zip model {i}")


@pytest.mark.parametrize("family, bits", [("float32", 8), ("float32", 1), ("bfloat16", None)])
def test_independent_reader_matches_library_on_fresh_stores(tmp_path, family, bits):
    from uwsfmt.testing.families import synthetic_family

    shapes = {"blocks.0.attn.qkv.weight": (48, 16), "blocks.0.mlp.fc1.weight": (16, 40), "conv.weight": (8, 4, 3, 3)}
    dtype = torch.bfloat16 if family == "bfloat16" else torch.float32
    fam = synthetic_family(n_models=5, shapes=shapes, rank=3, noise=0.01, dtype=dtype, seed=2)
    store = uwsfmt.convert(fam, tmp_path / "s.uws", rank=2, residual_bits=bits, min_numel=64, device="cpu")
    subspace = [e for e in store.manifest["tensors"] if e["encoding"] == "subspace"]
    assert {e["mode"] for e in subspace} == {"left", "right"}
    assert {"shared", "dense"} <= {e["encoding"] for e in store.manifest["tensors"]}
    assert all((e["residual"] or {}).get("bits") == bits for e in subspace)
    reader = SpecReader(tmp_path / "s.uws")
    for i in range(store.n_models):
        assert_conforms(reader.model(i), store.state_dict(i), store.manifest, f"{family}/{bits} model {i}")
    store.close()


# ---------------------------------------------------------------------------- (c) regeneration


def _make_example_module():
    spec = importlib.util.spec_from_file_location("make_example", EXAMPLES / "make_example.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _structure(manifest: dict) -> list:
    """The manifest without its floats and timestamps: what a regeneration must reproduce exactly."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in {"explained_variance", "energy", "budget", "error", "delta_error",
                                                                   "error_before", "added", "reason"}}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x
    return [manifest["packs"], strip(manifest["tensors"]), strip(manifest["models"])]


def test_regeneration_reproduces_the_examples(tmp_path):
    me = _make_example_module()
    paths = me.build(str(tmp_path))
    for name in STORES:
        new, old = (json.loads((Path(p) / "zarr.json").read_text())["attributes"]["uws"]
                    for p in (paths[name], EXAMPLES / f"{name}.uws"))
        assert _structure(new) == _structure(old), f"{name}: the regenerated store is laid out differently"
        fresh = load_expected(tmp_path / "expected" / name)
        checked_in = load_expected(EXAMPLES / "expected" / name)
        assert len(fresh) == len(checked_in)
        for i, ((got, meta), (want, _)) in enumerate(zip(fresh, checked_in)):
            assert meta["uws.model_id"] == new["models"][i]["id"]
            assert_conforms(got, want, new, f"regenerated {name} model {i}")


# ---------------------------------------------------------------------------- refusals


def _tamper(tmp_path: Path, edit) -> Path:
    dst = tmp_path / "t.uws"
    shutil.copytree(EXAMPLES / "example.uws", dst)
    root = json.loads((dst / "zarr.json").read_text())
    edit(root["attributes"]["uws"])
    (dst / "zarr.json").write_text(json.dumps(root))
    return dst


def _set(path: list, value):
    def edit(m):
        x = m
        for k in path[:-1]:
            x = x[k]
        x[path[-1]] = value
    return edit


@pytest.mark.parametrize("what, edit", [
    ("unknown major version", _set(["format_version"], "2.0")),
    ("building store", _set(["state"], "building")),
    ("node escaping the store", _set(["tensors", 0, "node"], "../outside")),
    ("absolute array path", _set(["tensors", 0, "mean"], "/etc/passwd")),
    ("dot segment in an exception path", _set(["models", 5, "exceptions", 0, "path"], "tensors/./x")),
    ("slot beyond its pack", _set(["tensors", 0, "coefficients", "offset"], 10_000)),
    ("error list of the wrong length", _set(["models", 0, "error"], [0.0])),
    ("unknown encoding", _set(["tensors", 0, "encoding"], "hologram")),
    ("unknown residual bits", _set(["tensors", 2, "residual", "bits"], 3)),
])
def test_both_readers_refuse_what_the_spec_refuses(tmp_path, what, edit):
    bad = _tamper(tmp_path, edit)
    with pytest.raises(uwsfmt.FormatError):
        uwsfmt.open(bad)
    with pytest.raises((SpecError, jsonschema.ValidationError)):
        SpecReader(bad)


def test_newer_minor_version_with_unknown_fields_is_read(tmp_path):
    def edit(m):
        m["format_version"] = "1.7"
        m["a_future_field"] = {"anything": [1, 2]}
        m["tensors"][0]["another_future_field"] = True
    ok = _tamper(tmp_path, edit)
    want, _ = load_expected(EXAMPLES / "expected" / "example")[0]
    with uwsfmt.open(ok) as store:
        assert all(torch.equal(store.state_dict(0)[k], v) for k, v in want.items())
    reader = SpecReader(ok)
    assert_conforms(reader.model(0), want, reader.manifest, "1.7 store")
