"""Nothing lost under crashes, full or read-only disks and concurrent writers and readers.

The SIGKILL campaign itself is tests/crash_harness.py (run here as a slow test); the tests
below cover what a kill cannot: I/O errors at every write, real full and read-only file
systems, concurrent appenders and readers, leftovers of killed converts, and integrity
(recorded sha256/size, checksums, ``validate --deep`` recomputing errors from the sources).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
import zarr.storage._local as zarr_local

import uwsfmt
from uwsfmt import cli
from uwsfmt.io.commit import StoreLock

from .crash_harness import make_sources, snapshot

ROOT = Path(__file__).resolve().parents[1]
BUILD = dict(max_error=0.01, min_numel=64)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """(sources, pristine store): 5 models converted, models #5 and #6 left to append."""
    work = tmp_path_factory.mktemp("reliability")
    srcs = make_sources(work / "src")
    # sources recorded relative to their root (the folder above src/), where `validate --deep` finds them
    uwsfmt.convert(srcs[:5], work / "pristine.uws", source_root=work, **BUILD).close()
    return srcs, str(work / "pristine.uws")


@pytest.fixture
def store(tmp_path, family):
    _, pristine = family
    shutil.copytree(pristine, tmp_path / "s.uws")
    return str(tmp_path / "s.uws")


class FailingWrites:
    """Make zarr's file writes fail from the ``at``-th on (ENOSPC, EROFS, ...), or count them."""

    def __init__(self, monkeypatch, at: int | None = None, err: int = errno.ENOSPC, delay: float = 0.0):
        self.count, self.at, self.err, self.delay = 0, at, err, delay
        self._put = zarr_local._put
        monkeypatch.setattr(zarr_local, "_put", self.put)

    def put(self, path, value, exclusive=False):
        self.count += 1
        if self.at is not None and self.count >= self.at:
            raise OSError(self.err, os.strerror(self.err), str(path))
        if self.delay:
            time.sleep(self.delay)
        return self._put(path, value, exclusive=exclusive)


def cli_run(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------------------- crash safety


@pytest.mark.slow
def test_sigkill_harness_loses_nothing(tmp_path):
    """SIGKILL convert and append at >= 20 random points each (plus write-boundary points)."""
    out = tmp_path / "crash.json"
    p = subprocess.run([sys.executable, "-m", "tests.crash_harness", "--kills", "22", "--write-kills", "10", "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    s = json.loads(out.read_text())
    assert s["failures"] == []
    for cmd in ("convert", "append"):
        assert s[cmd]["time"]["killed"] >= 20, s[cmd]
        assert s[cmd]["intact"] == s[cmd]["kill_points"], s[cmd]
    print(p.stdout)


def test_killed_convert_leftover_is_rejected_and_cleaned(tmp_path, family):
    srcs, _ = family
    target = tmp_path / "s.uws"
    # what a convert killed mid-build leaves: a hidden sibling marked 'building'
    left = tmp_path / f".s.uws{uwsfmt.reader.manifest.BUILDING_MARK}deadbeef"
    zarr.open_group(zarr.storage.LocalStore(left), mode="w", attributes={"uws": {"format_version": "1.0", "state": "building"}})
    bare = tmp_path / f".s.uws{uwsfmt.reader.manifest.BUILDING_MARK}0badf00d"  # killed before its first write
    bare.mkdir()
    for p in (left, bare):
        with pytest.raises(uwsfmt.FormatError, match="interrupted `uwsfmt convert`"):
            uwsfmt.validate(str(p))
    (tmp_path / ".s.uws.uws-convert.lock").write_text("")  # a killed convert's (released) lock
    assert not target.exists()
    uwsfmt.convert(srcs[:3], target, **BUILD).close()
    assert uwsfmt.validate(str(target)) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.uws"]  # leftovers and lock file gone


def test_cli_validate_rejects_a_building_store(tmp_path, capsys):
    left = tmp_path / f".s.uws{uwsfmt.reader.manifest.BUILDING_MARK}deadbeef"
    zarr.open_group(zarr.storage.LocalStore(left), mode="w", attributes={"uws": {"format_version": "1.0", "state": "building"}})
    rc, _, err = cli_run(capsys, "validate", left)
    assert rc == 2 and "'building'" in err and "interrupted" in err and "Traceback" not in err


def test_overwrite_swaps_atomically(tmp_path, family):
    srcs, pristine = family
    target = tmp_path / "s.uws"
    shutil.copytree(pristine, target)
    with uwsfmt.open(target) as st:
        before = st.model_ids
    uwsfmt.convert(srcs[2:5], target, overwrite=True, **BUILD).close()
    with uwsfmt.open(target) as st:
        assert st.model_ids == before[2:5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.uws"]


def test_a_replaced_store_never_lies_under_the_build_name(tmp_path, family, monkeypatch):
    """Killed while deleting the store it replaced, an overwrite leaves that old store under its own
    'replaced' name, never under the build's name (whose leftover validate would describe as the
    new store); the next convert removes it."""
    srcs, pristine = family
    target = tmp_path / "s.uws"
    shutil.copytree(pristine, target)
    with uwsfmt.open(target) as st:
        before = st.model_ids
    deleted = []
    real = shutil.rmtree
    monkeypatch.setattr(uwsfmt.writer.convert.shutil, "rmtree", lambda p, *a, **k: deleted.append(str(p)))  # "killed" before deleting
    uwsfmt.convert(srcs[2:5], target, overwrite=True, **BUILD).close()
    monkeypatch.setattr(uwsfmt.writer.convert.shutil, "rmtree", real)
    old = deleted[-1]  # the last deletion: the replaced store (earlier ones: the build's own clean start)
    assert uwsfmt.reader.manifest.REPLACED_MARK in old and uwsfmt.reader.manifest.BUILDING_MARK not in old
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["s.uws", os.path.basename(old)])
    with uwsfmt.open(target) as st:
        assert st.model_ids == before[2:5]
    notes = []
    assert uwsfmt.validate(old, notes=notes) == [] and "replaced" in notes[0]  # the old store, said to be such
    with uwsfmt.open(old) as st:
        assert st.model_ids == before
    (Path(old) / "zarr.json").unlink()  # partly deleted
    with pytest.raises(uwsfmt.FormatError, match="replaced by `uwsfmt convert --overwrite`"):
        uwsfmt.validate(old)
    uwsfmt.convert(srcs[:3], target, overwrite=True, **BUILD).close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.uws"]


# ---------------------------------------------------------------------------- disk full / read-only


def test_io_error_at_every_write_of_an_append_keeps_the_previous_state(store, family, monkeypatch):
    srcs, _ = family
    before = snapshot(store)
    counter = FailingWrites(monkeypatch)
    shutil.copytree(store, store + ".count")
    uwsfmt.append(store + ".count", srcs[5], id="late")
    writes = counter.count  # zarr's writes, parent groups' create-if-absent included
    assert writes >= 5
    monkeypatch.undo()
    for at in range(1, writes + 1):
        for err in (errno.ENOSPC, errno.EROFS) if at in (1, writes) else (errno.ENOSPC,):
            trial = f"{store}.{at}.{err}"  # a fresh copy: a failed append's files change the next one's writes
            shutil.copytree(store, trial)
            FailingWrites(monkeypatch, at=at, err=err)
            with pytest.raises(uwsfmt.StoreError, match=os.strerror(err)) as e:
                uwsfmt.append(trial, srcs[5], id="late")
            monkeypatch.undo()
            assert "previous committed state" in str(e.value)
            assert snapshot(trial) == before, f"write #{at} failing changed the store"
            assert uwsfmt.validate(trial, deep=True) == []
            uwsfmt.append(trial, srcs[5], id="late")  # and the store takes the append once the disk is back
            assert snapshot(trial)[0] == before[0] + 1
            shutil.rmtree(trial)


def test_io_error_during_convert_leaves_nothing(tmp_path, family, monkeypatch):
    srcs, pristine = family
    counter = FailingWrites(monkeypatch)
    uwsfmt.convert(srcs[:5], tmp_path / "count.uws", **BUILD).close()
    writes = counter.count
    monkeypatch.undo()
    old = tmp_path / "old.uws"
    shutil.copytree(pristine, old)
    before = snapshot(str(old))
    for at in sorted({1, 2, writes // 3, writes // 2, writes - 1, writes}):
        FailingWrites(monkeypatch, at=at, err=errno.ENOSPC)
        with pytest.raises(uwsfmt.StoreError, match="No space left on device.*nothing was written there"):
            uwsfmt.convert(srcs[:5], tmp_path / "new.uws", **BUILD)
        monkeypatch.undo()
        FailingWrites(monkeypatch, at=at, err=errno.ENOSPC)
        with pytest.raises(uwsfmt.StoreError, match="existing store there is unchanged"):
            uwsfmt.convert(srcs[:5], old, overwrite=True, **BUILD)
        monkeypatch.undo()
        assert not (tmp_path / "new.uws").exists()
        assert snapshot(str(old)) == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["count.uws", "old.uws"]


def test_cli_reports_a_full_disk_in_one_line(store, family, monkeypatch, capsys):
    srcs, _ = family
    FailingWrites(monkeypatch, at=3)
    rc, _, err = cli_run(capsys, "append", store, srcs[5], "--id", "late")
    assert rc == 2 and "No space left on device" in err and "previous committed state" in err
    assert "Traceback" not in err


@pytest.fixture
def tiny_fs(tmp_path):
    """A 1 MiB tmpfs (skipped where mounting is not allowed); unmounted afterwards."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tmpfs")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_real_full_and_read_only_file_system(tiny_fs, family, capsys):
    srcs, pristine = family
    store = tiny_fs / "s.uws"
    shutil.copytree(pristine, store)
    before = snapshot(str(store))
    # fill the file system to the last few KiB
    free = shutil.disk_usage(tiny_fs).free
    with open(tiny_fs / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - 4096))
    with pytest.raises(uwsfmt.StoreError, match="No space left on device"):
        uwsfmt.append(str(store), srcs[5], id="late")
    with pytest.raises(uwsfmt.StoreError, match="No space left on device"):
        uwsfmt.convert(srcs[:5], tiny_fs / "new.uws", **BUILD)
    assert not (tiny_fs / "new.uws").exists()
    assert snapshot(str(store)) == before and uwsfmt.validate(str(store), deep=True) == []
    rc, _, err = cli_run(capsys, "append", store, srcs[5], "--id", "late")
    assert rc == 2 and "No space left on device" in err
    os.remove(tiny_fs / "filler")
    assert not [p for p in tiny_fs.iterdir() if p.name not in ("s.uws",)]  # no temporary folders left
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True, capture_output=True)
    with pytest.raises(uwsfmt.StoreError, match="Read-only file system"):
        uwsfmt.append(str(store), srcs[5], id="late")
    with pytest.raises(uwsfmt.StoreError, match="Read-only file system"):
        uwsfmt.convert(srcs[:5], tiny_fs / "new.uws", **BUILD)
    rc, _, err = cli_run(capsys, "append", store, srcs[5], "--id", "late")
    assert rc == 2 and "Read-only file system" in err and "Traceback" not in err
    assert snapshot(str(store)) == before  # and a read-only store still reads
    assert uwsfmt.validate(str(store), deep=True) == []


# ---------------------------------------------------------------------------- concurrency


def _by_id(state):
    return state[1]


def test_concurrent_appenders_serialise_and_readers_see_committed_states(store, family, monkeypatch, tmp_path):
    srcs, pristine = family
    # the reference: the same models appended one after the other
    ref = tmp_path / "ref.uws"
    shutil.copytree(pristine, ref)
    uwsfmt.append(str(ref), srcs[5], id="a")
    uwsfmt.append(str(ref), srcs[6], id="b")
    want = _by_id(snapshot(str(ref)))
    early = uwsfmt.open(store)  # opened before any append: keeps its snapshot
    early_ids = early.model_ids
    FailingWrites(monkeypatch, delay=0.01)  # widen every window
    errors: list[BaseException] = []
    seen: list[int] = []
    stop = threading.Event()

    def appender(src, mid, barrier):
        try:
            barrier.wait()
            uwsfmt.append(store, src, id=mid)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    def reader():
        try:
            while not stop.is_set():
                with uwsfmt.open(store) as st:
                    seen.append(st.n_models)
                    for mid in st.model_ids:
                        sd = st.state_dict(mid)
                        for k, v in sd.items():
                            dt, shape, raw = want[mid][k]
                            assert (str(v.dtype), tuple(v.shape)) == (dt, shape) and v.contiguous().view(-1).view(torch.uint8).numpy().tobytes() == raw, (mid, k)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    barrier = threading.Barrier(2)
    threads = [threading.Thread(target=appender, args=(srcs[5], "a", barrier)),
               threading.Thread(target=appender, args=(srcs[6], "b", barrier))]
    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in readers + threads:
        t.start()
    for t in threads:
        t.join(120)
    stop.set()
    for t in readers:
        t.join(120)
    assert not errors, errors
    assert seen and set(seen) <= {5, 6, 7}
    final = snapshot(store)
    assert final[0] == snapshot(pristine)[0] + 2 and _by_id(final) == want  # both, neither torn nor lost
    assert early.model_ids == early_ids and early.n_models == 5  # an open store keeps its committed state
    for mid in early.model_ids:
        early.state_dict(mid)
    early.close()
    assert uwsfmt.validate(store, deep=True) == []


def test_appender_facing_a_held_lock_fails_cleanly(store, family, monkeypatch, capsys):
    srcs, _ = family
    monkeypatch.setenv("UWSFMT_LOCK_TIMEOUT", "0.3")
    before = snapshot(store)
    with StoreLock(store):
        with pytest.raises(uwsfmt.LockError, match="another process is writing to this store"):
            uwsfmt.append(store, srcs[5], id="late")
        rc, _, err = cli_run(capsys, "append", store, srcs[5], "--id", "late")
        assert rc == 2 and "another process is writing" in err
    assert snapshot(store) == before
    uwsfmt.append(store, srcs[5], id="late")


def test_concurrent_converts_to_one_target_serialise(tmp_path, family, monkeypatch):
    srcs, _ = family
    FailingWrites(monkeypatch, delay=0.003)
    out = tmp_path / "s.uws"
    results: list = []

    def conv(sources):
        try:
            uwsfmt.convert(sources, out, **BUILD).close()
            results.append("ok")
        except uwsfmt.UWSError as e:
            results.append(e)

    ts = [threading.Thread(target=conv, args=(srcs[:4],)), threading.Thread(target=conv, args=(srcs[1:5],))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert results.count("ok") == 1, results  # the other one fails cleanly: the target exists by then
    other = next(r for r in results if r != "ok")
    assert isinstance(other, uwsfmt.StoreExistsError)
    assert uwsfmt.validate(str(out), deep=True) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.uws"]


# ---------------------------------------------------------------------------- integrity


def test_sources_are_fingerprinted(store, family):
    srcs, _ = family
    with uwsfmt.open(store) as st:
        for mid, src in zip(st.model_ids, srcs):
            rec = st.model_entry(mid)["source"]
            data = Path(src).read_bytes()
            assert rec["sha256"] == hashlib.sha256(data).hexdigest() and rec["size"] == len(data)
            assert rec["name"] == Path(src).name and rec["path"] == f"src/{Path(src).name}"  # never an absolute path


def test_deep_validate_recomputes_errors_from_the_sources(store, family, capsys):
    root = str(Path(family[0][0]).parent.parent)
    notes: list[str] = []
    assert uwsfmt.validate(store, deep=True, notes=notes) == []  # without the root: the store does not say where they are
    assert len(notes) == 5 and all("--source-root" in n and "checked readback only" in n for n in notes)
    notes = []
    assert uwsfmt.validate(store, deep=True, notes=notes, source_root=root) == []
    assert len(notes) == 5 and all("errors recomputed" in n and n.endswith("match") for n in notes)
    rc, out, _ = cli_run(capsys, "validate", store, "--deep", "--source-root", root)
    assert rc == 0 and "errors recomputed against" in out


def test_deep_validate_catches_data_that_does_not_rebuild_what_was_written(store, family, capsys):
    root = str(Path(family[0][0]).parent.parent)  # where the sources are (the store records them relative to it)
    with uwsfmt.open(store) as st:
        e = next(t for t in st.manifest["tensors"] if t["encoding"] == "subspace")
        sl, mid = e["coefficients"], st.model_ids[2]
    pack = zarr.open_array(zarr.storage.LocalStore(store), path=f"packs/{sl['pack']}", mode="r+")
    row = pack[2, :]
    part = row[sl["offset"]: sl["offset"] + sl["length"]]
    # valid checksums, wrong numbers (float32 coefficients scaled, quantized codes' bits flipped)
    row[sl["offset"]: sl["offset"] + sl["length"]] = part * 1.5 if part.dtype.kind == "f" else part ^ 0x5A
    pack[2, :] = row
    assert uwsfmt.validate(store) == []  # structure is fine ...
    problems = uwsfmt.validate(store, deep=True, source_root=root)  # ... the numbers are not
    assert len(problems) == 1 and mid in problems[0] and e["name"] in problems[0] and "records" in problems[0]
    rc, _, err = cli_run(capsys, "validate", store, "--deep", "--source-root", root)
    assert rc == 1 and "INVALID" in err and e["name"] in err


def test_deep_validate_without_sources_checks_readback_only(tmp_path, family):
    srcs, _ = family
    copies = []
    for s in srcs[:3]:
        copies.append(str(tmp_path / Path(s).name))
        shutil.copy(s, copies[-1])
    uwsfmt.convert(copies, tmp_path / "s.uws", source_root=tmp_path, **BUILD).close()
    os.remove(copies[0])
    with open(copies[1], "r+b") as f:  # same size, other bytes
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x00\x80\x7f")
    Path(copies[2]).write_bytes(Path(copies[2]).read_bytes() + b" ")
    mem = tmp_path / "mem.uws"
    uwsfmt.convert({"m0": {"w": torch.randn(8, 8)}, "m1": {"w": torch.randn(8, 8)}}, mem).close()
    notes: list[str] = []
    assert uwsfmt.validate(str(tmp_path / "s.uws"), deep=True, notes=notes, source_root=tmp_path) == []
    assert "not found" in notes[0] and "sha256 differs" in notes[1] and "size differs" in notes[2]
    assert all("checked readback only" in n for n in notes)
    notes = []
    assert uwsfmt.validate(str(mem), deep=True, notes=notes) == []
    assert len(notes) == 2 and all("in-memory state dict" in n and "checked readback only" in n for n in notes)


def _chunk_files(store: str, prefix: str) -> list[Path]:
    return sorted(p for p in Path(store, prefix).rglob("*") if p.is_file() and p.name != "zarr.json")


@pytest.mark.parametrize("what", ["pack row", "basis", "shared value"])
def test_checksums_are_checked_on_read(store, what, capsys):
    with uwsfmt.open(store) as st:
        sub = next(t for t in st.manifest["tensors"] if t["encoding"] == "subspace" and t["left"])
        shared = next(t for t in st.manifest["tensors"] if t["encoding"] == "shared")
    target = {"pack row": _chunk_files(store, "packs/float32")[1],  # model #1's shard
              "basis": _chunk_files(store, sub["left"])[0],
              "shared value": _chunk_files(store, shared["data"]["path"])[0]}[what]
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 3] ^= 0x10  # one flipped bit in the data
    target.write_bytes(bytes(raw))
    with uwsfmt.open(store) as st:
        with pytest.raises(uwsfmt.FormatError, match="damaged"):
            st.state_dict(1)
        if what != "pack row":
            with pytest.raises(uwsfmt.FormatError, match="damaged"):
                st.state_dict(0)
            name = sub["name"] if what == "basis" else shared["name"]
            with pytest.raises(uwsfmt.FormatError, match="damaged"):
                st.tensor(0, name)
    problems = uwsfmt.validate(store, deep=True)
    assert problems and any("checksum" in p or "crc32c" in p or "damaged" in p for p in problems), problems
    with uwsfmt.open(store) as st:
        mid = st.model_ids[1]
    rc, _, err = cli_run(capsys, "export", store, mid, "-o", Path(store).parent / "x.safetensors")
    assert rc == 2 and "damaged" in err and "Traceback" not in err
    assert not (Path(store).parent / "x.safetensors").exists()


def test_uncommitted_rows_are_ignored(store, family):
    """A killed append leaves a resized pack and a written row; readers and validate ignore them."""
    srcs, _ = family
    before = snapshot(store)
    zs = zarr.storage.LocalStore(store)
    with uwsfmt.open(store) as st:
        packs = st.manifest["packs"]
    for info in packs.values():
        arr = zarr.open_array(zs, path=info["path"], mode="r+")
        arr.resize((arr.shape[0] + 1, arr.shape[1]))
        arr[arr.shape[0] - 1, :] = np.ones(arr.shape[1], dtype=arr.dtype)
    assert snapshot(store) == before and uwsfmt.validate(store, deep=True) == []
    uwsfmt.append(store, srcs[5], id="late")  # reuses the uncommitted row
    assert uwsfmt.validate(store, deep=True) == []
    with uwsfmt.open(store) as st:
        assert st.n_models == 6 and st.model_ids[-1] == "late"


def test_deep_validate_recomputes_lora_errors_from_the_adapters(tmp_path):
    from uwsfmt.testing.families import lora_family, write_peft_family

    dirs = write_peft_family(lora_family(4, layers=2, width=32, rank=4, shared_rank=2), tmp_path / "adapters")
    st = uwsfmt.convert([str(d) for d in dirs], tmp_path / "s.uws", rank=3)
    notes: list[str] = []
    assert st.validate(deep=True, notes=notes, source_root=tmp_path / "adapters") == []
    assert len(notes) == 4 and all(n.endswith("match") for n in notes)
    e = next(t for t in st.manifest["tensors"] if t.get("lora"))
    sl = e["coefficients"]
    st.close()
    pack = zarr.open_array(zarr.storage.LocalStore(str(tmp_path / "s.uws")), path=f"packs/{sl['pack']}", mode="r+")
    row = pack[1, :]
    row[sl["offset"]: sl["offset"] + sl["length"]] *= 1.3
    pack[1, :] = row
    problems = uwsfmt.validate(str(tmp_path / "s.uws"), deep=True, source_root=tmp_path / "adapters")
    assert len(problems) == 1 and "adapter-001" in problems[0] and e["name"] in problems[0]
