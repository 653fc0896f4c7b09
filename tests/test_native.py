"""The fused CPU kernel (uwsfmt.numerics.native): same values as torch, the same bits on every path, and a
quiet fallback to torch wherever it cannot be built."""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import signal

import pytest
import torch

import uwsfmt
from uwsfmt.encodings import subspace
from uwsfmt.errors import ConfigError
from uwsfmt.numerics import native, quantize
from uwsfmt.testing.families import synthetic_family

X86 = platform.machine().lower() in ("x86_64", "amd64")
needs_kernel = pytest.mark.skipif(not (X86 and (shutil.which("cc") or shutil.which("gcc"))),
                                  reason="the native kernel needs x86-64 and a C compiler")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A kernel state of its own: nothing loaded yet, a private cache folder."""
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("UWSFMT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("UWSFMT_NATIVE", raising=False)
    return tmp_path / "cache" / "native"


def _items(m, n, k, *, mean=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    return (torch.full((m, n), float("nan")), torch.randn(m, n, generator=g) if mean else None, a, b)


def _call(k, items, *, isa, parts=1, stream=True):
    k.fn(native._jobs(items, stream), len(items), parts, isa)


SHAPES = [(1, 1, 1), (3, 7, 2), (4, 16, 16), (5, 17, 3), (9, 63, 33), (8, 64, 16), (6, 65, 5), (130, 200, 16), (13, 300, 64)]


@needs_kernel
def test_kernel_is_built_and_matches_float64(fresh):
    st = native.status()
    assert st["available"], st["detail"]
    assert st["isa"] in ("avx512", "avx2")
    assert str(fresh) in st["detail"] and list(fresh.glob("expand-*.so"))
    for m, n, r in SHAPES:
        for with_mean in (True, False):
            out, mean, a, b = _items(m, n, r, mean=with_mean)
            assert native.expand([(out, mean, a, b)])
            want = a.double() @ b.double() + (mean.double() if with_mean else 0)
            torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5 * r)


@needs_kernel
def test_every_path_gives_the_same_bits(fresh):
    """Vector tiles, narrow and masked tails, AVX2 and AVX-512, any row split, streaming or not:
    each value is the same fma chain then the mean (the portable scalar path, isa 0)."""
    k = native.kernel()
    isas = [i for i in (2, 1) if i <= k.isa]
    for m, n, r in SHAPES:
        items = _items(m, n, r)
        ref = torch.empty_like(items[0])
        _call(k, [(ref, *items[1:])], isa=0)
        assert torch.isfinite(ref).all()
        for isa in isas:
            for parts, stream in ((1, True), (3, True), (7, False)):
                out = torch.full_like(ref, float("nan"))
                _call(k, [(out, *items[1:])], isa=isa, parts=parts, stream=stream)
                assert torch.equal(out, ref), (m, n, r, isa, parts, stream)


def _crafted(m, n, seed=1):
    """Float32 values over the whole range (random bit patterns: NaN, infinities, subnormals) and
    the edges of bfloat16 / float16 rounding (ties, the largest finite values, subnormal steps)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randint(-2**31, 2**31 - 1, (m * n,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)
    edges = torch.tensor([65504.0, 65519.99, 65520.0, 65536.0, 6e-8, 5.96e-8, 2.98e-8, 2.9802322e-8, 2.99e-8, 1e-40, -1e-40,
                          3.4e38, 3.3961e38, float("inf"), -float("inf"), 0.0, -0.0, 6.1035e-5, 6.1e-5, 1.0009765625,
                          1.00048828125, 1.00390625, 1.01171875, -2.0039062])
    scaled = torch.randn(m * n, generator=g) * torch.logspace(-30, 30, m * n)  # finite values at every scale
    v[: edges.numel()] = edges
    v[edges.numel():: 2] = scaled[edges.numel():: 2]
    return v.view(m, n)


def _module(sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    mod = torch.nn.Module()
    for name, t in sd.items():
        mod.register_buffer(name, torch.zeros_like(t))
    return mod


def _same_half(got: torch.Tensor, f32: torch.Tensor) -> bool:
    """``got`` holds torch's cast of ``f32`` bit for bit (any NaN where it has NaN)."""
    want = f32.to(got.dtype)
    nan = torch.isnan(f32)
    return bool(torch.equal(got.view(torch.int16)[~nan], want.view(torch.int16)[~nan]) and torch.isnan(got[nan].float()).all())


@needs_kernel
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_half_outputs_are_torchs_cast_on_every_path(fresh, dt):
    """bfloat16 / float16 outputs: the float32 value rounded as ``Tensor.to`` rounds it, on every
    path (scalar, AVX2, AVX-512; tiles, tails; any split; streaming or not; unaligned)."""
    k = native.kernel()
    for m, n, r in [(257, 333, 3), (64, 256, 16), (5, 17, 2), (9, 63, 33)]:
        for crafted in (True, False):
            out, mean, a, b = _items(m, n, r, seed=m)
            if crafted:  # the products vanish: the output is the crafted mean itself
                mean, a, b = _crafted(m, n), torch.zeros_like(a), torch.zeros_like(b)
            f32 = torch.empty(m, n)
            _call(k, [(f32, mean, a, b)], isa=0)
            for isa in [0] + [i for i in (2, 1) if i <= k.isa]:
                for parts, stream, offset in ((1, True, 0), (3, False, 0), (2, True, 1)):
                    buf = torch.zeros(offset + m * n, dtype=dt)
                    got = buf[offset:].view(m, n)
                    _call(k, [(got, mean, a, b)], isa=isa, parts=parts, stream=stream)
                    assert _same_half(got, f32), (dt, m, n, r, crafted, isa, parts, stream, offset)
                    assert offset == 0 or buf[0] == 0
    out, mean, a, b = _items(8, 32, 4)
    assert not native.expand([(out.to(dt), mean, a.to(dt), b)])  # factors must be float32
    assert not native.expand([(out.to(dt), mean.to(torch.bfloat16), a, b)])  # a mean float32 or float16


@needs_kernel
def test_float16_means_are_read_as_their_float32_values_on_every_path(fresh):
    """A float16 mean (format 1.1) gives the same bits as its float32 conversion, on every path
    and output type: all 65,536 float16 bit patterns (subnormals, infinities, NaN) with vanishing
    products, then random ones with real products, full tiles and tails."""
    k = native.kernel()
    isas = [0] + [i for i in (2, 1) if i <= k.isa]
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)
    cases = [(every.reshape(256, 256), 0)] + [(torch.randn(m, n, generator=torch.Generator().manual_seed(m)).half(), r)
                                             for m, n, r in [(257, 333, 3), (64, 256, 16), (5, 17, 2), (9, 63, 33)]]
    for mean16, r in cases:
        m, n = mean16.shape
        g = torch.Generator().manual_seed(r)
        a, b = torch.randn(m, r, generator=g), torch.randn(r, n, generator=g)
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            want = torch.empty(m, n, dtype=dt)
            _call(k, [(want, mean16.float(), a, b)], isa=0)
            for isa in isas:
                for parts, stream in ((1, True), (3, False)):
                    got = torch.empty(m, n, dtype=dt)
                    _call(k, [(got, mean16, a, b)], isa=isa, parts=parts, stream=stream)
                    nan = torch.isnan(want.float())
                    bits = torch.int32 if dt == torch.float32 else torch.int16
                    assert torch.equal(got.view(bits)[~nan], want.view(bits)[~nan]), (r, dt, isa, parts, stream)
                    assert torch.isnan(got.float()[nan]).all()
    assert int(torch.isnan(every.float()).sum()) == 2046 and torch.isinf(every.float()).sum() == 2


@needs_kernel
def test_unaligned_output_and_batches(fresh):
    """Streaming stores only where the output is aligned: an output one float into a buffer is
    written correctly (no fault); several jobs in one call, split over threads."""
    buf = torch.zeros(1 + 64 * 256)
    out = buf[1:].view(64, 256)
    _, mean, a, b = _items(64, 256, 16)
    items = [(out, mean, a, b)] + [_items(40 + i, 96 + 16 * i, 8, seed=i) for i in range(3)]
    with_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        assert native.expand(items)
    finally:
        torch.set_num_threads(with_threads)
    assert buf[0] == 0
    for o, m_, a_, b_ in items:
        torch.testing.assert_close(o, torch.addmm(m_, a_, b_), rtol=1e-5, atol=1e-4)


@needs_kernel
def test_items_that_do_not_fit_are_left_to_the_caller(fresh):
    out, mean, a, b = _items(8, 32, 4)
    for bad in ((out.double(), mean.double(), a.double(), b.double()),  # float64
                (out, mean, a, b.T.contiguous().T),  # b not contiguous
                (out, mean, a[:, :3], b),  # inner dimensions differ
                (out, out, a, b),  # the output is also the mean
                (out, mean[:4], a, b)):  # mean of another shape
        assert not native.expand([bad])
    assert not native.expand([(out, mean, a, b), (out, mean, a[:, :3], b)])  # one bad item: none written
    assert torch.isnan(out).all()  # nothing written


def test_turned_off_and_unbuildable_fall_back(fresh, monkeypatch):
    monkeypatch.setenv("UWSFMT_NATIVE", "0")
    st = native.status()
    assert not st["available"] and "UWSFMT_NATIVE" in st["detail"]
    out, mean, a, b = _items(8, 32, 4)
    assert not native.expand([(out, mean, a, b)])

    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("UWSFMT_NATIVE", "auto")
    monkeypatch.setenv("CC", "/nonexistent/cc")
    st = native.status()
    assert not st["available"] and ("could not build" in st["detail"] or "no native kernel" in st["detail"])
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("UWSFMT_NATIVE", "require")
    with pytest.raises(ConfigError, match="UWSFMT_NATIVE=require"):
        native.expand([(out, mean, a, b)])


@needs_kernel
def test_damaged_cache_entry_is_rebuilt_and_shared_folders_are_not_used(fresh, monkeypatch):
    assert native.status()["available"]
    (so,) = fresh.glob("expand-*.so")
    monkeypatch.setattr(native, "_state", {})
    other = fresh.parent.parent / "cache2"
    monkeypatch.setenv("UWSFMT_CACHE_DIR", str(other))
    (other / "native").mkdir(parents=True)
    (other / "native" / so.name).write_bytes(b"not a shared library")
    assert native.status()["available"]
    assert (other / "native" / so.name).read_bytes()[:4] == b"\x7fELF"  # rebuilt in place

    monkeypatch.setattr(native, "_state", {})
    shared = fresh.parent.parent / "shared"
    (shared / "native").mkdir(parents=True)
    (shared / "native").chmod(0o777)
    monkeypatch.setenv("UWSFMT_CACHE_DIR", str(shared))
    st = native.status()
    assert st["available"] and str(shared) not in st["detail"]  # a private temporary folder instead
    assert not list((shared / "native").iterdir())


@needs_kernel
@pytest.mark.parametrize("mean_dtype", ["compute", "float16"])
def test_store_reads_and_recorded_errors_agree_with_and_without_kernel(tmp_path, monkeypatch, fresh, mean_dtype):
    """The kernel changes no value beyond float32 rounding, and the errors recorded at build time
    are those of what the reader gives back (rebuild uses the same function)."""
    fam = synthetic_family(n_models=5, shapes={"w": (300, 260), "v": (260, 300), "s": (16, 16)}, rank=3, noise=1e-2,
                           seed=4, extra=False)
    st = uwsfmt.convert(fam, tmp_path / "s.uws", rank=3, mean_dtype=mean_dtype)
    assert {str(st.array(e["mean"]).dtype) for e in st.manifest["tensors"] if e.get("mean")} == {
        "float16" if mean_dtype == "float16" else "float32"}
    assert 300 * 260 >= subspace.EXPAND_MIN_ELEMENTS > 16 * 16
    assert native.status()["available"]
    ids = st.model_ids
    names = [e["name"] for e in st.manifest["tensors"]]
    recorded = st.errors()
    fast = {i: st.state_dict(i) for i in ids}
    for i in ids:
        for name in ("w", "v"):
            w = fam[i][name]
            err = float((fast[i][name].double() - w.double()).norm() / w.double().norm())
            assert err == pytest.approx(recorded[ids.index(i), names.index(name)], rel=1e-6)
    monkeypatch.setenv("UWSFMT_NATIVE", "0")
    monkeypatch.setattr(native, "_state", {})
    slow = uwsfmt.open(tmp_path / "s.uws")
    for i in ids:
        for name, t in slow.state_dict(i).items():
            torch.testing.assert_close(fast[i][name], t, rtol=1e-6, atol=1e-6)


@needs_kernel
def test_half_precision_reads_are_the_cast_float32_rebuild(tmp_path, monkeypatch, fresh):
    """A bfloat16 family read into bfloat16 / float16 modules or as state dicts: what the kernel
    writes directly is exactly the float32 rebuild cast, also where a residual or an appended
    model's exception is added after the rebuild (those take the float32 way), kernel or not."""
    fam = synthetic_family(n_models=7, shapes={"w": (300, 260), "v": (260, 300), "s": (16, 16)}, rank=3, noise=1e-2,
                           seed=5, extra=False)
    ids = sorted(fam)
    fam = {i: {k: t.to(torch.bfloat16) for k, t in fam[i].items()} for i in ids}
    plain = uwsfmt.convert({i: fam[i] for i in ids[:6]}, tmp_path / "p.uws", rank=3)
    budget = uwsfmt.convert({i: fam[i] for i in ids[:6]}, tmp_path / "b.uws", max_error=0.004)
    assert budget.tensor_entry("w")["residual"] is not None and plain.tensor_entry("w")["residual"] is None
    alien = {k: t.clone() for k, t in fam[ids[6]].items()}
    alien["w"] = (alien["w"].float() + 0.05 * torch.randn(alien["w"].shape, generator=torch.Generator().manual_seed(1))).to(torch.bfloat16)
    entry = budget.append(alien, id="alien")
    assert "w" in {x["tensor"] for x in entry["exceptions"]}
    written = []
    real = native.expand
    monkeypatch.setattr(native, "expand", lambda items, **kw: written.extend(o.dtype for o, *_ in items) or real(items, **kw))

    def reads(st):
        out = {}
        for mid in st.model_ids:
            f32 = st.state_dict(mid, dtype=torch.float32)
            mods = {dt: _module({k: t.to(dt) for k, t in f32.items()}) for dt in (torch.bfloat16, torch.float16)}
            for mod in mods.values():
                st.load_into(mod, mid)
            out[mid] = (f32, st.state_dict(mid), {dt: mod.state_dict() for dt, mod in mods.items()},
                        {n: st.tensor(mid, n) for n in ("w", "v")})
        return out

    for path in (tmp_path / "p.uws", tmp_path / "b.uws"):
        fast = reads(uwsfmt.open(path))
        for f32, sd, mods, single in fast.values():
            for name, t in f32.items():
                assert sd[name].dtype == torch.bfloat16 and _same_half(sd[name], t), (path.name, name)
                for dt, msd in mods.items():
                    assert _same_half(msd[name], t), (path.name, name, dt)
            for name, t in single.items():
                assert torch.equal(t, sd[name])
        assert torch.bfloat16 in written and torch.float16 in written
        with native.suspended():
            slow = reads(uwsfmt.open(path))
        for mid, (f32, sd, mods, single) in fast.items():
            for name in f32:
                assert torch.equal(slow[mid][0][name], f32[name]) and torch.equal(slow[mid][1][name], sd[name])
                for dt in mods:
                    assert torch.equal(slow[mid][2][dt][name], mods[dt][name])


@needs_kernel
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_threads_work_in_a_forked_child(fresh):
    """A child forked after the kernel's OpenMP threads ran (a DataLoader worker) computes on its
    own thread: GNU OpenMP hangs in such a child (torch's own ops do too)."""
    out, mean, a, b = _items(256, 512, 16)
    assert native._run(native.kernel(), [(out, mean, a, b)], threads=2) is None  # OpenMP's threads exist now
    shared = torch.full((256, 512), float("nan")).share_memory_()
    pid = os.fork()
    if pid == 0:  # the child: no torch compute here (GNU OpenMP is not fork-safe), only the kernel
        signal.alarm(30)
        try:
            native._run(native.kernel(), [(shared, mean, a, b)], threads=2)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    assert torch.equal(shared, out)


@needs_kernel
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_residual_is_added_as_the_dequantized_one_on_every_path(fresh, bits):
    """mean + a b + Q in one pass: bit for bit the float32 rebuild plus the dequantized residual
    (spec 6.4), per-row and per-column scales, on every vector path, split between threads or not,
    whatever the element count of a row in bits (rows not byte-aligned)."""
    k = native.kernel()
    for m, n, r in [(1, 1, 1), (5, 17, 3), (9, 63, 33), (130, 7, 4), (13, 300, 0), (66, 3, 2), (257, 40, 5), (64, 24, 1)]:
        for axis in (0, 1):
            _, mean, a, b = _items(m, n, r, seed=bits)
            codes, scales = quantize.quantize_view(torch.randn(m, n, generator=torch.Generator().manual_seed(m)), bits, axis)
            res = (codes, scales, bits, axis)
            want = torch.empty(m, n)
            _call(k, [(want, mean, a, b)], isa=0)
            want.add_(quantize.dequantize_view(codes, scales, (m, n), bits, axis))
            for isa in [0] + [i for i in (2, 1) if i <= k.isa]:
                for parts in (1, 3):
                    got = torch.full((m, n), float("nan"))
                    _call(k, [(got, mean, a, b, res)], isa=isa, parts=parts)
                    assert torch.equal(got, want), (m, n, r, axis, isa, parts)


@needs_kernel
def test_residual_items_the_kernel_cannot_take_are_left_to_the_caller(fresh):
    out, mean, a, b = _items(8, 12, 2)
    codes, scales = quantize.quantize_view(torch.randn(8, 12), 4, 0)
    assert not native.expand([(out.to(torch.bfloat16), mean, a, b, (codes, scales, 4, 0))])  # half output: cast after Q
    assert not native.expand([(out, mean, a, b, (codes[:-1], scales, 4, 0))])  # too few codes
    assert not native.expand([(out, mean, a, b, (codes, scales[:-1], 4, 0))])  # a scale short
    assert not native.expand([(out, mean, a, b, (codes, scales, 16, 0))])  # float16 residuals are added by torch
    assert native.expand([(out, mean, a, b, (codes, scales, 4, 0))])


@needs_kernel
def test_stores_with_residuals_read_the_same_with_and_without_kernel(tmp_path, monkeypatch, fresh):
    """Budgeted stores (quantized coefficients, 1-8 bit residuals, per-row and per-column scales):
    the kernel's one-pass decode gives what torch's separate passes give, and what was recorded."""
    fam = synthetic_family(n_models=5, shapes={"tall": (600, 120), "wide": (160, 500)}, rank=4, noise=2e-2,
                           seed=5, extra=False)
    st = uwsfmt.convert(fam, tmp_path / "s.uws", rank=2, residual_bits=2)
    res = {e["name"]: e["residual"] for e in st.manifest["tensors"]}
    assert res["tall"]["axis"] == 1 and "axis" not in res["wide"] and min(600 * 120, 160 * 500) >= subspace.EXPAND_MIN_ELEMENTS
    fast = {i: st.state_dict(i) for i in st.model_ids}
    names = [e["name"] for e in st.manifest["tensors"]]
    for j, i in enumerate(st.model_ids):
        for name, w in fam[i].items():
            err = float((fast[i][name].double() - w.double()).norm() / w.double().norm())
            assert err == pytest.approx(st.errors()[j, names.index(name)], rel=1e-6)
    monkeypatch.setenv("UWSFMT_NATIVE", "0")
    monkeypatch.setattr(native, "_state", {})
    with uwsfmt.open(tmp_path / "s.uws") as slow:
        for i in st.model_ids:
            for name, t in slow.state_dict(i).items():
                assert torch.equal(fast[i][name], t), (i, name)


@needs_kernel
def test_a_kernel_whose_job_layout_differs_is_not_used(fresh, monkeypatch):
    """A C source edited (or upgraded) under a running process: the library it builds reads jobs
    of another size than this process passes; the loader refuses it instead of crashing."""
    class Old(ctypes.Structure):
        _fields_ = [(f, ctypes.c_int64) for f in ("mean", "a", "b", "out", "m", "n", "k", "stream", "otype", "mtype")]

    monkeypatch.setattr(native, "_Job", Old)
    st = native.status()
    assert not st["available"] and "job layout" in st["detail"]
    out, mean, a, b = _items(8, 12, 2)
    assert not native.expand([(out, mean, a, b)])  # the caller computes it with torch
