"""Error budgets on LoRA families: each module's rank is the smallest every adapter meets the
budget at, checked against what a reader gets back; budgets no rank can meet are clear errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import uwsfmt
from uwsfmt.sources import open_checkpoint
from uwsfmt.testing.families import lora_family, lora_key, write_peft_family


def _family(tmp_path, name="src", dtype=torch.float32, **kw):
    """Seven adapters with a shared 3-dim structure: six of rank 4 on two modules, one of rank 8
    on q_proj only (mixed ranks, a missing module)."""
    opts = dict(layers=1, width=48, shared_rank=3, seed=11, dtype=dtype, noise=0.02) | kw
    a = lora_family(6, modules=("q_proj", "v_proj"), rank=4, **opts)
    b = lora_family(1, modules=("q_proj",), rank=8, **opts)
    fam = {**a, **{f"wide-{k}": v for k, v in b.items()}}
    return [str(d) for d in write_peft_family(fam, tmp_path / name)]


def _update(sd: dict, module: str, scale: float = 1.0) -> torch.Tensor:
    return scale * sd[lora_key(0, module, "B")].double() @ sd[lora_key(0, module, "A")].double()


def _source_update(path: str, module: str) -> torch.Tensor | None:
    ck = open_checkpoint(path)
    pair = next((p for m, p in ck.lora_pairs().items() if m.endswith(f"{module}")), None)
    if pair is None:
        return None
    return float(pair.scale) * ck.get(pair.b).double() @ ck.get(pair.a).double()


def _worst_by_module(store) -> list[float]:
    errs = store.errors()
    return [float(errs[:, j].max()) for j in range(errs.shape[1])]


def test_budget_picks_the_cheapest_ranks_every_adapter_meets(tmp_path):
    src = _family(tmp_path)
    budget = 0.3
    st = uwsfmt.convert(src, tmp_path / "b.uws", max_error=budget)
    assert st.summary()["budget_met"] is True
    full = uwsfmt.convert(src, tmp_path / "full.uws", rank=64)  # the same bases, every direction kept
    for j, (e, ef) in enumerate(zip(st.manifest["tensors"], full.manifest["tensors"])):
        kl, kr = e["budget"]["ranks"]
        assert e["rank"] == [kl, kr] and e["lora"] is not None
        assert 0 < kl < ef["rank"][0] and 0 < kr < ef["rank"][1], "the budget should cut both ranks"
        assert float(st.errors()[:, j].max()) <= budget
        assert e["budget"]["error"] == pytest.approx(float(st.errors()[:, j].max()), rel=1e-9)
        # recomputed densely from the sources: these ranks meet the budget, and a cheaper pair
        # (one direction fewer on either side) misses it for some adapter
        left = torch.from_numpy(full.read_array(ef["left"])).double()
        right = torch.from_numpy(full.read_array(ef["right"])).double()
        module = e["name"].rsplit(".", 1)[-1]
        xs = [x for x in (_source_update(p, module) for p in src) if x is not None]

        def worst(a: int, b: int, left=left, right=right, xs=xs) -> float:
            la, rb = left[:, :a], right[:, :b]
            return max(float((x - la @ (la.T @ x @ rb) @ rb.T).norm() / x.norm()) for x in xs)

        assert worst(kl, kr) <= budget
        assert worst(kl - 1, kr) > budget and worst(kl, kr - 1) > budget
    # what a reader gets back, against the sources' own s B A
    for mid, path in zip(st.model_ids, src):
        back = st.state_dict(mid)
        for module in ("q_proj", "v_proj"):
            want = _source_update(path, module)
            if want is None:
                assert lora_key(0, module, "A") not in back
                continue
            assert float((_update(back, module) - want).norm() / want.norm()) <= budget + 1e-6
    # for a LoRA update ||W - M|| is ||W||: the delta budget chooses alike
    same = uwsfmt.convert(src, tmp_path / "d.uws", max_delta_error=budget)
    assert [e["rank"] for e in same.manifest["tensors"]] == [e["rank"] for e in st.manifest["tensors"]]
    assert st.validate(deep=True) == []


def test_tighter_budgets_keep_more_and_lose_less(tmp_path):
    src = _family(tmp_path)
    prev_rank, prev_err = None, None
    for budget in (0.6, 0.3, 0.1, 1e-4):
        st = uwsfmt.convert(src, tmp_path / f"b{budget}.uws", max_error=budget)
        rank = [sum(e["rank"]) for e in st.manifest["tensors"]]
        err = _worst_by_module(st)
        assert max(err) <= budget
        if prev_rank is not None:
            assert all(r >= p for r, p in zip(rank, prev_rank)) and rank != prev_rank
            assert all(x <= p for x, p in zip(err, prev_err))
        prev_rank, prev_err = rank, err
        frontier = st.manifest["tensors"][0]["budget"]["frontier"]
        assert [p[3] for p in frontier] == sorted(p[3] for p in frontier) and frontier[0][4] == 1.0
        assert [p[4] for p in frontier] == sorted((p[4] for p in frontier), reverse=True)
    assert max(prev_err) < 1e-5  # every direction the adapters span: float32 rounding only


def test_budgets_no_rank_meets_are_clear_errors_and_write_nothing(tmp_path):
    src = _family(tmp_path, dtype=torch.bfloat16)
    ok = uwsfmt.convert(src, tmp_path / "ok.uws", max_error=0.05)  # above bf16's rounding: fine
    assert max(_worst_by_module(ok)) <= 0.05
    with pytest.raises(uwsfmt.BudgetError, match=r"q_proj.*cannot be met.*bfloat16.*--lora-mode factors"):
        uwsfmt.convert(src, tmp_path / "tight.uws", max_error=1e-4)
    with pytest.raises(uwsfmt.BudgetError, match=r"raise --max-rank"):
        uwsfmt.convert(src, tmp_path / "capped.uws", max_error=1e-4, max_rank=2)
    with pytest.raises(uwsfmt.BudgetError, match=r"budget of 0.*--lora-mode factors"):
        uwsfmt.convert(src, tmp_path / "zero.uws", max_error=0)
    assert sorted(os.listdir(tmp_path)) == ["ok.uws", "src"]  # no store, no half-built folder
    # the way to exact bits: the factor-wise mode stores A and B as they are
    exact = uwsfmt.convert(src[:-1], tmp_path / "exact.uws", max_error=0, lora_mode="factors")  # every module in each
    for mid, path in zip(exact.model_ids, src[:-1]):
        back, ck = exact.state_dict(mid), open_checkpoint(path)
        for name in ck.infos():
            assert torch.equal(back[name], ck.get(name))


def test_append_over_the_budget_is_refused_and_the_store_unchanged(tmp_path):
    src = _family(tmp_path)
    st = uwsfmt.convert(src[:-2], tmp_path / "b.uws", max_error=0.3)
    before = (st.n_models, st.manifest["generation"])
    stranger = _family(tmp_path, "other", seed=99)[0]  # same shapes, none of the family's structure
    with pytest.raises(uwsfmt.BudgetError, match=r"over the error budget.*not added"):
        st.append(stranger, id="stranger")
    again = uwsfmt.open(tmp_path / "b.uws")
    assert (again.n_models, again.manifest["generation"]) == before and again.validate() == []
    # with a looser budget given for it, it goes in, and the store says its budget is no longer met
    entry = st.append(stranger, id="stranger", max_error=1.0)
    assert max(entry["error"]) > 0.3
    assert uwsfmt.open(tmp_path / "b.uws").summary()["budget_met"] is False


def test_cli_budgeted_lora_convert_and_its_clear_failure(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "uwsfmt.cli", *args], capture_output=True, text=True, timeout=300)

    src = _family(tmp_path, dtype=torch.bfloat16)
    p = run("convert", *src, "-o", str(tmp_path / "b.uws"), "--max-error", "0.1", "-q")
    assert p.returncode == 0, p.stderr
    assert "error budget: max_error=0.1 per tensor and model: met for every tensor of every model" in p.stdout
    p = run("convert", *src, "-o", str(tmp_path / "t.uws"), "--max-error", "1e-4", "-q")
    assert p.returncode != 0 and "cannot be met" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "t.uws").exists()


def _wide_family(tmp_path, dtype=torch.float32):
    """Twelve rank-8 adapters of two 256-wide modules: 96 directions per side, more than a
    sketch of 64 (+16) columns, so basis="sketch" sketches."""
    fam = lora_family(12, layers=1, modules=("q_proj", "v_proj"), width=256, rank=8, shared_rank=3, seed=5,
                      dtype=dtype, noise=0.002)
    return [str(d) for d in write_peft_family(fam, tmp_path / "wide")]


def _check_budget_met(st, src, budget):
    assert st.summary()["budget_met"] is True and max(_worst_by_module(st)) <= budget
    for mid, path in zip(st.model_ids, src):  # what a reader gets back, against the sources' s B A
        back = st.state_dict(mid)
        for module in ("q_proj", "v_proj"):
            want = _source_update(path, module)
            assert float((_update(back, module) - want).norm() / want.norm()) <= budget + 1e-6


def _cost(e) -> int:  # values the ranks cost: bases and every adapter's core
    kl, kr = e["budget"]["ranks"]
    out, inp = e["view"]
    return out * kl + inp * kr + 12 * kl * kr


def test_sketched_budget_is_met_at_about_the_exact_ranks(tmp_path):
    src = _wide_family(tmp_path)
    budget = 0.2
    steps = []
    st = uwsfmt.convert(src, tmp_path / "s.uws", max_error=budget, basis="sketch", progress=lambda *a: steps.append(a[:2]))
    assert steps[-1][0] == steps[-1][1]  # progress counts each adapter once per module
    exact = uwsfmt.convert(src, tmp_path / "e.uws", max_error=budget)
    _check_budget_met(st, src, budget)
    for e, ex in zip(st.manifest["tensors"], exact.manifest["tensors"]):
        assert e["basis"]["method"] == "sketch" and e["basis"]["columns"] == {"left": 80, "right": 80}
        assert all(c["ok"] for c in e["basis"]["check"].values())
        assert e["rank"] == e["budget"]["ranks"] and e["rank"][0] < 64 and e["rank"][1] < 64
        assert "basis" not in ex  # exact bases, none sketched
        assert _cost(e) <= 1.1 * _cost(ex), (e["rank"], ex["rank"])


def test_sketched_budget_widens_the_sketch_when_its_candidates_run_short(tmp_path, monkeypatch):
    src = _wide_family(tmp_path)
    monkeypatch.setattr(uwsfmt.numerics.randomized, "SKETCH_RANK", 8)  # 8 candidates: the budget needs more, 4x more do
    st = uwsfmt.convert(src, tmp_path / "s.uws", max_error=0.2, basis="sketch")
    _check_budget_met(st, src, 0.2)
    for e in st.manifest["tensors"]:
        assert e["basis"]["method"] == "sketch" and e["basis"]["columns"] == {"left": 32 + 16, "right": 32 + 16}
        assert 32 > e["rank"][0] > 8
    # met with every sketched direction of a side (B's 8 here): widened too, in case more fit better
    st = uwsfmt.convert(src, tmp_path / "edge.uws", max_error=0.3, basis="sketch")
    exact = uwsfmt.convert(src, tmp_path / "e.uws", max_error=0.3)
    for e, ex in zip(st.manifest["tensors"], exact.manifest["tensors"]):
        assert e["basis"]["columns"] == {"left": 32 + 16, "right": 32 + 16} and e["rank"] == ex["rank"] == [3, 8]


def test_sketched_budget_falls_back_to_the_exact_bases(tmp_path, monkeypatch):
    src = _wide_family(tmp_path)
    exact = uwsfmt.convert(src, tmp_path / "e.uws", max_error=0.2)
    # too few adapters to sketch (their 96 directions against 64 + 16 sketched columns): exact
    few = uwsfmt.convert(src[:9], tmp_path / "few.uws", max_error=0.2, basis="sketch")
    assert all("basis" not in e for e in few.manifest["tensors"])
    # a sketch whose check fails at the ranks picked: the exact bases, and the exact ranks
    real = uwsfmt.numerics.randomized.SketchResult.check
    monkeypatch.setattr(uwsfmt.numerics.randomized.SketchResult, "check", lambda self, k, tol: real(self, k, tol) | {"ok": False})
    st = uwsfmt.convert(src, tmp_path / "s.uws", max_error=0.2, basis="sketch")
    _check_budget_met(st, src, 0.2)
    for e, ex in zip(st.manifest["tensors"], exact.manifest["tensors"]):
        assert e["basis"]["method"] == "exact" and "a-posteriori check failed" in e["basis"]["sketch_rejected"]
        assert e["rank"] == ex["rank"]
    monkeypatch.undo()
    # a budget nothing meets is the exact path's clear error, nothing written
    bf = _wide_family(tmp_path / "bf", dtype=torch.bfloat16)
    with pytest.raises(uwsfmt.BudgetError, match=r"cannot be met.*bfloat16"):
        uwsfmt.convert(bf, tmp_path / "tight.uws", max_error=1e-4, basis="sketch")
    assert not (tmp_path / "tight.uws").exists()


def test_cli_sketched_budget(tmp_path):
    src = _wide_family(tmp_path)
    p = subprocess.run([sys.executable, "-m", "uwsfmt.cli", "convert", *src, "-o", str(tmp_path / "s.uws"),
                        "--max-error", "0.2", "--basis", "sketch", "--seed", "3", "-q"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "met for every tensor of every model" in p.stdout
    st = uwsfmt.open(tmp_path / "s.uws")
    assert [e["basis"]["method"] for e in st.manifest["tensors"]] == ["sketch", "sketch"]
    p = subprocess.run([sys.executable, "-m", "uwsfmt.cli", "convert", *src, "-o", str(tmp_path / "x.uws"), "--basis", "fast"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "invalid choice: 'fast'" in p.stderr and not (tmp_path / "x.uws").exists()


def test_info_says_when_a_product_store_is_larger_than_the_adapters(tmp_path):
    """Adapters with no shared subspace (independent inits and updates): a budgeted product-basis
    store outgrows their files, and `info` says so and what to do."""
    import io

    from uwsfmt.cli import print_summary
    from uwsfmt.report import summary
    from uwsfmt.testing.families import lora_family, write_peft_family

    fam = lora_family(8, layers=1, width=48, rank=8, shared_rank=0, shared_init=False, seed=3)
    dirs = write_peft_family(fam, tmp_path / "adapters")
    product = uwsfmt.convert(dirs, tmp_path / "p.uws", max_error=0.01, lora_mode="product")
    s = summary(product)
    assert s["ratio"] < 1 and s["lora_larger_than_sources"]
    out = io.StringIO()
    print_summary(product, out)
    assert "LARGER THAN ITS SOURCES" in out.getvalue() and "--lora-mode factors" in out.getvalue()
    factors = uwsfmt.convert(dirs, tmp_path / "f.uws", max_error=0.01, lora_mode="factors")
    assert not summary(factors)["lora_larger_than_sources"]


def test_auto_lora_mode_weighs_the_product_basis_against_the_adapters_factors(tmp_path):
    """lora_mode="auto" (the default) under a budget: adapters that share no subspace are stored
    by their factors (the product basis would outgrow them), a family that shares one keeps the
    product basis; each store records why, and every adapter meets the budget either way."""
    import io

    from uwsfmt.cli import print_summary
    from uwsfmt.report import summary
    from uwsfmt.testing.families import lora_family, write_peft_family

    unrelated = write_peft_family(lora_family(8, layers=1, width=48, rank=8, shared_rank=0, shared_init=False, seed=3),
                                  tmp_path / "unrelated")
    shared = write_peft_family(lora_family(12, layers=1, width=256, rank=8, shared_rank=8, seed=3), tmp_path / "shared")
    for dirs, want in ((unrelated, "factors"), (shared, "product")):
        st = uwsfmt.convert(dirs, tmp_path / f"{want}.uws", max_error=0.1)
        settings = st.manifest["build"]["settings"]
        assert settings["lora_mode"] == want and settings["lora_choice"].startswith(f"auto: {want} (")
        assert summary(st)["ratio"] > 1  # smaller than the adapters' files
        assert float(st.errors().max()) <= 0.1 * (1 + 1e-6)
        assert any(e.get("lora") for e in st.manifest["tensors"]) == (want == "product")
        out = io.StringIO()
        print_summary(st, out)
        assert f"LoRA mode auto: {want} (under the budget the product basis need" in out.getvalue()
    forced = uwsfmt.convert(unrelated, tmp_path / "forced.uws", max_error=0.1, lora_mode="product")
    assert summary(forced)["ratio"] < 1 and forced.manifest["build"]["settings"]["lora_choice"] is None
    # no budget: nothing to weigh, the product basis as before
    plain = uwsfmt.convert(unrelated, tmp_path / "plain.uws", rank=4)
    assert plain.manifest["build"]["settings"]["lora_mode"] == "product" and any(e.get("lora") for e in plain.manifest["tensors"])
