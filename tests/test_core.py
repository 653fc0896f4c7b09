"""Issue 2 acceptance: build, read, append, project, export, dtypes, validate."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import uwsfmt
from uwsfmt.testing.families import synthetic_family

from .conftest import SHAPES


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float((a - b).norm())


def test_exact_when_rank_covers_family(tmp_path, small_family):
    fam, truth = small_family
    store = uwsfmt.convert(fam, tmp_path / "s.uws", rank=3, min_numel=256)
    table = {r["name"]: r for r in store.tensor_table()}
    for name in SHAPES:
        assert table[name]["encoding"] == "subspace"
    for mid, sd in fam.items():
        out = store.state_dict(mid)
        assert set(out) == set(sd)
        for name, w in sd.items():
            assert out[name].dtype == w.dtype and out[name].shape == w.shape
            assert rel(out[name], w) < 1e-6, (mid, name)
    # recorded errors agree with what the reader gives back
    assert np.nanmax(store.errors()) < 1e-6


@pytest.mark.parametrize("mode", ["left", "right", "both", "flat"])
def test_every_mode_is_exact_at_full_rank(tmp_path, small_family, mode):
    fam, _ = small_family
    store = uwsfmt.convert(fam, tmp_path / "s.uws", mode=mode, rank=None, tau=1.0, min_numel=256)
    for name in SHAPES:
        e = store.tensor_entry(name)
        assert e["mode"] == mode
    for mid, sd in fam.items():
        out = store.state_dict(mid)
        for name in SHAPES:
            assert rel(out[name], sd[name]) < 1e-5, (mode, mid, name)
    assert store.validate() == []


def test_error_equals_tail_energy(tmp_path):
    """Truncated rank: the family's squared error is exactly the discarded eigenvalues."""
    fam, truth = synthetic_family(n_models=8, shapes={"w": (48, 40)}, rank=6, noise=0.0, extra=False,
                                  seed=3, return_truth=True)
    for k in (1, 3, 5):
        store = uwsfmt.convert(fam, tmp_path / f"k{k}.uws", rank=k, mode="left", overwrite=True)
        spec = store.spectrum("w")
        tail = float(spec["eigenvalues"][k:].sum())
        sq = 0.0
        for mid, sd in fam.items():
            w = sd["w"].double()
            sq += float((store.tensor(mid, "w").double() - w).norm() ** 2)
        assert sq == pytest.approx(tail, rel=1e-4, abs=1e-9)
        # and it matches the generator's ground truth (relative to total centred energy)
        total = float(spec["eigenvalues"].sum())
        assert tail / total == pytest.approx(truth.tensors["w"].tail_energy(k, "left"), rel=1e-3, abs=1e-9)
        assert spec["tau"] is None  # a fixed rank, not a threshold


def test_spectrum_reports_the_tau_ranks_were_chosen_by(tmp_path):
    fam = synthetic_family(n_models=6, shapes={"w": (96, 64)}, rank=3, noise=0.01, extra=False, seed=5)
    default = uwsfmt.convert(fam, tmp_path / "d.uws", mode="left", max_rank=96)  # no rank, tau or budget: the default tau
    sp = default.spectrum("w")
    assert sp["tau"] == default.manifest["build"]["default_tau"]
    assert sp["explained"][sp["kept"] - 1] >= sp["tau"] > sp["explained"][sp["kept"] - 2]
    assert uwsfmt.convert(fam, tmp_path / "t.uws", tau=0.9, mode="left").spectrum("w")["tau"] == 0.9


def test_mean_is_added_back(tmp_path):
    fam = synthetic_family(n_models=5, shapes={"w": (32, 64)}, rank=2, extra=False, base_scale=10.0, seed=4)
    store = uwsfmt.convert(fam, tmp_path / "s.uws", rank=0)
    mean = torch.stack([sd["w"].double() for sd in fam.values()]).mean(0)
    for mid in fam:
        got = store.tensor(mid, "w").double()
        assert torch.allclose(got, mean, atol=1e-5)
        # rank 0 keeps the mean: error is the deviation from the mean, not the whole weight
        assert rel(got, fam[mid]["w"]) < 0.05


def test_residual_k0_is_mean_plus_quantized_delta(tmp_path):
    fam = synthetic_family(n_models=5, shapes={"w": (64, 64)}, rank=8, noise=0.01, extra=False, seed=5)
    errs = {}
    for bits in (2, 4, 8, 16):
        store = uwsfmt.convert(fam, tmp_path / f"b{bits}.uws", rank=0, residual_bits=bits)
        errs[bits] = max(rel(store.tensor(m, "w"), fam[m]["w"]) for m in fam)
        recorded = float(np.nanmax(store.errors()))
        assert recorded == pytest.approx(errs[bits], rel=1e-3)
    assert errs[16] < errs[8] < errs[4] < errs[2]
    assert errs[8] < 1e-3


def test_shared_and_dense_are_bit_exact(tmp_path, small_family):
    fam, truth = small_family
    store = uwsfmt.convert(fam, tmp_path / "s.uws", rank=1)
    enc = {r["name"]: r["encoding"] for r in store.tensor_table()}
    for name in truth.shared:
        assert enc[name] == "shared"
    for name in truth.dense:
        assert enc[name] == "dense"
    for mid, sd in fam.items():
        out = store.state_dict(mid)
        for name in list(truth.shared) + list(truth.dense):
            assert torch.equal(out[name], sd[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_round_trip(tmp_path, dtype):
    fam = synthetic_family(n_models=4, shapes={"w": (64, 48)}, rank=2, dtype=dtype, seed=6)
    store = uwsfmt.convert(fam, tmp_path / "s.uws", rank=3)
    out_file = tmp_path / "m.safetensors"
    store.export("model-001", str(out_file))
    back = load_file(str(out_file))
    for name, w in fam["model-001"].items():
        assert back[name].dtype == w.dtype
        assert back[name].shape == w.shape
        if not w.is_floating_point() or store.tensor_entry(name)["encoding"] != "subspace":
            assert torch.equal(back[name], w), name
        else:
            # within the source dtype's own rounding
            eps = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
            assert rel(back[name], w) < eps


def test_append_equals_project_and_leaves_existing_untouched(tmp_path):
    fam = synthetic_family(n_models=7, shapes=SHAPES, rank=3, noise=1e-3, seed=7)
    ids = sorted(fam)
    first = {i: fam[i] for i in ids[:6]}
    store = uwsfmt.convert(first, tmp_path / "s.uws", rank=3, residual_bits=8, min_numel=256)
    before = {m: store.state_dict(m) for m in store.model_ids}
    pack_files = {}
    for root, _, files in os.walk(tmp_path / "s.uws" / "packs"):
        for f in files:
            if f != "zarr.json":
                p = os.path.join(root, f)
                pack_files[p] = open(p, "rb").read()

    proj = store.project(fam[ids[6]])
    entry = store.append(fam[ids[6]], id="newcomer")
    assert store.model_ids[-1] == "newcomer"
    reopened = uwsfmt.open(tmp_path / "s.uws")
    assert reopened.n_models == 7
    # existing models bit-identical, and their shard files untouched
    for m, sd in before.items():
        now = reopened.state_dict(m)
        assert all(torch.equal(now[k], v) for k, v in sd.items())
    for p, data in pack_files.items():
        assert open(p, "rb").read() == data
    # project and append give the same coefficients and errors
    pack = reopened.manifest["packs"]["float32"]
    import zarr
    row = zarr.open_array(str(tmp_path / "s.uws"), path=pack["path"], mode="r")[6, :]
    for name, c in proj["coefficients"].items():
        sl = reopened.tensor_entry(name)["coefficients"]
        assert np.array_equal(row[sl["offset"]: sl["offset"] + sl["length"]], c.numpy().reshape(-1))
    assert entry["error"] == [proj["error"][n] for n in reopened.tensor_names]
    new = reopened.state_dict("newcomer")
    for name, w in fam[ids[6]].items():
        j = reopened.tensor_names.index(name)
        assert rel(new[name], w) == pytest.approx(entry["error"][j], rel=1e-3, abs=1e-7)
    assert reopened.validate() == []


def test_append_refuses_duplicate_id_and_conflicting_shapes(tmp_path, small_family):
    fam, _ = small_family
    store = uwsfmt.convert(fam, tmp_path / "s.uws", rank=2)
    with pytest.raises(uwsfmt.ConflictError, match="already in the store"):
        store.append(fam["model-000"], id="model-000")
    bad = dict(fam["model-000"])
    bad["blocks.0.mlp.fc1.weight"] = torch.zeros(3, 3)
    with pytest.raises(uwsfmt.ConflictError, match="shape"):
        store.append(bad, id="bad")
    assert uwsfmt.open(tmp_path / "s.uws").n_models == len(fam)


def test_sources_from_files_and_folder(tmp_path, family_files, small_family):
    fam, _ = small_family
    folder = os.path.dirname(family_files[0])
    store = uwsfmt.convert([folder], tmp_path / "s.uws", rank=3)
    assert sorted(store.model_ids) == sorted(fam)
    m = store.model_entry("model-002")
    assert m["source"]["format"] == "safetensors" and len(m["source"]["sha256"]) == 64
    assert m["source"]["size"] == os.path.getsize(family_files[2])
    # torch files too (weights_only)
    from uwsfmt.testing.families import write_family

    pts = write_family(fam, tmp_path / "pt", fmt="pt")
    store2 = uwsfmt.convert([str(p) for p in pts], tmp_path / "s2.uws", rank=3)
    for name, w in fam["model-001"].items():
        assert rel(store2.state_dict("model-001")[name], w) < 1e-5


def test_zip_store_reads_in_place_and_unpacks(tmp_path, small_family):
    fam, _ = small_family
    store = uwsfmt.convert(fam, tmp_path / "s.uws", rank=3)
    z = uwsfmt.pack(str(tmp_path / "s.uws"), str(tmp_path / "s.uws.zip"))
    zs = uwsfmt.open(z)
    for name, w in store.state_dict("model-004").items():
        assert torch.equal(zs.state_dict("model-004")[name], w)
    assert zs.validate() == []
    with pytest.raises(uwsfmt.StoreError, match="read-only"):
        uwsfmt.open(z, mode="a")
    d = uwsfmt.unpack(z, str(tmp_path / "back.uws"))
    assert uwsfmt.open(d).model_ids == store.model_ids


def test_load_into_module(tmp_path):
    from bench.trained import trained_family

    tf = trained_family(n_tasks=3)
    store = uwsfmt.convert(tf.state_dicts, tmp_path / "s.uws", tau=1.0)
    mid = store.model_ids[1]
    module = tf.make_model()
    store.load_into(module, mid)
    for k, v in module.state_dict().items():
        assert torch.allclose(v, tf.state_dicts[mid][k], atol=1e-5)


def test_validate_detects_broken_pieces(tmp_path, small_family):
    fam, _ = small_family
    path = tmp_path / "s.uws"
    uwsfmt.convert(fam, path, rank=3, min_numel=256)
    assert uwsfmt.validate(str(path)) == []
    # 1) a basis that is no longer orthonormal
    broken = tmp_path / "b1.uws"
    shutil.copytree(path, broken)
    st = uwsfmt.open(broken)
    e = next(x for x in st.manifest["tensors"] if x["encoding"] == "subspace")
    import zarr

    side = "left" if e["left"] else "right"
    arr = zarr.open_array(str(broken), path=e[side], mode="r+")
    arr[...] = arr[...] * 2
    problems = uwsfmt.validate(str(broken))
    assert any("not orthonormal" in p and e["name"] in p for p in problems)
    # 2) a missing array
    broken2 = tmp_path / "b2.uws"
    shutil.copytree(path, broken2)
    shutil.rmtree(broken2 / e["mean"])
    problems = uwsfmt.validate(str(broken2))
    assert any(e["mean"] in p for p in problems)
    # 3) a manifest that points outside a pack
    broken3 = tmp_path / "b3.uws"
    shutil.copytree(path, broken3)
    doc = json.loads((broken3 / "zarr.json").read_text())
    t0 = next(t for t in doc["attributes"]["uws"]["tensors"] if t["encoding"] == "subspace")
    t0["coefficients"]["offset"] = 10**9
    (broken3 / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(uwsfmt.FormatError, match="outside pack"):
        uwsfmt.open(broken3)


def test_unknown_major_version_is_refused(tmp_path, small_family):
    fam, _ = small_family
    path = tmp_path / "s.uws"
    uwsfmt.convert(fam, path, rank=2)
    doc = json.loads((path / "zarr.json").read_text())
    doc["attributes"]["uws"]["format_version"] = "2.0"
    (path / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(uwsfmt.VersionError, match="not readable by this uwsfmt"):
        uwsfmt.open(path)
    doc["attributes"]["uws"]["format_version"] = "1.7"
    doc["attributes"]["uws"]["future_field"] = {"x": 1}
    (path / "zarr.json").write_text(json.dumps(doc))
    assert uwsfmt.open(path).n_models == len(fam)  # newer minor: read what is known


def test_encoding_overrides(tmp_path, small_family):
    fam, _ = small_family
    store = uwsfmt.convert(fam, tmp_path / "s.uws", rank=2, encodings={"conv.*": "dense"})
    assert store.tensor_entry("conv.weight")["encoding"] == "dense"
    for mid, sd in fam.items():
        assert torch.equal(store.tensor(mid, "conv.weight"), sd["conv.weight"])


def test_single_tensor_read_matches_state_dict(tmp_path, small_family):
    fam, _ = small_family
    store = uwsfmt.convert(fam, tmp_path / "s.uws", rank=2, residual_bits=4, min_numel=256)
    sd = store.state_dict("model-003")
    for name in sd:
        assert torch.equal(store.tensor("model-003", name), sd[name]), name
    assert store.tensor("model-003", "blocks.0.mlp.fc1.weight", dtype=torch.float64).dtype == torch.float64
    with pytest.raises(uwsfmt.NotFoundError, match="no model"):
        store.state_dict("nope")
    with pytest.raises(uwsfmt.NotFoundError, match="no tensor"):
        store.tensor("model-003", "nope")


def test_extend_equals_appending_one_by_one_with_one_commit(tmp_path):
    fam = synthetic_family(n_models=9, shapes=SHAPES, rank=3, noise=1e-3, seed=11)
    ids = sorted(fam)
    uwsfmt.convert({i: fam[i] for i in ids[:5]}, tmp_path / "a.uws", rank=3, residual_bits=8, min_numel=256).close()
    shutil.copytree(tmp_path / "a.uws", tmp_path / "b.uws")
    for i in ids[5:]:
        uwsfmt.append(tmp_path / "a.uws", fam[i], id=i)
    with uwsfmt.open(tmp_path / "b.uws", mode="a") as st:
        gen = st.manifest["generation"]
        entries = st.extend({i: fam[i] for i in ids[5:]})
        assert [e["id"] for e in entries] == ids[5:] and st.model_ids == ids
        assert st.manifest["generation"] == gen + 1  # one commit for the four
    with uwsfmt.open(tmp_path / "a.uws") as one, uwsfmt.open(tmp_path / "b.uws") as many:
        assert one.model_ids == many.model_ids
        for a, b in zip(one.manifest["models"], many.manifest["models"]):
            assert a["error"] == b["error"] and a["delta_error"] == b["delta_error"]
        for m in ids:
            x, y = one.state_dict(m), many.state_dict(m)
            assert all(torch.equal(x[k], y[k]) for k in x), m
        assert many.validate(deep=True) == []


def test_extend_is_all_or_nothing(tmp_path, small_family):
    fam, _ = small_family
    uwsfmt.convert(fam, tmp_path / "s.uws", rank=2).close()
    with uwsfmt.open(tmp_path / "s.uws") as st:
        before = {m: st.state_dict(m) for m in st.model_ids}
    good = {f"new-{i}": sd for i, sd in enumerate(fam.values())}
    bad = dict(fam["model-000"])
    bad["blocks.0.mlp.fc1.weight"] = torch.zeros(3, 3)
    with uwsfmt.open(tmp_path / "s.uws", mode="a") as st:
        with pytest.raises(uwsfmt.ConflictError, match="shape"):  # the third model fails after two were written
            st.extend({"new-0": good["new-0"], "new-1": good["new-1"], "bad": bad})
        assert st.n_models == len(fam)
        with pytest.raises(uwsfmt.ConflictError, match="models with ids 'model-000', 'model-001' are already in the store"):
            st.extend({"model-000": fam["model-000"], "model-001": fam["model-001"], "fresh": fam["model-002"]})
        # or those already there are left out: a folder synced into its store again
        gen = st.manifest["generation"]
        assert st.extend({"model-000": fam["model-000"], "model-001": fam["model-001"]}, skip_existing=True) == []
        assert st.manifest["generation"] == gen  # nothing to add: nothing committed
        added = st.extend({"model-000": fam["model-000"], "fresh": fam["model-002"]}, skip_existing=True)
        assert [e["id"] for e in added] == ["fresh"] and st.model_ids[-1] == "fresh" and st.manifest["generation"] == gen + 1
        sources = [uwsfmt.sources.StateDictCheckpoint("twin", fam["model-000"]), uwsfmt.sources.StateDictCheckpoint("twin", fam["model-001"])]
        with pytest.raises(uwsfmt.ConflictError, match="the same model id: 'twin'"):
            st.extend(sources)
    assert uwsfmt.validate(tmp_path / "s.uws", deep=True) == []
    with uwsfmt.open(tmp_path / "s.uws") as st:
        assert st.n_models == len(fam) + 1
        # the failed batch's rows lie beyond the committed models; the next extend takes their place
        st2 = uwsfmt.open(tmp_path / "s.uws", mode="a")
        st2.extend({"new-0": good["new-0"], "new-1": good["new-1"]})
        assert st2.model_ids[-3:] == ["fresh", "new-0", "new-1"]
        back, same = st2.state_dict("new-1"), st2.state_dict("model-001")  # the same weights, projected again
        assert all(torch.allclose(back[k], same[k], rtol=1e-4, atol=1e-5) for k in back)
        for m, sd in before.items():  # the models committed before are bit-identical
            now = st2.state_dict(m)
            assert all(torch.equal(now[k], v) for k, v in sd.items()), m
