"""bench/lora_accuracy.py on a tiny family: it runs, and its evaluation rebuilds what the adapters are."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("sklearn")

BENCH = Path(__file__).resolve().parents[1] / "bench" / "lora_accuracy.py"


def test_lora_accuracy_bench_runs_and_rebuilds_the_adapters(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("lora_accuracy", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "SETTINGS", {"--rank 1": {"rank": 1}, "--max-error 1e-4": {"lora_mode": "product", "max_error": 1e-4},
                                          "--lora-mode factors --max-error 1e-4": {"lora_mode": "factors", "max_error": 1e-4}})
    assert mod.main(["--tasks", "3", "--epochs", "3", "--hidden", "32", "--out", str(tmp_path)]) == 0
    res = (tmp_path / "lora_accuracy.md").read_text()
    rows = {r.split(" | ")[0].lstrip("| "): r for r in res.splitlines() if r.startswith("| ")}
    assert {"adapters (PEFT safetensors)", "ours --rank 1", "ours --max-error 1e-4", "ours --lora-mode factors --max-error 1e-4"} <= set(rows)
    import json

    data = json.loads((tmp_path / "lora_accuracy.json").read_text())
    by = {r["method"]: r for r in data["rows"]}
    # near-lossless stores give the adapters' own accuracy back on every task, both modes (within
    # a test sample or so: a wrong scale or a missing module costs tens of points)
    for m in ("ours --max-error 1e-4", "ours --lora-mode factors --max-error 1e-4"):
        assert abs(by[m]["drop_worst"]) < 2.0 and by[m]["error_max"] <= 1e-4
    assert by["ours --rank 1"]["error_max"] > 1e-2  # rank 1 cannot hold three unrelated adapters
