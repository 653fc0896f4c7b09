"""Headless tests of the Jupyter widgets: state, callbacks, threading; no browser, no kernel."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import numpy as np
import pytest

pytest.importorskip("anywidget")

from jupyter_ext import Converter, Inspector, jobs, payload  # noqa: E402
from jupyter_ext import converter as converter_mod  # noqa: E402
from tests.browser.fake_store import FakeStore  # noqa: E402


# ---------------------------------------------------------------------------- payloads
def test_jsonable_handles_numpy_nan_and_nesting():
    out = payload.jsonable({"a": np.float32(2.5), "b": [np.int64(3), float("inf")], "c": (np.bool_(True),),
                            "d": np.array([[1.0, np.nan]])})
    assert out == {"a": 2.5, "b": [3, None], "c": [True], "d": [[1.0, None]]}


def test_heatmap_is_float32_and_pools_large_matrices():
    e = np.arange(12, dtype=np.float64).reshape(3, 4)
    data, meta = payload.heatmap(e)
    assert np.frombuffer(data, "<f4").reshape(3, 4).tolist() == e.tolist()
    assert (meta["row_block"], meta["col_block"], meta["min_positive"], meta["max"]) == (1, 1, 1.0, 11.0)
    big = np.random.default_rng(0).random((2500, 30))
    big[7, 3] = 5.0
    data, meta = payload.heatmap(big, max_cells=1000)
    pooled = np.frombuffer(data, "<f4").reshape(meta["rows"], meta["cols"])
    assert meta["rows"] <= 1000 and meta["row_block"] == 3 and meta["n_models"] == 2500
    assert pooled[7 // 3, 3] == 5.0  # max-pooling keeps the worst error visible


def test_heatmap_keeps_nan_and_handles_empty():
    data, meta = payload.heatmap(np.array([[np.nan, 1e-3]]))
    assert np.isnan(np.frombuffer(data, "<f4")[0]) and meta["min"] == pytest.approx(1e-3)
    data, meta = payload.heatmap(np.zeros((0, 5)))
    assert data == b"" and meta["rows"] == 0 and meta["max"] is None


def test_leading_above_null():  # payload takes it from uwsfmt.report (the notes of `info` use it too)
    assert payload.leading_above(np.array([3.0, 2.0, 0.5]), np.array([1.0, 1.0, 1.0])) == 2
    assert payload.leading_above(np.array([0.1, 2.0]), np.array([1.0, 1.0])) == 0
    assert payload.leading_above(np.array([5.0, 4.0]), np.array([1.0, 1.0])) == 2


# ---------------------------------------------------------------------------- inspector
def test_inspector_shows_metadata_without_reading_spectra():
    st = FakeStore(n_models=5, n_tensors=9)
    w = Inspector(st)
    assert w.message == "" and w.store is st
    assert w.summary["n_models"] == 5 and len(w.tensors) == 9 and len(w.models) == 5
    assert len(w.errors) == 5 * 9 * 4 and w.heatmap["rows"] == 5 and w.heatmap["cols"] == 9
    assert st.spectrum_calls == []  # lazy: nothing read until a tensor is selected
    assert w.tab == "overview" and w.spectrum == {}


def test_inspector_loads_spectrum_on_selection_and_caches_it():
    st = FakeStore(n_tensors=6)
    w = Inspector(st)
    w.select_tensor(st.tensor_names[0])
    sp = w.spectrum
    assert st.spectrum_calls == [st.tensor_names[0]]
    assert sp["name"] == st.tensor_names[0] and sp["kept"] == 4 and sp["tau"] == 0.99
    assert len(sp["eigenvalues"]) == len(sp["null"]) == len(sp["explained"]) == 32
    assert sp["n_above_null"] == 4 and 0.99 < sp["explained_at_kept"] <= 1
    w.select_tensor(st.tensor_names[1])
    w.select_tensor(st.tensor_names[0])
    assert st.spectrum_calls == [st.tensor_names[0], st.tensor_names[1]]  # cached


def test_inspector_tensor_without_spectrum_says_why():
    st = FakeStore(n_tensors=6)
    w = Inspector(st)
    w.selected_tensor = st.tensor_names[2]  # dense
    assert "dense" in w.spectrum["unavailable"] and st.spectrum_calls == []


def test_inspector_spectrum_errors_become_messages():
    st = FakeStore(n_tensors=3)

    def broken(name):
        raise OSError("chunk missing")

    st.spectrum = broken
    w = Inspector(st)
    w.selected_tensor = st.tensor_names[0]
    assert "chunk missing" in w.spectrum["unavailable"]


def test_inspector_bad_path_shows_message(tmp_path):
    pytest.importorskip("uwsfmt")
    w = Inspector(tmp_path / "nope.uws")
    assert w.message_kind == "error" and "nope.uws" in w.message and "Traceback" not in w.message
    assert w.store is None and w.tensors == [] and w.errors == b""
    (tmp_path / "empty").mkdir()
    w = Inspector(tmp_path / "empty")
    assert w.message_kind == "error" and "empty" in w.message


def test_inspector_opens_500_models_x_300_tensors_from_metadata_only():
    # the time it takes is measured by bench/open_store.py (a real store), not asserted here
    st = FakeStore(n_models=500, n_tensors=300)
    w = Inspector(st)
    assert w.heatmap["rows"] == 500 and w.heatmap["cols"] == 300 and len(w.errors) == 500 * 300 * 4
    assert st.spectrum_calls == []


def test_inspector_export_defaults_and_runs_inline(tmp_path):
    st = FakeStore()
    w = Inspector(st)
    w.selected_model = "model-002"
    assert w.export_path == "model-002.safetensors"
    w.export_format = "peft"
    assert w.export_path == "model-002-peft"  # still the suggestion: follows the format
    w.export_path = str(tmp_path / "mine.safetensors")
    w.export_format = "safetensors"
    assert w.export_path == str(tmp_path / "mine.safetensors")  # the user's own path is kept
    import asyncio
    assert asyncio._get_running_loop() is None, f"a running loop leaked from an earlier test: {asyncio._get_running_loop()!r}"
    w._on_msg(w, {"action": "export"}, [])
    assert w.export_state == "done", (w.export_state, w.export_message)
    assert st.exports == [("model-002", str(tmp_path / "mine.safetensors"), "safetensors")]
    assert w.export_state == "done" and "model-002" in w.export_message


def test_inspector_export_failures_are_messages():
    from uwsfmt import StoreError

    st = FakeStore()
    w = Inspector(st)
    w.export()
    assert w.export_state == "error" and "Select a model" in w.export_message
    w.export(model_id="model-000", format="peft")  # a plain (not LoRA) store offers safetensors only
    assert w.export_state == "error" and "choose one of safetensors" in w.export_message and st.exports == []
    st.export_formats = lambda model_id: ["safetensors", "peft"]  # the store's own answer wins (Store.export_formats)
    w.selected_model = "model-000"
    assert w.export_formats == ["safetensors", "peft"]
    st.export_error = StoreError("fake.uws: model 'model-000' is not a LoRA family; export it as safetensors")
    w.export(format="peft")
    assert w.export_state == "error" and "not a LoRA family" in w.export_message
    st.export_error = RuntimeError("boom")
    w.export()
    assert w.export_state == "error" and w.export_message == "Unexpected RuntimeError: boom"


def test_inspector_export_runs_in_a_worker_from_the_loop():
    st = FakeStore()
    seen = {}

    def slow_export(model_id, path, format="safetensors"):
        seen["thread"] = threading.get_ident()
        time.sleep(0.05)
        return path

    st.export = slow_export
    w = Inspector(st)
    w.selected_model = "model-001"
    states = []
    w.observe(lambda c: states.append((c["new"], threading.get_ident())), "export_state")

    async def main():
        task = w.export()
        assert task is not None and w.export_state == "running"
        await task

    asyncio.run(main())
    main_thread = threading.get_ident()
    assert seen["thread"] != main_thread
    assert [s for s, _ in states] == ["running", "done"]
    assert all(t == main_thread for _, t in states)


# ---------------------------------------------------------------------------- jobs
def test_progress_relay_coalesces_and_applies_on_the_loop():
    applied = []

    async def main():
        relay = jobs.ProgressRelay(lambda d, t, m, lines: applied.append((d, t, m, len(lines), threading.get_ident())),
                                   interval=0.05)

        def worker():
            for i in range(1, 201):
                relay(i, 200, f"step {i}")
                time.sleep(0.001)

        await asyncio.to_thread(worker)
        relay.flush()

    asyncio.run(main())
    assert applied[-1][:3] == (200, 200, "step 200")
    assert sum(a[3] for a in applied) == 200  # every log line delivered once
    assert 1 < len(applied) < 100  # coalesced
    assert {a[4] for a in applied} == {threading.get_ident()}


# ---------------------------------------------------------------------------- converter
def test_split_sources():
    assert converter_mod.split_sources(" a.pt \n\n# c\n b/*.safetensors, c/ ") == ["a.pt", "b/*.safetensors", "c/"]


def test_converter_offers_cuda_only_when_available(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert Converter().devices == ["cpu"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    c = Converter()
    assert c.devices == ["cpu", "cuda"] and c.device == "cuda"


def test_converter_kwargs_follow_the_form():
    c = Converter(sources="x", output="o.uws", device="cpu")
    kw = c.convert_kwargs()
    assert kw["rank"] is None and kw["tau"] is None and kw["center"] in ("mean", True) and kw["device"] == "cpu"
    c.rank_mode, c.tau = "tau", 0.95
    assert c.convert_kwargs()["tau"] == 0.95 and c.convert_kwargs()["rank"] is None
    c.rank_mode, c.rank, c.center = "rank", 8, False
    kw = c.convert_kwargs()
    assert kw["rank"] == 8 and kw["tau"] is None and kw["center"] in ("none", False)
    assert "mode" not in kw and "basis" not in kw  # the library's own defaults
    c.residual_bits, c.max_error, c.overwrite, c.mode = 4, 1e-3, True, "left"
    kw = c.convert_kwargs()
    assert kw["residual_bits"] == 4 and kw["max_error"] == 1e-3 and kw["overwrite"] is True and kw["mode"] == "left"
    c.basis = "sketch"
    assert c.convert_kwargs()["basis"] == "sketch"
    assert "mean_dtype" not in c.convert_kwargs()  # auto: the library's default
    c.mean_dtype = "float16"
    assert c.convert_kwargs()["mean_dtype"] == "float16"
    from jupyter_ext.converter import MEAN_DTYPES
    from uwsfmt.writer.settings import MEAN_DTYPES as LIBRARY_MEAN_DTYPES

    assert MEAN_DTYPES == LIBRARY_MEAN_DTYPES  # the form offers what convert() takes


def test_converter_options_reach_the_real_library(tmp_path):
    """The form's choices are what the built store holds (not dropped on the way to convert())."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    for i in range(4):
        save_file({"w": torch.randn(64, 48, generator=g)}, str(tmp_path / f"m{i}.safetensors"))
    out = tmp_path / "fam.uws"
    c = Converter(sources=str(tmp_path / "*.safetensors"), output=str(out), device="cpu")
    c.rank_mode, c.rank, c.mode, c.residual_bits, c.center = "rank", 2, "left", 8, False

    async def main():
        await c.run()

    asyncio.run(main())
    assert c.status == "done", c.message
    e = c.store.manifest["tensors"][0]
    assert (e["mode"], e["rank"][0], e["residual"]["bits"], e["center"]) == ("left", 2, 8, "none")
    c.store.close()


def test_converter_rejects_bad_options_with_messages():
    c = Converter(sources="", output="o.uws")
    assert c.run() is None and c.status == "error" and "at least one source" in c.message
    c.sources = "a.safetensors"
    c.output = ""
    assert c.run() is None and "output path" in c.message
    c.output, c.rank_mode, c.tau = "o.uws", "tau", 1.5
    assert c.run() is None and "tau" in c.message
    c.rank_mode, c.basis = "auto", "fast"
    assert c.run() is None and "Unknown basis method 'fast'" in c.message
    c.basis, c.mean_dtype = "exact", "half"
    assert c.run() is None and "Unknown mean storage 'half'; choose auto, float16, compute" in c.message
    c.mean_dtype, c.device = "auto", "cuda:7"
    assert c.run() is None and "not available" in c.message


@pytest.fixture
def fake_lib(monkeypatch):
    """uwsfmt.plan / uwsfmt.convert replaced by fakes with the library's signature."""
    import uwsfmt

    calls = {}

    def plan(sources, **settings):
        calls["plan"] = list(sources)
        return {"formats": {"safetensors": 3}, "n_models": 3, "n_tensors": 7, "conflicts": calls.get("conflicts", []),
                "total_bytes": 123456}

    def convert(sources, out, *, rank=None, tau=None, center="mean", mode="auto", device=None, residual_bits=None,
                max_error=None, overwrite=False, progress=None, cancel=None):
        calls["convert"] = dict(sources=list(sources), out=out, rank=rank, tau=tau, center=center, device=device,
                                thread=threading.get_ident())
        total = calls.get("steps", 20)
        for i in range(1, total + 1):
            if cancel is not None and cancel.is_set():
                raise uwsfmt.Cancelled("cancelled by the user; nothing was written at the target")
            time.sleep(calls.get("delay", 0.002))
            progress(i, total, f"tensor {i}")
        return FakeStore(n_models=3, n_tensors=7, path=out)

    monkeypatch.setattr(uwsfmt, "plan", plan)
    monkeypatch.setattr(uwsfmt, "convert", convert)
    return calls


def test_converter_plan_shows_report(fake_lib):
    c = Converter(sources="a/*.safetensors\nb.pt", output="o.uws")
    c._on_msg(c, {"action": "plan"}, [])
    assert fake_lib["plan"] == ["a/*.safetensors", "b.pt"]
    assert c.status == "planned" and c.plan_report["n_models"] == 3 and c.message_kind == "success"
    fake_lib["conflicts"] = ["b.pt: tensor 'w' has shape (3, 4), others (4, 4)"]
    c.plan()
    assert c.message_kind == "error" and "1 conflict" in c.message and c.plan_report["conflicts"]


def test_converter_buttons_carry_the_form(fake_lib):
    """A button's message carries the form as the view had it: an option changed just before the
    click whose trait update ipywidgets still holds back is not lost (seen in CI under load)."""
    import re
    from pathlib import Path

    from jupyter_ext.converter import FORM_TRAITS

    c = Converter(sources="old/", output="o.uws")
    c._on_msg(c, {"action": "plan", "form": {"sources": "a/*.safetensors", "mean_dtype": "float16", "rank": 5}}, [])
    assert fake_lib["plan"] == ["a/*.safetensors"] and c.mean_dtype == "float16" and c.rank == 5 and c.status == "planned"
    c._on_msg(c, {"action": "plan", "form": {"rank": "many", "sources": "b/"}}, [])
    assert c.status == "error" and "could not be taken" in c.message and fake_lib["plan"] == ["a/*.safetensors"]
    c._on_msg(c, {"action": "plan", "form": {"unknown_trait": 1, "sources": "c/"}}, [])  # only the form's own options
    assert fake_lib["plan"] == ["c/"] and not hasattr(c, "unknown_trait")
    js = (Path(__file__).parents[1] / "labextension" / "src" / "views" / "converter.js").read_text()
    sent = re.search(r"const FORM = \[([^\]]*)\]", js).group(1)
    assert tuple(re.findall(r'"(\w+)"', sent)) == FORM_TRAITS


def test_converter_runs_from_the_loop_with_progress_eta_and_summary(fake_lib):
    c = Converter(sources="ckpts/", output="fam.uws", device="cpu")
    c.rank_mode, c.rank = "rank", 4
    updates = []
    c.observe(lambda ch: updates.append((ch["name"], threading.get_ident())), ["progress", "status", "log", "summary"])

    async def main():
        task = c.run()
        assert task is not None and c.status == "running"
        await task

    asyncio.run(main())
    main_thread = threading.get_ident()
    assert fake_lib["convert"]["thread"] != main_thread  # the work ran in a worker thread ...
    assert {t for _, t in updates} == {main_thread}  # ... and every widget update on the loop
    assert c.status == "done" and c.message_kind == "success"
    assert c.progress["done"] == c.progress["total"] == 20 and c.progress["eta"] == 0.0
    assert fake_lib["convert"]["rank"] == 4 and fake_lib["convert"]["out"] == "fam.uws"
    assert c.summary["n_models"] == 3 and c.summary["ratio"] == 25.0
    assert any("tensor 20" in line for line in c.log)
    insp = c.open_inspector()
    assert insp is c.inspector and insp.summary["n_models"] == 3 and c._slot.children == (insp,)


def test_converter_cancel(fake_lib, tmp_path):
    fake_lib.update(steps=2000, delay=0.002)
    out = tmp_path / "fam.uws"
    c = Converter(sources="ckpts/", output=str(out), device="cpu")

    async def main():
        task = c.run()
        while not c.progress.get("done"):
            await asyncio.sleep(0.01)
        c._on_msg(c, {"action": "cancel"}, [])
        assert c.status == "cancelling"
        await task

    asyncio.run(main())
    assert c.status == "cancelled" and "Nothing was written" in c.message
    assert c.progress["done"] < 2000 and c.store is None


def test_converter_second_run_while_busy_is_ignored(fake_lib):
    fake_lib.update(steps=50, delay=0.002)
    c = Converter(sources="x", output="o.uws", device="cpu")

    async def main():
        t1 = c.run()
        assert c.run() is None and c.plan() is None
        await t1

    asyncio.run(main())
    assert c.status == "done"


# ---------------------------------------------------------------------------- converter + real library
def _write(path, tensors):
    from safetensors.torch import save_file

    save_file(tensors, str(path))


def _family(folder, n=4, shape=(48, 32), seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    base = torch.randn(shape, generator=g)
    basis = torch.randn(shape[0], 2, generator=g)
    for i in range(n):
        w = base + 0.05 * basis @ torch.randn(2, shape[1], generator=g)
        _write(folder / f"m{i}.safetensors", {"layer.weight": w.contiguous(), "layer.bias": torch.full((shape[0],), float(i))})
    return folder


def _run(c):
    async def main():
        task = c.run()
        if task is not None:
            await task

    asyncio.run(main())


@pytest.mark.parametrize("case", ["missing", "empty_folder", "no_match", "conflict"])
def test_converter_bad_input_real_library(tmp_path, case):
    pytest.importorskip("uwsfmt")
    if case == "missing":
        src = str(tmp_path / "does-not-exist")
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        src = str(tmp_path / "empty")
    elif case == "no_match":
        src = str(tmp_path / "*.safetensors")
    else:
        import torch

        _family(tmp_path / "fam", n=2)
        # a checkpoint of another architecture: its tensors are missing from the others and vice versa
        _write(tmp_path / "fam" / "odd.safetensors", {"head.weight": torch.zeros(7, 5), "layer.bias": torch.zeros(48)})
        src = str(tmp_path / "fam")
    out = tmp_path / "out.uws"
    c = Converter(sources=src, output=str(out), device="cpu")
    c.plan()
    if case == "conflict":
        assert c.status == "planned" and c.plan_report["conflicts"], c.message
    else:
        assert c.status == "error" and c.message_kind == "error", c.message
        assert "Traceback" not in c.message and len(c.message) > 10
    _run(c)
    assert c.status == "error" and c.message_kind == "error" and "Traceback" not in c.message, c.message
    assert not out.exists()


@pytest.mark.slow
def test_converter_end_to_end_real_library(tmp_path):
    pytest.importorskip("uwsfmt")
    src = _family(tmp_path / "fam", n=4)
    out = tmp_path / "fam.uws"
    c = Converter(sources=str(src / "*.safetensors"), output=str(out), device="cpu")
    c.rank_mode, c.rank = "rank", 2
    c.plan()
    assert c.status == "planned" and c.plan_report["n_models"] == 4, c.message
    _run(c)
    assert c.status == "done", c.message
    assert out.exists() and c.summary["n_models"] == 4 and c.progress["done"] == c.progress["total"] > 0
    insp = c.open_inspector()
    assert insp.message == "" and {t["name"] for t in insp.tensors} == {"layer.weight", "layer.bias"}
    insp.selected_tensor = "layer.weight"
    assert insp.spectrum.get("kept") == 2, insp.spectrum
    insp.selected_model = insp.models[1]["id"]
    insp.export_path = str(tmp_path / "m1.safetensors")
    insp.export()
    assert insp.export_state == "done", insp.export_message
    assert os.path.exists(tmp_path / "m1.safetensors")
    # converting again onto the same output without overwrite is refused with the library's message
    c2 = Converter(sources=str(src), output=str(out), device="cpu")
    _run(c2)
    assert c2.status == "error" and str(out) in c2.message


@pytest.mark.slow
def test_converter_cancel_real_library(tmp_path):
    pytest.importorskip("uwsfmt")
    src = _family(tmp_path / "fam", n=6)
    out = tmp_path / "fam.uws"
    c = Converter(sources=str(src), output=str(out), device="cpu")
    c._cancel = None

    async def main():
        task = c.run()
        c.cancel()  # before the worker's first step: the library stops at its first check
        await task

    asyncio.run(main())
    assert c.status == "cancelled", c.message
    assert not out.exists()


def test_converter_adds_checkpoints_to_an_existing_store(tmp_path):
    import threading

    import uwsfmt

    src = _family(tmp_path / "fam", n=6)
    out = tmp_path / "fam.uws"
    uwsfmt.convert(sorted(map(str, src.glob("m[0-3].safetensors"))), out, rank=2).close()
    c = Converter(sources=str(src / "m4.safetensors") + "\n" + str(src / "m5.safetensors"), output=str(out), device="cpu")
    c.action = "add"
    c.plan()
    assert c.status == "planned" and c.plan_report["new"] == ["m4", "m5"] and c.message.startswith("2 new model(s)"), c.message
    assert c.add_kwargs() == {"device": "cpu", "skip_existing": True}
    c.max_error, c.skip_existing = 0.5, False
    assert c.add_kwargs() == {"device": "cpu", "skip_existing": False, "max_error": 0.5}
    _run(c)
    assert c.status == "done" and c.message.startswith("Added 2 model(s)"), c.message
    assert c.summary["n_models"] == 6 and c.progress["done"] == c.progress["total"] == 2
    with uwsfmt.open(out) as st:
        assert st.model_ids[-2:] == ["m4", "m5"]
    # again: the ids are taken, the library's message, the store unchanged; or skipped
    c2 = Converter(sources=str(src / "m4.safetensors"), output=str(out), device="cpu", action="add", skip_existing=False)
    _run(c2)
    assert c2.status == "error" and "already in the store" in c2.message
    c2.plan()
    assert c2.message_kind == "error" and "already in the store" in c2.plan_report["conflicts"][0]
    c2.skip_existing = True
    c2.plan()
    assert c2.message_kind == "success" and c2.plan_report["existing"] == ["m4"] and c2.plan_report["new"] == []
    _run(c2)
    assert c2.status == "done" and c2.message.startswith("Nothing to add") and c2.summary["n_models"] == 6
    # cancelled before the first model: nothing is added
    for i in (6, 7):
        (src / f"m{i}.safetensors").write_bytes((src / "m0.safetensors").read_bytes())
    c3 = Converter(sources=str(src / "m[67].safetensors"), output=str(out), device="cpu", action="add")

    started = threading.Event()
    real = uwsfmt.Store.extend

    def slow_extend(self, sources, **kw):
        kw["cancel"].set()  # the user presses Cancel as the work starts
        started.set()
        return real(self, sources, **kw)

    uwsfmt.Store.extend = slow_extend
    try:
        _run(c3)
    finally:
        uwsfmt.Store.extend = real
    assert started.is_set() and c3.status == "cancelled" and "keeps its previous committed state" in c3.message, c3.message
    with uwsfmt.open(out) as st:
        assert st.n_models == 6


@pytest.mark.parametrize("where, expect", [("missing", "is not a store directory"), ("zip", "unpack it first"), ("", "Enter the path")])
def test_converter_add_needs_a_store_directory(tmp_path, where, expect):
    path = {"missing": str(tmp_path / "nope.uws"), "zip": str(tmp_path / "s.zip"), "": ""}[where]
    if where == "zip":
        (tmp_path / "s.zip").write_bytes(b"PK")
    c = Converter(sources="x.safetensors", output=path, device="cpu", action="add")
    assert c.run() is None and c.status == "error" and expect in c.message
