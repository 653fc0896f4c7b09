"""The fast paths give the same answers as the plain ones.

- basis="sketch" (randomised range finder + a-posteriori check) vs the exact float64 Gram;
- the sketch's map-reduce products vs the Gram applied explicitly;
- the direct shard-row reader vs zarr-python, including damaged shards;
- load_into (rebuilt straight into a module's tensors) vs state_dict, batched vs per-tensor;
- reused row buffers never leak into returned tensors; recorded errors are the reader's.
"""

from __future__ import annotations

import os
import platform

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import save_file

import uwsfmt
from uwsfmt.encodings import subspace
from uwsfmt.io.shards import row_reader
from uwsfmt.numerics import gram, linalg, randomized
from uwsfmt.testing.families import lora_family, synthetic_family, write_peft_family
from uwsfmt.writer import build, encode, fit, holdings, sketch
from uwsfmt.writer.settings import FLOAT32_GRAM_MIN_NUMEL

SHAPES = {"a": (256, 512), "b": (512, 200), "c": (48, 40)}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def noisy_family():
    return synthetic_family(n_models=10, shapes=SHAPES, rank=6, noise=1e-3, extra=True, seed=7)


# ---------------------------------------------------------------------------- sketch


@pytest.mark.parametrize("settings", [{"rank": 8}, {"rank": 3}, {"tau": 0.9}, {"tau": 0.99}])
def test_sketch_matches_exact(tmp_path, noisy_family, settings):
    exact = uwsfmt.convert(noisy_family, tmp_path / "exact.uws", **settings)
    sketch = uwsfmt.convert(noisy_family, tmp_path / "sketch.uws", basis="sketch", **settings)
    for name in ("a", "b"):
        ee, es = exact.tensor_entry(name), sketch.tensor_entry(name)
        assert es["basis"]["method"] == "sketch"
        assert es["rank"] == ee["rank"]
        # the sketch spectrum's sum is the total energy (Ritz values + one tail entry); both paths
        # take each model's delta in float32 (sums in float64), so they agree to float32 rounding
        assert es["energy"] == pytest.approx(ee["energy"], rel=1e-6)
        side = "left" if ee["rank"][0] else "right"
        assert es["explained_variance"][side] == pytest.approx(ee["explained_variance"][side], abs=2e-3)
        j = exact.tensor_names.index(name)
        err_e, err_s = exact.errors()[:, j], sketch.errors()[:, j]
        # squared error within the check's 1% tolerance (plus rounding)
        assert np.all(err_s**2 <= err_e**2 * 1.02 + 1e-12)
    # small tensors are not worth a sketch: exact, and no record
    assert "basis" not in sketch.tensor_entry("c")
    for mid, sd in noisy_family.items():
        out = sketch.state_dict(mid)
        assert rel(out["a"], sd["a"]) == pytest.approx(sketch.errors()[list(noisy_family).index(mid), sketch.tensor_names.index("a")], rel=1e-4)


def test_sketch_refuses_deltas_that_overflow_float32(tmp_path):
    """The sketch takes each model's delta in float32: finite weights whose difference overflows
    get a clear error naming the tensor and the way out (basis='exact'), not a wrong basis."""
    big = torch.full((64, 80), 3e38)
    fam = {"a": {"w": big}, "b": {"w": -big}, "c": {"w": big * 0.5}}
    with pytest.raises(uwsfmt.ConfigError, match=r"'w'.*basis='exact'"):
        uwsfmt.convert(fam, tmp_path / "s.uws", basis="sketch", rank=1)
    assert not (tmp_path / "s.uws").exists()


def test_sketch_falls_back_to_exact_when_tau_needs_more(tmp_path):
    fam = synthetic_family(n_models=6, shapes={"w": (200, 400)}, rank=4, noise=1e-2, extra=False, seed=1)
    store = uwsfmt.convert(fam, tmp_path / "s.uws", basis="sketch", tau=0.9999)
    e = store.tensor_entry("w")
    assert e["basis"]["method"] == "exact" and "tau" in e["basis"]["sketch_rejected"]
    exact = uwsfmt.convert(fam, tmp_path / "e.uws", tau=0.9999)
    assert e["rank"] == exact.tensor_entry("w")["rank"]
    assert np.allclose(store.errors(), exact.errors(), rtol=1e-6, atol=1e-9)


def test_sketch_check_rejects_a_missed_direction():
    vals = torch.tensor([10.0, 5.0, 1.0], dtype=torch.float64)
    res = randomized.SketchResult(vals, torch.eye(4, 3, dtype=torch.float64), total=20.0, residual_top=4.0)
    assert not res.check(3, 0.01)["ok"]  # a missed direction of energy ~4 beats the kept 1.0
    assert res.check(2, 0.01)["ok"]  # the kept 10 and 5 cannot be beaten by 4
    spec = res.spectrum()
    assert float(spec.sum()) == pytest.approx(20.0) and spec.numel() == 4


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("center", ["mean", "base", "none"])
def test_gram_sketch_products_equal_explicit_gram(center, dtype):
    # float64 tensors are sketched in float64 (agreement to round-off); float32 ones take each
    # model's delta and thin GEMMs in float32, summed in float64 (agreement to float32 rounding)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(12, 9, generator=g, dtype=dtype) for _ in range(5 if dtype == torch.float64 else 40)]
    ref = ws[0] if center != "base" else torch.randn(12, 9, generator=g, dtype=dtype)
    xs = {"left": torch.randn(12, 3, generator=g, dtype=torch.float64), "right": torch.randn(9, 4, generator=g, dtype=torch.float64)}
    st = gram.GramStats.empty(12, 9, left=True, right=True, reference=ref)
    a = randomized.GramSketch(12, 9, xs, ref)
    b = randomized.GramSketch(12, 9, xs, ref)
    for i, w in enumerate(ws):
        st.add(w)
        (a if i < 2 else b).add(w)  # map on two workers ...
    a.merge(b)  # ... reduce
    mean, gl, gr = st.center(center)
    m2, prods, total = a.products(center)
    scale = max(float(gl.abs().max()), float(gr.abs().max())) * max(float(xs["left"].abs().max()), float(xs["right"].abs().max()))
    assert torch.allclose(prods["left"], gl @ xs["left"], rtol=tol, atol=tol * scale)
    assert torch.allclose(prods["right"], gr @ xs["right"], rtol=tol, atol=tol * scale)
    assert total == pytest.approx(float(torch.trace(gl)), rel=tol)
    assert (mean is None) == (m2 is None) and (mean is None or torch.allclose(mean, m2.to(mean.dtype), rtol=tol, atol=tol))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sketch_family_mean_and_its_rounding(dtype):
    """The sketch's mean in the compute dtype, plus what its rounding left out: together the exact
    mean, far below that rounding, for a family of fine-tunes (deltas small against the weights)."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(30, 20, generator=g, dtype=torch.float64)
    ws = [(base + 1e-3 * torch.randn(30, 20, generator=g, dtype=torch.float64)).to(dtype) for _ in range(40)]
    sk = randomized.GramSketch(30, 20, {}, ws[0])
    for w in ws:
        sk.add(w)
    mc, offset = sk.family_mean()
    m2, _, _ = sk.products("mean")
    assert mc.dtype == offset.dtype == dtype and torch.equal(mc, m2)
    exact = torch.stack([w.to(torch.float64) for w in ws]).mean(0)
    rounding = float((mc.to(torch.float64) - exact).abs().max())
    left = float((mc.to(torch.float64) + offset.to(torch.float64) - exact).abs().max())
    if dtype == torch.float32:
        assert 1e-8 < rounding < 1e-6 and left <= 0.01 * rounding
    else:
        assert rounding < 1e-15 and left < 1e-15


@pytest.mark.parametrize("m", [3, 255, 257, 300])
def test_blocked_gram_equals_full_gemm(m):
    """The exact path's Gram accumulates only its upper block triangle; mirrored, it is D D^T."""
    g = torch.Generator().manual_seed(m)
    ds = [torch.randn(m, 40, generator=g, dtype=torch.float64) for _ in range(3)]
    acc = torch.zeros(m, m, dtype=torch.float64)
    for d in ds:
        gram.gram_upper_add_(acc, d)
    want = sum(d @ d.T for d in ds)
    assert torch.allclose(gram.gram_full(acc), want, rtol=1e-12, atol=1e-10)
    st = gram.GramStats.empty(m, 40, left=True, right=True, reference=torch.zeros(m, 40))
    for d in ds:
        st.add(d)
    _, gl, gr = st.center("base")
    assert torch.allclose(gl, want, rtol=1e-12, atol=1e-10)
    assert torch.allclose(gr, sum(d.T @ d for d in ds), rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("center", ["mean", "base", "none"])
def test_float32_gram_products_agree_with_float64(center):
    """Large tensors' exact path takes each model's delta and Gram product in float32 (summed in
    float64): the centred Grams agree with the float64 ones to float32 rounding, and the noise
    floor separates a low-rank family's real eigenvalues from the round-off ones."""
    g = torch.Generator().manual_seed(3)
    m, n, r = 96, 400, 3
    base = torch.randn(m, n, generator=g) * 0.05
    u = torch.randn(m, r, generator=g)
    ws = [base + u @ torch.randn(r, n, generator=g) * 1e-3 for _ in range(6)]
    ref = ws[0] if center != "base" else base
    sts = {dt: gram.GramStats.empty(m, n, left=True, right=True, reference=ref, compute=dt) for dt in (torch.float32, torch.float64)}
    for st in sts.values():
        for w in ws:
            st.add(w)
    (_, l64, r64), (_, l32, r32) = sts[torch.float64].center(center), sts[torch.float32].center(center)
    for a, b in ((l32, l64), (r32, r64)):
        assert a.dtype == torch.float64
        scale = float(torch.diagonal(b).sum())
        assert float((a - b).abs().max()) <= 1e-6 * scale
    assert sts[torch.float64].noise_floor(l64) == 0.0
    for side, g32, g64 in (("left", l32, l64), ("right", r32, r64)):
        vals, _ = gram.eig_desc(g32)
        want = gram.numerical_rank(gram.eig_desc(g64)[0], g64.shape[0])  # left: r (+1 off the mean); right: r per model
        assert want < g64.shape[0] or center == "none"  # W itself (centre none) has full rank
        assert int((vals > sts[torch.float32].noise_floor(g32)).sum()) == want
    other = gram.GramStats.empty(m, n, left=True, right=False, reference=ref, compute=torch.float64)
    with pytest.raises(ValueError, match="same dtype"):
        gram.GramStats.empty(m, n, left=True, right=False, reference=ref, compute=torch.float32).merge(other)


def test_exact_build_float32_products_on_large_tensors(tmp_path):
    """A large float32 tensor's exact build keeps the family's real rank (no round-off direction
    kept even when more are asked for) and reconstructs as well as float64 products would."""
    fam = synthetic_family(n_models=5, shapes={"w": (512, 640)}, rank=3, noise=0.0, extra=False, seed=4)
    assert 512 * 640 >= FLOAT32_GRAM_MIN_NUMEL  # on the float32-product path
    store = uwsfmt.convert(fam, tmp_path / "f32.uws", rank=8)
    e = store.tensor_entry("w")
    assert e["rank"][0] == 3  # the family's 3 directions; no round-off one, though 8 were allowed
    assert float(store.errors().max()) < 1e-6
    vals = np.asarray(store.spectrum("w")["eigenvalues"])
    assert vals[2] > 1e6 * vals[3]  # what is past the real directions is round-off


@pytest.mark.parametrize("center", ["mean", "base", "none"])
def test_gram_ritz_equals_explicit_gram(center):
    """The sketch's last sweep: H = Q^T G Q and G U for every centring, against the explicit Gram."""
    g = torch.Generator().manual_seed(1)
    ws = [torch.randn(12, 9, generator=g, dtype=torch.float64) for _ in range(6)]
    ref = ws[0] if center != "base" else torch.randn(12, 9, generator=g, dtype=torch.float64)
    st = gram.GramStats.empty(12, 9, left=True, right=True, reference=ref)
    sums = randomized.GramSketch(12, 9, {}, ref)
    qs = {"left": linalg.orthonormal_columns(torch.randn(12, 4, generator=g, dtype=torch.float64)),
          "right": linalg.orthonormal_columns(torch.randn(9, 3, generator=g, dtype=torch.float64))}
    us = {side: torch.randn(q.shape[0], 2, generator=g, dtype=torch.float64) for side, q in qs.items()}
    us = {side: u - qs[side] @ (qs[side].T @ u) for side, u in us.items()}
    ritz = randomized.GramRitz(12, 9, qs, us, ref)
    # centring "mean" also from deltas against another reference (the build uses the mean as
    # readers store it, float32), given the family mean minus that reference
    other = (sum(ws) / len(ws)).to(torch.float32).to(torch.float64) if center == "mean" else None
    at_other = None if other is None else randomized.GramRitz(12, 9, qs, us, other, keep=True,
                                                          mean_offset=sum(ws) / len(ws) - other)
    for w in ws:
        st.add(w)
        sums.add(w)
        ritz.add(w)
        if at_other is not None:
            at_other.add(w)
    _, gl, gr = st.center(center)
    got = ritz.centred(center, sums)
    if at_other is not None:
        for side, (h, gu) in at_other.centred(center, sums).items():
            assert torch.allclose(h, got[side][0], rtol=1e-10, atol=1e-9)
            assert torch.allclose(gu, got[side][1], rtol=1e-10, atol=1e-9)
        zs, dsq, wsq = at_other.kept[2]
        assert torch.allclose(zs["left"], (ws[2] - other).T @ qs["left"]) and torch.allclose(zs["right"], (ws[2] - other) @ qs["right"])
        assert dsq == pytest.approx(float((ws[2] - other).square().sum())) and wsq == pytest.approx(float(ws[2].square().sum()))
    for side, g_side in (("left", gl), ("right", gr)):
        h, gu = got[side]
        assert torch.allclose(h, qs[side].T @ g_side @ qs[side], rtol=1e-10, atol=1e-9)
        assert torch.allclose(gu, g_side @ us[side], rtol=1e-10, atol=1e-9)
        res = randomized.ritz_from_h(qs[side], h, us[side], gu, float(torch.trace(g_side)))
        want = torch.linalg.eigvalsh(qs[side].T @ g_side @ qs[side]).flip(0).clamp_min(0)
        assert torch.allclose(res.values, want, rtol=1e-9, atol=1e-9)


def test_lora_product_sketch_matches_exact(tmp_path):
    dirs = write_peft_family(lora_family(10, layers=1, width=512, rank=8, shared_rank=4), tmp_path / "src")
    exact = uwsfmt.convert(dirs, tmp_path / "e.uws", rank=8)
    sketch = uwsfmt.convert(dirs, tmp_path / "s.uws", rank=8, basis="sketch")
    methods = [e.get("basis", {}).get("method") for e in sketch.manifest["tensors"] if e.get("lora")]
    assert methods and all(m == "sketch" for m in methods)
    err_e, err_s = exact.errors(), sketch.errors()
    assert np.nanmax(err_s) <= np.nanmax(err_e) * 1.05 + 1e-9
    assert np.nanmean(err_s) <= np.nanmean(err_e) * 1.02 + 1e-9


# ---------------------------------------------------------------------------- reading


@pytest.fixture(scope="module")
def store(tmp_path_factory, noisy_family):
    return uwsfmt.convert(noisy_family, tmp_path_factory.mktemp("st") / "s.uws", rank=4, residual_bits=8)


def test_direct_row_reader_equals_zarr(store):
    for pack, info in store.manifest["packs"].items():
        arr = store.array(info["path"])
        reader = row_reader(store._zstore, info["path"], arr)
        assert reader is not None, pack
        assert reader.zstd == (pack in ("uint8", "bool", "int64"))  # integer packs hold zstd frames
        buf = np.empty(reader.width, reader.dtype)
        for i in range(store.n_models):
            assert np.array_equal(reader.read_into(i, buf), arr[i, :]), (pack, i)


def test_direct_row_reader_checks_crc_and_missing_chunks(tmp_path):
    import zarr
    from zarr.codecs import Crc32cCodec
    from zarr.storage import LocalStore

    zs = LocalStore(str(tmp_path / "z"))
    a = zarr.create_array(zs, name="p", shape=(3, 1000), dtype="float32", chunks=(1, 256), shards=(1, 1024),
                          compressors=[Crc32cCodec()], filters=None, fill_value=0)
    data = np.arange(3000, dtype=np.float32).reshape(3, 1000) + 1
    data[1, 256:512] = 0  # an all-zero inner chunk is not written: it reads as the fill value
    a[...] = data
    reader = row_reader(zs, "p", a)
    buf = np.empty(1000, np.float32)
    for i in range(3):
        assert np.array_equal(reader.read_into(i, buf), data[i])
    _flip_byte(reader.shard_file(2), 10)
    with pytest.raises(uwsfmt.FormatError, match="crc32c"):
        reader.read_into(2, buf)
    os.remove(reader.shard_file(0))  # a row never written reads as zeros, as in zarr
    assert not reader.read_into(0, buf).any()


def test_rows_are_not_shared_between_calls(store, noisy_family):
    ids = list(noisy_family)
    first = store.state_dict(ids[0])
    copy = {k: v.clone() for k, v in first.items()}
    store.state_dict(ids[1])  # reuses the row buffer
    for k in first:
        assert torch.equal(first[k], copy[k]), k


def test_load_into_equals_state_dict_and_tensor(store, noisy_family):
    ids = list(noisy_family)
    sd = store.state_dict(ids[2])
    wrapper = _Named(sd)
    store.load_into(wrapper, ids[2])
    for k, v in sd.items():
        got = wrapper.get(k)
        assert got.dtype == v.dtype and got.shape == v.shape
        assert torch.allclose(got.double(), v.double(), rtol=1e-6, atol=1e-7), k
        if store.tensor_entry(k)["encoding"] == "subspace":
            assert torch.allclose(store.tensor(ids[2], k).double(), v.double(), rtol=1e-6, atol=1e-7), k  # per-tensor decode


def test_load_into_casts_and_checks_shapes(store, noisy_family):
    ids = list(noisy_family)
    sd = store.state_dict(ids[3])
    wrapper = _Named({k: v.to(torch.float64) if v.is_floating_point() else v for k, v in sd.items()})
    store.load_into(wrapper, ids[3])
    assert wrapper.get("a").dtype == torch.float64
    assert torch.allclose(wrapper.get("a"), sd["a"].double(), rtol=1e-6)
    bad = _Named({**sd, "a": torch.zeros(3, 3)})
    with pytest.raises(uwsfmt.ConflictError, match="'a'"):
        store.load_into(bad, ids[3])


def test_direct_decode_path_is_taken_for_large_tensors(tmp_path):
    from uwsfmt.encodings import subspace

    fam = synthetic_family(n_models=4, shapes={"big": (512, 256)}, rank=3, noise=1e-3, extra=False, seed=2)
    st = uwsfmt.convert(fam, tmp_path / "s.uws", rank=3)
    assert 512 * 256 >= subspace.EXPAND_MIN_ELEMENTS
    wrapper = _Named({"big": torch.zeros(512, 256)})
    target = wrapper.get("big")
    ptr = target.data_ptr()
    st.load_into(wrapper, "model-001")
    assert wrapper.get("big").data_ptr() == ptr  # written in place
    assert torch.allclose(wrapper.get("big"), st.state_dict("model-001")["big"], rtol=1e-6, atol=1e-7)


def test_lora_load_into_writes_factors_in_place(tmp_path):
    """load_into of a LoRA store: each factor is computed straight into the module's tensor (same
    storage before and after), equal to state_dict's factors; a bf16 module gets the cast values."""
    dirs = write_peft_family(lora_family(4, layers=2, width=64, rank=4, shared_rank=2), tmp_path / "src")
    st = uwsfmt.convert(dirs, tmp_path / "l.uws", rank=4)
    mid = st.model_ids[2]
    sd = st.state_dict(mid)
    wrapper = _Named(sd)
    ptrs = {k: wrapper.get(k).data_ptr() for k in sd}
    st.load_into(wrapper, mid)
    for k, v in sd.items():
        assert wrapper.get(k).data_ptr() == ptrs[k], k
        assert torch.allclose(wrapper.get(k), v, rtol=1e-6, atol=1e-7), k
    half = _Named({k: v.to(torch.bfloat16) for k, v in sd.items()})
    st.load_into(half, mid)
    for k, v in sd.items():
        assert torch.equal(half.get(k), v.to(torch.bfloat16)), k


@pytest.mark.parametrize("mode,basis", [("left", "exact"), ("right", "exact"), ("both", "exact"), ("flat", "exact"),
                                        ("left", "sketch"), ("right", "sketch")])
def test_recorded_errors_are_what_readers_get(tmp_path, monkeypatch, mode, basis):
    # lossy float32 (the cheap E = D - L C path), near-lossless float32 and float64 (the
    # reader's own rebuild below 1e-4), residuals and bfloat16 (always the reader's rebuild);
    # three tensors of one shape, so that pass 2 also encodes them as a batch. With the sketch,
    # one-sided lossy float32/float64 tensors get coefficients and errors from pass 1 (the
    # norms' difference); the near-lossless ones fall back to pass 2's rebuild.
    encoded = []
    real = subspace.Subspace.encode  # pass 2's one-tensor path (the batch and pass-1 results bypass it)
    monkeypatch.setattr(subspace.Subspace, "encode", lambda self, ctx, e, w: encoded.append(e["name"]) or real(self, ctx, e, w))
    shapes = {"w": (128, 96), "v": (128, 96), "u": (128, 96)}
    fam = synthetic_family(n_models=5, shapes=shapes, rank=5, noise=1e-2, extra=False, seed=3)
    tiny = synthetic_family(n_models=5, shapes=shapes, rank=3, noise=1e-9, extra=False, seed=4)
    fam16 = {k: {n: t.to(torch.bfloat16) for n, t in sd.items()} for k, sd in fam.items()}
    fam64 = {k: {n: t.to(torch.float64) for n, t in sd.items()} for k, sd in fam.items()}
    cases = [(fam, {"rank": 2}), (tiny, {"rank": 3}), (fam64, {"rank": 2}), (fam16, {"rank": 2})]
    if mode != "flat":
        cases.append((fam, {"rank": 1, "residual_bits": 4}))
    paths = set()
    for f, kw in cases:
        encoded.clear()
        st = uwsfmt.convert(f, tmp_path / "s.uws", overwrite=True, mode=mode, min_numel=256, basis=basis, **kw)
        if basis == "sketch":
            assert all(st.tensor_entry(x)["basis"]["method"] == "sketch" for x in shapes)
            # pass 2 encodes a tensor only where pass 1 could not: bfloat16, residuals, tiny errors
            assert bool(encoded) == (f is tiny or f is fam16 or "residual_bits" in kw)
        for j, name in enumerate(st.tensor_names):
            mean = torch.from_numpy(zarr.open_array(str(tmp_path / "s.uws"), path=st.tensor_entry(name)["mean"], mode="r")[...])
            for i, (mid, sd) in enumerate(f.items()):
                got, w = st.tensor(mid, name).to(torch.float64), sd[name].to(torch.float64)
                err = float(torch.linalg.vector_norm(got - w))
                assert st.errors()[i, j] == pytest.approx(err / float(torch.linalg.vector_norm(w)), rel=3e-6, abs=1e-12)
                dn = float(torch.linalg.vector_norm(w - mean.to(torch.float64).reshape(w.shape)))
                assert st.errors("delta_error")[i, j] == pytest.approx(err / dn, rel=3e-6, abs=1e-12)
                paths.add(st.errors()[i, j] >= 1e-4)
        st.close()
    assert paths == {True, False}  # both ways of measuring were exercised


def test_coefficients_from_pass_1_equal_pass_2(tmp_path, monkeypatch, noisy_family):
    """Sketched one-sided tensors take their coefficients and errors from the last sketch sweep
    while the holding limit allows: the same store as pass 2 computes (to float32 rounding), for
    every centring that has a mean, and partly held when the limit is reached mid-build."""
    base = str(tmp_path / "base.safetensors")
    save_file({k: v.contiguous() for k, v in next(iter(noisy_family.values())).items()}, base)
    held = []
    real = sketch.coefficients_from_ritz
    monkeypatch.setattr(sketch, "coefficients_from_ritz", lambda fit, *a: held.append(fit) or real(fit, *a))
    for center in ("mean", "base"):
        kw = {"rank": 4, "basis": "sketch", "center": center, "base": base if center == "base" else None}
        monkeypatch.setattr(holdings, "KEEP_COEFFICIENTS_BYTES", 0)
        plain = uwsfmt.convert(noisy_family, tmp_path / f"plain-{center}.uws", **kw)
        assert not held
        # all; room for "a"'s sweep (10 models x (4 + 16) columns x 512) but not for "b"'s after it
        for limit in (1 << 30, 10 * 20 * 512 * 4):
            monkeypatch.setattr(holdings, "KEEP_COEFFICIENTS_BYTES", limit)
            st = uwsfmt.convert(noisy_family, tmp_path / f"kept-{center}-{limit}.uws", **kw)
            assert len(held) == (2 if limit > 1 << 20 else 1)
            held.clear()
            for name in ("a", "b"):
                j = st.tensor_names.index(name)
                assert st.tensor_entry(name)["basis"] == plain.tensor_entry(name)["basis"]
                np.testing.assert_allclose(st.errors()[:, j], plain.errors()[:, j], rtol=1e-6)
                np.testing.assert_allclose(st.errors("delta_error")[:, j], plain.errors("delta_error")[:, j], rtol=1e-6)
                for mid, sd in noisy_family.items():
                    got, want = st.tensor(mid, name), plain.tensor(mid, name)
                    # the same rebuild, to rounding: far closer to each other than to the source
                    assert float((got - want).norm()) <= 1e-4 * float((want - sd[name]).norm()) + 1e-6 * float(sd[name].norm())


@pytest.mark.parametrize("center", ["mean", "none"])
def test_sketch_build_of_float32_tensors_matches_exact_for_each_centring(tmp_path, noisy_family, center):
    """A float32 family sketched with each centring: the sketch's sums and reference stay in
    float32, and the errors come out within a few percent of the exact float64 Gram's."""
    got = {basis: uwsfmt.convert(noisy_family, tmp_path / f"{basis}.uws", rank=4, basis=basis, center=center)
           for basis in ("sketch", "exact")}
    for name in ("a", "b"):
        assert got["sketch"].tensor_entry(name)["basis"]["method"] == "sketch"
        j = got["exact"].tensor_names.index(name)
        sketch, exact = got["sketch"].errors()[:, j], got["exact"].errors()[:, j]
        assert np.all(sketch <= exact * 1.05 + 1e-7)  # per model: close to the exact basis
        assert float(np.sum(sketch**2)) >= float(np.sum(exact**2)) * (1 - 1e-5)  # which is optimal in sum


def test_sketch_sweeps_reuse_the_first_sweeps_tensors(tmp_path, monkeypatch, noisy_family):
    """A sketched tensor's later sweeps take the first models' copies as the first sweep read
    them, up to KEEP_SOURCES_BYTES, and read the rest again: the same store either way."""
    from uwsfmt.sources.base import StateDictCheckpoint

    reads = []
    real = StateDictCheckpoint.get
    monkeypatch.setattr(StateDictCheckpoint, "get", lambda self, name: reads.append(name) or real(self, name))
    a_bytes = noisy_family[next(iter(noisy_family))]["a"].numel() * 4
    stores, counts = {}, {}
    for keep, room in (("none", 0), ("three", 3 * a_bytes + 1), ("all", 1 << 30)):
        monkeypatch.setattr(fit, "KEEP_SOURCES_BYTES", room)
        reads.clear()
        stores[keep] = uwsfmt.convert(noisy_family, tmp_path / f"{keep}.uws", rank=4, basis="sketch")
        counts[keep] = reads.count("a")
    n = len(noisy_family)  # one sketch sweep and one Rayleigh-Ritz sweep (sketch_power=1)
    assert counts["none"] - counts["three"] == 3 and counts["none"] - counts["all"] == n
    for keep in ("three", "all"):
        for name in ("a", "b"):
            assert stores[keep].tensor_entry(name)["basis"] == stores["none"].tensor_entry(name)["basis"]
            for mid in noisy_family:
                assert torch.equal(stores[keep].tensor(mid, name), stores["none"].tensor(mid, name))
        assert np.array_equal(stores[keep].errors(), stores["none"].errors())


def test_small_tensors_are_encoded_in_batches_like_one_by_one(tmp_path, monkeypatch):
    """Pass 2 batches small same-kind tensors: the same coefficients, errors to rounding, and
    a NaN in one of them is still reported by name."""

    shapes = {f"l{i}.weight": (24, 40) for i in range(7)} | {f"s{i}.weight": (30, 30) for i in range(4)}
    fam = synthetic_family(n_models=4, shapes=shapes, rank=3, noise=1e-2, extra=False, seed=8)
    calls = []
    real = encode._encode_batch
    monkeypatch.setattr(encode, "_encode_batch", lambda g, *a: calls.append(len(g)) or real(g, *a))
    batched = uwsfmt.convert(fam, tmp_path / "b.uws", rank=2, min_numel=64)
    assert sorted(set(calls)) == [4, 7]  # per model: one batch of each shape
    monkeypatch.setattr(encode, "BATCH_MAX_NUMEL", 0)
    single = uwsfmt.convert(fam, tmp_path / "s.uws", rank=2, min_numel=64)
    assert np.allclose(batched.errors(), single.errors(), rtol=1e-6, atol=0)
    assert np.allclose(batched.errors("delta_error"), single.errors("delta_error"), rtol=1e-6, atol=0)
    for mid in fam:
        a, b = batched.state_dict(mid), single.state_dict(mid)
        assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    monkeypatch.undo()
    batched.close()
    bad = dict(fam["model-002"])
    bad["l3.weight"] = bad["l3.weight"].clone()
    bad["l3.weight"][0, 0] = float("nan")  # appended: only pass 2 sees it, inside a batch
    with pytest.raises(uwsfmt.SourceError, match="l3.weight"):
        uwsfmt.append(str(tmp_path / "b.uws"), bad, id="with-nan")
    assert uwsfmt.open(tmp_path / "b.uws").n_models == 4  # nothing added


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_pass1_batches_fit_like_one_by_one(tmp_path, monkeypatch, dtype):
    """Pass 1 gathers small same-kind tensors' statistics in batches: the same encodings (a
    bit-identical tensor in a batch is still shared), bases and errors as one tensor at a time."""

    shapes = {f"l{i}.weight": (24, 40) for i in range(5)} | {f"s{i}.weight": (30, 30) for i in range(3)}
    fam = synthetic_family(n_models=4, shapes=shapes | {"big.weight": (300, 256)}, rank=3, noise=1e-2, extra=False, seed=9)
    fam = {k: {n: t.to(dtype) for n, t in sd.items()} for k, sd in fam.items()}
    for sd in fam.values():
        sd["l1.weight"] = fam["model-000"]["l1.weight"].clone()
    sizes = []
    real = build.fit_batch
    monkeypatch.setattr(build, "fit_batch", lambda g, *a: sizes.append(len(g)) or real(g, *a))
    for center in ("mean", "none"):
        batched = uwsfmt.convert(fam, tmp_path / f"b-{center}.uws", rank=2, min_numel=64, center=center)
        with monkeypatch.context() as mp:
            mp.setattr(fit, "BATCH_MAX_NUMEL", 0)
            single = uwsfmt.convert(fam, tmp_path / f"s-{center}.uws", rank=2, min_numel=64, center=center)
        encs = [(e["name"], e["encoding"]) for e in batched.manifest["tensors"]]
        assert encs == [(e["name"], e["encoding"]) for e in single.manifest["tensors"]]
        assert ("l1.weight", "shared") in encs and ("l0.weight", "subspace") in encs
        assert np.allclose(batched.errors(), single.errors(), rtol=1e-6, atol=0, equal_nan=True)
        for e in batched.manifest["tensors"]:
            if e["encoding"] == "subspace":
                a, b = batched.spectrum(e["name"]), single.spectrum(e["name"])
                assert np.allclose(np.asarray(a["eigenvalues"]), np.asarray(b["eigenvalues"]), rtol=1e-9, atol=1e-12)
        for mid in fam:
            a, b = batched.state_dict(mid), single.state_dict(mid)
            assert all(torch.allclose(a[k].double(), b[k].double(), rtol=0, atol=1e-6) for k in a)
    assert sorted(set(sizes)) == [3, 5]  # per build: one batch of each small shape (the 300 x 256 one alone)


def test_pass1_batch_reports_non_finite_values(tmp_path):
    shapes = {f"l{i}.weight": (24, 40) for i in range(4)}
    fam = synthetic_family(n_models=3, shapes=shapes, rank=2, noise=1e-2, extra=False, seed=2)
    fam["model-001"]["l2.weight"] = fam["model-001"]["l2.weight"].clone()
    fam["model-001"]["l2.weight"][3, 4] = float("inf")
    with pytest.raises(uwsfmt.SourceError, match="l2.weight"):
        uwsfmt.convert(fam, tmp_path / "a.uws", rank=2, min_numel=64)
    assert not (tmp_path / "a.uws").exists()
    st = uwsfmt.convert(fam, tmp_path / "b.uws", rank=2, min_numel=64, allow_nonfinite=True)
    encs = {e["name"]: e["encoding"] for e in st.manifest["tensors"]}
    assert encs == {"l0.weight": "subspace", "l1.weight": "subspace", "l2.weight": "dense", "l3.weight": "subspace"}
    assert torch.equal(st.tensor("model-001", "l2.weight"), fam["model-001"]["l2.weight"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_paths_match_cpu(store, noisy_family):
    ids = list(noisy_family)
    cpu = store.state_dict(ids[1])
    for _ in range(2):  # pinned row buffers are reused: the second read must not race the first copy
        gpu = store.state_dict(ids[1], device="cuda")
        other = store.state_dict(ids[2], device="cuda")
    for k in cpu:
        assert torch.allclose(gpu[k].cpu().double(), cpu[k].double(), rtol=1e-5, atol=1e-6), k
    assert not torch.equal(other["a"], gpu["a"])
    wrapper = _Named({k: v.cuda() for k, v in cpu.items()})
    store.load_into(wrapper, ids[1])
    for k in cpu:
        assert torch.allclose(wrapper.get(k).cpu().double(), cpu[k].double(), rtol=1e-5, atol=1e-6), k


def _flip_byte(path: str, at: int) -> None:
    """Damage one byte of a file in place (a shard whose checksum must now fail)."""
    raw = bytearray(open(path, "rb").read())
    raw[at] ^= 0xFF
    open(path, "wb").write(bytes(raw))


class _Named(torch.nn.Module):
    """A module whose state dict has exactly the given (dotted) names."""

    def __init__(self, sd: dict[str, torch.Tensor]):
        super().__init__()
        self._names = list(sd)
        for i, (k, v) in enumerate(sd.items()):
            self.register_buffer(f"t{i}", torch.zeros_like(v))

    def get(self, name: str) -> torch.Tensor:
        return getattr(self, f"t{self._names.index(name)}")

    def state_dict(self, *args, **kwargs):
        return {k: getattr(self, f"t{i}").detach() for i, k in enumerate(self._names)}

    def load_state_dict(self, sd, strict=True, assign=False):  # not used by load_into
        raise AssertionError("load_into must not need load_state_dict")


def _zstd_rows(tmp_path, data: np.ndarray, shard: int):
    """A uint8 pack-like array of ``data`` (zstd + crc32c, 256-value inner chunks) and its row reader."""
    from zarr.codecs import Crc32cCodec, ZstdCodec
    from zarr.storage import LocalStore

    zs = LocalStore(str(tmp_path / "z"))
    a = zarr.create_array(zs, name="p", shape=data.shape, dtype="uint8", chunks=(1, 256), shards=(1, shard),
                          compressors=[ZstdCodec(level=3), Crc32cCodec()], filters=None, fill_value=0)
    a[...] = data
    return row_reader(zs, "p", a)


def test_zstd_pack_rows_are_checked(tmp_path):
    data = (np.arange(1400) % 7).astype(np.uint8).reshape(2, 700)
    reader = _zstd_rows(tmp_path, data, 768)
    assert reader is not None and reader.zstd
    buf = np.empty(700, np.uint8)
    assert np.array_equal(reader.read_into(1, buf), data[1])
    _flip_byte(reader.shard_file(1), 5)
    with pytest.raises(uwsfmt.FormatError, match="crc32c"):
        reader.read_into(1, buf)


def test_thin_products_through_onednn_match_torch(monkeypatch):
    """thin_mm / tmm (the sweeps' D X and D^T X): float32 CPU products go through oneDNN where
    torch has it, to float32 accuracy; float64, small or autograd operands are torch's own
    products exactly; UWSFMT_ONEDNN=0 turns oneDNN off."""
    g = torch.Generator().manual_seed(3)
    a, x, y = torch.randn(300, 700, generator=g), torch.randn(700, 24, generator=g), torch.randn(300, 24, generator=g)
    calls = []
    real = linalg._onednn_linear
    monkeypatch.setattr(linalg, "_onednn_linear", lambda *t: calls.append(1) or real(*t))
    if platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available():
        assert linalg._onednn_usable()  # the fast path must not vanish silently where it exists
    usable = linalg._onednn_usable()
    calls.clear()
    assert rel(linalg.thin_mm(a, x), a.double() @ x.double()) < 1e-6
    assert rel(linalg.tmm(a, y), a.double().T @ y.double()) < 1e-6
    assert len(calls) == (2 if usable else 0)
    calls.clear()
    a64 = a.double()
    assert torch.equal(linalg.thin_mm(a64, x.double()), a64 @ x.double())
    assert torch.equal(linalg.tmm(a64, y.double()), (y.double().T @ a64).T)
    assert torch.equal(linalg.thin_mm(a[:20, :30], x[:30]), a[:20, :30] @ x[:30])
    with torch.enable_grad():
        xg = x.clone().requires_grad_(True)
        linalg.thin_mm(a, xg).sum().backward()
    assert xg.grad is not None and calls == []
    monkeypatch.setenv("UWSFMT_ONEDNN", "0")
    monkeypatch.setattr(linalg, "_onednn", None)
    assert not linalg._onednn_usable()
    assert torch.equal(linalg.thin_mm(a, x), a @ x) and calls == []


def test_small_tensors_run_single_threaded_and_restore():
    n = torch.get_num_threads()
    with linalg.threads_for(64 * 64):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == n
    with linalg.threads_for(linalg.PARALLEL_MIN_ELEMENTS):
        assert torch.get_num_threads() == n


def test_zstd_rows_decompressed_by_several_threads_are_checked(tmp_path, monkeypatch):
    """The threaded path (rows of many frames): the same bytes as zarr, a damaged frame still refused."""
    from uwsfmt.io import shards

    monkeypatch.setattr(shards, "PARALLEL_FRAMES", 2)
    data = np.random.default_rng(0).integers(0, 16, size=(2, 5000), dtype=np.uint8)
    reader = _zstd_rows(tmp_path, data, 5120)
    assert reader is not None and reader.zstd and reader.n_chunks == 20
    buf = np.empty(5000, np.uint8)
    for i in range(2):
        assert np.array_equal(reader.read_into(i, buf), data[i])
    _flip_byte(reader.shard_file(1), 2000)
    with pytest.raises(uwsfmt.FormatError, match="crc32c"):
        reader.read_into(1, buf)
