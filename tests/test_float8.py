"""float8 sources (issue 28, item 10): float8_e4m3fn / float8_e5m2 tensors in a safetensors file are
stored as their exact bits (dense or shared, uint8 storage with the logical dtype, spec §4) and
come back bit for bit, through convert, append (exceptions of kind ``replace``), validate and export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import uwsfmt

ROOT = Path(__file__).resolve().parents[1]
F8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _family(tmp_path: Path, n: int = 4) -> list[Path]:
    """n float8 checkpoints: per-model float8 weights (small and large), float8 tensors frozen in
    the first n-1 models and changed in the last one (so appending it needs exceptions), a float32
    matrix, and float8 extremes (largest finite values, signed zeros, subnormals)."""
    frozen = torch.linspace(-500, 500, 2048).reshape(32, 64)
    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        sd = {
            "big.weight": (4 * torch.randn(64, 64, generator=g)).to(torch.float8_e4m3fn),
            "small.e5m2": torch.randn(8, generator=g).to(torch.float8_e5m2),
            "frozen.e4m3": frozen.to(torch.float8_e4m3fn),
            "frozen.e5m2": (frozen * 100).to(torch.float8_e5m2),
            "special": torch.tensor([448.0, -448.0, 0.0, -0.0, 2 ** -9, 2 ** -6]).to(torch.float8_e4m3fn),
            "dense.weight": torch.randn(64, 32, generator=g),
        }
        if i == n - 1:
            sd["frozen.e4m3"] = (frozen * 0.5).to(torch.float8_e4m3fn)
            sd["frozen.e5m2"] = (frozen * 100 + 1).to(torch.float8_e5m2)
        p = tmp_path / f"f8-{i}.safetensors"
        save_file(sd, str(p))
        paths.append(p)
    return paths


def _check_same(store, index: int, path: Path) -> None:
    sd = store.state_dict(index)
    with safe_open(str(path), "pt") as f:
        for k in f.keys():
            src = f.get_tensor(k)
            if src.dtype in F8:
                assert sd[k].dtype == src.dtype and sd[k].shape == src.shape, k
                assert torch.equal(_bits(sd[k]), _bits(src)), f"model {index}: {k} is not bit-identical"


@pytest.mark.parametrize("budget", [None, 1e-3])
def test_float8_safetensors_are_stored_bit_exact(tmp_path, budget):
    paths = _family(tmp_path)
    fidelity = uwsfmt.Fidelity(max_error=budget) if budget is not None else uwsfmt.Fidelity(tau=0.999)  # None: no budget
    st = uwsfmt.convert([str(p) for p in paths[:-1]], tmp_path / "f8.uws", fidelity=fidelity, device="cpu")
    entries = {e["name"]: e for e in st.manifest["tensors"]}
    for name in ("big.weight", "small.e5m2", "frozen.e4m3", "frozen.e5m2", "special"):
        e = entries[name]
        assert e["dtype"].startswith("float8_") and e["encoding"] in ("dense", "shared"), e
    assert entries["frozen.e4m3"]["encoding"] == "shared" and entries["big.weight"]["encoding"] == "dense"
    assert st.manifest["packs"]["uint8"]["dtype"] == "uint8"  # §4: the raw bits in uint8
    for i, p in enumerate(paths[:-1]):
        _check_same(st, i, p)
    if budget is None:  # without a budget, a shared tensor that changed is a conflict (as for any dtype)
        with pytest.raises(uwsfmt.errors.ConflictError, match="frozen.e4m3"):
            st.append(str(paths[-1]), id="changed")
        assert st.n_models == len(paths) - 1 and st.validate(deep=True) == []
        return
    entry = st.append(str(paths[-1]), id="changed")
    kinds = {x["tensor"]: x["kind"] for x in entry.get("exceptions") or ()}
    assert kinds == {"frozen.e4m3": "replace", "frozen.e5m2": "replace"}  # float8 is never computed: exact bits
    _check_same(st, len(paths) - 1, paths[-1])
    assert st.validate(deep=True) == []
    out = st.export(len(paths) - 1, str(tmp_path / "back.safetensors"))
    with safe_open(out, "pt") as f, safe_open(str(paths[-1]), "pt") as g:
        for k in g.keys():
            if g.get_tensor(k).dtype in F8:
                assert torch.equal(_bits(f.get_tensor(k)), _bits(g.get_tensor(k))), k
    st.close()


def test_cli_converts_float8_safetensors(tmp_path):
    paths = _family(tmp_path, 3)
    r = subprocess.run([sys.executable, "-m", "uwsfmt.cli", "convert", *map(str, paths), "-o", str(tmp_path / "c.uws"), "-q"],
                       capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "c.uws" / "zarr.json").read_text())["attributes"]["uws"]
    assert {e["dtype"] for e in m["tensors"]} >= {"float8_e4m3fn", "float8_e5m2"}


def test_float8_nan_is_refused_clearly_or_stored_when_allowed(tmp_path):
    paths = _family(tmp_path, 3)
    g = tmp_path / "nan.safetensors"
    with safe_open(str(paths[0]), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    sd["special"] = torch.tensor([float("nan"), 1.0]).to(torch.float8_e4m3fn)
    save_file(sd, str(g))
    with pytest.raises(uwsfmt.errors.SourceError, match=r"'special'.*NaN.*allow_nonfinite"):
        uwsfmt.convert([str(g), str(paths[1])], tmp_path / "n.uws", device="cpu")
    assert not (tmp_path / "n.uws").exists()
    st = uwsfmt.convert([str(g), str(paths[1])], tmp_path / "n.uws", device="cpu", allow_nonfinite=True)
    _check_same(st, 0, g)
    st.close()
