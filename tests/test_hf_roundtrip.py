"""Hugging Face round trip (issue 29): folders in, the same loadable folders out.

Families of tiny GPT-2 / BERT / Llama models made with transformers' own classes, saved sharded
with save_pretrained plus a tokenizer with a chat template, converted; exported with
``format="hf"`` (API and CLI) and loaded with ``from_pretrained``; loaded with
``uwsfmt.hf.from_store``; outputs compared with the originals' on a fixed batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import uwsfmt
import uwsfmt.hf
from uwsfmt.cli import main as cli_main

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from tests.hf_family import batch, save_family  # noqa: E402

AUTO = {"gpt2": "AutoModelForCausalLM", "bert": "AutoModelForMaskedLM", "llama": "AutoModelForCausalLM"}
#: the small files save_pretrained wrote (plus the model card the family adds), compared byte for byte
SMALL = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "README.md")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{kind: [model folder paths]}: three fine-tunes of one base per architecture."""
    root = tmp_path_factory.mktemp("hf_src")
    return {kind: save_family(root / kind, kind, n=3) for kind in AUTO}


def _auto(kind: str):
    return getattr(transformers, AUTO[kind])


def _outputs(model, kind: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch(kind)).logits


def _files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}


def _quiet():
    transformers.logging.set_verbosity_error()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.mark.parametrize("kind", list(AUTO))
def test_export_hf_loads_with_from_pretrained(tmp_path, folders, kind):
    _quiet()
    src = folders[kind]
    store = uwsfmt.convert(src, tmp_path / "s.uws")  # defaults: lossy
    mid = store.model_ids[1]
    out = store.export(mid, tmp_path / "out", format="hf")
    assert store.export_formats(mid) == ["safetensors", "hf"]
    from jupyter_ext import payload  # what the Inspector and the JupyterLab panel offer, before a model is picked

    assert payload.export_formats(store) == ["safetensors", "hf"] and payload.export_formats(store, mid) == ["safetensors", "hf"]
    # the same folder: the same file names; the small files byte for byte; the index as it was
    have, orig = _files(out), _files(src[1])
    assert sorted(have) == sorted(orig)
    for name in (*SMALL, "model.safetensors.index.json"):
        if name in orig:
            assert have[name] == orig[name], name
    assert len([n for n in have if n.endswith(".safetensors")]) > 1  # sharded like the source
    # from_pretrained loads it; the weights are the store's reconstruction, the outputs the original's within its error
    ref = _auto(kind).from_pretrained(src[1]).eval()
    got = _auto(kind).from_pretrained(out).eval()
    sd = store.state_dict(mid)
    got_sd = got.state_dict()
    assert all(torch.equal(got_sd[k], v) for k, v in sd.items())
    err = max(e for e in store.model_entry(mid)["error"] if e is not None)
    a, b = _outputs(ref, kind), _outputs(got, kind)
    assert 0 < err < 0.1
    # within the recorded error: the outputs' relative deviation is of the order of the weights' (a few layers deep)
    print(kind, float((a - b).norm() / a.norm()), err)
    assert (a - b).norm() <= 4 * err * a.norm()
    if kind == "gpt2":  # tied weights as transformers expects: left out of the files, tied on load
        assert "lm_head.weight" not in json.loads(have["model.safetensors.index.json"])["weight_map"]
        assert got.lm_head.weight.data_ptr() == got.transformer.wte.weight.data_ptr()


@pytest.mark.parametrize("kind", list(AUTO))
def test_from_store_matches_the_exported_folder(tmp_path, folders, kind):
    _quiet()
    store = uwsfmt.convert(folders[kind], tmp_path / "s.uws", max_error=0)  # lossless: the originals' bits
    mid = store.model_ids[2]
    lm = uwsfmt.hf.from_store(store, mid, _auto(kind), device="cpu")
    ref = _auto(kind).from_pretrained(folders[kind][2]).eval()
    assert not lm.training
    assert torch.equal(_outputs(lm, kind), _outputs(ref, kind))
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in lm.state_dict().items())
    if kind == "gpt2":
        assert lm.lm_head.weight is lm.transformer.wte.weight
    # the default model class is the config's architecture
    assert type(uwsfmt.hf.from_store(store, mid)).__name__ == type(ref).__name__
    if getattr(ref, "generation_config", None) is not None:  # generative models: the kept generation_config.json
        assert lm.generation_config.to_dict() == ref.generation_config.to_dict()


def test_from_store_refuses_a_model_class_that_does_not_fit(tmp_path, folders):
    store = uwsfmt.convert(folders["bert"][:2], tmp_path / "s.uws")
    with pytest.raises(uwsfmt.ConflictError, match="has no place for"):
        uwsfmt.hf.from_store(store, 0, transformers.AutoModel)  # a bare encoder: no MLM head
    plain = uwsfmt.convert({"a": {"w": torch.randn(4, 4)}}, tmp_path / "p.uws")
    with pytest.raises(uwsfmt.NotFoundError, match="no kept config.json"):
        uwsfmt.hf.from_store(plain, "a")


def test_cli_export_hf_and_max_shard_size(tmp_path, folders, capsys):
    _quiet()
    src = folders["llama"]
    store = tmp_path / "s.uws"
    assert cli_main(["convert", *src, "-o", str(store), "-q"]) == 0
    assert cli_main(["export", str(store), "llama-ft0", "-o", str(tmp_path / "a"), "--format", "hf"]) == 0
    assert cli_main(["export", str(store), "llama-ft0", "-o", str(tmp_path / "b"), "--format", "hf", "--max-shard-size", "60KB"]) == 0
    assert cli_main(["export", str(store), "llama-ft0", "-o", str(tmp_path / "c"), "--format", "hf", "--max-shard-size", "100MB"]) == 0
    capsys.readouterr()
    a, b, c = (_files(tmp_path / x) for x in "abc")
    shards_b = sorted(n for n in b if n.endswith(".safetensors"))
    assert len(shards_b) > 1 and shards_b[0] == f"model-00001-of-{len(shards_b):05d}.safetensors"
    assert sorted(n for n in c if n.endswith("safetensors") or n.endswith(".json")) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    index = json.loads(b["model.safetensors.index.json"])
    assert set(index["weight_map"].values()) == set(shards_b)
    assert all(len(b[s]) <= 60_000 + 10_000 for s in shards_b)  # a shard holds at most 60 KB of tensors (+ header)
    outs = [_outputs(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / x).eval(), "llama") for x in "abc"]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    # overwriting replaces the folder as a whole: no stale shards of the old layout
    assert cli_main(["export", str(store), "llama-ft0", "-o", str(tmp_path / "b"), "--format", "hf", "--overwrite"]) == 0
    assert sorted(_files(tmp_path / "b")) == sorted(a)
    # a model that is not from an HF folder: a clear refusal, non-zero exit
    plain = tmp_path / "p.uws"
    uwsfmt.convert({"m": {"w": torch.randn(4, 4)}}, plain).close()
    assert cli_main(["export", str(plain), "m", "-o", str(tmp_path / "d"), "--format", "hf"]) == 2
    err = capsys.readouterr().err
    assert "did not come from a Hugging Face model folder" in err and "--format safetensors" in err
    assert not (tmp_path / "d").exists()
    assert cli_main(["export", str(store), "llama-ft0", "-o", str(tmp_path / "e"), "--max-shard-size", "1MB"]) == 2
    assert "--max-shard-size" in capsys.readouterr().err


def test_no_absolute_path_in_the_manifest_or_exports(tmp_path, folders):
    src_root = tmp_path / "models"
    shutil.copytree(Path(folders["gpt2"][0]).parent, src_root)
    srcs = sorted(str(p) for p in src_root.iterdir())
    store = uwsfmt.convert(srcs, tmp_path / "s.uws")
    mid = store.model_ids[0]
    store.export(mid, tmp_path / "hf", format="hf")
    written = store.export(mid, tmp_path / "plain", format="safetensors")
    assert written == str(tmp_path / "plain.safetensors")  # the extension a name without one gets
    from safetensors import safe_open

    with safe_open(written, "pt") as f:
        assert f.metadata()["uwsfmt.store"] == "s.uws"
    secret = str(tmp_path).encode()
    manifest = (tmp_path / "s.uws" / "zarr.json").read_bytes()
    assert secret not in manifest and str(tmp_path).encode("unicode_escape") not in manifest
    for p in [*(tmp_path / "hf").iterdir(), Path(written), *(tmp_path / "s.uws").rglob("*")]:
        if p.is_file():
            assert secret not in p.read_bytes(), p
    rec = store.model_entry(mid)["source"]
    assert rec["name"] == Path(srcs[0]).name and "path" not in rec and rec["format"] == "hf_folder"
    # opt-in: paths relative to a named root; evaluate and validate --deep find the sources under it
    st2 = uwsfmt.convert(srcs, tmp_path / "r.uws", source_root=tmp_path, max_error=1e-3)  # near exact: evaluate below
    assert st2.model_entry(0)["source"]["path"] == f"models/{Path(srcs[0]).name}"
    assert secret not in (tmp_path / "r.uws" / "zarr.json").read_bytes()
    notes: list[str] = []
    assert uwsfmt.validate(str(tmp_path / "r.uws"), deep=True, notes=notes, source_root=tmp_path) == []
    assert all("errors recomputed" in n for n in notes)
    notes = []
    assert uwsfmt.validate(str(tmp_path / "r.uws"), deep=True, notes=notes) == []
    assert all("--source-root" in n for n in notes)

    def score(sd):
        return float(sd["transformer.wte.weight"].double().sum())

    res = uwsfmt.evaluate(st2, score, source_root=tmp_path)
    assert all(r["original"] is not None and abs(r["delta"]) < 1e-2 for r in res.values())
    assert all(r["original"] is None for r in uwsfmt.evaluate(st2, score).values())
    with pytest.raises(uwsfmt.ConfigError, match="not inside the source root"):
        uwsfmt.convert(srcs, tmp_path / "x.uws", source_root=src_root / srcs[0])


def test_files_are_stored_once_by_content_and_checked(tmp_path, folders):
    store = uwsfmt.convert(folders["gpt2"], tmp_path / "s.uws")
    recs = [m["folder"] for m in store.manifest["models"]]
    shas = {f["sha256"] for r in recs for f in r["files"].values()}
    stored = sorted(p.name for p in (tmp_path / "s.uws" / "files").iterdir() if p.is_dir())
    assert stored == sorted(shas)
    # the tokenizer is the same file in every folder: one array; the model cards differ
    assert len({r["files"]["tokenizer.json"]["sha256"] for r in recs}) == 1
    assert len({r["files"]["README.md"]["sha256"] for r in recs}) == 3
    data = store.read_file(1, "tokenizer.json")
    assert hashlib.sha256(data).hexdigest() == recs[1]["files"]["tokenizer.json"]["sha256"]
    assert data == (Path(folders["gpt2"][1]) / "tokenizer.json").read_bytes()
    with pytest.raises(uwsfmt.NotFoundError, match="no kept file"):
        store.read_file(0, "vocab.txt")
    # a damaged file is caught (its checksum, or its sha256), by readers and by validate
    chunk = next((tmp_path / "s.uws" / "files" / recs[0]["files"]["config.json"]["sha256"]).rglob("c/*"))
    raw = bytearray(chunk.read_bytes())
    raw[5] ^= 0x01
    chunk.write_bytes(bytes(raw))
    with uwsfmt.open(tmp_path / "s.uws") as st:
        with pytest.raises(uwsfmt.FormatError, match="damaged"):
            st.read_file(0, "config.json")
    problems = uwsfmt.validate(str(tmp_path / "s.uws"))
    assert any("config.json" in p for p in problems)


def test_file_policy_size_limit_and_remote_code(tmp_path, folders, capsys):
    src = tmp_path / "m"
    shutil.copytree(folders["gpt2"][0], src)
    (src / "modeling_custom.py").write_text("raise SystemExit('never run')\n")
    (src / "notes.txt").write_bytes(b"x" * 5000)
    store = uwsfmt.convert([str(src)], tmp_path / "s.uws")
    rec = store.model_entry(0)["folder"]
    assert "modeling_custom.py" not in rec["files"] and rec["skipped"] == ["modeling_custom.py"]
    assert "notes.txt" in rec["files"] and not any(n.endswith(".safetensors") for n in rec["files"])
    kept = uwsfmt.convert([str(src)], tmp_path / "c.uws", files=uwsfmt.FilePolicy(remote_code=True))
    assert kept.read_file(0, "modeling_custom.py") == b"raise SystemExit('never run')\n"
    # over the limit: refused before anything is written, naming the file, the limit and the options
    with pytest.raises(uwsfmt.SourceError, match=r"notes\.txt.*4,000-byte limit.*--max-file-size.*--no-files"):
        uwsfmt.convert([str(src)], tmp_path / "big.uws", files=uwsfmt.FilePolicy(max_size="4KB"))
    assert not (tmp_path / "big.uws").exists()
    assert cli_main(["convert", str(src), "-o", str(tmp_path / "big.uws"), "--max-file-size", "4KB", "-q"]) == 2
    assert "notes.txt" in capsys.readouterr().err and not (tmp_path / "big.uws").exists()
    none = uwsfmt.convert([str(src)], tmp_path / "n.uws", files=False)
    assert none.model_entry(0)["folder"]["files"] == {} and none.export_formats(0) == ["safetensors"]
    with pytest.raises(uwsfmt.ConfigError, match="not a byte count"):
        uwsfmt.FilePolicy(max_size="lots")


def test_append_keeps_files_and_rewrites_uncommitted_ones(tmp_path, folders):
    _quiet()
    src = folders["gpt2"]
    store_path = tmp_path / "s.uws"
    uwsfmt.convert(src[:2], store_path).close()
    # a killed append left a damaged array where the new model's model card will go
    new = tmp_path / "gpt2-new"
    shutil.copytree(src[2], new)
    card = b"# another card\n"
    (new / "README.md").write_bytes(card)
    sha = hashlib.sha256(card).hexdigest()
    stale = store_path / "files" / sha
    shutil.copytree(next(p for p in (store_path / "files").iterdir() if p.is_dir()), stale)  # another file's bytes
    with uwsfmt.open(store_path, mode="a") as st:
        shared = {f: (store_path / "files" / st.model_entry(0)["folder"]["files"][f]["sha256"] / "zarr.json").stat().st_mtime_ns
                  for f in ("tokenizer.json", "config.json")}
        st.append(str(new))
        assert st.read_file("gpt2-new", "README.md") == card
        assert st.model_entry("gpt2-new")["source"]["name"] == "gpt2-new"
        out = st.export("gpt2-new", tmp_path / "out", format="hf")
    for f, t in shared.items():  # contents a committed model names are not written again
        with uwsfmt.open(store_path) as st:
            assert (store_path / "files" / st.model_entry(0)["folder"]["files"][f]["sha256"] / "zarr.json").stat().st_mtime_ns == t
    assert uwsfmt.validate(str(store_path)) == []
    assert (Path(out) / "README.md").read_bytes() == card
    lm = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert lm is not None


def test_peft_adapters_keep_their_folder_files(tmp_path, peft_family):
    _, adapters = peft_family
    store = uwsfmt.convert(adapters[:3], tmp_path / "s.uws")
    assert store.export_formats(0) == ["safetensors", "peft"]
    assert store.read_file(0, "adapter_config.json") == (Path(adapters[0]) / "adapter_config.json").read_bytes()
    assert store.model_entry(0)["folder"]["weights"]["shards"] == ["adapter_model.safetensors"]


def test_state_dict_of_some_names_then_all(tmp_path):
    """Stacked bases are cached per group of tensors read together: reading part of a group first
    must not hand its stack to a later read of the whole group."""
    from uwsfmt.testing.families import synthetic_family

    fam = synthetic_family(n_models=4, shapes={"x.weight": (32, 32), "y.weight": (32, 32), "z.weight": (32, 32)}, rank=3, seed=2)
    st = uwsfmt.convert(fam, tmp_path / "s.uws", rank=2)
    with uwsfmt.open(tmp_path / "s.uws") as fresh:
        want = fresh.state_dict(1)
    names = [e["name"] for e in st.manifest["tensors"] if e["encoding"] == "subspace"]
    part = st.state_dict(1, names=names[:1])
    assert torch.equal(part[names[0]], want[names[0]])
    got = st.state_dict(1)
    assert all(torch.equal(got[k], v) for k, v in want.items())
