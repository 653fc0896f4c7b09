"""Rate-distortion v2 (issue 25): the default fidelity is an error budget that compresses and never
grows a store past its sources; the store says when a family shares no subspace or a forced rank
keeps noise; quantized coefficients are met by the budget and recorded as the reader gets them."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from safetensors.torch import save_file

import uwsfmt
from uwsfmt.report import print_summary, store_bytes, summary
from uwsfmt.testing.families import synthetic_family
from uwsfmt.writer.options import DEFAULT_BUDGET


def _files(tmp_path, fam: dict) -> list[str]:
    out = []
    for mid, sd in fam.items():
        p = tmp_path / f"{mid}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(p))
        out.append(str(p))
    return out


def _seeds_family(n: int = 6, shape=(48, 40)) -> dict:
    """Models "trained from different seeds": independent weights, no shared centre or subspace."""
    g = torch.Generator().manual_seed(3)
    return {f"seed-{i}": {"w": torch.randn(shape, generator=g), "v": torch.randn(shape[::-1], generator=g)} for i in range(n)}


def test_default_is_the_error_budget_and_compresses_a_fine_tune_family(tmp_path):
    fam = synthetic_family(n_models=8, shapes={"a.weight": (96, 64), "b.weight": (64, 96)}, rank=4, noise=0.01, seed=1, extra=False)
    src = _files(tmp_path, fam)
    st = uwsfmt.convert(src, tmp_path / "f.uws")
    s = summary(st)
    assert (s["max_error"], s["max_delta_error"]) == (DEFAULT_BUDGET["max_error"], DEFAULT_BUDGET["max_delta_error"])
    assert s["budget_met"] is True
    assert s["ratio"] > 3, s["ratio"]
    for mid in st.model_ids:  # what the reader returns meets the default budget, tensor by tensor
        got = st.state_dict(mid)
        for k, w in fam[mid].items():
            assert float((got[k] - w).norm() / w.norm()) <= DEFAULT_BUDGET["max_error"] + 1e-6


def test_default_never_grows_a_store_past_its_sources(tmp_path):
    src = _files(tmp_path, _seeds_family())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "larger than its sources" warning either
        st = uwsfmt.convert(src, tmp_path / "s.uws")
    assert store_bytes(st.path) <= sum((tmp_path / f"seed-{i}.safetensors").stat().st_size for i in range(6))
    assert summary(st)["budget_met"] is True


def test_a_family_without_a_shared_subspace_is_named_as_such(tmp_path):
    st = uwsfmt.convert(_files(tmp_path, _seeds_family()), tmp_path / "s.uws")
    out = io.StringIO()
    print_summary(st, out)
    assert "shares no useful subspace" in out.getvalue() and "quantized per-model deltas" in out.getvalue()


def test_a_forced_rank_over_noise_says_so_and_a_larger_store_warns(tmp_path):
    fam = {mid: {k: v.to(torch.bfloat16) for k, v in sd.items()} for mid, sd in _seeds_family(n=12).items()}
    src = _files(tmp_path, fam)  # bfloat16: a float16 residual alone is as large as the sources
    with pytest.warns(UserWarning, match="LARGER THAN ITS SOURCES.*drop --rank"):
        st = uwsfmt.convert(src, tmp_path / "r.uws", rank=11, residual_bits=16)
    notes = summary(st)["notes"]
    assert any("no stronger than noise" in n and "drop --rank" in n for n in notes), notes


@pytest.mark.parametrize("scheme", ["8", "8/4/2"])
def test_quantized_coefficients_are_what_the_recorded_errors_measure(tmp_path, scheme):
    fam = synthetic_family(n_models=8, shapes={"a.weight": (80, 48)}, rank=6, noise=0.005, seed=2, extra=False)
    st = uwsfmt.convert(fam, tmp_path / "q.uws", rank=6, coefficient_bits=scheme)
    e = st.tensor_entry("a.weight")
    assert st.format_version == "1.2" and e["coefficients"]["pack"] == "uint8" and e["coefficients"]["bits"]
    plain = uwsfmt.convert(fam, tmp_path / "p.uws", rank=6)
    assert plain.format_version == "1.0"  # float32 coefficients: older readers still read it
    assert store_bytes(st.path) < store_bytes(plain.path)
    for i, mid in enumerate(st.model_ids):
        err = float((st.state_dict(mid)["a.weight"] - fam[mid]["a.weight"]).norm() / fam[mid]["a.weight"].norm())
        assert err == pytest.approx(st.manifest["models"][i]["error"][0], rel=1e-4)
    assert uwsfmt.validate(st.path) == []


def test_a_budget_meets_every_member_with_quantized_coefficients_and_appends_too(tmp_path):
    fam = synthetic_family(n_models=10, shapes={"a.weight": (96, 64), "b.weight": (64, 96)}, rank=6, noise=0.01, seed=4, extra=False)
    first = {k: fam[k] for k in list(fam)[:8]}
    st = uwsfmt.convert(first, tmp_path / "b.uws", max_delta_error=0.3, coefficient_bits="8/4/2")
    st.close()
    with uwsfmt.open(tmp_path / "b.uws", mode="a") as st:
        for mid in list(fam)[8:]:
            st.append(fam[mid], id=mid)
    with uwsfmt.open(tmp_path / "b.uws") as st:
        assert summary(st)["budget_met"] is True
        for mid in st.model_ids:
            got = st.state_dict(mid)
            for k, w in fam[mid].items():
                centre = torch.stack([first[m][k] for m in first]).mean(0)
                assert float((got[k] - w).norm() / (w - centre).norm()) <= 0.3 + 1e-5, (mid, k)


def test_tall_views_quantize_residuals_per_column(tmp_path):
    """Format 1.3: a view at least twice as tall as wide (a LoRA B factor, out x r) gets one
    residual scale per column, not per row: r scales instead of out, the same codes."""
    from tests.independent_reader import SpecReader

    fam = synthetic_family(n_models=5, shapes={"b.weight": (96, 8), "a.weight": (8, 96)}, rank=2, noise=0.05,
                           extra=False, seed=3)
    st = uwsfmt.convert(fam, tmp_path / "s.uws", rank=0, residual_bits=4, min_numel=64)
    tall, wide = (st.tensor_entry(n)["residual"] for n in ("b.weight", "a.weight"))
    assert tall["axis"] == 1 and tall["scales"]["length"] == 8 and tall["codes"]["length"] == 96 * 8 * 4 // 8
    assert "axis" not in wide and wide["scales"]["length"] == 8
    assert st.format_version == "1.3"
    reader = SpecReader(tmp_path / "s.uws")
    for i, (mid, sd) in enumerate(fam.items()):
        got, spec = st.state_dict(mid), reader.model(i)
        for name, w in sd.items():
            assert torch.allclose(got[name], spec[name], rtol=0, atol=1e-6)
            d = w - torch.stack([m[name] for m in fam.values()]).mean(0)
            # 4-bit codes over a column of 96 deviations: well within a 7-level step of each column's range
            assert float((got[name] - w).norm() / d.norm()) < 0.15
            assert float((got[name] - w).norm() / w.norm()) == pytest.approx(st.errors()[i][st.tensor_position(name)], rel=1e-4)
    assert st.validate(deep=True) == []
