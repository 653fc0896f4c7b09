"""The CLI end to end: every command, machine-readable info, clean errors (no traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def run(*args, ok=True):
    p = subprocess.run([sys.executable, "-m", "uwsfmt.cli", *args], capture_output=True, text=True, timeout=300)
    if ok:
        assert p.returncode == 0, p.stderr
    return p


def test_convert_info_export_append_pack(tmp_path, family_files):
    out = tmp_path / "s.uws"
    run("convert", *family_files[:-1], "-o", str(out), "--rank", "3", "-q")
    info = json.loads(run("info", str(out), "--json").stdout)
    assert info["summary"]["n_models"] == len(family_files) - 1
    t = {r["name"]: r for r in info["tensors"]}
    assert t["blocks.0.mlp.fc1.weight"]["rank"] == 3
    assert t["blocks.0.mlp.fc1.weight"]["explained_variance"] > 0.99
    assert set(info["errors"]["models"]) == {os.path.basename(f)[:-12] for f in family_files[:-1]}
    assert "compression" in run("info", str(out)).stdout
    run("validate", str(out))
    run("append", str(out), family_files[-1], "--id", "late")
    assert json.loads(run("info", str(out), "--json").stdout)["summary"]["n_models"] == len(family_files)
    p = run("append", str(out), family_files[-1], family_files[0], "--id", "x", ok=False)
    assert p.returncode == 2 and "--id names one model" in p.stderr
    p = run("append", str(out), *family_files[:2], ok=False)  # their stems are taken: nothing is added
    assert p.returncode == 2 and "are already in the store" in p.stderr
    batch = tmp_path / "batch"
    batch.mkdir()
    for name in ("n1", "n2"):
        (batch / f"{name}.safetensors").write_bytes(open(family_files[0], "rb").read())
    p = run("append", str(out), str(batch / "*.safetensors"), "-q")
    assert f"appended 'n1' as model #{len(family_files)}" in p.stdout and "'n2'" in p.stdout
    assert json.loads(run("info", str(out), "--json").stdout)["summary"]["n_models"] == len(family_files) + 2
    (batch / "n3.safetensors").write_bytes(open(family_files[1], "rb").read())
    p = run("append", str(out), str(batch), "--skip-existing", "-q")  # only n3 is new
    assert "'n3'" in p.stdout and "'n1'" not in p.stdout
    assert "nothing to add" in run("append", str(out), str(batch), "--skip-existing", "-q").stdout
    assert json.loads(run("info", str(out), "--json").stdout)["summary"]["n_models"] == len(family_files) + 3
    run("export", str(out), "late", "-o", str(tmp_path / "late.safetensors"))
    from safetensors.torch import load_file

    assert "conv.weight" in load_file(str(tmp_path / "late.safetensors"))
    run("pack", str(out), str(tmp_path / "s.zip"))
    run("validate", str(tmp_path / "s.zip"))
    run("unpack", str(tmp_path / "s.zip"), str(tmp_path / "u.uws"))
    plan = json.loads(run("plan", *family_files, "--json").stdout)
    assert plan["n_models"] == len(family_files) and plan["conflicts"] == []


@pytest.mark.parametrize(
    "args, msg",
    [
        (["info", "/nonexistent/store"], "no such store"),
        (["convert", "/nonexistent/x.safetensors", "-o", "OUT"], "no such file"),
        (["export", "STORE", "no-such-model", "-o", "x.safetensors"], "no model"),
        (["convert", "SRC", "-o", "STORE"], "already exists"),
        (["convert", "SRC", "-o", "NEW", "--tau", "1.5"], "tau must be"),
    ],
)
def test_errors_are_one_clear_line(tmp_path, family_files, args, msg):
    store = tmp_path / "s.uws"
    run("convert", *family_files, "-o", str(store), "--rank", "2", "-q")
    sub = {"STORE": str(store), "SRC": family_files[0], "OUT": str(tmp_path / "o.uws"), "NEW": str(tmp_path / "n.uws")}
    p = run(*[sub.get(a, a) for a in args], ok=False)
    assert p.returncode != 0
    assert msg in p.stderr
    assert "Traceback" not in p.stderr
    assert uwsfmt_store_ok(store)


def uwsfmt_store_ok(path) -> bool:
    import uwsfmt

    return uwsfmt.validate(str(path)) == []


def test_validate_fails_on_broken_store(tmp_path, family_files):
    import shutil

    store = tmp_path / "s.uws"
    run("convert", *family_files, "-o", str(store), "--rank", "2", "-q")
    packs = store / "packs"
    shutil.rmtree(packs / "float32")
    p = run("validate", str(store), ok=False)
    assert p.returncode == 1 and "INVALID" in p.stderr and "packs/float32" in p.stderr


def test_demo_runs(tmp_path):
    p = run("demo", str(tmp_path / "demo"))
    assert "compression" in p.stdout and "validate: ok" in p.stdout
