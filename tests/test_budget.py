"""Error budgets: the budget is met for every tensor of every model, tightening it never increases
error, 0 is lossless, appended models respect it, and the functional check hook."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import uwsfmt
from bench.trained import trained_family
from uwsfmt.cli import main as cli_main
from uwsfmt.encodings import budget
from uwsfmt.numerics import quantize, randomized
from uwsfmt.testing.families import synthetic_family, write_family

SHAPES = {"attn.weight": (48, 32), "mlp.weight": (64, 32), "conv.weight": (16, 4, 3, 3)}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float((a - b).norm())


def recomputed(store, fam) -> np.ndarray:
    return np.array([[rel(store.state_dict(m)[n], fam[m][n]) for n in store.tensor_names] for m in store.model_ids])


@pytest.fixture(scope="module")
def noisy_family():
    # low-rank structure plus iid noise: neither a pure subspace nor pure quantized deltas is best
    return synthetic_family(n_models=8, shapes=SHAPES, rank=3, noise=2e-3, delta_scale=0.05, seed=11)


@pytest.mark.parametrize("E", [0.1, 0.02, 3e-3, 1e-4])
def test_budget_is_met_for_every_tensor_of_every_model(tmp_path, noisy_family, E):
    fam = noisy_family
    store = uwsfmt.convert(fam, tmp_path / "s.uws", max_error=E)
    recorded = store.errors()
    assert np.all(np.isfinite(recorded)) and recorded.max() <= E  # from the stored values
    again = recomputed(store, fam)
    assert again.max() <= E  # and by recomputation from what a reader gets
    assert np.allclose(again, recorded, rtol=1e-4, atol=1e-7)
    s = store.summary()
    assert s["max_error"] == E and s["budget"] == f"max_error={E:g}"
    assert s["budget_met"] is True and s["refit_suggested"] == []
    for e in store.manifest["tensors"]:
        if "budget" in e:  # the choice is recorded, with what it cost and what it achieved
            b = e["budget"]
            assert b["max_error"] == E and b["error"] <= E and b["bytes"] <= b["dense_bytes"]
            assert b["frontier"][-1][0] == "dense"
            if e["encoding"] == "subspace":
                assert b["rank"] == max(k or 0 for k in e["rank"])
                assert b["residual_bits"] == (e["residual"] or {}).get("bits")
    assert store.validate(deep=True) == []


def test_tightening_the_budget_never_increases_error(tmp_path, noisy_family):
    fam = noisy_family
    worst, nbytes = [], []
    for i, E in enumerate([0.2, 0.05, 0.01, 2e-3, 5e-4, 1e-5, 0.0]):
        store = uwsfmt.convert(fam, tmp_path / f"s{i}.uws", max_error=E)
        errs = store.errors()
        worst.append(errs.max(axis=0))
        nbytes.append(sum((e.get("budget") or {}).get("bytes", 0) for e in store.manifest["tensors"]))
    worst = np.array(worst)
    assert np.all(np.diff(worst, axis=0) <= 1e-12), worst  # per tensor, worst model
    assert all(b2 >= b1 for b1, b2 in zip(nbytes, nbytes[1:])), nbytes
    assert worst[-1].max() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_zero_budget_is_lossless(tmp_path, dtype):
    fam = synthetic_family(n_models=4, shapes=SHAPES, rank=2, noise=1e-3, dtype=dtype, seed=12)
    store = uwsfmt.convert(fam, tmp_path / "s.uws", max_error=0)
    for mid, sd in fam.items():
        out = store.state_dict(mid)
        for name, w in sd.items():
            assert out[name].dtype == w.dtype and torch.equal(out[name], w), (mid, name)
    assert store.summary()["budget_met"] is True


def test_zero_budget_explains_when_it_cannot(tmp_path, noisy_family):
    with pytest.raises(uwsfmt.BudgetError, match=r"attn.weight.*forced to the subspace.*max_error=0.*exact bits"):
        uwsfmt.convert(noisy_family, tmp_path / "s.uws", max_error=0, encodings={"attn.*": "subspace"})
    assert not (tmp_path / "s.uws").exists()


def test_subspace_wins_on_low_rank_and_deltas_win_on_noise(tmp_path):
    low = synthetic_family(n_models=10, shapes={"w": (64, 48)}, rank=2, noise=0.0, extra=False, seed=13)
    st = uwsfmt.convert(low, tmp_path / "low.uws", max_error=1e-4)
    b = st.tensor_entry("w")["budget"]
    assert st.tensor_entry("w")["encoding"] == "subspace" and b["rank"] == 2 and b["residual_bits"] is None
    noise = synthetic_family(n_models=10, shapes={"w": (64, 48)}, rank=0, noise=0.05, extra=False, seed=14)
    st = uwsfmt.convert(noise, tmp_path / "noise.uws", max_error=0.03)
    b = st.tensor_entry("w")["budget"]
    assert b["rank"] == 0 and b["residual_bits"] in (1, 2, 4, 8)  # mean + quantized deltas


def test_overrides_fix_what_they_name(tmp_path, noisy_family):
    st = uwsfmt.convert(noisy_family, tmp_path / "r.uws", max_error=0.02, rank=2, mode="left")
    for e in st.manifest["tensors"]:
        if e["encoding"] == "subspace":  # a vector (view 1 x n) has one left direction at most
            assert e["rank"][0] == min(2, e["view"][0]) and e["mode"] == "left"
    st = uwsfmt.convert(noisy_family, tmp_path / "b.uws", max_error=0.02, residual_bits=8)
    for e in st.manifest["tensors"]:
        if e["encoding"] == "subspace":
            assert e["residual"]["bits"] == 8
    assert st.errors().max() <= 0.02
    with pytest.raises(uwsfmt.ConfigError, match="max_error"):
        uwsfmt.convert(noisy_family, tmp_path / "x.uws", max_error=-1.0)


def test_appended_models_respect_the_budget(tmp_path, capfd):
    fam = synthetic_family(n_models=9, shapes={"w": (48, 40), "v": (32, 32)}, rank=2, noise=0.0, seed=15)
    ids = sorted(fam)
    store = uwsfmt.convert({m: fam[m] for m in ids[:6]}, tmp_path / "s.uws", max_error=1e-4)
    assert store.tensor_entry("w")["residual"] is None  # exact rank 2: no residual at build
    # a model the bases do not hold: other directions, and a changed "frozen" tensor
    g = torch.Generator().manual_seed(0)
    alien = {k: v.clone() for k, v in fam[ids[6]].items()}
    alien["w"] += 0.05 * torch.randn(alien["w"].shape, generator=g)
    alien["embed.frozen.weight"] += 1e-3 * torch.randn(alien["embed.frozen.weight"].shape, generator=g)
    entry = store.append(alien, id="alien")
    kinds = {x["tensor"]: x for x in entry["exceptions"]}
    assert set(kinds) >= {"w", "embed.frozen.weight"}
    assert kinds["w"]["error_before"] > 1e-4 >= kinds["w"]["error"]
    plain = store.append(fam[ids[7]], id="plain")  # a family member: no exception needed
    assert not plain.get("exceptions")
    st = uwsfmt.open(tmp_path / "s.uws")
    for mid, src in (("alien", alien), ("plain", fam[ids[7]])):
        sd = st.state_dict(mid)
        for j, name in enumerate(st.tensor_names):
            got = rel(sd[name], src[name])
            assert got <= 1e-4, (mid, name, got)
            assert got == pytest.approx(st.errors()[st.model_index(mid), j], rel=1e-3, abs=1e-7)
            assert torch.equal(st.tensor(mid, name), sd[name])
    s = st.summary()
    assert s["budget_met"] and set(s["refit_suggested"]) == set(kinds)
    assert st.validate(deep=True) == []
    assert cli_main(["info", str(tmp_path / "s.uws")]) == 0
    assert "REFIT SUGGESTED for 2 tensor(s)" in capfd.readouterr().out
    # a tighter budget for one append, e.g. 0: exact
    exact = st.append(alien, id="alien-exact", max_error=0.0)
    assert max(exact["error"]) == 0.0
    sd = uwsfmt.open(tmp_path / "s.uws").state_dict("alien-exact")
    assert all(torch.equal(sd[n], alien[n]) for n in alien)


def test_cli_convert_with_budget_and_info(tmp_path, noisy_family, capfd):
    files = [str(p) for p in write_family(noisy_family, tmp_path / "src")]
    out = str(tmp_path / "s.uws")
    assert cli_main(["convert", *files, "-o", out, "--max-error", "0.01", "-q"]) == 0
    assert cli_main(["info", out]) == 0
    text = capfd.readouterr().out
    assert "error budget: max_error=0.01 per tensor and model: met" in text and "bits" in text
    assert cli_main(["convert", *files, "-o", str(tmp_path / "x.uws"), "--max-error", "-2", "-q"]) == 2
    assert "max_error must be" in capfd.readouterr().err


def test_evaluate_hook_on_a_trained_family(tmp_path):
    tf = trained_family(n_tasks=3)
    files = write_family(tf.state_dicts, tmp_path / "src")
    store = uwsfmt.convert([str(p) for p in files], tmp_path / "s.uws", max_error=0.05)
    res = uwsfmt.evaluate(store, tf.evaluate, source_root=tmp_path / "src")  # originals: the recorded sources, found by name
    assert set(res) == set(tf.state_dicts)
    for mid, r in res.items():
        assert r["original"] == pytest.approx(tf.accuracies()[mid])
        assert r["delta"] == pytest.approx(r["reconstructed"] - r["original"])
        assert abs(r["delta"]) <= 2.0
    # one-argument metrics and explicit originals work too; unknown originals have no delta
    one = uwsfmt.evaluate(store, lambda sd: float(sd["fc1.weight"].double().norm()), sources={"task-000": tf.state_dicts["task-000"]})
    assert one["task-000"]["delta"] is not None and one["task-001"]["original"] is None
    from uwsfmt.evaluate import summarize

    assert summarize(res)["worst_delta"] <= 2.0


def test_chooser_predicts_what_pass_two_records():
    torch.manual_seed(0)
    ws = [torch.randn(24, 40) * 0.1 + 1.0 for _ in range(6)]
    mean = torch.stack([w.double() for w in ws]).mean(0)
    gram = sum((w.double() - mean) @ (w.double() - mean).T for w in ws)
    vals, vecs = torch.linalg.eigh(gram)
    fit = budget.Fit("left", "mean", mean.float(), vecs.flip(1)[:, :5].float(), None, {"left": vals.flip(0)}, {"left": 5})
    sweep = budget.ErrorSweep(fit, budget.candidates(fit), "bfloat16", (24, 40))
    for w in ws:
        sweep.add(w.to(torch.bfloat16))
    errs = sweep.errors()
    assert errs.shape == (6, len(sweep.cands)) and np.all(np.isfinite(errs))
    choice = budget.pick(sweep, n_models=6, budget=budget.Budget(max_error=0.01))
    assert choice.encoding == "subspace" and choice.error <= 0.01
    assert budget.candidate_ranks(5) == [0, 1, 2, 4, 5] and budget.candidate_ranks(0) == [0]


def test_lossless_store_costs_what_the_sources_do(tmp_path):
    # one model's dense row spans several pack chunks: no chunk may be padded to full size on disk
    fam = synthetic_family(n_models=3, shapes={"w": (384, 256)}, rank=2, noise=1e-3, extra=False, seed=16)
    store = uwsfmt.convert(fam, tmp_path / "s.uws", max_error=0)
    raw = sum(w.numel() * w.element_size() for sd in fam.values() for w in sd.values())
    assert store.summary()["store_bytes"] <= 1.02 * raw + 16_000


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_fake_quantization_is_bit_identical_to_quantize_then_dequantize(bits):
    """The budget's sweep rates candidates with fake_quantize_rows: it must give what a reader decodes,
    on rows where different clips win, zero rows, tiny and heavy-tailed ones."""
    g = torch.Generator().manual_seed(10 + bits)
    r = torch.randn(64, 300, generator=g)
    r[5] = 0.0
    r[6] = -0.0
    r[7, 3] = 40.0  # an outlier: a smaller clip wins on that row
    r[8] *= 1e-30
    r[9] = torch.randn(300, generator=g).pow(5)  # heavy tails: every clip wins somewhere
    for m in (r, r.T.contiguous(), r[:, :7].contiguous()):
        codes, scales = quantize.quantize_rows(m, bits)
        back = quantize.dequantize_rows(codes, scales, tuple(m.shape), bits)
        fake = quantize.fake_quantize_rows(m, bits)
        assert torch.equal(back, fake)  # (a reader's zeros are +0.0; -0.0 adds the same)
        q, s = quantize.row_codes(m, bits)  # the codes and scales the search picks, times each other: bit for bit
        assert torch.equal(fake.view(torch.int32), q.mul_(s[:, None]).view(torch.int32))
    bad = r.clone()
    bad[2, 2] = float("nan")  # a non-finite row: NaN scale, as row_codes gives it
    q, s = quantize.row_codes(bad, bits)
    torch.testing.assert_close(quantize.fake_quantize_rows(bad, bits), q.mul_(s[:, None]), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_quantizer_round_trip_and_one_bit_sign(bits):

    g = torch.Generator().manual_seed(bits)
    r = torch.randn(7, 37, generator=g)
    r[3] = 0.0
    codes, scales = quantize.quantize_rows(r, bits)
    back = quantize.dequantize_rows(codes, scales, (7, 37), bits)
    assert torch.equal(back, quantize.fake_quantize_rows(r, bits))
    assert codes.numel() == (7 * 37 * bits + 7) // 8 and torch.all(back[3] == 0)
    if bits == 1:
        assert torch.equal(torch.sign(back[0]), torch.where(r[0] >= 0, 1.0, -1.0))
        assert torch.allclose(scales, r.abs().mean(dim=1))
    plain = quantize.dequantize_rows(*quantize.quantize_rows(r, bits, search=False), (7, 37), bits)
    assert (back - r).norm() <= (plain - r).norm() + 1e-6  # the clip search never does worse than absmax


def _wide():
    """Two tensors wide enough on both sides for a sketch of 64 (+16) directions."""
    return synthetic_family(8, shapes={"w.weight": (256, 192), "v.weight": (320, 256)}, rank=6, noise=2e-3, extra=False)


def _budget_held(st, fam, E):
    assert st.summary()["budget_met"] is True and float(st.errors().max()) <= E
    for mid, sd in fam.items():  # what a reader gets back
        back = st.state_dict(mid)
        for name, w in sd.items():
            assert float((back[name].double() - w.double()).norm() / w.double().norm()) <= E * (1 + 1e-6)


@pytest.mark.parametrize("E", [1e-3, 2e-4])
def test_sketched_budget_meets_it_with_about_the_exact_bytes(tmp_path, E):
    fam = _wide()
    steps = []
    # float32 coefficients: the bases are compared (int8 ones at a budget of 2e-4 leave the
    # sketch's slightly worse directions less room, ~8% more bytes)
    st = uwsfmt.convert(fam, tmp_path / "s.uws", max_error=E, basis="sketch", coefficient_bits="float32",
                        progress=lambda *a: steps.append(a[:2]))
    assert steps[-1][0] == steps[-1][1]
    exact = uwsfmt.convert(fam, tmp_path / "e.uws", max_error=E, coefficient_bits="float32")
    _budget_held(st, fam, E)
    for e, ex in zip(st.manifest["tensors"], exact.manifest["tensors"]):
        b = e["budget"]
        assert e["basis"]["method"] == "sketch" and "basis" not in ex
        used = [s for s in ("left", "right") if b["mode"] in (s, "both")]
        assert sorted(e["basis"]["check"]) == used and all(e["basis"]["check"][s]["ok"] for s in used)
        assert b["bytes"] <= 1.05 * ex["budget"]["bytes"], (b, ex["budget"])
    assert [r["basis"] for r in st.tensor_table()] == ["sketch", "sketch"]
    assert [(r["basis"], r["basis_note"]) for r in exact.tensor_table()] == [("exact", None), ("exact", None)]


def test_sketched_budget_widens_then_falls_back_to_exact(tmp_path, monkeypatch):
    fam = _wide()
    exact = uwsfmt.convert(fam, tmp_path / "e.uws", max_error=1e-3)
    want = [(e["budget"]["mode"], e["budget"]["rank"], e["budget"]["residual_bits"]) for e in exact.manifest["tensors"]]
    assert all(r == 8 for _, r, _ in want)
    monkeypatch.setattr(randomized, "SKETCH_RANK", 4)  # 4 candidates: rank 4 is the edge, 16 hold the 8 needed
    st = uwsfmt.convert(fam, tmp_path / "w.uws", max_error=1e-3, basis="sketch")
    _budget_held(st, fam, 1e-3)
    assert [(e["budget"]["mode"], e["budget"]["rank"], e["budget"]["residual_bits"]) for e in st.manifest["tensors"]] == want
    assert all(e["basis"]["columns"] == {"left": 16 + 16, "right": 16 + 16} for e in st.manifest["tensors"])
    monkeypatch.undo()
    real = uwsfmt.numerics.randomized.SketchResult.check
    monkeypatch.setattr(uwsfmt.numerics.randomized.SketchResult, "check", lambda self, k, tol: real(self, k, tol) | {"ok": False})
    st = uwsfmt.convert(fam, tmp_path / "x.uws", max_error=1e-3, basis="sketch")
    _budget_held(st, fam, 1e-3)
    for e, ex in zip(st.manifest["tensors"], exact.manifest["tensors"]):
        assert e["basis"]["method"] == "exact" and "a-posteriori check failed at rank 8" in e["basis"]["sketch_rejected"]
        assert e["budget"] == ex["budget"]
    row = st.tensor_table()[0]  # what info --json and the inspector show
    assert row["basis"] == "exact" and "a-posteriori check failed" in row["basis_note"]


def test_sketched_budget_does_not_widen_when_its_candidates_hold_everything(tmp_path):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(768, generator=g)
    fam = {f"m{i}": {"norm.weight": base + 0.01 * torch.randn(768, generator=g)} for i in range(8)}
    st = uwsfmt.convert(fam, tmp_path / "s.uws", max_delta_error=0.3, basis="sketch")
    assert st.summary()["budget_met"] is True
    e = st.manifest["tensors"][0]
    assert (e["budget"]["rank"], e["budget"]["residual_bits"]) == (0, 4)  # mean + int4 deltas
    # eight models span at most 7 directions around their mean: the candidates hold all of it (the
    # rest is rounding), so rank 0 is not for want of directions: no wider sketch
    assert e["basis"]["method"] == "sketch" and e["basis"]["columns"] == {"right": 64 + 16}
