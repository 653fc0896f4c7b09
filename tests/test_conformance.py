"""Conformance with spec/uws-1.md: the checked-in examples, an independent reader, regeneration.

Computed values are compared by the spec's own rule (§6.8), with the bound ``T`` computed from
each store's arrays by the independent reader, never by float bits: results differ in their last
bits between CPUs, BLAS builds and thread counts. Exact parts (dense, shared, replace, integers,
bool, float8) are compared bit for bit.

- the library reproduces ``spec/examples/expected`` within the rule;
- ``independent_reader.py`` (tensorstore + the spec, no uwsfmt) reproduces the expected tensors
  of every example and the library's models on stores built with every writer option, directory
  or zip; LoRA factors agree on their product;
- ``make_example.py`` regenerates the same layout and manifest structure, the same exact parts,
  and computed tensors within their recorded errors;
- both readers refuse what the spec says to refuse, and only that.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import re
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


def _make_example_module():
    spec = importlib.util.spec_from_file_location("make_example", EXAMPLES / "make_example.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


STORES = _make_example_module().STORES


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny GEMMs on a shared 2-core machine: a second thread only adds contention (the rule
    # below holds for any thread count; nothing here depends on it)
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


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]) \
        if t.dtype != torch.bool else t.reshape(-1)


def conforms(g: torch.Tensor, w: torch.Tensor, t: float) -> float:
    """§6.8's rule for one tensor: how far ``g`` is beyond ``2T + eps_d max(|g|, |w|) + eps_d
    tiny_d`` of ``w`` (<= 0: conforms); exact comparison (bits) where ``t`` is 0."""
    if t == 0 or not w.is_floating_point():
        return 0.0 if torch.equal(_bits(g), _bits(w)) else math.inf
    x, y = g.double(), w.double()
    finite = torch.isfinite(y)
    if not torch.equal(torch.isfinite(x), finite) or not torch.equal(x[~finite].nan_to_num(), y[~finite].nan_to_num()):
        return math.inf  # non-finite values agree exactly
    fi = torch.finfo(w.dtype)
    tol = 2 * t + fi.eps * torch.maximum(x.abs(), y.abs()) + fi.eps * fi.tiny
    return float(((x - y).abs() - tol)[finite].max()) if bool(finite.any()) else 0.0


def assert_conforms(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tol: dict[str, float], where: str) -> None:
    """The spec's acceptance rule (§6.8): names, dtypes and shapes equal; exact parts bit for bit;
    computed parts within 2T (+ one ulp of the logical dtype from the final cast)."""
    assert sorted(got) == sorted(want), where
    for name, w in want.items():
        g = got[name]
        assert (g.dtype, g.shape) == (w.dtype, w.shape), f"{where}: {name!r} is {g.dtype} {tuple(g.shape)}, expected {w.dtype} {tuple(w.shape)}"
        over = conforms(g, w, tol[name])
        kind = "is not bit-identical" if tol[name] == 0 else f"differs beyond the spec's rule (T = {tol[name]:.3g})"
        assert over <= 0, f"{where}: {name!r} {kind} (by {over:.3g})"


def library_model(store, i: int) -> dict[str, torch.Tensor]:
    """What the library gives for model ``i`` in the form of expected/: LoRA product-mode modules as
    their dense update (§6.3), the factors left out."""
    lora = [e for e in store.manifest["tensors"] if e.get("lora")]
    factors = {n for e in lora for n in (e["lora"]["a"], e["lora"]["b"], e["lora"]["alpha"]) if n}
    sd = {k: v for k, v in store.state_dict(i).items() if k not in factors}
    sd.update({e["name"]: store.tensor(i, e["name"]) for e in lora})
    return sd


def _product(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return b.double().reshape(b.shape[0], -1) @ a.double().reshape(a.shape[0], -1)


def assert_factors_agree(factors: dict[str, torch.Tensor], dense: dict[str, torch.Tensor], tol: dict[str, float],
                         manifest: dict, where: str) -> None:
    """§6.7: LoRA factors agree on their product: ||B'A' - X||_F <= 3 u_d sqrt(k) ||X||_F + T
    (+ the rounding of the dense update X itself to its dtype, which the reference carries)."""
    for e in (e for e in manifest["tensors"] if e.get("lora")):
        rec, x = e["lora"], dense[e["name"]]
        if rec["b"] not in factors:
            assert float(x.abs().max()) == 0, f"{where}: {e['name']!r} has no factors but a non-zero update"
            continue
        b, a = factors[rec["b"]], factors[rec["a"]]
        k = a.shape[0]
        assert b.dtype == a.dtype == x.dtype and list(b.shape) == [e["view"][0], k] + rec["b_tail"], where
        assert k == min(e["rank"][0], e["rank"][1], k) and list(a.shape) == [k] + rec["a_tail"], where
        if rec.get("alpha"):
            assert float(factors[rec["alpha"]]) == k and factors[rec["alpha"]].shape == ()
        u_d = torch.finfo(x.dtype).eps / 2
        xd = x.double().reshape(e["view"])
        bound = (3 * u_d * math.sqrt(k) + torch.finfo(x.dtype).eps) * float(xd.norm()) + tol[e["name"]] * math.sqrt(xd.numel())
        err = float((_product(b, a) - xd).norm())
        assert err <= bound, f"{where}: LoRA module {e['name']!r}: factors' product is {err:.3g} from the update (bound {bound:.3g})"


# ---------------------------------------------------------------------------- (a) the library


@pytest.mark.parametrize("name", STORES)
def test_library_reproduces_expected_tensors(name):
    expected = load_expected(EXAMPLES / "expected" / name)
    reader = SpecReader(EXAMPLES / f"{name}.uws")
    with uwsfmt.open(EXAMPLES / f"{name}.uws") as store:
        assert store.n_models == len(expected)
        for i, (want, meta) in enumerate(expected):
            assert meta["uws.model_id"] == store.model_ids[i]
            tol: dict[str, float] = {}
            reader.model(i, tolerances=tol)
            assert_conforms(library_model(store, i), want, tol, f"{name} model {i}")
            if any(e.get("lora") for e in store.manifest["tensors"]):
                assert_factors_agree(store.state_dict(i), want, tol, store.manifest, f"{name} model {i} (library factors)")
        assert store.validate(deep=True) == []


def test_examples_cover_the_spec():
    me = _make_example_module()
    paths = {n: str(EXAMPLES / f"{n}.uws") for n in STORES}
    assert me.REQUIRED <= me.coverage(paths)
    assert sorted(p.name for p in EXAMPLES.glob("*.uws")) == sorted(f"{n}.uws" for n in STORES)
    assert sorted(p.name for p in (EXAMPLES / "expected").iterdir()) == sorted(STORES)  # named without .uws
    m = json.loads((EXAMPLES / "example.uws" / "zarr.json").read_text())["attributes"]["uws"]
    assert "../not-a-path" in [x["id"] for x in m["models"]]
    for n in STORES:
        assert not (EXAMPLES / f"{n}.uws" / ".uws.lock").exists()
        text = (EXAMPLES / f"{n}.uws" / "zarr.json").read_text()
        assert "/tmp" not in text and str(ROOT) not in text  # no generating machine's path


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
        tol: dict[str, float] = {}
        got = reader.model(i, tolerances=tol)
        assert_conforms(got, want, tol, f"{name} model {i}")
        if any(e.get("lora") for e in reader.manifest["tensors"]):
            assert_factors_agree(reader.lora_factors(i), want, tol, reader.manifest, f"{name} model {i} (spec factors)")


def test_independent_reader_forms_factors_mode_updates_from_the_recorded_scales():
    """§6.7 factors mode: s from ``adapter.scales`` (kohya: alpha / r), A and B by their suffixes."""
    reader = SpecReader(EXAMPLES / "example-lora-factors.uws")
    for i, (want, _) in enumerate(load_expected(EXAMPLES / "expected" / "example-lora-factors")):
        scales = reader.manifest["models"][i]["adapter"]["scales"]
        assert "ranks" not in reader.manifest["models"][i]["adapter"]
        for module, s in scales.items():
            a, b = want[f"{module}.lora_down.weight"], want[f"{module}.lora_up.weight"]
            assert s == pytest.approx(float(want[f"{module}.alpha"]) / a.shape[0], rel=1e-6)
            x = reader.adapter_update(i, module)
            torch.testing.assert_close(x, s * _product(b, a), rtol=0, atol=1e-5 * float(x.abs().max()))


def test_independent_reader_reads_a_zipped_store_in_place(tmp_path):
    z = uwsfmt.pack(str(EXAMPLES / "example.uws"), str(tmp_path / "example.zip"))
    reader = SpecReader(z)
    for i, (want, _) in enumerate(load_expected(EXAMPLES / "expected" / "example")):
        tol: dict[str, float] = {}
        assert_conforms(reader.model(i, tolerances=tol), want, tol, f"zip model {i}")


# a matrix of writer options: each option (mode, centre, mean dtype, residual width, dtype, basis,
# budget, append with exceptions, LoRA modes, float8) in at least one store
MATRIX = {
    "left-mean-r8-f32": dict(dtype=torch.float32, kw=dict(rank=2, mode="left", residual_bits=8)),
    "right-none-r1-bf16": dict(dtype=torch.bfloat16, kw=dict(rank=2, mode="right", center="none", residual_bits=1)),
    "both-r2-f16": dict(dtype=torch.float16, kw=dict(rank=2, mode="both", residual_bits=2)),
    "flat-r4-f64": dict(dtype=torch.float64, kw=dict(rank=2, mode="flat", residual_bits=4)),
    "auto-r16-half-mean": dict(dtype=torch.float32, kw=dict(rank=3, residual_bits=16, mean_dtype="float16")),
    "rank0-r4-bf16-half-mean": dict(dtype=torch.bfloat16, kw=dict(rank=0, residual_bits=4, mean_dtype="float16")),
    "sketch-tau": dict(dtype=torch.float32, kw=dict(tau=0.99, basis="sketch")),
    "base": dict(dtype=torch.float32, kw=dict(rank=2, center="base")),
    "budget-append": dict(dtype=torch.float32, kw=dict(max_error=1e-4), append=True),
    "qcoef-right-4-bf16": dict(dtype=torch.bfloat16, kw=dict(rank=3, mode="right", coefficient_bits="4")),
    "qcoef-both-84-r2": dict(dtype=torch.float32, kw=dict(rank=3, mode="both", coefficient_bits="8/4", residual_bits=2)),
    "qcoef-budget-append": dict(dtype=torch.float32, kw=dict(max_delta_error=0.3, coefficient_bits="8/4/2"), append=True),
    "delta-budget-bf16-append": dict(dtype=torch.bfloat16, kw=dict(max_delta_error=0.05), append=True),
}


def _family(dtype: torch.dtype, n: int, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """n models: low-rank deviations plus noise around a base, a conv kernel, a frozen tensor,
    per-model heads, integer and bool buffers, a 0-D scalar."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"attn.qkv.weight": (48, 16), "mlp.fc1.weight": (16, 40), "conv.weight": (8, 4, 3, 3)}
    base = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    dirs = {k: torch.linalg.qr(torch.randn(s[0], 3, generator=g, dtype=torch.float64))[0] for k, s in shapes.items()}
    frozen = torch.randn(12, 8, generator=g, dtype=torch.float64)
    out = {}
    for i in range(n):
        gi = torch.Generator().manual_seed(seed * 100 + i)
        sd = {k: (base[k] + 0.2 * (dirs[k] @ torch.randn(3, math.prod(s[1:]), generator=gi, dtype=torch.float64)).reshape(s)
                  + 0.01 * torch.randn(s, generator=gi, dtype=torch.float64)).to(dtype) for k, s in shapes.items()}
        sd["frozen.weight"] = frozen.to(dtype)
        sd["head.weight"] = torch.randn(2 + i % 3, 8, generator=gi, dtype=torch.float64).to(dtype)
        sd["norm.bias"] = torch.randn(16, generator=gi, dtype=torch.float64).to(dtype)
        sd["scale"] = torch.tensor(1.5, dtype=dtype)
        sd["steps"] = torch.tensor(100 + i)
        sd["mask"] = torch.arange(6) % (i + 2) == 0
        out[f"m{i}"] = sd
    return out


def _check_fresh(path: Path, where: str) -> None:
    reader = SpecReader(path)
    with uwsfmt.open(path) as store:
        for i in range(store.n_models):
            tol: dict[str, float] = {}
            got = reader.model(i, tolerances=tol)
            assert_conforms(got, library_model(store, i), tol, f"{where} model {i}")
            if any(e.get("lora") for e in store.manifest["tensors"]):
                assert_factors_agree(reader.lora_factors(i), got, tol, reader.manifest, f"{where} model {i} (spec factors)")
                assert_factors_agree(store.state_dict(i), got, tol, reader.manifest, f"{where} model {i} (library factors)")
        return store.manifest


@pytest.mark.parametrize("name", sorted(MATRIX))
def test_independent_reader_matches_library_on_every_writer_option(tmp_path, name):
    opt = MATRIX[name]
    fam = _family(opt["dtype"], 6, seed=len(name))
    ids = sorted(fam)
    kw = dict(opt["kw"])
    if kw.get("center") == "base":
        kw["base"] = {k: v.clone() for k, v in fam[ids[0]].items() if k != "head.weight"}
    store = uwsfmt.convert({i: fam[i] for i in ids[:5]}, tmp_path / "s.uws", min_numel=64, device="cpu", **kw)
    if opt.get("append"):
        odd = {k: v.clone() for k, v in fam[ids[5]].items()}
        g = torch.Generator().manual_seed(9)
        odd["attn.qkv.weight"] = (odd["attn.qkv.weight"].double() + 0.05 * torch.randn(48, 16, generator=g, dtype=torch.float64)).to(opt["dtype"])
        odd["frozen.weight"] = (odd["frozen.weight"].double() + 1e-3 * torch.randn(12, 8, generator=g, dtype=torch.float64)).to(opt["dtype"])
        entry = store.append(odd, id="odd")
        assert {x["tensor"] for x in entry["exceptions"]} >= {"frozen.weight"}
    store.close()
    m = _check_fresh(tmp_path / "s.uws", name)
    sub = [e for e in m["tensors"] if e["encoding"] == "subspace"]
    assert sub and {"shared", "dense"} <= {e["encoding"] for e in m["tensors"]}
    if "mode" in kw:
        assert {e["mode"] for e in sub} == {kw["mode"]}
    if "residual_bits" in kw:
        assert {(e["residual"] or {}).get("bits") for e in sub} == {kw["residual_bits"]}


@pytest.mark.parametrize("mode", ["product", "factors"])
def test_independent_reader_matches_library_on_lora_stores(tmp_path, mode):
    me = _make_example_module()
    src = me.lora_files(str(tmp_path / "src"), (4, 6, 4, 8), torch.bfloat16 if mode == "product" else torch.float16,
                        lacking={1: "lora_unet_down_blocks_0_resnets_0_conv1"} if mode == "product" else None)
    store = uwsfmt.convert(src, tmp_path / "l.uws", rank=5, lora_mode=mode, device="cpu", min_numel=64)
    store.close()
    m = _check_fresh(tmp_path / "l.uws", mode)
    assert any(e.get("lora") for e in m["tensors"]) == (mode == "product")


def test_independent_reader_matches_library_on_float8(tmp_path):
    me = _make_example_module()
    fam = me.f8_family()
    store = uwsfmt.convert(fam, tmp_path / "f.uws", max_error=1e-4, min_numel=64, device="cpu")
    store.append(me.f8_appended(fam["f8-0"]), id="x")
    store.close()
    m = _check_fresh(tmp_path / "f.uws", "float8")
    assert {e["dtype"] for e in m["tensors"]} >= {"float8_e4m3fn", "float8_e5m2"}


# ---------------------------------------------------------------------------- (c) regeneration


def _structure(manifest: dict) -> list:
    """The manifest without its floats and timestamps: what a regeneration must reproduce exactly."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in {"explained_variance", "energy", "budget", "error", "delta_error",
                                                                   "error_before", "added", "reason", "scales", "check",
                                                                   # hashes of generated sources: their float bits come from
                                                                   # BLAS/LAPACK (QR, matmul), and safetensors orders a
                                                                   # file's metadata differently from run to run
                                                                   "sha256"}}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x
    return [manifest["format_version"], manifest["packs"], strip(manifest["tensors"]), strip(manifest["models"])]


def test_regeneration_reproduces_the_examples(tmp_path):
    """Regenerating gives the same layout and manifest structure and the same exact parts; the
    computed tensors of two builds are two approximations of one source, so they may differ by
    up to the sum of their recorded errors (bases computed on another CPU differ by round-off)."""
    me = _make_example_module()
    paths = me.build(str(tmp_path))
    for name in STORES:
        new, old = (json.loads((Path(p) / "zarr.json").read_text())["attributes"]["uws"]
                    for p in (paths[name], EXAMPLES / f"{name}.uws"))
        assert _structure(new) == _structure(old), f"{name}: the regenerated store is laid out differently"
        fresh = load_expected(tmp_path / "expected" / name)
        checked_in = load_expected(EXAMPLES / "expected" / name)
        assert len(fresh) == len(checked_in)
        reader = SpecReader(EXAMPLES / f"{name}.uws")
        index = {e["name"]: t for t, e in enumerate(old["tensors"])}
        for i, ((got, meta), (want, _)) in enumerate(zip(fresh, checked_in)):
            assert meta["uws.model_id"] == new["models"][i]["id"]
            tol: dict[str, float] = {}
            reader.model(i, tolerances=tol)
            assert sorted(got) == sorted(want)
            for k, w in want.items():
                g = got[k]
                assert (g.dtype, g.shape) == (w.dtype, w.shape), (name, i, k)
                if tol[k] == 0:
                    assert torch.equal(_bits(g), _bits(w)), f"regenerated {name} model {i}: exact {k!r} differs"
                    continue
                t = index[k]
                errs = [m["models"][i]["error"][t] for m in (new, old)]
                assert None not in errs, (name, i, k)
                dist, norm = float((g.double() - w.double()).norm()), float(w.double().norm())
                bound = (sum(errs) * 1.001 + 1e-6) * norm + 2 * tol[k] * math.sqrt(w.numel())
                assert dist <= bound, f"regenerated {name} model {i}: {k!r} moved by {dist:.3g}, beyond the recorded errors ({bound:.3g})"


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
    tol: dict[str, float] = {}
    assert_conforms(reader.model(0, tolerances=tol), want, tol, "1.7 store")


@pytest.mark.parametrize("what, edit, tensor", [
    ("unknown encoding", _set(["tensors", 0, "encoding"], "hologram"), "enc.left.weight"),
    ("unknown residual bits", _set(["tensors", 2, "residual", "bits"], 3), "enc.resid.weight"),
    ("unknown exception kind", _set(["models", 5, "exceptions", 2, "kind"], "future"), "position_ids"),
])
def test_both_readers_refuse_only_the_tensors_an_unknown_value_touches(tmp_path, what, edit, tensor):
    """§12: a value a later 1.y may add makes the tensors that use it unreadable, not the store."""
    path = _tamper(tmp_path, edit)
    model = 5 if "exception" in what else 0
    want, _ = load_expected(EXAMPLES / "expected" / "example")[model]
    others = [k for k in want if k != tensor]
    with uwsfmt.open(path) as store:
        with pytest.raises(uwsfmt.FormatError, match=re.escape(repr(tensor))):
            store.state_dict(model)
        got = store.state_dict(model, names=others)
        assert all(torch.equal(got[k], want[k]) for k in others)
    reader = SpecReader(path)
    with pytest.raises(SpecError, match=re.escape(repr(tensor))):
        reader.model(model)
    tol: dict[str, float] = {}
    got = reader.model(model, names=others, tolerances=tol)
    assert sorted(got) == sorted(others)
    assert_conforms(got, {k: want[k] for k in others}, tol, what)


@pytest.mark.parametrize("what, edit", [
    # a 1.2 writer's view of the record: no axis field, so a reader takes the n scales for m rows
    ("1.2 reader (no axis field)", lambda r: r.pop("axis")),
    ("unknown axis", lambda r: r.update(axis=2)),
])
def test_per_column_residual_scales_are_refused_where_they_do_not_fit(tmp_path, what, edit):
    """§6.4 (1.3): a reader that does not know `axis` meets n scales where §3.4 wants m and refuses
    the tensor (it cannot misread it), as does one that meets an axis it does not know."""
    dst = tmp_path / "t.uws"
    shutil.copytree(EXAMPLES / "example-tall.uws", dst)
    root = json.loads((dst / "zarr.json").read_text())
    m = root["attributes"]["uws"]
    tall = next(e for e in m["tensors"] if e["name"] == "tall.weight")
    assert tall["residual"]["axis"] == 1 and tall["view"][0] >= 2 * tall["view"][1]
    edit(tall["residual"])
    (dst / "zarr.json").write_text(json.dumps(root))
    want, _ = load_expected(EXAMPLES / "expected" / "example-tall")[0]
    with uwsfmt.open(dst) as store:
        with pytest.raises(uwsfmt.FormatError, match="tall.weight"):
            store.state_dict(0)
        got = store.state_dict(0, names=["tall.bf16.weight"])
        assert torch.equal(got["tall.bf16.weight"], want["tall.bf16.weight"])
    with pytest.raises(SpecError, match="tall.weight"):
        SpecReader(dst).model(0)
    assert any("tall.weight" in p for p in uwsfmt.validate(dst))


def test_per_column_scales_in_a_store_declaring_1_2_are_reported(tmp_path):
    dst = tmp_path / "t.uws"
    shutil.copytree(EXAMPLES / "example-tall.uws", dst)
    root = json.loads((dst / "zarr.json").read_text())
    root["attributes"]["uws"]["format_version"] = "1.2"
    (dst / "zarr.json").write_text(json.dumps(root))
    problems = uwsfmt.validate(dst)
    assert any("per-column scales" in p and "1.3" in p for p in problems), problems
