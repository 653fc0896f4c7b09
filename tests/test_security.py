"""Security: no pickle anywhere, no path outside the store, bounded metadata on open.

- Torch checkpoints load with ``weights_only=True`` only: malicious pickles in every container
  uwsfmt reads (.pt/.bin files, HF and PEFT folders) are refused and never run.
- The format holds no pickle: only Zarr v3 numeric arrays with the spec's codecs; a store that
  declares anything else (another codec, a Zarr v2 array, an object dtype) is refused before any
  chunk is decoded.
- Tensor names and model ids never become paths outside the store (directory and zip stores);
  manifests and zips that point outside are refused.
- Metadata sizes are bounded before parsing, so a hostile store cannot exhaust memory on open.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
import tracemalloc
import uuid
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import uwsfmt
from uwsfmt import cli

from .crash_harness import make_sources

MARKERS: list[Path] = []


class Payload:
    """Unpickling this runs ``open(marker, "w")``: the proof that something executed."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def run_cli(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _good(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(32, 32, generator=g), "b": torch.randn(8, generator=g)}


# ---------------------------------------------------------------------------- pickle


def _evil_checkpoint(kind: str, folder: Path, marker: Path) -> Path:
    evil = {"w": torch.zeros(32, 32), "b": Payload(marker)}
    folder.mkdir(parents=True)
    if kind == "torch.save .pt":
        torch.save(evil, folder / "evil.pt")
        return folder / "evil.pt"
    if kind == "raw pickle .bin":
        with open(folder / "evil.bin", "wb") as f:
            pickle.dump(evil, f)
        return folder / "evil.bin"
    if kind == "HF folder":
        torch.save(evil, folder / "pytorch_model.bin")
        (folder / "config.json").write_text("{}")
        return folder
    if kind == "PEFT folder":
        torch.save({"base_model.model.fc.lora_A.weight": torch.zeros(2, 8), "base_model.model.fc.lora_B.weight": Payload(marker)},
                   folder / "adapter_model.bin")
        (folder / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["fc"], "base_model_name_or_path": "x"}))
        return folder
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["torch.save .pt", "raw pickle .bin", "HF folder", "PEFT folder"])
def test_malicious_pickle_never_runs(tmp_path, capsys, kind):
    marker = tmp_path / f"PWNED-{uuid.uuid4().hex}"
    evil = _evil_checkpoint(kind, tmp_path / "evil", marker)
    good = tmp_path / "good.safetensors"
    save_file(_good(0), str(good))
    out = tmp_path / "s.uws"
    for call in (lambda: uwsfmt.plan([str(evil)]), lambda: uwsfmt.convert([str(good), str(evil)], out)):
        with pytest.raises(uwsfmt.SourceError, match="weights_only"):
            call()
    rc, _, err = run_cli(capsys, "convert", good, evil, "-o", out, "-q")
    assert rc == 2 and "weights_only" in err and "Traceback" not in err
    store = tmp_path / "ok.uws"
    uwsfmt.convert({"a": _good(1), "b": _good(2)}, store).close()
    with pytest.raises(uwsfmt.SourceError, match="weights_only"):
        uwsfmt.append(str(store), str(evil), id="evil")
    with pytest.raises(uwsfmt.SourceError, match="weights_only"):
        uwsfmt.project(str(store), str(evil))
    rc, _, err = run_cli(capsys, "append", store, evil, "--id", "evil")
    assert rc == 2 and "weights_only" in err
    assert not marker.exists()  # nothing executed, in any path
    assert not out.exists() and uwsfmt.open(store).n_models == 2


def test_malicious_pickle_in_a_fresh_interpreter(tmp_path):
    """The console command too (its own process, nothing imported beforehand)."""
    marker = tmp_path / "PWNED"
    evil = _evil_checkpoint("torch.save .pt", tmp_path / "evil", marker)
    p = subprocess.run([sys.executable, "-m", "uwsfmt.cli", "plan", str(evil)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "weights_only" in p.stderr and "Traceback" not in p.stderr
    assert not marker.exists()


ALLOWED_CODECS = {"bytes", "crc32c", "zstd", "sharding_indexed"}
STORAGE_DTYPES = {"float64", "float32", "float16", "uint16", "uint8", "int64", "int32", "int16", "int8", "bool"}


def _codecs(codecs):
    for c in codecs:
        yield c["name"]
        if c["name"] == "sharding_indexed":
            yield from _codecs(c["configuration"]["codecs"])
            yield from _codecs(c["configuration"]["index_codecs"])


def _check_no_pickle(files: dict[str, bytes]) -> int:
    arrays = 0
    for name, data in files.items():
        base = name.rsplit("/", 1)[-1]
        assert base not in (".zarray", ".zattrs", ".zgroup", ".zmetadata"), name  # no Zarr v2 (pickle-capable) nodes
        assert b"\x80\x02" != data[:2] or base != "zarr.json"
        if base == "zarr.json":
            doc = json.loads(data)  # plain JSON, nothing else
            assert doc["zarr_format"] == 3
            if doc["node_type"] == "array":
                arrays += 1
                assert doc["data_type"] in STORAGE_DTYPES, name
                assert set(_codecs(doc["codecs"])) <= ALLOWED_CODECS, (name, doc["codecs"])
                outer = doc["codecs"][0]  # every chunk (and shard index) carries a crc32c checksum
                if outer["name"] == "sharding_indexed":
                    for key in ("codecs", "index_codecs"):
                        assert "crc32c" in {c["name"] for c in outer["configuration"][key]}, name
                else:
                    assert "crc32c" in {c["name"] for c in doc["codecs"]}, name
        else:  # every other file is a chunk or shard: under an array's c/ folder
            assert "/c/" in f"/{name}", name
    return arrays


def test_the_format_holds_no_pickle(tmp_path):
    srcs = make_sources(tmp_path / "src")
    st = uwsfmt.convert(srcs[:5], tmp_path / "s.uws", max_error=0.01, min_numel=64)
    st.append(srcs[5], id="late")  # with a per-model exception
    st.close()
    root = tmp_path / "s.uws"
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != ".uws.lock"}
    assert _check_no_pickle(files) > 10
    uwsfmt.pack(str(root), str(tmp_path / "s.zip"))
    with zipfile.ZipFile(tmp_path / "s.zip") as z:
        assert z.namelist()[0] == "zarr.json"
        assert _check_no_pickle({n: z.read(n) for n in z.namelist()}) > 10


def _array_meta(store: Path, path: str) -> tuple[Path, dict]:
    p = store / path / "zarr.json"
    return p, json.loads(p.read_text())


@pytest.fixture
def store(tmp_path):
    fam = {f"m{i}": {**_good(i), "frozen": torch.ones(4, 4)} for i in range(3)}
    uwsfmt.convert(fam, tmp_path / "s.uws", rank=2).close()
    return tmp_path / "s.uws"


def _value_path(store: Path) -> str:
    with uwsfmt.open(store) as st:
        return st.tensor_entry("frozen")["data"]["path"]


@pytest.mark.parametrize("codecs, name", [
    ([{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "gzip", "configuration": {"level": 1}}], "gzip"),
    ([{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "numcodecs.zlib", "configuration": {"level": 1}}], "numcodecs.zlib"),
    ([{"name": "transpose", "configuration": {"order": [1, 0]}}, {"name": "bytes", "configuration": {"endian": "little"}}], "transpose"),
])
def test_arrays_with_other_codecs_are_refused_before_decoding(store, capsys, codecs, name):
    path = _value_path(store)
    meta, doc = _array_meta(store, path)
    doc["codecs"] = codecs
    meta.write_text(json.dumps(doc))
    with pytest.raises(uwsfmt.FormatError, match=f"uses codec '{name}'"):
        uwsfmt.open(store).state_dict("m0")
    rc, _, err = run_cli(capsys, "validate", store)
    assert rc == 1 and f"uses codec '{name}'" in err


def test_a_zarr_v2_array_with_a_pickle_codec_is_never_decoded(store, capsys):
    marker = store.parent / f"PWNED-{uuid.uuid4().hex}"
    path = _value_path(store)
    shutil.rmtree(store / path)
    (store / path).mkdir()
    (store / path / ".zarray").write_text(json.dumps({"zarr_format": 2, "shape": [4, 4], "chunks": [4, 4], "dtype": "|O",
                                                       "compressor": {"id": "pickle"}, "fill_value": None, "order": "C",
                                                       "filters": None}))
    (store / path / "0.0").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(uwsfmt.FormatError, match="missing"):
        uwsfmt.open(store).state_dict("m0")
    assert any("missing" in p for p in uwsfmt.validate(str(store)))
    rc, _, err = run_cli(capsys, "export", store, "m0", "-o", store.parent / "o.safetensors")
    assert rc == 2 and "missing" in err
    assert not marker.exists()


def test_object_and_string_dtypes_are_refused(store):
    path = _value_path(store)
    meta, doc = _array_meta(store, path)
    doc["data_type"] = "string"
    doc["fill_value"] = ""
    doc["codecs"] = [{"name": "vlen-utf8"}]
    meta.write_text(json.dumps(doc))
    with pytest.raises(uwsfmt.FormatError, match="data type|codec"):
        uwsfmt.open(store).state_dict("m0")


# ---------------------------------------------------------------------------- paths


TRAVERSAL = ["../../../../../../tmp/uws-escape-{tag}", "/tmp/uws-escape-{tag}-abs", "a/../../../uws-escape-{tag}",
             "..\\..\\uws-escape-{tag}", "%2e%2e/%2e%2e/uws-escape-{tag}", "./../uws-escape-{tag}", "..", ".", "~", "/",
             "con:uws-escape-{tag}", "\x7f\x1b[31muws-escape-{tag}"]


def _no_escape(tag: str, roots: list[Path]) -> None:
    """No file or folder is named after the end of a traversal name (escaped node names contain it, never start with it)."""
    for r in roots:
        hits = [p for p in r.rglob("*") if p.name.startswith((f"uws-escape-{tag}", f"evil-{tag}"))]
        assert not hits, hits
    assert not [p for p in Path("/tmp").glob(f"uws-escape-{tag}*")]


def test_names_and_ids_cannot_create_paths_outside_the_store(tmp_path):
    tag = uuid.uuid4().hex[:8]
    names = [n.format(tag=tag) for n in TRAVERSAL]
    g = torch.Generator().manual_seed(0)
    base = {n: torch.randn(40, 40, generator=g) if i % 3 == 0 else torch.randn(3, generator=g) for i, n in enumerate(names)}
    fam = {names[i]: {k: v + 0.01 * i for k, v in base.items()} for i in range(4)}
    work = tmp_path / "work"
    work.mkdir()
    out = work / "s.uws"
    st = uwsfmt.convert(fam, out, rank=2)
    st.append({k: v * 2 for k, v in base.items()}, id=names[5])
    st.append({k: v * 3 for k, v in base.items()}, id=names[6])
    assert st.validate(deep=True) == []
    st.close()
    assert sorted(p.name for p in work.iterdir()) == ["s.uws"]
    for p in out.rglob("*"):  # every node name is an escaped, safe name
        assert p.resolve().is_relative_to(out.resolve())
        assert p.name in (".uws.lock", "zarr.json") or not p.name.startswith("."), p
    uwsfmt.pack(str(out), str(work / "s.zip"))
    uwsfmt.unpack(str(work / "s.zip"), str(work / "u.uws"))
    with uwsfmt.open(work / "s.zip") as z, uwsfmt.open(work / "u.uws") as u:
        assert z.model_ids == u.model_ids == list(fam) + [names[5], names[6]]
        for mid in z.model_ids:
            a, b = z.state_dict(mid), u.state_dict(mid)
            assert set(a) == set(names) and all(torch.equal(a[k], b[k]) for k in a)
    _no_escape(tag, [tmp_path])


@pytest.mark.parametrize("field, value", [
    ("node", "../../outside"), ("node", "/etc"), ("mean", "tensors/../../../etc/passwd"), ("left", "a/./b"),
    ("pack", "../packs"), ("exception", "../../x"), ("left", "tensors//left"), ("mean", "tensors/x/"),
])
@pytest.mark.parametrize("container", ["directory", "zip"])
def test_manifest_paths_outside_the_store_are_refused(tmp_path, capsys, field, value, container):
    srcs = make_sources(tmp_path / "src")
    st = uwsfmt.convert(srcs[:5], tmp_path / "s.uws", max_error=0.01, min_numel=64)
    st.append(srcs[5], id="late")
    st.close()
    store = tmp_path / "s.uws"
    doc = json.loads((store / "zarr.json").read_text())
    m = doc["attributes"]["uws"]
    sub = next(t for t in m["tensors"] if t["encoding"] == "subspace" and t["left"])
    if field == "pack":
        next(iter(m["packs"].values()))["path"] = value
    elif field == "exception":
        m["models"][-1]["exceptions"][0]["path"] = value
    else:
        sub[field] = value
    (store / "zarr.json").write_text(json.dumps(doc))
    target = store
    if container == "zip":
        target = tmp_path / "s.zip"
        with zipfile.ZipFile(target, "w") as z:
            z.write(store / "zarr.json", "zarr.json")
            for p in store.rglob("*"):
                if p.is_file() and p.name != ".uws.lock" and p != store / "zarr.json":
                    z.write(p, p.relative_to(store).as_posix())
    with pytest.raises(uwsfmt.FormatError, match="not valid UWS 1.x metadata"):
        uwsfmt.open(target)
    rc, _, err = run_cli(capsys, "validate", target)
    assert rc == 2 and "not valid UWS 1.x metadata" in err


@pytest.mark.parametrize("entry", ["../evil-{tag}", "/tmp/evil-{tag}", "a/../../evil-{tag}", "a\\..\\..\\evil-{tag}", "./a/evil-{tag}"])
def test_hostile_zip_entries_are_refused_on_unpack(tmp_path, capsys, entry, store):
    tag = uuid.uuid4().hex[:8]
    zpath = tmp_path / "hostile.zip"
    uwsfmt.pack(str(store), str(zpath))
    with zipfile.ZipFile(zpath, "a") as z:
        z.writestr(entry.format(tag=tag), b"payload")
    out = tmp_path / "deep" / "u.uws"
    out.parent.mkdir()
    with pytest.raises(uwsfmt.FormatError, match="outside the store"):
        uwsfmt.unpack(str(zpath), str(out))
    rc, _, err = run_cli(capsys, "unpack", zpath, out)
    assert rc == 2 and "outside the store" in err
    assert not out.exists() and list(out.parent.iterdir()) == []
    _no_escape(tag, [tmp_path])
    assert not [p for p in Path("/tmp").glob(f"evil-{tag}*")]


def test_shard_index_paths_outside_the_folder_are_refused(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file(_good(0), str(tmp_path / "outside.safetensors"))
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../outside.safetensors"}}))
    with pytest.raises(uwsfmt.SourceError, match="points outside the folder"):
        uwsfmt.plan([str(folder)])


# ---------------------------------------------------------------------------- bounded metadata


def _peak(call) -> tuple[BaseException | None, int, float]:
    tracemalloc.start()
    t0 = time.monotonic()
    err = None
    try:
        call()
    except BaseException as e:  # noqa: BLE001
        err = e
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return err, peak, time.monotonic() - t0


def test_a_huge_manifest_is_refused_before_it_is_read(store):
    root = store / "zarr.json"
    with open(root, "r+b") as f:
        f.truncate(uwsfmt.reader.manifest.MAX_MANIFEST_BYTES + 1)  # sparse: costs no disk
    err, peak, secs = _peak(lambda: uwsfmt.open(store))
    assert isinstance(err, uwsfmt.FormatError) and "refusing to parse it" in str(err)
    assert peak < 8 << 20 and secs < 5


def test_huge_declared_shapes_and_chunks_are_refused_without_allocating(store):
    path = _value_path(store)
    meta, doc = _array_meta(store, path)
    doc["shape"] = [2**40, 2**20]
    doc["chunk_grid"]["configuration"]["chunk_shape"] = [2**40, 2**20]
    meta.write_text(json.dumps(doc))
    err, peak, _ = _peak(lambda: uwsfmt.open(store).state_dict("m0"))
    assert isinstance(err, uwsfmt.FormatError) and "limit" in str(err)
    assert peak < 64 << 20
    doc["chunk_grid"]["configuration"]["chunk_shape"] = [4, 4]  # small chunks, absurd shape: the manifest's shape wins
    meta.write_text(json.dumps(doc))
    err, peak, _ = _peak(lambda: uwsfmt.open(store).state_dict("m0"))
    assert isinstance(err, uwsfmt.FormatError) and "the manifest implies [4, 4]" in str(err)
    assert peak < 64 << 20


def test_a_shard_index_too_large_is_refused(store):
    meta, doc = _array_meta(store, "packs/float32")
    sharding = doc["codecs"][0]
    doc["chunk_grid"]["configuration"]["chunk_shape"] = [1, 2**40]
    sharding["configuration"]["chunk_shape"] = [1, 1]
    meta.write_text(json.dumps(doc))
    err, peak, _ = _peak(lambda: uwsfmt.open(store).state_dict("m0"))
    assert isinstance(err, uwsfmt.FormatError) and "limit" in str(err) or "too large" in str(err)
    assert peak < 64 << 20


@pytest.mark.parametrize("doc", [b"[" * 200000 + b"]" * 200000, b'{"zarr_format": 3, "node_type": "group", "attributes": '
                                 + b'{"uws": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5000 + b"}}"])
def test_deeply_nested_metadata_is_refused(store, doc):
    (store / "zarr.json").write_bytes(doc)
    with pytest.raises(uwsfmt.FormatError):
        uwsfmt.open(store)


def test_deep_validate_reads_only_recorded_regular_sources(store, tmp_path):
    fifo = tmp_path / "m0.safetensors"
    os.mkfifo(fifo)  # reading it would block forever
    doc = json.loads((store / "zarr.json").read_text())
    models = doc["attributes"]["uws"]["models"]
    models[0]["source"] = {"path": str(fifo), "format": "safetensors", "sha256": "0" * 64, "size": 10}
    models[1]["source"] = {"path": "/dev/zero", "format": "torch", "sha256": "0" * 64, "size": 10}
    models[2]["source"] = {"path": "/proc/self/mem", "format": "torch", "sha256": "0" * 64, "size": 10}
    (store / "zarr.json").write_text(json.dumps(doc))
    notes: list[str] = []
    t0 = time.monotonic()
    assert uwsfmt.validate(str(store), deep=True, notes=notes) == []
    assert time.monotonic() - t0 < 30
    assert len(notes) == 3 and all("checked readback only" in n for n in notes)
