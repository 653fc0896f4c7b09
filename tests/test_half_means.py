"""float16 means (format 1.1): where the writer keeps them, and that the errors a store records
stay the errors readers get back."""

from __future__ import annotations

import json

import pytest
import torch

import uwsfmt
from uwsfmt.testing.families import synthetic_family

SHAPES = {"a.weight": (96, 64), "b.weight": (64, 160), "c.weight": (16, 8, 3, 3)}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def mean_dtypes(store) -> dict[str, str]:
    return {e["name"]: str(store.array(e["mean"]).dtype) for e in store.manifest["tensors"] if e.get("mean")}


def recorded(store, model: int) -> dict[str, float]:
    names = [e["name"] for e in store.manifest["tensors"]]
    return dict(zip(names, store.manifest["models"][model]["error"]))


def assert_recorded_errors_are_read_back(store, fam: dict, tol: float = 1e-5) -> None:
    for i, (mid, sd) in enumerate(fam.items()):
        got = store.state_dict(mid)
        rec = recorded(store, i)
        for e in store.manifest["tensors"]:
            if e["encoding"] == "subspace":
                assert rec[e["name"]] == pytest.approx(rel(got[e["name"]], sd[e["name"]]), rel=tol, abs=1e-7), (mid, e["name"])


def family(dtype=torch.float32, n=6, shapes=SHAPES, seed=0):
    return synthetic_family(n_models=n, shapes=shapes, rank=3, noise=0.02, dtype=dtype, seed=seed, extra=False)


@pytest.mark.parametrize("basis", ["exact", "sketch"])
def test_float16_means_halve_the_mean_bytes_and_record_true_errors(tmp_path, basis):
    shapes = {"a.weight": (192, 128), "b.weight": (128, 320)} if basis == "sketch" else SHAPES
    fam = family(shapes=shapes)
    full = uwsfmt.convert(fam, tmp_path / "full.uws", rank=2, mean_dtype="compute", basis=basis)
    half = uwsfmt.convert(fam, tmp_path / "half.uws", rank=2, mean_dtype="float16", basis=basis)
    assert set(mean_dtypes(full).values()) == {"float32"} and full.format_version == "1.0"
    assert set(mean_dtypes(half).values()) == {"float16"} and half.format_version == "1.1"
    if basis == "sketch":
        assert {e["basis"]["method"] for e in half.manifest["tensors"] if e["encoding"] == "subspace"} == {"sketch"}
    for e in half.manifest["tensors"]:
        if e.get("mean"):
            m16, m32 = half.read_array(e["mean"]), full.read_array(e["mean"])
            assert m16.nbytes * 2 == m32.nbytes
            # the stored mean is the float32 mean rounded once to float16
            assert torch.equal(torch.from_numpy(m16), torch.from_numpy(m32).to(torch.float16))
    assert_recorded_errors_are_read_back(half, fam)
    for i in range(len(fam)):  # the rounding adds next to nothing to a lossy store's errors
        for name, err in recorded(half, i).items():
            assert err == pytest.approx(recorded(full, i)[name], rel=0.02)
    assert half.validate(deep=True) == []


def test_auto_is_float16_for_16_bit_families_and_under_budgets(tmp_path):
    bf = family(torch.bfloat16)
    f32 = family(torch.float32)
    s_bf = uwsfmt.convert(bf, tmp_path / "bf.uws", rank=2)
    s_32 = uwsfmt.convert(f32, tmp_path / "f32.uws", rank=2)
    s_budget = uwsfmt.convert(f32, tmp_path / "budget.uws", max_delta_error=0.3, coefficient_bits="float32")  # 1.1 alone
    assert set(mean_dtypes(s_bf).values()) == {"float16"} and s_bf.format_version == "1.1"
    assert set(mean_dtypes(s_32).values()) == {"float32"} and s_32.format_version == "1.0"
    # 1.1 for the float16 means, unless a residual the budget chose needs per-column scales (1.3)
    column = any((e.get("residual") or {}).get("axis") == 1 for e in s_budget.manifest["tensors"])
    assert set(mean_dtypes(s_budget).values()) == {"float16"} and s_budget.format_version == ("1.3" if column else "1.1")
    assert_recorded_errors_are_read_back(s_bf, bf, tol=1e-4)
    # bfloat16 reads are the float32 rebuild cast once
    sd = s_bf.state_dict(0, dtype=torch.float32)
    assert all(torch.equal(v.to(torch.bfloat16), s_bf.state_dict(0)[k]) for k, v in sd.items())


def test_float16_is_refused_where_it_would_lose_the_mean(tmp_path):
    fam = family()
    for sd in fam.values():
        sd["a.weight"] = sd["a.weight"] * 1e-7  # below float16's normal range: most of its bits lost
        sd["b.weight"] = sd["b.weight"] * 1e5  # beyond float16's largest value
    store = uwsfmt.convert(fam, tmp_path / "s.uws", rank=2, mean_dtype="float16")
    assert mean_dtypes(store) == {"a.weight": "float32", "b.weight": "float32", "c.weight": "float16"}
    assert_recorded_errors_are_read_back(store, fam)


def test_budgets_decide_with_the_rounding_counted(tmp_path):
    fam = family(n=5)
    loose = uwsfmt.convert(fam, tmp_path / "loose.uws", max_error=0.05, mean_dtype="float16")
    tight = uwsfmt.convert(fam, tmp_path / "tight.uws", max_error=1e-4, mean_dtype="float16")
    delta = uwsfmt.convert(fam, tmp_path / "delta.uws", max_delta_error=0.3, mean_dtype="float16")
    exact = uwsfmt.convert(fam, tmp_path / "exact.uws", max_error=0, mean_dtype="float16")
    # a loose budget leaves room for the rounding (~3e-4 of M), a tight one (its tenth: 1e-5) does not
    assert "float16" in mean_dtypes(loose).values() and "float16" in mean_dtypes(delta).values()
    assert set(mean_dtypes(tight).values()) <= {"float32"}
    assert set(mean_dtypes(exact).values()) <= {"float32"}
    # the budget counts a float16 mean at 2 bytes per value: same choice, 2 bytes per value fewer
    full = uwsfmt.convert(fam, tmp_path / "full.uws", max_error=0.05, mean_dtype="compute")
    checked = False
    for e in loose.manifest["tensors"]:
        f = full.tensor_entry(e["name"])
        pick = [(x["budget"]["mode"], x["budget"]["rank"], x["budget"]["residual_bits"]) for x in (e, f)]
        if e.get("mean") and mean_dtypes(loose)[e["name"]] == "float16" and pick[0] == pick[1]:
            checked = True
            assert f["budget"]["bytes"] - e["budget"]["bytes"] == 2 * e["view"][0] * e["view"][1]
    assert checked
    for store, bound in ((loose, 0.05), (tight, 1e-4)):
        for i in range(len(fam)):
            assert max(recorded(store, i).values()) <= bound * (1 + 1e-6)
        assert_recorded_errors_are_read_back(store, fam, tol=1e-3)


def test_appended_models_project_onto_the_float16_mean(tmp_path):
    fam = family(n=7)
    first = dict(list(fam.items())[:5])
    store = uwsfmt.convert(first, tmp_path / "s.uws", rank=2, mean_dtype="float16")
    for mid in list(fam)[5:]:
        store.append(fam[mid], id=mid)
    store = uwsfmt.open(tmp_path / "s.uws")
    assert store.n_models == 7 and store.format_version == "1.1"
    assert_recorded_errors_are_read_back(store, fam)


def test_validate_flags_a_float16_mean_in_a_1_0_store(tmp_path):
    store = uwsfmt.convert(family(), tmp_path / "s.uws", rank=2, mean_dtype="float16")
    assert store.validate() == []
    root = tmp_path / "s.uws" / "zarr.json"
    doc = json.loads(root.read_text())
    doc["attributes"]["uws"]["format_version"] = "1.0"
    root.write_text(json.dumps(doc))
    problems = uwsfmt.open(tmp_path / "s.uws").validate()
    assert problems and all("format 1.0 does not allow" in p for p in problems)


def test_bad_mean_dtype_is_a_clear_error(tmp_path):
    with pytest.raises(uwsfmt.ConfigError, match="mean_dtype must be one of auto, float16, compute"):
        uwsfmt.convert(family(), tmp_path / "s.uws", rank=2, mean_dtype="bfloat16")
    assert not (tmp_path / "s.uws").exists()
    with pytest.raises(uwsfmt.ConfigError, match="base must be a checkpoint path, a state dict or a Checkpoint, not int"):
        uwsfmt.convert(family(), tmp_path / "s.uws", rank=2, base=42)
    assert not (tmp_path / "s.uws").exists()


def test_cli_mean_dtype(tmp_path, capsys):
    from safetensors.torch import save_file

    from uwsfmt.cli import main

    files = []
    for mid, sd in family().items():
        files.append(str(tmp_path / f"{mid}.safetensors"))
        save_file(sd, files[-1])
    assert main(["convert", *files, "-o", str(tmp_path / "s.uws"), "--rank", "2", "--mean-dtype", "float16", "-q"]) == 0
    assert set(mean_dtypes(uwsfmt.open(tmp_path / "s.uws")).values()) == {"float16"}
    with pytest.raises(SystemExit) as e:
        main(["convert", *files, "-o", str(tmp_path / "t.uws"), "--mean-dtype", "half"])
    assert e.value.code != 0 and "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("basis", ["exact", "sketch"])
def test_a_bfloat16_family_centred_on_its_base_keeps_a_float16_base(tmp_path, basis):
    shapes = {"a.weight": (192, 128), "b.weight": (128, 320)}
    fam = family(torch.bfloat16, n=6, shapes=shapes, seed=3)
    base = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(9))).to(torch.bfloat16)
            for k, v in fam["m0" if "m0" in fam else next(iter(fam))].items()}
    store = uwsfmt.convert(fam, tmp_path / "s.uws", rank=2, base=base, basis=basis)
    assert {e["center"] for e in store.manifest["tensors"] if e.get("mean")} == {"base"}
    assert set(mean_dtypes(store).values()) == {"float16"} and store.format_version == "1.1"
    if basis == "sketch":
        assert {e["basis"]["method"] for e in store.manifest["tensors"] if e.get("mean")} == {"sketch"}
    for e in store.manifest["tensors"]:
        if e.get("mean"):  # the base itself, rounded once to float16
            assert torch.equal(torch.from_numpy(store.read_array(e["mean"])), base[e["name"]].reshape(e["view"]).to(torch.float16))
    assert_recorded_errors_are_read_back(store, fam, tol=1e-4)
