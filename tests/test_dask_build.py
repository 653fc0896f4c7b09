"""The build on a Dask cluster (convert(..., client=...), CLI --dask) writes the store the build in
one process writes: the same files, bit for bit, and the same manifest but for timestamps.

The workers compute with one torch thread each (Dask's default), so the local builds compared
with them do too: some BLAS/LAPACK reductions (eigenvalue spectra of 256 x 256 Grams, seen in
bench/dask_build.py) round differently with another thread count, on one machine or many."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
import torch
from safetensors.torch import save_file

import uwsfmt
from uwsfmt.testing.families import lora_family, synthetic_family, write_family, write_peft_family
from uwsfmt.writer import adding, holdings

dd = pytest.importorskip("dask.distributed")

SHAPES = {"big.a": (128, 160), "big.b": (160, 96), "conv.weight": (16, 8, 3, 3)} | {f"small{i}.weight": (24, 40) for i in range(5)}
N = 6


@pytest.fixture(autouse=True)
def one_thread():
    """This process computes as each worker does: with one torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client():
    with dd.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=":0") as cluster, \
            dd.Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A family with every kind of tensor: sketchable, batched small ones, shared, dense, int,
    bool, and one whose shape varies between models (per-model arrays)."""
    root = tmp_path_factory.mktemp("dask_sources")
    fam = synthetic_family(n_models=N, shapes=SHAPES, rank=3, noise=1e-2, seed=4)
    for i, sd in enumerate(fam.values()):
        sd["head.weight"] = torch.randn(3 + i % 2, 8, generator=torch.Generator().manual_seed(i))
    write_family(fam, root / "models")
    save_file({k: v.contiguous() for k, v in fam["model-000"].items() if k != "head.weight"}, str(root / "base.safetensors"))
    write_peft_family(lora_family(5, layers=2, width=64, rank=4, shared_rank=2), root / "lora")
    return root


def files_of(store) -> dict[str, bytes]:
    out = {}
    for folder, _, names in os.walk(store):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, store)] = f.read()
    return out


def comparable(manifest: dict) -> dict:
    m = json.loads(json.dumps(manifest))
    for k in ("created", "updated"):
        m.pop(k)
    m["build"].pop("device")
    for rec in m["models"]:
        rec.pop("added")
    return m


def assert_same_store(got, want) -> None:
    a, b = files_of(got), files_of(want)
    assert sorted(a) == sorted(b)
    assert [k for k in a if k != "zarr.json" and a[k] != b[k]] == []  # every array, bit for bit
    sa, sb = uwsfmt.open(got), uwsfmt.open(want)
    assert comparable(sa.manifest) == comparable(sb.manifest)
    for mid in sb.model_ids:
        x, y = sa.state_dict(mid), sb.state_dict(mid)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in y)


@pytest.mark.parametrize("case", [pytest.param("budget", marks=pytest.mark.slow), "sketch", "base+residual", "lora"])
def test_dask_build_equals_local_build(client, sources, tmp_path, monkeypatch, case):
    kw: dict = {
        "budget": {},  # the default error budget: ranks, residuals and exceptions picked per tensor
        "sketch": {"rank": 2, "basis": "sketch", "min_numel": 64},  # batched small tensors, sketched big ones
        "base+residual": {"tau": 0.9, "residual_bits": 4, "base": str(sources / "base.safetensors")},
        "lora": {},  # PEFT adapters, lora_mode "auto" under the budget
    }[case]
    src = str(sources / ("lora" if case == "lora" else "models"))
    if case == "sketch":  # room for the first sketched tensor's pass-2 results, not the second's: the driver replays this
        monkeypatch.setattr(holdings, "KEEP_COEFFICIENTS_BYTES", N * 18 * 160 * 4 + 100)
    local = uwsfmt.convert(src, tmp_path / "local.uws", **kw)
    steps = []
    on_dask = uwsfmt.convert(src, tmp_path / "dask.uws", client=client, progress=lambda *a: steps.append(a), **kw)
    assert_same_store(on_dask.path, local.path)
    assert steps and steps[-1][0] == steps[-1][1]  # progress to the end
    assert [d for d, _, _ in steps] == sorted(d for d, _, _ in steps)
    if case == "sketch":
        assert any(e.get("basis", {}).get("method") == "sketch" for e in local.manifest["tensors"])
    if case == "budget":
        assert any(e["shape"] is None for e in local.manifest["tensors"])  # per-model arrays


def test_cancel_leaves_the_old_store_and_no_temporary_folder(client, sources, tmp_path):
    out = tmp_path / "out" / "s.uws"
    out.parent.mkdir()
    uwsfmt.convert(str(sources / "models"), out, rank=2)
    before = files_of(out)
    cancel = threading.Event()
    steps = []

    def progress(done, total, _):
        steps.append(done)
        if done > total - N:  # pass 2 under way: workers are writing rows
            cancel.set()

    with pytest.raises(uwsfmt.UWSError, match="cancelled"):
        uwsfmt.convert(str(sources / "models"), out, rank=3, overwrite=True, client=client, progress=progress, cancel=cancel)
    assert os.listdir(out.parent) == ["s.uws"]  # no temporary folder, no lock left behind
    assert files_of(out) == before


def test_an_error_on_a_worker_is_raised_as_it_was(client, sources, tmp_path):
    fam = synthetic_family(n_models=3, shapes={"w": (64, 48)}, rank=2, noise=1e-2, extra=False, seed=1)
    fam["model-001"]["w"][5, 5] = float("nan")
    paths = [str(p) for p in write_family(fam, tmp_path / "src")]
    with pytest.raises(uwsfmt.SourceError, match="model-001.*NaN"):
        uwsfmt.convert(paths, tmp_path / "s.uws", rank=2, client=client)
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_cli_dask_local(sources, tmp_path):
    out = tmp_path / "cli.uws"
    p = subprocess.run([sys.executable, "-m", "uwsfmt.cli", "convert", str(sources / "models"), "-o", str(out), "--rank", "2",
                        "--dask", "local", "-q"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    local = uwsfmt.convert(str(sources / "models"), tmp_path / "local.uws", rank=2)
    assert_same_store(out, local.path)


def test_unusable_clients_are_clear_errors(client, sources, tmp_path, monkeypatch):
    from uwsfmt.writer import distributed

    src = str(sources / "models")
    closed = dd.Client(client.scheduler.address)
    closed.close()
    with pytest.raises(uwsfmt.ConfigError, match="client is closed"):
        uwsfmt.convert(src, tmp_path / "a.uws", client=closed)
    monkeypatch.setattr(distributed, "CONNECT_TIMEOUT_S", 1)
    with pytest.raises(uwsfmt.ConfigError, match="cannot reach the Dask scheduler at 'tcp://127.0.0.1:9'"):
        uwsfmt.convert(src, tmp_path / "b.uws", client="tcp://127.0.0.1:9")
    fam = synthetic_family(n_models=2, shapes={"w": (32, 32)}, extra=False)
    with pytest.raises(uwsfmt.ConfigError, match="not a checkpoint file or folder"):
        uwsfmt.convert(fam, tmp_path / "c.uws", client=client)
    assert sorted(os.listdir(tmp_path)) == []


def test_without_dask_a_client_is_a_clear_error(sources, tmp_path, monkeypatch):
    import uwsfmt.writer

    monkeypatch.setitem(sys.modules, "dask.distributed", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "uwsfmt.writer.distributed", raising=False)
    monkeypatch.delattr(uwsfmt.writer, "distributed", raising=False)
    with pytest.raises(uwsfmt.ConfigError, match=r"pip install 'uwsfmt\[dask\]'"):
        uwsfmt.convert(str(sources / "models"), tmp_path / "s.uws", client="local")


@pytest.fixture(scope="module")
def newcomers(sources, tmp_path_factory):
    """Three new members of the family, one of them off its subspace (exceptions under a budget)."""
    root = tmp_path_factory.mktemp("dask_new")
    fam = synthetic_family(n_models=N, shapes=SHAPES, rank=3, noise=1e-2, seed=4)
    g = torch.Generator().manual_seed(11)
    new = {}
    for k, (mid, sd) in enumerate(list(fam.items())[:3]):
        sd = {n: (t + (0.05 if k == 2 else 1e-3) * torch.randn(t.shape, generator=g) if n in SHAPES else t)  # shared ones kept
              for n, t in sd.items()}
        sd["head.weight"] = torch.randn(3 + k % 2, 8, generator=g)
        new[f"new-{k}"] = sd
    write_family(new, root / "new")
    return root / "new"


@pytest.mark.parametrize("settings", [{}, {"rank": 2, "basis": "sketch", "min_numel": 64}])
def test_dask_extend_equals_local_extend(client, sources, newcomers, tmp_path, settings):
    """``extend(..., client=)``: each new model encoded and written by a worker, the commit by
    this process; the store equals the one an extend in this process makes, file for file."""
    import shutil

    built = uwsfmt.convert(str(sources / "models"), tmp_path / "built.uws", **settings)
    built.close()
    for name in ("local", "dask"):
        shutil.copytree(tmp_path / "built.uws", tmp_path / f"{name}.uws")
    local = uwsfmt.open(tmp_path / "local.uws", mode="a")
    local.extend(str(newcomers))
    steps = []
    on_dask = uwsfmt.open(tmp_path / "dask.uws", mode="a")
    with pytest.MonkeyPatch.context() as mp:  # in this process nothing is encoded: the workers (other processes) do it
        mp.setattr(adding, "encode_model", lambda *a, **k: pytest.fail("encoded in the driver"))
        added = on_dask.extend(str(newcomers), client=client, progress=lambda *a: steps.append(a))
    assert [e["id"] for e in added] == ["new-0", "new-1", "new-2"]
    assert steps and steps[-1][0] == steps[-1][1] == 3
    assert_same_store(tmp_path / "dask.uws", tmp_path / "local.uws")
    m = uwsfmt.open(tmp_path / "dask.uws").manifest
    assert m["models"][-1]["source"]["sha256"]  # hashed on the worker
    if not settings:  # under the default budget the off-subspace newcomer gets exceptions
        assert m["models"][-1].get("exceptions")
    assert uwsfmt.validate(str(tmp_path / "dask.uws"), deep=True) == []


def test_dask_extend_errors_leave_the_store_as_it_was(client, sources, newcomers, tmp_path):
    import shutil

    uwsfmt.convert(str(sources / "models"), tmp_path / "s.uws", rank=2).close()
    before = files_of(tmp_path / "s.uws")
    st = uwsfmt.open(tmp_path / "s.uws", mode="a")
    with pytest.raises(uwsfmt.ConfigError, match="not a checkpoint file or folder"):
        st.extend({f"new-{k}": sd for k, sd in enumerate(uwsfmt.open(tmp_path / "s.uws").state_dict(m) for m in ["model-000"])},
                  client=client)
    # a truncated source: its error, nothing committed
    bad = tmp_path / "bad"
    shutil.copytree(newcomers, bad)
    victim = sorted(bad.glob("*.safetensors"))[1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(uwsfmt.UWSError, match=victim.name):
        st.extend(str(bad), client=client)
    assert uwsfmt.open(tmp_path / "s.uws").n_models == N
    assert uwsfmt.validate(str(tmp_path / "s.uws")) == []
    assert files_of(tmp_path / "s.uws")["zarr.json"] == before["zarr.json"]  # nothing committed


def test_cancelling_an_extend_on_the_cluster_commits_nothing(client, sources, newcomers, tmp_path):
    """Cancel set after the first new model is done: the workers stop, nothing is committed, the
    rows already written are not part of the committed state, and the store stays valid."""
    uwsfmt.convert(str(sources / "models"), tmp_path / "s.uws", rank=2).close()
    before = files_of(tmp_path / "s.uws")
    cancel = threading.Event()
    steps = []

    def progress(done, total, _):
        steps.append(done)
        if done >= 1:
            cancel.set()

    st = uwsfmt.open(tmp_path / "s.uws", mode="a")
    with pytest.raises(uwsfmt.UWSError, match="cancelled"):
        st.extend(str(newcomers), client=client, progress=progress, cancel=cancel)
    st.close()
    assert steps and max(steps) < 3  # stopped before every new model was in
    after = uwsfmt.open(tmp_path / "s.uws")
    assert after.n_models == N and after.model_ids == uwsfmt.open(tmp_path / "s.uws").model_ids
    assert files_of(tmp_path / "s.uws")["zarr.json"] == before["zarr.json"]  # nothing committed
    assert uwsfmt.validate(str(tmp_path / "s.uws"), deep=True) == []
    st = uwsfmt.open(tmp_path / "s.uws", mode="a")  # and the next extend adds them all
    assert [e["id"] for e in st.extend(str(newcomers), client=client)] == ["new-0", "new-1", "new-2"]


def test_cli_append_dask_local(sources, newcomers, tmp_path):
    import shutil

    uwsfmt.convert(str(sources / "models"), tmp_path / "a.uws", rank=2).close()
    shutil.copytree(tmp_path / "a.uws", tmp_path / "b.uws")
    p = subprocess.run([sys.executable, "-m", "uwsfmt.cli", "append", str(tmp_path / "a.uws"), str(newcomers), "--dask", "local", "-q"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("appended") == 3
    uwsfmt.extend(str(tmp_path / "b.uws"), str(newcomers))
    assert_same_store(tmp_path / "a.uws", tmp_path / "b.uws")
    p = subprocess.run([sys.executable, "-m", "uwsfmt.cli", "append", str(tmp_path / "a.uws"), str(newcomers / "new-0.safetensors"),
                        "--id", "x", "--dask", "local"], capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "drop --id" in p.stderr
