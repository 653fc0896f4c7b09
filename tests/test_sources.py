"""Checkpoint inputs: sharded HF folders, torch state dicts, the pickle guard, format
detection and override, planning reports, and full fine-tunes stored against their base."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import uwsfmt
from uwsfmt.sources import open_checkpoint


def _family(n=4, seed=0, dtype=torch.float32):
    """A base and n fine-tunes: low-rank deltas on matrices, frozen embedding, own biases."""
    g = torch.Generator().manual_seed(seed)
    base = {
        "embed.weight": torch.randn(40, 16, generator=g),
        "layers.0.attn.weight": torch.randn(48, 32, generator=g),
        "layers.0.mlp.weight": torch.randn(64, 48, generator=g),
        "layers.0.mlp.bias": torch.randn(64, generator=g),
        "step": torch.tensor([7], dtype=torch.int64),
    }
    u = {k: torch.randn(v.shape[0], 2, generator=g) for k, v in base.items() if v.ndim == 2}
    fam = {}
    for i in range(n):
        sd = {k: v.clone() for k, v in base.items()}
        for k in ("layers.0.attn.weight", "layers.0.mlp.weight"):
            sd[k] = sd[k] + 0.05 * u[k] @ torch.randn(2, sd[k].shape[1], generator=g)
        sd["layers.0.mlp.bias"] = sd["layers.0.mlp.bias"] + 0.01 * torch.randn(64, generator=g)
        fam[f"ft-{i}"] = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in base.items()}, fam


def _write_sharded(folder, sd: dict, n_shards: int = 3, ext: str = "safetensors"):
    os.makedirs(folder, exist_ok=True)
    names = list(sd)
    weight_map = {}
    for s in range(n_shards):
        part = names[s::n_shards]
        fname = (f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors" if ext == "safetensors"
                 else f"pytorch_model-{s + 1:05d}-of-{n_shards:05d}.bin")
        if ext == "safetensors":
            save_file({k: sd[k].contiguous() for k in part}, os.path.join(folder, fname), metadata={"format": "pt"})
        else:
            torch.save({k: sd[k] for k in part}, os.path.join(folder, fname))
        weight_map.update({k: fname for k in part})
    index = "model.safetensors.index.json" if ext == "safetensors" else "pytorch_model.bin.index.json"
    with open(os.path.join(folder, index), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": "tiny", "architectures": ["TinyForTest"]}, f)


def _same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


# ---------------------------------------------------------------------------- HF folders


@pytest.mark.parametrize("ext", ["safetensors", "bin"])
def test_sharded_hf_folders_round_trip(tmp_path, ext):
    _, fam = _family(dtype=torch.bfloat16)
    for mid, sd in fam.items():
        _write_sharded(tmp_path / "src" / mid, sd, ext=ext)
    ck = open_checkpoint(str(tmp_path / "src" / "ft-0"))
    assert ck.format == "hf_folder" and ck.metadata()["model_type"] == "tiny"
    assert len(ck.files()) == 4  # 3 shards + the index
    rep = uwsfmt.plan([str(tmp_path / "src")])
    assert rep["n_models"] == 4 and rep["formats"] == {"hf_folder": 4} and rep["conflicts"] == []
    st = uwsfmt.convert([str(tmp_path / "src")], tmp_path / "s.uws", rank=8)
    for mid, sd in fam.items():
        back = st.state_dict(mid)
        assert set(back) == set(sd)
        for k, v in sd.items():
            if st.tensor_entry(k)["encoding"] in ("dense", "shared"):
                assert _same_bits(back[k], v), k
            else:
                assert back[k].dtype == torch.bfloat16
                assert float((back[k].float() - v.float()).norm() / v.float().norm()) < 1e-2


def test_each_shard_is_opened_once(tmp_path, monkeypatch):
    _, fam = _family(n=3)
    for mid, sd in fam.items():
        _write_sharded(tmp_path / "src" / mid, sd)
    import uwsfmt.sources.safetensors_file as stf

    opened = []
    real = stf.open_data

    def counting(path, *a, **kw):
        opened.append(path)
        return real(path, *a, **kw)

    monkeypatch.setattr(stf, "open_data", counting)
    uwsfmt.convert([str(tmp_path / "src")], tmp_path / "s.uws", rank=4)
    assert len(opened) == len(set(opened)) == 9  # 3 models x 3 shards, each opened once


def test_planning_reads_headers_only(tmp_path, monkeypatch):
    _, fam = _family(n=2)
    for mid, sd in fam.items():
        _write_sharded(tmp_path / "src" / mid, sd)
    import uwsfmt.sources.safetensors_file as stf

    def no_data(*a, **kw):
        raise AssertionError("planning read tensor data")

    monkeypatch.setattr(stf, "open_data", no_data)
    rep = uwsfmt.plan([str(tmp_path / "src")])
    assert rep["n_tensors"] == 5 and rep["total_bytes"] == sum(v.numel() * v.element_size() for v in fam["ft-0"].values()) * 2


def test_broken_shard_index_is_reported(tmp_path):
    _, fam = _family(n=1)
    _write_sharded(tmp_path / "m", fam["ft-0"])
    idx = tmp_path / "m" / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    data["weight_map"]["ghost.weight"] = "model-00001-of-00003.safetensors"
    idx.write_text(json.dumps(data))
    with pytest.raises(uwsfmt.SourceError, match="does not match the shards"):
        open_checkpoint(str(tmp_path / "m")).infos()
    data["weight_map"]["ghost.weight"] = "../outside.safetensors"
    idx.write_text(json.dumps(data))
    with pytest.raises(uwsfmt.SourceError, match="outside the folder"):
        open_checkpoint(str(tmp_path / "m"))


# ---------------------------------------------------------------------------- torch files


def test_torch_state_dicts_round_trip(tmp_path):
    _, fam = _family(dtype=torch.float16)
    for mid, sd in fam.items():
        torch.save(sd, tmp_path / f"{mid}.pt")
    torch.save({"state_dict": fam["ft-0"]}, tmp_path / "wrapped.pth")  # lightning-style wrapper
    assert set(open_checkpoint(str(tmp_path / "wrapped.pth")).infos()) == set(fam["ft-0"])
    st = uwsfmt.convert([str(tmp_path / f"ft-{i}.pt") for i in range(4)], tmp_path / "s.uws", rank=8)
    back = st.state_dict("ft-2")
    assert _same_bits(back["step"], fam["ft-2"]["step"]) and _same_bits(back["embed.weight"], fam["ft-2"]["embed.weight"])
    assert back["layers.0.attn.weight"].dtype == torch.float16


class _Payload:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("container", ["torch.save", "raw pickle"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, container):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.bin"
    obj = {"w": torch.zeros(2, 2), "x": _Payload(marker)}
    if container == "torch.save":
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    with pytest.raises(uwsfmt.SourceError, match="refused to load") as err:
        uwsfmt.plan([str(path)])
    assert "weights_only" in str(err.value)
    p = subprocess.run([sys.executable, "-m", "uwsfmt.cli", "convert", str(path), "-o", str(tmp_path / "s.uws"), "-q"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "refused to load" in p.stderr and "Traceback" not in p.stderr
    assert not marker.exists()  # nothing was executed, in-process or by the CLI
    assert not (tmp_path / "s.uws").exists()


# ---------------------------------------------------------------------------- detection


def test_format_detection_and_override(tmp_path):
    sd = {"unet.a.to_q.lora_A.weight": torch.randn(2, 8), "unet.a.to_q.lora_B.weight": torch.randn(8, 2)}
    save_file(sd, str(tmp_path / "x.safetensors"))
    assert open_checkpoint(str(tmp_path / "x.safetensors")).format == "diffusers"
    forced = open_checkpoint(str(tmp_path / "x.safetensors"), format="safetensors")
    assert forced.format == "safetensors" and forced.lora_pairs() == {}
    with pytest.raises(uwsfmt.SourceError, match="unknown format"):
        open_checkpoint(str(tmp_path / "x.safetensors"), format="nope")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(uwsfmt.SourceError, match="--format"):
        open_checkpoint(str(tmp_path / "notes.txt"))
    # a folder of checkpoints is a family; the override applies to every member
    (tmp_path / "fam").mkdir()
    for i in range(2):
        save_file(sd, str(tmp_path / "fam" / f"m{i}.safetensors"))
    st = uwsfmt.convert([str(tmp_path / "fam")], tmp_path / "s.uws", format="safetensors", rank=2)
    assert not any(e.get("lora") for e in st.manifest["tensors"])


# ---------------------------------------------------------------------------- full fine-tunes with a base


def test_full_finetunes_against_their_base(tmp_path):
    base, fam = _family(n=5)
    save_file(base, str(tmp_path / "base.safetensors"))
    (tmp_path / "src").mkdir()
    for mid, sd in fam.items():
        save_file(sd, str(tmp_path / "src" / f"{mid}.safetensors"))
    st = uwsfmt.convert([str(tmp_path / "src")], tmp_path / "s.uws", base=str(tmp_path / "base.safetensors"), rank=2,
                        mode="left")  # the deltas share a 2-dim column space
    e = st.tensor_entry("layers.0.mlp.weight")
    assert e["center"] == "base"
    stored_base = torch.from_numpy(st.read_array(e["mean"]))
    assert torch.equal(stored_base, base["layers.0.mlp.weight"])  # the base, stored once
    assert st.tensor_entry("embed.weight")["encoding"] == "shared"
    for mid, sd in fam.items():
        out = st.export(mid, str(tmp_path / f"{mid}.out.safetensors"))
        back = load_file(out)
        for k, v in sd.items():
            assert back[k].dtype == v.dtype
            if v.is_floating_point():
                assert float((back[k] - v).norm() / v.norm()) < 1e-5, k  # rank-2 deltas: exact at rank 2
            else:
                assert torch.equal(back[k], v)
    # through the CLI too
    p = subprocess.run([sys.executable, "-m", "uwsfmt.cli", "convert", str(tmp_path / "src"), "-o", str(tmp_path / "c.uws"),
                        "--base", str(tmp_path / "base.safetensors"), "--rank", "2", "--mode", "left", "-q"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert uwsfmt.open(tmp_path / "c.uws").manifest["build"]["base"]["format"] == "safetensors"


def test_wrong_base_is_reported_all_at_once(tmp_path):
    base, fam = _family(n=2)
    base.pop("layers.0.attn.weight")
    base["layers.0.mlp.weight"] = torch.zeros(8, 8)
    save_file(base, str(tmp_path / "base.safetensors"))
    with pytest.raises(uwsfmt.ConflictError) as err:
        uwsfmt.convert(fam, tmp_path / "s.uws", base=str(tmp_path / "base.safetensors"), rank=2)
    assert len(err.value.problems) == 2 and "not in the base" in str(err.value)


# ---------------------------------------------------------------------------- plan / dry run


def test_plan_and_dry_run_print_the_report(tmp_path):
    _, fam = _family(n=3)
    fam["ft-2"]["layers.0.attn.weight"] = torch.zeros(8, 8)  # a shape conflict...
    fam["ft-1"].pop("layers.0.mlp.bias")  # ...and a missing tensor
    (tmp_path / "src").mkdir()
    for mid, sd in fam.items():
        save_file(sd, str(tmp_path / "src" / f"{mid}.safetensors"))
    rep = uwsfmt.plan([str(tmp_path / "src")])
    assert rep["varying_shapes"] == ["layers.0.attn.weight"]
    assert any("missing from 1 model(s): ft-1" in c for c in rep["conflicts"])
    for cmd in (["plan", str(tmp_path / "src")], ["convert", str(tmp_path / "src"), "--dry-run"]):
        p = subprocess.run([sys.executable, "-m", "uwsfmt.cli", *cmd], capture_output=True, text=True, timeout=120)
        assert p.returncode == 1, p.stderr  # conflicts -> non-zero
        assert "3 models (safetensors: 3)" in p.stdout and "CONFLICT" in p.stdout and "layers.0.attn.weight" in p.stdout
    assert not any(x.endswith(".uws") for x in os.listdir(tmp_path))


def test_safetensors_headers_are_parsed_once_per_file_version(tmp_path):
    """Format detection and the checkpoint share one parse of a header; a rewritten file (other
    size, mtime or inode) is parsed again; the cache keeps a bounded number of headers."""
    from uwsfmt.sources import safetensors_file as sf

    p = tmp_path / "m.safetensors"
    save_file({"x": torch.zeros(3)}, str(p))
    first = sf.read_header(str(p))
    assert sf.read_header(str(p)) is first
    save_file({"x": torch.zeros(3), "y": torch.ones(2)}, str(p))
    assert set(sf.read_header(str(p))) == {"x", "y"}
    for i in range(sf._HEADERS_KEPT + 5):
        q = tmp_path / f"{i}.safetensors"
        save_file({"x": torch.zeros(1)}, str(q))
        sf.read_header(str(q))
    assert len(sf._HEADERS) <= sf._HEADERS_KEPT
