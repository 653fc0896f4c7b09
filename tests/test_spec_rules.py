"""Rules of spec/uws-1.md that concern the manifest as a whole (issue 28):

- §12 forward compatibility: the schema accepts values of ``encoding``, exception ``kind`` and
  residual ``bits`` that a later 1.y may add; uwsfmt then refuses to rebuild only the tensors
  that use one (naming them), reads the others, and ``validate`` reports the values as a problem
  in a store of a version uwsfmt implements, as a note in a newer one;
- §13 / item 12: ``validate`` checks every declared shape and dtype against the slots and arrays
  that hold it;
- the schema shipped in the package is the spec's.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import torch
from safetensors import safe_open

import uwsfmt
from uwsfmt.reader import compat

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "spec" / "examples" / "example.uws"
SCHEMA = ROOT / "spec" / "schema" / "manifest.schema.json"


def _expected(i: int) -> dict[str, torch.Tensor]:
    with safe_open(str(ROOT / "spec" / "examples" / "expected" / "example" / f"{i}.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _tamper(tmp_path: Path, edit) -> Path:
    dst = tmp_path / "t.uws"
    shutil.copytree(EXAMPLE, dst)
    root = json.loads((dst / "zarr.json").read_text())
    edit(root["attributes"]["uws"])
    (dst / "zarr.json").write_text(json.dumps(root))
    return dst


def _entry(m: dict, name: str) -> dict:
    return next(e for e in m["tensors"] if e["name"] == name)


def test_package_schema_is_the_spec_schema():
    assert (ROOT / "uwsfmt" / "format" / "schema" / "manifest.schema.json").read_bytes() == SCHEMA.read_bytes()


def _future(version: str):
    def edit(m):
        m["format_version"] = version
        _entry(m, "enc.left.weight")["encoding"] = "hologram"
        _entry(m, "conv.weight")["residual"]["bits"] = 3
        appended = m["models"][5]
        assert [x["tensor"] for x in appended["exceptions"]][1] == "embed.frozen.weight"
        appended["exceptions"][1]["kind"] = "future"
    return edit


UNKNOWN = {"enc.left.weight": "encoding 'hologram'", "conv.weight": "residual bits 3"}


def test_schema_accepts_values_a_later_minor_version_may_add(tmp_path):
    m = json.loads((_tamper(tmp_path, _future("1.7")) / "zarr.json").read_text())["attributes"]["uws"]
    jsonschema.validate(m, json.loads(SCHEMA.read_text()))
    bad = json.loads(json.dumps(m))
    _entry(bad, "enc.resid.weight")["residual"] = {"bits": 4, "values": _entry(bad, "enc.resid.weight")["residual"]["codes"]}
    with pytest.raises(jsonschema.ValidationError):  # a known width still needs its own slots
        jsonschema.validate(bad, json.loads(SCHEMA.read_text()))
    del bad["models"][5]["exceptions"][0]["view"]  # "correct" needs its view; "replace" does not (spec §6.6)
    assert bad["models"][5]["exceptions"][0]["kind"] == "correct"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(m | {"models": bad["models"]}, json.loads(SCHEMA.read_text()))
    replace = m["models"][5]["exceptions"][2]
    assert replace["kind"] == "replace"
    del replace["view"]
    jsonschema.validate(m, json.loads(SCHEMA.read_text()))


@pytest.mark.parametrize("version", ["1.7", "1.1"])
def test_unknown_values_refuse_only_the_tensors_concerned(tmp_path, version):
    path = _tamper(tmp_path, _future(version))
    with uwsfmt.open(path) as st:
        assert compat.unreadable(st.manifest, 0) == UNKNOWN
        for i in (0, 5):
            with pytest.raises(uwsfmt.FormatError) as err:
                st.state_dict(i)
            msg = str(err.value)
            assert all(repr(name) in msg for name in UNKNOWN) and "names=" in msg
            assert ("install a newer uwsfmt" in msg) == (version == "1.7")
        with pytest.raises(uwsfmt.FormatError, match="hologram"):
            st.tensor(0, "enc.left.weight")
        with pytest.raises(uwsfmt.FormatError, match="kind 'future'"):
            st.state_dict(5, names=["embed.frozen.weight"])
        readable = [n for n in st.tensor_names if n not in UNKNOWN]
        for i in (0, 5):
            got = st.state_dict(i, names=[n for n in readable if i == 0 or n != "embed.frozen.weight"])
            want = _expected(i)
            assert all(torch.equal(got[k], want[k]) for k in got) and len(got) >= len(readable) - 1
        assert torch.equal(st.tensor(0, "enc.resid.weight"), _expected(0)["enc.resid.weight"])
        assert torch.equal(st.state_dict(1, names=["embed.frozen.weight"])["embed.frozen.weight"],
                           _expected(1)["embed.frozen.weight"])  # the unknown kind is model 5's only
    notes: list[str] = []
    problems = uwsfmt.validate(str(path), deep=True, notes=notes)
    said = problems if version == "1.1" else [n for n in notes if "newer uwsfmt" in n]
    assert len(said) == 3 and all(any(repr(n) in s for s in said) for n in [*UNKNOWN, "embed.frozen.weight"]), said
    if version == "1.7":
        assert problems == []  # every other tensor was checked, deep, and is fine


def _dense_shape(shape):
    def edit(m):
        _entry(m, "enc.left.bias")["shape"] = shape
    return edit


def _set(name: str, *keys, value):
    def edit(m):
        x = _entry(m, name)
        for k in keys[:-1]:
            x = x[k]
        x[keys[-1]] = value
    return edit


def _exception(i: int, **fields):
    def edit(m):
        m["models"][5]["exceptions"][i].update(fields)
    return edit


@pytest.mark.parametrize("edit, says", [
    (_dense_shape([2**30, 2**20]), r"'enc.left.bias': data holds 16 values, the declared shape needs 1125899906842624"),
    (_dense_shape([4, 2]), r"'enc.left.bias': data holds 16 values, the declared shape needs 8"),
    (_set("enc.norm.weight", "dtype", value="float16"), r"'enc.norm.weight': data is in pack 'uint16'.*pack 'float16'"),
    (_set("keep_mask", "dtype", value="int64"), r"'keep_mask': data is in pack 'bool'.*pack 'int64'"),
    (_set("enc.resid.weight", "residual", "bits", value=2), r"'enc.resid.weight': residual codes holds 256 values.*needs 128"),
    (_set("enc.resid.weight", "residual", "scales", "length", value=8), r"'enc.resid.weight': residual scales holds 8"),
    (_set("enc.left.weight", "right", value="tensors/enc.left.weight/left"), r"'enc.left.weight': right is present but rank\[1\]"),
    (_set("position_ids", "shape", value=[8, 1]), r"'position_ids'.*has shape \[1, 8\], the manifest implies \[8, 1\]"),
    (_set("embed.frozen.weight", "dtype", value="int32"), r"exception on tensor 'embed.frozen.weight': a correct exception on a int32"),
    (_exception(0, view=[6, 80]), r"exception on tensor 'enc.left.weight': array .*/scales has shape \[12\], the manifest implies \[6\]"),
    (_exception(0, bits=4), r"exception on tensor 'enc.left.weight': array .*/codes has shape \[480\], the manifest implies \[240\]"),
    (_exception(0, view=[7, 7]), r"view \[7, 7\] does not hold the tensor's shape \[12, 40\]"),
    (_set("embed.frozen.weight", "dtype", value="float8_e4m3fn"), r"'embed.frozen.weight'.*has dtype float32, expected uint8"),
])
def test_validate_checks_declared_shapes_and_dtypes_against_their_storage(tmp_path, edit, says):
    bad = _tamper(tmp_path, edit)
    problems = uwsfmt.validate(str(bad))
    assert any(re.search(says, p) for p in problems), problems
    if "2**30" not in says and "1125899906842624" not in says:
        return
    r = subprocess.run([sys.executable, "-m", "uwsfmt.cli", "validate", str(bad)], capture_output=True, text=True, cwd=ROOT,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode != 0 and "INVALID" in r.stdout + r.stderr


def test_the_examples_pass_the_declared_checks():
    for name in ("example", "example-flat", "example-half"):
        assert uwsfmt.validate(str(ROOT / "spec" / "examples" / f"{name}.uws")) == [], name


def test_both_readers_refuse_a_dense_shape_its_slot_cannot_hold(tmp_path):
    from .independent_reader import SpecError, SpecReader

    bad = _tamper(tmp_path, _dense_shape([2**30, 2**20]))
    with uwsfmt.open(bad) as st:
        with pytest.raises(uwsfmt.FormatError, match="enc.left.bias"):
            st.state_dict(0)
        assert torch.equal(st.state_dict(0, names=["enc.left.weight"])["enc.left.weight"], _expected(0)["enc.left.weight"])
    with pytest.raises(SpecError, match="enc.left.bias"):
        SpecReader(bad)
