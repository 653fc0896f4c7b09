"""Each path of the subspace rebuild, forced one at a time, against the spec's rule (§6.8): the
native kernel's AVX-512, AVX2 and portable scalar code, and the torch fallback (the path on CPUs
without a compiler, on other architectures, or with UWSFMT_NATIVE=0). A path this CPU lacks is
skipped with the reason, so the suite passes on AMD and Intel alike and says what it did not run.

The rule: for out = M + L C R^T (L, R orthonormal, float32), every element is within
T = (kl + kr + 4) u (||C||_F + max|M|) of the exact value, u = 2^-24, whatever the summation order.
"""

from __future__ import annotations

import platform
import shutil

import pytest
import torch

from uwsfmt.encodings import subspace
from uwsfmt.numerics import native

X86 = platform.machine().lower() in ("x86_64", "amd64")
HAS_CC = bool(shutil.which("cc") or shutil.which("gcc"))
U = 2.0 ** -24
#: (m, n, kl, kr): full vector tiles, masked tails, narrow outputs, a deep inner dimension
SHAPES = [(130, 200, 16, 12), (9, 63, 5, 33), (257, 17, 3, 2), (64, 256, 32, 32)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("native-cache")  # one compile for the module


@pytest.fixture
def fresh(monkeypatch, cache):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("UWSFMT_CACHE_DIR", str(cache))
    monkeypatch.delenv("UWSFMT_NATIVE", raising=False)


def _case(m: int, n: int, kl: int, kr: int, seed: int):
    """Stored arrays of one subspace tensor (float32) and its exact rebuild and bound T."""
    g = torch.Generator().manual_seed(seed)
    left = torch.linalg.qr(torch.randn(m, kl, generator=g, dtype=torch.float64))[0].float().contiguous()
    right = torch.linalg.qr(torch.randn(n, kr, generator=g, dtype=torch.float64))[0].float().contiguous()
    c = (10 * torch.randn(kl, kr, generator=g)).float()
    mean = torch.randn(m, n, generator=g)
    exact = mean.double() + left.double() @ c.double() @ right.double().T
    t = (kl + kr + 4) * U * (float(c.double().norm()) + float(mean.abs().max()))
    return mean, left, c, right, exact, t


def _kernel_or_skip(isa: int):
    if not (X86 and HAS_CC):
        pytest.skip("the native kernel needs x86-64 and a C compiler")
    k = native.kernel()
    if k is None:
        pytest.skip(f"native kernel unavailable: {native.status()['detail']}")
    if isa > k.isa:
        flags = {2: "avx512f", 1: "avx2 + fma + f16c"}[isa]
        pytest.skip(f"this CPU lacks {flags}, so the {native.ISA_NAMES[isa]} path cannot run here (it runs on CPUs that have it)")
    return k


@pytest.mark.parametrize("path", ["avx512", "avx2", "scalar", "torch"])
def test_each_rebuild_path_meets_the_spec_rule(fresh, monkeypatch, path):
    seen = []
    for seed, (m, n, kl, kr) in enumerate(SHAPES):
        mean, left, c, right, exact, t = _case(m, n, kl, kr, seed)
        out = torch.full((m, n), float("nan"))
        if path == "torch":
            monkeypatch.setenv("UWSFMT_NATIVE", "0")
            monkeypatch.setattr(native, "_state", {})
            subspace.expand_into([(out, mean, left, c, right)])
            assert not native.status()["available"]
        else:
            isa = {"avx512": 2, "avx2": 1, "scalar": 0}[path]
            k = _kernel_or_skip(isa)
            b = (c @ right.T).contiguous()  # the kernel's inner factor, as the reader forms it
            for parts, stream in ((1, True), (3, False)):
                k.fn(native._jobs([(out, mean, left, b)], stream), 1, parts, isa)
                worst = float((out.double() - exact).abs().max())
                assert worst <= t, f"{path} {m}x{n} ({kl}, {kr}), {parts} parts: off by {worst:.3g} > T = {t:.3g}"
        worst = float((out.double() - exact).abs().max())
        assert worst <= t, f"{path} {m}x{n} ({kl}, {kr}): off by {worst:.3g} > T = {t:.3g}"
        seen.append(worst / t)
    assert max(seen) > 0  # the comparison is not vacuous: round-off is there, and within T


def test_paths_agree_with_each_other_by_the_rule_not_by_bits(fresh, monkeypatch):
    """Kernel and torch sum in different orders: they may differ in the last bits (on some CPUs
    they do), never by more than 2T."""
    mean, left, c, right, exact, t = _case(130, 200, 16, 12, 7)
    fast = torch.empty(130, 200)
    subspace.expand_into([(fast, mean, left, c, right)])
    monkeypatch.setenv("UWSFMT_NATIVE", "0")
    monkeypatch.setattr(native, "_state", {})
    slow = torch.empty(130, 200)
    subspace.expand_into([(slow, mean, left, c, right)])
    assert float((fast.double() - slow.double()).abs().max()) <= 2 * t
