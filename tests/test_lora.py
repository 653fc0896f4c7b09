"""LoRA families: product-basis math, kohya / diffusers layouts, mixed ranks, conflicts."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import uwsfmt
from uwsfmt.encodings.lora import ProductGramStats, core, factors
from uwsfmt.sources import open_checkpoint
from uwsfmt.testing.families import lora_family, lora_key, write_peft_family


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---------------------------------------------------------------------------- math


def test_product_grams_equal_the_dense_ones():
    g = torch.Generator().manual_seed(0)
    st = ProductGramStats.empty(12, 9, device=torch.device("cpu"))
    dense_l, dense_r, sq = torch.zeros(12, 12, dtype=torch.float64), torch.zeros(9, 9, dtype=torch.float64), 0.0
    for r, s in ((2, 0.5), (5, 2.0), (3, 1.0)):
        a, b = torch.randn(r, 9, generator=g), torch.randn(12, r, generator=g)
        st.add(a, b, s)
        x = s * b.double() @ a.double()
        dense_l += x @ x.T
        dense_r += x.T @ x
        sq += float((x * x).sum())
    st.add_zero()
    assert st.count == 4
    assert torch.allclose(st.left, dense_l) and torch.allclose(st.right, dense_r)
    assert st.sq_norm == pytest.approx(sq)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adapters_added_together_equal_the_dense_grams_and_sketches(dtype):
    """add_many (n adapters in one GEMM per side) gives the dense product Grams, and the
    sketch's G X, for wide enough shapes that the sketch's products take the oneDNN path."""
    from uwsfmt.encodings.lora import ProductGramSketch

    g = torch.Generator().manual_seed(3)
    out, inp, r, scales = 300, 260, 4, [0.5, 2.0, 1.0, 3.0]
    a = torch.randn(len(scales), r, inp, generator=g, dtype=dtype)
    b = torch.randn(len(scales), out, r, generator=g, dtype=dtype)
    xs = {"left": torch.randn(out, 6, generator=g, dtype=torch.float64),
          "right": torch.randn(inp, 6, generator=g, dtype=torch.float64)}
    st = ProductGramStats.empty(out, inp, device=torch.device("cpu"))
    sk = ProductGramSketch(xs)
    st.add_many(a, b, scales)
    sk.add_many(a, b, scales)
    st.add_zero()
    x = [s * b[i].double() @ a[i].double() for i, s in enumerate(scales)]
    dense_l, dense_r = sum(xi @ xi.T for xi in x), sum(xi.T @ xi for xi in x)
    sq = sum(float((xi * xi).sum()) for xi in x)
    assert st.count == 5 and sk.count == 4
    assert torch.allclose(st.left, dense_l, rtol=1e-10, atol=1e-9) and torch.allclose(st.right, dense_r, rtol=1e-10, atol=1e-9)
    assert st.sq_norm == pytest.approx(sq, rel=1e-12) and sk.sq_norm == pytest.approx(sq, rel=1e-12)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for side, dense in (("left", dense_l), ("right", dense_r)):
        want = dense @ xs[side]
        assert float((sk.y[side] - want).norm() / want.norm()) < tol
    one = ProductGramStats.empty(out, inp, device=torch.device("cpu"))
    for i, s in enumerate(scales):  # one at a time: the same sums
        one.add(a[i], b[i], s)
    assert torch.allclose(one.left, st.left, rtol=1e-12, atol=1e-9)


def test_sketch_sweeps_add_adapters_in_runs_split_by_rank_and_batch(tmp_path, monkeypatch):
    """A sketch build adds consecutive adapters of one rank together, at most SWEEP_BATCH; the
    store is the one built adding them one by one (same ranks, errors to float32 round-off)."""
    import uwsfmt.encodings.lora as lora_enc

    a = lora_family(5, layers=1, modules=("q_proj", "v_proj"), width=160, rank=4, shared_rank=3, seed=21)
    b = lora_family(2, layers=1, modules=("q_proj", "v_proj"), width=160, rank=8, shared_rank=3, seed=22)
    fam = {**a, **{f"wide-{k}": v for k, v in b.items()}}
    fam["adapter-002"] = {k: v for k, v in fam["adapter-002"].items() if "v_proj" not in k}
    src = [str(d) for d in write_peft_family(fam, tmp_path / "src")]
    sizes = []
    real = lora_enc.ProductGramSketch.add_many
    monkeypatch.setattr(lora_enc.ProductGramSketch, "add_many", lambda self, x, y, s: sizes.append(len(s)) or real(self, x, y, s))
    monkeypatch.setattr(lora_enc.bases, "SWEEP_BATCH", 3)
    together = uwsfmt.convert(src, tmp_path / "together.uws", rank=4, basis="sketch")
    # two sweeps per module: q_proj's 5 rank-4 adapters in runs of 3 + 2, then the 2 rank-8 ones;
    # v_proj, which adapter-002 lacks: 000, 001, 003 | 004 | the 2 rank-8 ones
    assert sizes == [3, 2, 2] * 2 + [3, 1, 2] * 2
    assert [(e.get("basis") or {}).get("method") for e in together.manifest["tensors"]] == ["sketch", "sketch"]
    monkeypatch.setattr(lora_enc.bases, "SWEEP_BATCH", 1)
    alone = uwsfmt.convert(src, tmp_path / "alone.uws", rank=4, basis="sketch")
    assert [e["rank"] for e in together.manifest["tensors"]] == [e["rank"] for e in alone.manifest["tensors"]]
    assert together.errors() == pytest.approx(alone.errors(), rel=1e-4, abs=1e-6)


def test_core_and_factors_rebuild_the_projection():
    g = torch.Generator().manual_seed(1)
    left = torch.linalg.qr(torch.randn(10, 4, generator=g, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(7, 3, generator=g, dtype=torch.float64))[0]
    a, b = torch.randn(2, 7, generator=g, dtype=torch.float64), torch.randn(10, 2, generator=g, dtype=torch.float64)
    c = core(left, right, a, b, 1.5)
    assert torch.allclose(c, left.T @ (1.5 * b @ a) @ right)
    bb, aa = factors(left, right, c, 2)
    assert bb.shape == (10, 2) and aa.shape == (2, 7)  # rank <= min(k, r)
    assert torch.allclose(bb @ aa, left @ c @ right.T)
    b0, a0 = factors(left, right, c, 0)
    assert b0.shape == (10, 0) and a0.shape == (0, 7)


def _gauge(fam: dict, seed: int) -> dict:
    """Every adapter's (B G, G^-1 A): the same products, different factors."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for mid, sd in fam.items():
        sd = dict(sd)
        for k in list(sd):
            if k.endswith("lora_A.weight"):
                kb = k.replace("lora_A", "lora_B")
                r = sd[k].shape[0]
                gm = torch.randn(r, r, generator=g, dtype=torch.float64) + 3 * torch.eye(r, dtype=torch.float64)
                sd[kb] = (sd[kb].double() @ gm).float()
                sd[k] = torch.linalg.solve(gm, sd[k].double()).float()
        out[mid] = sd
    return out


def test_product_mode_is_gauge_invariant_factor_mode_is_not(tmp_path):
    fam = lora_family(5, layers=1, modules=("q_proj", "v_proj"), width=48, rank=4, shared_rank=2, seed=3)
    other = _gauge(fam, 7)
    errs = {}
    for mode in ("product", "factors"):
        for tag, f in (("orig", fam), ("gauge", other)):
            src = write_peft_family(f, tmp_path / f"{mode}-{tag}", alpha=8)
            st = uwsfmt.convert([str(d) for d in src], tmp_path / f"{mode}-{tag}.uws", rank=3, lora_mode=mode)
            # error of the products s*B*A, whatever the mode stores
            k = lora_key(0, "q_proj", "A")
            kb = k.replace("lora_A", "lora_B")
            errs[mode, tag] = [
                _rel(st.state_dict(m)[kb].double() @ st.state_dict(m)[k].double() * (1 if mode == "product" else 2),
                     2 * f[m][kb].double() @ f[m][k].double()) for m in st.model_ids]
    assert errs["product", "orig"] == pytest.approx(errs["product", "gauge"], rel=1e-4, abs=1e-6)
    assert errs["factors", "orig"] != pytest.approx(errs["factors", "gauge"], rel=1e-2)


def test_mixed_ranks_and_module_sets_in_product_mode(tmp_path):
    a = lora_family(3, layers=1, modules=("q_proj", "v_proj"), width=32, rank=4, shared_rank=2, seed=5)
    b = lora_family(2, layers=1, modules=("q_proj",), width=32, rank=8, shared_rank=2, seed=5)
    fam = {**a, **{f"wide-{k}": v for k, v in b.items()}}
    src = write_peft_family(fam, tmp_path / "src")
    rep = uwsfmt.plan([str(d) for d in src])
    assert rep["conflicts"] == [] and rep["lora"]["ranks"] == {"4": 6, "8": 2}
    assert list(rep["lora"]["partial_modules"].values()) == [2]
    st = uwsfmt.convert([str(d) for d in src], tmp_path / "s.uws", rank=64)
    assert float(st.errors().max()) < 1e-5
    sd = st.state_dict("wide-adapter-000")
    assert sd[lora_key(0, "q_proj", "A")].shape == (8, 32)
    assert lora_key(0, "v_proj", "A") not in sd  # that adapter never had v_proj
    assert st.validate(deep=True) == []


def test_rank_by_tau_and_recorded_spectrum(tmp_path):
    fam = lora_family(6, layers=1, modules=("q_proj",), width=64, rank=8, shared_rank=3, seed=2, noise=0.0)
    src = write_peft_family(fam, tmp_path / "src")
    st = uwsfmt.convert([str(d) for d in src], tmp_path / "s.uws", tau=0.9)
    e = st.manifest["tensors"][0]
    spec = st.spectrum(e["name"], "left")
    assert spec["kept"] == e["rank"][0] and spec["explained"][spec["kept"] - 1] >= 0.9
    assert e["rank"][0] <= 3  # B spans the shared 3-dim space only


def _module_like(sd: dict) -> torch.nn.Module:
    """A module with these names, shapes and dtypes, holding other values (7.0)."""
    module = torch.nn.Module()
    for name, t in sd.items():
        *path, leaf = name.split(".")
        m = module
        for part in path:
            m = m._modules.setdefault(part, torch.nn.Module())
        m.register_buffer(leaf, torch.full_like(t, 7.0))
    return module


def _factor_store(tmp_path, dtype, rank: int):
    fam = lora_family(3, layers=1, modules=("q_proj", "v_proj"), width=40, rank=4, shared_rank=2, seed=4, dtype=dtype)
    src = write_peft_family(fam, tmp_path / f"src-{dtype}")
    return uwsfmt.convert([str(d) for d in src], tmp_path / f"s-{dtype}-{rank}.uws", rank=rank)


@pytest.mark.parametrize("dtype,rank,expect", [(torch.float32, 4, "basis"), (torch.float32, 3, "basis"),
                                               (torch.float32, 6, "balanced"), (torch.float16, 4, "balanced")])
def test_factor_convention_and_load_into_agree_with_state_dict(tmp_path, dtype, rank, expect):
    """Adapter rank >= basis rank, float32/64: B' is the store's own left basis (no SVD) and A' = C R^T;
    truncated or float16 factors: the balanced split (equal column / row norms). Either way the
    product is L C R^T, and load_into writes the same factors that state_dict returns."""
    st = _factor_store(tmp_path, dtype, rank)
    mid = st.model_ids[1]
    ka, kb = lora_key(0, "q_proj", "A"), lora_key(0, "q_proj", "B")
    sd = st.state_dict(mid)
    a, b = sd[ka].double(), sd[kb].double()
    r = min(rank, 4)  # the adapters' own rank is 4: a wider basis gives rank-4 factors (truncated SVD)
    assert sd[ka].dtype == dtype and a.shape == (r, 40) and b.shape == (40, r)
    dense = st.delta(mid, "base_model.model.model.layers.0.self_attn.q_proj", dtype=torch.float64)
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    assert _rel(b @ a, dense) < tol
    e = st.tensor_entry("base_model.model.model.layers.0.self_attn.q_proj")
    if expect == "basis":
        assert torch.equal(sd[kb], torch.from_numpy(st.read_array(e["left"])).reshape(40, rank))
    else:
        col, row = b.norm(dim=0), a.norm(dim=1)
        assert torch.allclose(col, row, rtol=5e-3 if dtype == torch.float16 else 1e-6)
    module = _module_like(sd)
    st.load_into(module, mid)
    got = module.state_dict()
    assert all(torch.equal(got[k], v) for k, v in sd.items())


def test_basis_factors_from_batched_gemms_split_where_a_module_is_missing(tmp_path, monkeypatch):
    """The basis factors' products come from one batched GEMM per run of consecutive modules (a
    run ends where an adapter lacks a module, and every PRODUCT_BATCH modules): every module's
    B' A' is still the stored L C R^T, and load_into writes what state_dict returns."""
    import uwsfmt.encodings.lora as lora_enc

    monkeypatch.setattr(lora_enc.decode, "PRODUCT_BATCH", 2)
    fam = lora_family(3, layers=3, modules=("q_proj", "k_proj", "v_proj"), width=24, rank=4, shared_rank=2, seed=6)
    holey = sorted(fam)[1]
    gone = (lora_key(1, "k_proj", "A"), lora_key(1, "k_proj", "B"))
    fam[holey] = {k: v for k, v in fam[holey].items() if k not in gone}
    src = write_peft_family(fam, tmp_path / "src")
    st = uwsfmt.convert([str(d) for d in src], tmp_path / "s.uws", rank=4)
    calls = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a, **k: calls.append(a[0].shape[0]) or real_bmm(*a, **k))
    for mid in st.model_ids:
        calls.clear()
        sd = st.state_dict(mid)
        # 9 modules in one group: runs of at most 2, and the missing module splits one more
        assert sorted(calls, reverse=True) == ([2, 2, 2, 1, 1] if mid == holey else [2, 2, 2, 2, 1])
        assert (gone[0] in sd) is (mid != holey)
        for layer in range(3):
            for m in ("q_proj", "k_proj", "v_proj"):
                if lora_key(layer, m, "A") in sd:
                    b, a = sd[lora_key(layer, m, "B")].double(), sd[lora_key(layer, m, "A")].double()
                    dense = st.delta(mid, f"base_model.model.model.layers.{layer}.self_attn.{m}", dtype=torch.float64)
                    assert _rel(b @ a, dense) < 1e-6
        module = _module_like(sd)
        st.load_into(module, mid)
        got = module.state_dict()
        assert got.keys() == sd.keys() and all(torch.equal(got[k], v) for k, v in sd.items())


def test_batched_pass_two_records_each_modules_own_error(tmp_path, monkeypatch):
    """Pass 2 encodes runs of same-kind modules together (split at PRODUCT_BATCH, where an
    adapter lacks a module, and where ranks differ): every recorded error is still that module's
    own ||s B A - B' A'|| / ||s B A||, with s B A from the adapter's files and B' A' as read back."""
    import uwsfmt.encodings.lora as lora_enc

    monkeypatch.setattr(lora_enc.decode, "PRODUCT_BATCH", 2)
    mods = ("q_proj", "k_proj", "v_proj")
    narrow = lora_family(3, layers=2, modules=mods, width=24, rank=4, shared_rank=3, seed=11)
    wide = lora_family(2, layers=2, modules=mods, width=24, rank=6, shared_rank=3, seed=12)
    fam = {**narrow, **{f"wide-{k}": v for k, v in wide.items()}}
    holey = sorted(narrow)[1]
    gone = (lora_key(0, "k_proj", "A"), lora_key(0, "k_proj", "B"))
    fam[holey] = {k: v for k, v in fam[holey].items() if k not in gone}
    src = write_peft_family(fam, tmp_path / "src", alpha=8.0)
    kept = []
    real = lora_enc.encode
    monkeypatch.setattr(lora_enc, "encode", lambda *a: kept.append(a[4]) or real(*a))
    st = uwsfmt.convert([str(d) for d in src], tmp_path / "s.uws", rank=3)  # truncated: errors well above round-off
    # the stacked bases kept between adapters hold each module once, however the runs split
    runs = [k[1:] for k in kept[-1] if isinstance(k, tuple) and k[:1] == ("lora",)]
    assert len(kept) == len(src) and all(k is kept[0] for k in kept)
    assert runs and sorted(n for r in runs for n in r) == sorted(set(n for r in runs for n in r))
    errs = st.errors()
    names = [e["name"] for e in st.manifest["tensors"]]
    seen = 0
    for i, (mid, folder) in enumerate(zip(st.model_ids, src)):
        files = load_file(str(folder / "adapter_model.safetensors"))
        sd = st.state_dict(mid)
        for j, name in enumerate(names):
            layer, m = int(name.split(".")[4]), name.rsplit(".", 1)[1]
            ka, kb = lora_key(layer, m, "A"), lora_key(layer, m, "B")
            if ka not in files:
                assert errs[i, j] == 0.0 and ka not in sd
                continue
            r = files[ka].shape[0]
            source = (8.0 / r) * files[kb].double() @ files[ka].double()
            assert errs[i, j] == pytest.approx(_rel(sd[kb].double() @ sd[ka].double(), source), rel=1e-6, abs=1e-9)
            assert errs[i, j] > 1e-3
            seen += 1
    assert seen == 5 * 6 - 1


@pytest.mark.parametrize("basis", ["exact", "sketch"])
def test_nonfinite_factors_are_refused_and_large_finite_ones_are_not(tmp_path, basis):
    """A NaN/Inf in an adapter's factor stops the build naming the adapter and module; factors
    whose float16 sum overflows (every value finite) are not mistaken for it."""
    fam = lora_family(6, layers=1, modules=("q_proj",), width=96, rank=4, shared_rank=2, seed=8, dtype=torch.float16)
    ka = lora_key(0, "q_proj", "A")
    big = {mid: dict(sd) for mid, sd in fam.items()}
    big[sorted(big)[0]][ka] = torch.full_like(fam[sorted(fam)[0]][ka], 60000.0)  # finite; its sum is inf in float16
    assert not torch.isfinite(big[sorted(big)[0]][ka].sum())
    src = write_peft_family(big, tmp_path / "big")
    settings = {"rank": 2, "basis": basis}
    st = uwsfmt.convert([str(d) for d in src], tmp_path / "big.uws", **settings)
    assert st.n_models == 6 and torch.isfinite(torch.tensor(st.errors())).all()
    rec = st.manifest["tensors"][0].get("basis") or {}
    if basis == "sketch":  # 6 x rank 4 > 2 + 16 columns: the sketch's sweeps ran over the large factors
        assert rec.get("method") == "sketch" or rec.get("sketch_rejected")
    bad = {mid: dict(sd) for mid, sd in fam.items()}
    mid = sorted(bad)[1]
    bad[mid][ka] = bad[mid][ka].clone()
    bad[mid][ka][1, 5] = float("nan")
    src = write_peft_family(bad, tmp_path / "bad")
    with pytest.raises(uwsfmt.SourceError, match="q_proj.*NaN or Inf"):
        uwsfmt.convert([str(d) for d in src], tmp_path / "bad.uws", **settings)
    assert not (tmp_path / "bad.uws").exists()


# ---------------------------------------------------------------------------- kohya / A1111


KOHYA_MODULES = {
    # module -> (out, in, kernel) with the public key layout of kohya sd-scripts
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (40, 40, None),
    "lora_unet_down_blocks_0_resnets_0_conv1": (16, 8, 3),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (24, 24, None),
}


def _kohya_file(path, seed: int, rank: int, alpha: float, modules=KOHYA_MODULES, dtype=torch.float16, base="sd_v1"):
    g = torch.Generator().manual_seed(seed)
    shared = torch.Generator().manual_seed(99)
    sd = {}
    for mod, (o, i, k) in modules.items():
        a_shape = (rank, i) if k is None else (rank, i, k, k)
        b_shape = (o, rank) if k is None else (o, rank, 1, 1)
        a0 = torch.randn(a_shape, generator=shared) * 0.1
        sd[f"{mod}.lora_down.weight"] = (a0 + 0.01 * torch.randn(a_shape, generator=g)).to(dtype)
        sd[f"{mod}.lora_up.weight"] = (0.05 * torch.randn(b_shape, generator=g)).to(dtype)
        sd[f"{mod}.alpha"] = torch.tensor(alpha, dtype=dtype)
    save_file(sd, str(path), metadata={"ss_network_module": "networks.lora", "ss_base_model_version": base,
                                       "ss_network_dim": str(rank), "ss_network_alpha": str(alpha)})
    return sd


def _kohya_delta(sd: dict, mod: str) -> torch.Tensor:
    down, up = sd[f"{mod}.lora_down.weight"].double(), sd[f"{mod}.lora_up.weight"].double()
    r = down.shape[0]
    scale = float(sd[f"{mod}.alpha"]) / r if f"{mod}.alpha" in sd else 1.0
    return scale * up.reshape(up.shape[0], r) @ down.reshape(r, -1)


def test_kohya_files_round_trip_with_conv_loras_and_mixed_ranks(tmp_path):
    srcs = {}
    for i, (rank, alpha) in enumerate(((4, 4.0), (8, 1.0), (4, 2.0), (8, 8.0))):
        p = tmp_path / f"style-{i}.safetensors"
        srcs[p.stem] = _kohya_file(p, i, rank, alpha)
    ck = open_checkpoint(str(tmp_path / "style-1.safetensors"))
    assert ck.format == "kohya"
    pair = ck.lora_pairs()["lora_unet_down_blocks_0_resnets_0_conv1"]
    assert pair.scale == pytest.approx(1.0 / 8) and pair.alpha.endswith(".alpha")
    st = uwsfmt.convert([str(tmp_path / "*.safetensors")], tmp_path / "k.uws", rank=64)
    assert st.manifest["models"][0]["adapter"]["format"] == "kohya"
    for mid, sd in srcs.items():
        out = st.export(mid, str(tmp_path / f"{mid}.out.safetensors"), format="kohya")
        back = load_file(out)
        assert set(back) == set(sd)
        for mod, (o, i, k) in KOHYA_MODULES.items():
            assert back[f"{mod}.lora_down.weight"].dtype == torch.float16
            assert back[f"{mod}.lora_up.weight"].shape[0] == o
            assert float(back[f"{mod}.alpha"]) == back[f"{mod}.lora_down.weight"].shape[0]  # scale 1: folded in
            assert _rel(_kohya_delta(back, mod), _kohya_delta(sd, mod)) < 2e-3  # fp16 factors
        # the conv delta comes back in the conv weight's layout
        conv = "lora_unet_down_blocks_0_resnets_0_conv1"
        assert st.delta(mid, conv).shape == (16, 8, 3, 3)
    with open(tmp_path / "style-0.out.safetensors", "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(n))["__metadata__"]
    assert meta["ss_network_module"] == "networks.lora"
    with pytest.raises(uwsfmt.ConfigError, match="--format kohya"):
        st.export("style-0", str(tmp_path / "x"), format="peft")


def test_kohya_compressed_rank_lowers_alpha_with_the_rank(tmp_path):
    for i in range(4):
        _kohya_file(tmp_path / f"s{i}.safetensors", i, 8, 4.0)
    st = uwsfmt.convert([str(tmp_path / "*.safetensors")], tmp_path / "k.uws", rank=3)
    sd = st.state_dict("s0")
    mod = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert sd[f"{mod}.lora_down.weight"].shape == (3, 24) and float(sd[f"{mod}.alpha"]) == 3.0
    assert _rel(_kohya_delta(sd, mod), st.delta("s0", mod)) < 2e-3


# ---------------------------------------------------------------------------- diffusers


def _diffusers_file(path, seed: int, layout: str, rank: int = 4, alpha: float | None = None, metadata=None):
    g = torch.Generator().manual_seed(seed)
    mods = ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"]
    suffix = {"peft": (".lora_A.weight", ".lora_B.weight"), "old": (".lora.down.weight", ".lora.up.weight"),
              "te": (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight")}[layout]
    sd = {}
    for m in mods:
        sd[m + suffix[0]] = torch.randn(rank, 32, generator=g)
        sd[m + suffix[1]] = torch.randn(32, rank, generator=g) * 0.1
        if alpha is not None:
            sd[m + ".alpha"] = torch.tensor(alpha)
    save_file(sd, str(path), metadata=metadata)
    return sd, mods, suffix


@pytest.mark.parametrize("layout", ["peft", "old", "te"])
def test_diffusers_layouts(tmp_path, layout):
    srcs = {}
    for i in range(3):
        p = tmp_path / f"d{i}.safetensors"
        srcs[p.stem] = _diffusers_file(p, i, layout, alpha=2.0 if layout == "old" else None)
    assert open_checkpoint(str(tmp_path / "d0.safetensors")).format == "diffusers"
    st = uwsfmt.convert([str(tmp_path / "*.safetensors")], tmp_path / "d.uws", rank=64)
    for mid, (sd, mods, (sa, sb)) in srcs.items():
        back = st.state_dict(mid)
        for m in mods:
            scale = 2.0 / 4 if layout == "old" else 1.0
            want = scale * sd[m + sb].double() @ sd[m + sa].double()
            assert _rel(back[m + sb].double() @ back[m + sa].double(), want) < 1e-5
            if layout == "old":
                assert float(back[m + ".alpha"]) == 4.0


def test_diffusers_adapter_metadata_gives_the_scale(tmp_path):
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8, "text_encoder.r": 4,
                                                 "text_encoder.lora_alpha": 2})}
    _diffusers_file(tmp_path / "m.safetensors", 0, "peft", metadata=meta)
    pairs = open_checkpoint(str(tmp_path / "m.safetensors")).lora_pairs()
    scales = {m.split(".")[0]: p.scale for m, p in pairs.items()}
    assert scales == {"unet": 2.0, "text_encoder": 0.5}


# ---------------------------------------------------------------------------- conflicts


def test_conflicts_are_reported_all_at_once(tmp_path):
    fam = lora_family(2, layers=1, modules=("q_proj",), width=32, rank=4, seed=1)
    wide = lora_family(1, layers=1, modules=("q_proj",), width=48, rank=4, seed=1)
    dirs = write_peft_family(fam, tmp_path / "a")
    dirs += write_peft_family({"wide": wide["adapter-000"]}, tmp_path / "b")
    cfg = json.loads((dirs[1] / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "someone/another-model"
    (dirs[1] / "adapter_config.json").write_text(json.dumps(cfg))
    full = tmp_path / "full.safetensors"
    save_file({"w": torch.zeros(4, 4)}, str(full))
    sources = [str(d) for d in dirs] + [str(full)]
    rep = uwsfmt.plan(sources)
    text = "\n".join(rep["conflicts"])
    assert "different base models" in text and "someone/another-model" in text
    assert "adapts a [48, 48] weight" in text
    assert "are not" in text  # adapters mixed with a full model
    with pytest.raises(uwsfmt.ConflictError) as err:
        uwsfmt.convert(sources, tmp_path / "x.uws")
    assert len(err.value.problems) >= 3
    assert not (tmp_path / "x.uws").exists()


def test_half_a_pair_is_a_clear_error(tmp_path):
    save_file({"unet.x.to_q.lora_A.weight": torch.zeros(2, 4)}, str(tmp_path / "bad.safetensors"))
    ck = open_checkpoint(str(tmp_path / "bad.safetensors"))
    with pytest.raises(uwsfmt.SourceError, match="no matching"):
        ck.lora_pairs()


def test_append_refuses_an_adapter_with_unknown_modules(tmp_path):
    fam = lora_family(3, layers=1, modules=("q_proj",), width=32, rank=4, seed=1)
    more = lora_family(1, layers=1, modules=("q_proj", "k_proj"), width=32, rank=4, seed=2)
    src = write_peft_family(fam, tmp_path / "a")
    new = write_peft_family({"new": more["adapter-000"]}, tmp_path / "b")[0]
    st = uwsfmt.convert([str(d) for d in src], tmp_path / "s.uws", rank=4)
    with pytest.raises(uwsfmt.ConflictError, match="k_proj"):
        st.append(str(new))
    assert uwsfmt.open(tmp_path / "s.uws").n_models == 3
    conflicts = st.plan_append(str(new))["conflicts"]  # the dry run says so from the headers
    assert len(conflicts) == 1 and "has LoRA modules the store has no basis for" in conflicts[0] and "k_proj" in conflicts[0]


def test_append_refuses_an_adapter_with_tensors_the_store_does_not_hold(tmp_path):
    fam = lora_family(3, layers=1, modules=("q_proj",), width=32, rank=4, seed=1)
    src = write_peft_family(fam, tmp_path / "a")
    st = uwsfmt.convert([str(d) for d in src], tmp_path / "s.uws", rank=4)
    extra = dict(fam["adapter-000"])
    extra["base_model.model.score.weight"] = torch.zeros(2, 32)  # e.g. a head saved beside the LoRA factors
    new = write_peft_family({"new": extra}, tmp_path / "b")[0]
    with pytest.raises(uwsfmt.ConflictError, match="'base_model.model.score.weight'.*|would be lost"):
        st.append(str(new))
    plain = write_peft_family({"fine": dict(fam["adapter-001"])}, tmp_path / "c")[0]
    assert st.append(str(plain))["id"] == "fine"  # its own factors are not extra tensors
    assert uwsfmt.open(tmp_path / "s.uws").n_models == 4


def test_cli_plan_convert_export_kohya(tmp_path):
    import subprocess
    import sys

    for i, (rank, alpha) in enumerate(((4, 4.0), (8, 2.0), (4, 1.0))):
        _kohya_file(tmp_path / f"s{i}.safetensors", i, rank, alpha)

    def run(*args):
        return subprocess.run([sys.executable, "-m", "uwsfmt.cli", *args], capture_output=True, text=True, timeout=300)

    glob = str(tmp_path / "s*.safetensors")
    p = run("convert", glob, "--dry-run")
    assert p.returncode == 0 and "3 models (kohya: 3)" in p.stdout and "LoRA (product mode): 3 adapters, 3 modules" in p.stdout
    p = run("convert", glob, "-o", str(tmp_path / "k.uws"), "--rank", "64", "-q")
    assert p.returncode == 0, p.stderr
    p = run("export", str(tmp_path / "k.uws"), "s1", "-o", str(tmp_path / "s1.out.safetensors"), "--format", "kohya")
    assert p.returncode == 0, p.stderr
    src, back = load_file(str(tmp_path / "s1.safetensors")), load_file(str(tmp_path / "s1.out.safetensors"))
    for mod in KOHYA_MODULES:
        assert _rel(_kohya_delta(back, mod), _kohya_delta(src, mod)) < 2e-3
    p = run("export", str(tmp_path / "k.uws"), "s1", "-o", str(tmp_path / "x"), "--format", "peft")
    assert p.returncode != 0 and "use --format kohya" in p.stderr and "Traceback" not in p.stderr


def test_damaged_lora_record_is_a_format_error(tmp_path):
    fam = lora_family(2, layers=1, modules=("q_proj",), width=16, rank=2, seed=1)
    st = uwsfmt.convert([str(d) for d in write_peft_family(fam, tmp_path / "a")], tmp_path / "s.uws", rank=2)
    zj = tmp_path / "s.uws" / "zarr.json"
    doc = json.loads(zj.read_text())
    doc["attributes"]["uws"]["tensors"][0]["lora"]["a"] = 5
    zj.write_text(json.dumps(doc))
    st.close()
    with pytest.raises(uwsfmt.FormatError, match="malformed LoRA record"):
        uwsfmt.open(tmp_path / "s.uws")


def test_factored_exact_bases_equal_the_gram_ones(tmp_path, monkeypatch):
    """Exact bases from QRs of the stacked factors (few directions) = those of the product Grams."""
    from uwsfmt.encodings import lora

    a = lora_family(4, layers=1, modules=("q_proj", "v_proj"), width=40, rank=4, shared_rank=2, seed=8)
    b = lora_family(2, layers=1, modules=("q_proj",), width=40, rank=2, shared_rank=2, seed=9)
    src = [str(d) for d in write_peft_family(a, tmp_path / "a", alpha=8.0) + write_peft_family({f"x-{k}": v for k, v in b.items()}, tmp_path / "b", alpha=1.0)]
    stores = {}  # scales 2 and 0.5
    for share in (0.0, 1.0):  # every module by its Grams, then every module by its factors
        monkeypatch.setattr(lora.bases, "FACTORED_SHARE", share)
        stores[share] = uwsfmt.convert(src, tmp_path / f"s{share}.uws", tau=0.95)
    g, q = stores[0.0], stores[1.0]
    for eg, eq in zip(g.manifest["tensors"], q.manifest["tensors"]):
        assert eg["rank"] == eq["rank"]
        for side in ("left", "right"):
            sg, sq = (torch.from_numpy(s.read_array(e["spectrum"][side])) for s, e in ((g, eg), (q, eq)))
            assert sg.shape == sq.shape and torch.allclose(sg, sq, rtol=1e-9, atol=1e-12 * float(sg[0]))
            bg, bq = (torch.from_numpy(s.read_array(e[side])).double() for s, e in ((g, eg), (q, eq)))
            assert torch.allclose(bg @ bg.T, bq @ bq.T, atol=1e-5)  # the same subspace (signs may differ)
    assert torch.allclose(torch.from_numpy(g.errors()), torch.from_numpy(q.errors()), atol=1e-6)
