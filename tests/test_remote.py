"""Stores on object storage and over HTTP: a real S3-compatible server (moto, in its own process,
checking credentials) and a ranged HTTP server on loopback, both counting what they serve."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch
import zarr.storage

import uwsfmt
from uwsfmt.errors import ConflictError, FormatError, LockError, StoreError, StoreExistsError
from uwsfmt.io import remote
from uwsfmt.io.commit import Writing
from uwsfmt.testing.servers import RangeHTTPServer, S3Server


def family(n: int, tensors: int = 3, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    basis = [torch.randn(48, 4, generator=g) for _ in range(tensors)]
    return {f"m{i}": {**{f"layer{j}.weight": basis[j] @ torch.randn(4, 48, generator=g) + 0.01 * torch.randn(48, 48, generator=g)
                         for j in range(tensors)}, "bias": torch.randn(48, generator=g)} for i in range(n)}


@pytest.fixture(scope="module")
def s3():
    with S3Server() as server:
        saved = {k: os.environ.get(k) for k in server.env()}
        os.environ.update(server.env())  # credentials where programs usually find them: the environment
        try:
            yield server
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


_buckets = iter(range(10**6))


@pytest.fixture
def bucket(s3):
    return s3.bucket(f"uws-test-{next(_buckets)}")


def objects(s3, bucket: str) -> dict[str, bytes]:
    c = s3.client()
    keys = [o["Key"] for o in c.list_objects_v2(Bucket=bucket).get("Contents", [])]
    return {k: c.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def same_models(a, b) -> None:
    assert a.model_ids == b.model_ids
    for m in a.model_ids:
        sa, sb = a.state_dict(m), b.state_dict(m)
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (m, k)


def test_convert_to_s3_reads_back_like_the_local_build(s3, bucket, tmp_path):
    fam = family(5)
    local = uwsfmt.convert(fam, tmp_path / "f.uws", rank=4)
    url = f"s3://{bucket}/families/f.uws"
    st = uwsfmt.convert(fam, url, rank=4)
    assert st.path == url and st.location.remote
    same_models(st, local)
    assert torch.equal(st.tensor("m2", "layer1.weight"), local.tensor("m2", "layer1.weight"))
    assert uwsfmt.validate(url) == []
    # the same objects as the local folder's files, and nothing else (no lock, no building marker)
    got = objects(s3, bucket)
    files = {os.path.relpath(os.path.join(d, f), tmp_path / "f.uws").replace(os.sep, "/")
             for d, _, fs in os.walk(tmp_path / "f.uws") for f in fs if f != ".uws.lock"}
    assert {k.removeprefix("families/f.uws/") for k in got} == files
    assert st.summary()["store_bytes"] == sum(len(v) for v in got.values())


def test_open_with_storage_options_and_zarr_store_objects(s3, bucket, tmp_path):
    url = f"s3://{bucket}/f.uws"
    uwsfmt.convert(family(3), url, rank=2)
    st = uwsfmt.open(url, storage_options=s3.options())
    assert st.n_models == 3
    zs = zarr.storage.FsspecStore.from_url(url, storage_options=s3.options(), read_only=True)
    same_models(uwsfmt.open(zs), st)


def test_append_on_s3_is_committed_once_and_refused_ids_touch_nothing(s3, bucket):
    url = f"s3://{bucket}/f.uws"
    fam = family(6)
    uwsfmt.convert({k: fam[k] for k in list(fam)[:4]}, url, rank=4)
    before = objects(s3, bucket)
    with uwsfmt.open(url, mode="a") as st:
        added = st.extend({k: fam[k] for k in list(fam)[4:]})
        assert [e["id"] for e in added] == ["m4", "m5"]
        with pytest.raises(ConflictError, match="already in the store"):
            st.extend({"m4": fam["m4"]})
    reread = uwsfmt.open(url)
    assert reread.model_ids == [f"m{i}" for i in range(6)]
    assert reread.manifest["generation"] == 2
    assert uwsfmt.validate(url) == []
    after = objects(s3, bucket)
    assert ".uws.lock" not in after
    # existing data is never rewritten: every object but the root zarr.json and the packs' metadata is unchanged
    changed = {k for k in before if after.get(k) != before[k]}
    assert changed <= {"f.uws/zarr.json"} | {k for k in before if k.startswith("f.uws/packs/") and k.endswith("zarr.json")}


def test_two_concurrent_appenders_both_land_neither_overwrites(s3, bucket):
    url = f"s3://{bucket}/f.uws"
    fam = family(6)
    uwsfmt.convert({k: fam[k] for k in ("m0", "m1", "m2")}, url, rank=4)
    errors: list[BaseException] = []

    def add(names):
        try:
            with uwsfmt.open(url, mode="a") as st:
                st.extend({k: fam[k] for k in names})
        except BaseException as e:  # collected for the assertion below
            errors.append(e)

    threads = [threading.Thread(target=add, args=(names,)) for names in (["m3", "m4"], ["m5"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    st = uwsfmt.open(url)
    assert sorted(st.model_ids) == [f"m{i}" for i in range(6)]
    assert st.manifest["generation"] == 3
    for m in st.model_ids:  # each model's rows are its own: nobody wrote over another's shard
        for k, v in st.state_dict(m).items():
            err = float((v - fam[m][k]).norm() / fam[m][k].norm())
            assert err < 0.05, (m, k, err)


def test_commit_refused_when_another_writer_committed_first(s3, bucket):
    url = f"s3://{bucket}/f.uws"
    uwsfmt.convert(family(3), url, rank=2)
    zs = remote.open_store(url, "w")
    with Writing(zs, url) as w:
        # another writer replaces the root zarr.json behind this one's back (its lease broken, say)
        c = s3.client()
        doc = json.loads(c.get_object(Bucket=bucket, Key="f.uws/zarr.json")["Body"].read())
        doc["attributes"]["uws"]["updated"] = "2026-01-01T00:00:00Z"
        c.put_object(Bucket=bucket, Key="f.uws/zarr.json", Body=json.dumps(doc).encode())
        m = uwsfmt.open(url).manifest
        with pytest.raises(ConflictError, match="another writer committed"):
            w.commit({**m, "generation": m["generation"] + 1})
    assert uwsfmt.open(url).manifest["generation"] == 1


def test_lock_waits_then_takes_over_an_expired_lease(s3, bucket, monkeypatch):
    url = f"s3://{bucket}/f.uws"
    uwsfmt.convert(family(2), url, rank=2)
    ofs = remote.ObjectFS(remote.open_store(url, "w"))
    held = json.dumps({"owner": "dead", "expires": time.time() + 3600}).encode()
    assert ofs.put_if_absent(remote.LOCK_OBJECT, held)
    assert not ofs.put_if_absent(remote.LOCK_OBJECT, b"x")  # put-if-absent is real on this server
    with pytest.raises(LockError, match="another process is writing"):
        with remote.ObjectLock(ofs, timeout=0.5):
            pass
    ofs.put(remote.LOCK_OBJECT, json.dumps({"owner": "dead", "expires": time.time() - 1}).encode())
    with remote.ObjectLock(ofs, timeout=5) as lock:
        assert json.loads(ofs.get(remote.LOCK_OBJECT)[0])["owner"] == lock.owner
    assert not ofs.exists(remote.LOCK_OBJECT)


_APPEND_CHILD = textwrap.dedent("""
    import os, sys, time, torch, uwsfmt
    url, flag = sys.argv[1], sys.argv[2]
    g = torch.Generator().manual_seed(7)
    def step(done, total, name):
        if done:  # a model is written: say so, then crawl so the parent kills us mid-append
            open(flag, "w").close()
            time.sleep(5)
    fam = {f"k{i}": {f"layer{j}.weight": torch.randn(48, 48, generator=g) for j in range(3)} | {"bias": torch.randn(48, generator=g)}
           for i in range(4)}
    uwsfmt.open(url, mode="a").extend(fam, progress=step)
""")


@pytest.mark.slow
def test_sigkill_during_an_s3_append_loses_nothing(s3, bucket, tmp_path):
    url = f"s3://{bucket}/f.uws"
    uwsfmt.convert(family(4), url, rank=4)
    before = uwsfmt.open(url)
    expected = {m: before.state_dict(m) for m in before.model_ids}
    flag = tmp_path / "written"
    env = dict(os.environ, UWSFMT_LOCK_LEASE="3")
    child = subprocess.Popen([sys.executable, "-c", _APPEND_CHILD, url, str(flag)], env=env)
    deadline = time.monotonic() + 120
    while not flag.exists():
        assert child.poll() is None and time.monotonic() < deadline, "the appender ended before writing a model"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert ".uws.lock" in {k.removeprefix("f.uws/") for k in objects(s3, bucket)}  # killed holding the lock
    after = uwsfmt.open(url)
    assert after.model_ids == before.model_ids and uwsfmt.validate(url) == []
    for m, sd in expected.items():
        assert all(torch.equal(sd[k], v) for k, v in after.state_dict(m).items())
    time.sleep(3.5)  # the dead writer's lease runs out; the next writer takes its lock over
    with uwsfmt.open(url, mode="a") as st:
        st.extend({"new": family(1, seed=9)["m0"]})
    assert uwsfmt.open(url).model_ids == before.model_ids + ["new"] and uwsfmt.validate(url) == []


def test_bad_credentials_missing_bucket_and_escaping_urls_are_clear_errors(s3, bucket):
    url = f"s3://{bucket}/f.uws"
    uwsfmt.convert(family(2), url, rank=2)
    secret = "definitely-not-the-secret-0123456789"
    bad = s3.options(key="AKIAWRONGWRONGWRONG", secret=secret)
    with pytest.raises(StoreError, match="access denied") as e:
        uwsfmt.open(url, storage_options=bad)
    assert secret not in str(e.value)
    with pytest.raises(StoreError, match="access denied"):
        uwsfmt.convert(family(2), f"s3://{bucket}/other.uws", rank=2, storage_options=bad)
    assert not any(k.startswith("other.uws") for k in objects(s3, bucket))
    with pytest.raises(FormatError, match="no zarr.json.*Check the URL"):
        uwsfmt.open("s3://no-such-bucket-here/f.uws")
    with pytest.raises(StoreError, match="bucket"):
        uwsfmt.convert(family(2), "s3://no-such-bucket-here/f.uws", rank=2)
    for escaping in (f"s3://{bucket}/x/../f.uws", f"s3://{bucket}/./f.uws", f"s3://{bucket}/f.uws/.."):
        with pytest.raises(StoreError, match=r"'\.' or '\.\.' segments"):
            uwsfmt.open(escaping)
    with pytest.raises(StoreExistsError, match="already there"):
        uwsfmt.convert(family(2), url, rank=2)
    with pytest.raises(uwsfmt.errors.ConfigError, match="overwrite is not offered"):
        uwsfmt.convert(family(2), url, rank=2, overwrite=True)
    assert uwsfmt.open(url).n_models == 2 and uwsfmt.validate(url) == []


def test_a_killed_convert_leaves_no_store_and_the_next_one_cleans_up(s3, bucket, tmp_path):
    url = f"s3://{bucket}/f.uws"
    local = uwsfmt.convert(family(3), tmp_path / "f.uws", rank=2)
    ofs = remote.ObjectFS(remote.open_store(url, "w"))
    ofs.put(remote.BUILDING_OBJECT, b"{}")  # what a convert killed mid-upload leaves: its marker and some objects
    ofs.put("packs/float32/c/0/0", b"partial")
    with pytest.raises(FormatError, match="uploading it, or was killed"):
        uwsfmt.open(url)
    st = uwsfmt.convert(family(3), url, rank=2)
    same_models(st, local)
    assert set(objects(s3, bucket)) == {f"f.uws/{k}" for k in ofs.names()} and remote.BUILDING_OBJECT not in ofs.names()
    other = f"s3://{bucket}/notours"
    remote.ObjectFS(remote.open_store(other, "w")).put("data.bin", b"user data")
    with pytest.raises(StoreError, match="holds 1 objects but no store"):
        uwsfmt.convert(family(2), other, rank=2)
    assert objects(s3, bucket)["notours/data.bin"] == b"user data"


def test_credentials_are_never_written(s3, bucket, tmp_path):
    url = f"s3://{bucket}/f.uws"
    st = uwsfmt.convert(family(3), url, rank=2, storage_options=s3.options())
    blob = b"".join(objects(s3, bucket).values()) + json.dumps(st.summary(), default=str).encode() + repr(st).encode()
    for secret in s3.credentials.values():
        assert secret.encode() not in blob
    assert remote.redact("https://user:pw@host:8080/a/f.uws?X-Amz-Signature=abc#x") == "https://host:8080/a/f.uws"


def test_cli_reads_and_writes_s3_with_credentials_from_the_environment(s3, bucket, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    from safetensors.torch import save_file

    for k, sd in family(3).items():
        save_file(sd, str(src / f"{k}.safetensors"))
    url = f"s3://{bucket}/cli.uws"
    run = [sys.executable, "-m", "uwsfmt.cli"]
    r = subprocess.run([*run, "convert", *sorted(map(str, src.glob("*.safetensors"))), "-o", url, "--rank", "2", "-q"],
                       capture_output=True, text=True, env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    save_file(family(1, seed=5)["m0"], str(tmp_path / "late.safetensors"))
    r = subprocess.run([*run, "append", url, str(tmp_path / "late.safetensors")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*run, "info", url], capture_output=True, text=True)
    assert r.returncode == 0 and "models: 4" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([*run, "info", url], capture_output=True, text=True,
                       env={**os.environ, "AWS_SECRET_ACCESS_KEY": "wrong-secret-xyz"})
    assert r.returncode != 0 and "access denied" in r.stderr and "wrong-secret-xyz" not in r.stderr


# ---------------------------------------------------------------------------------- HTTP
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A 200-tensor family served over HTTP, and the local store it came from."""
    root = tmp_path_factory.mktemp("http")
    g = torch.Generator().manual_seed(1)
    basis = [torch.randn(64, 8, generator=g) for _ in range(200)]
    fam = {f"m{i}": {f"t{j}": basis[j] @ torch.randn(8, 64, generator=g) for j in range(200)} for i in range(6)}
    local = uwsfmt.convert(fam, root / "fam.uws", rank=8, min_numel=1)
    with RangeHTTPServer(str(root)) as http:
        yield http, local


def test_http_store_reads_models_and_tensors_with_few_requests(served):
    http, local = served
    st = uwsfmt.open(http.url("fam.uws"))
    same_models(st, local)  # the first model fetches the bases; every other model below is one request per pack
    http.reset()
    st.state_dict("m4")
    assert len(http.requests) == len(local.manifest["packs"])
    assert all(r[0] == "GET" for r in http.requests)
    # one tensor of another open: its shard index, the chunk holding its slots, its mean and basis
    fresh = uwsfmt.open(http.url("fam.uws"))
    fresh.tensor("m1", "t5")
    http.reset()
    t = fresh.tensor("m3", "t17")
    assert torch.equal(t, local.tensor("m3", "t17"))
    e = local.tensor_entry("t17")
    own = 4 * (e["coefficients"]["length"] + 64 * 64 + 64 * 8)  # the tensor's slots, mean and basis, float32
    # per array a HEAD (its metadata's size, checked before parsing), its zarr.json and its chunk
    assert len(http.requests) <= 8, http.requests
    assert http.bytes_sent < own + 20_000, (http.bytes_sent, own)  # not the pack row (~200 KiB here)
    width = 4 * local.manifest["packs"]["float32"]["width"]
    assert width > 10 * http.bytes_sent


def test_http_is_read_only_and_missing_stores_are_clear(served):
    http, _ = served
    with pytest.raises(StoreError, match="read-only"):
        uwsfmt.open(http.url("fam.uws"), mode="a")
    with pytest.raises(FormatError, match="no zarr.json"):
        uwsfmt.open(http.url("nothing.uws"))
    with pytest.raises(StoreError, match="read-only"):
        uwsfmt.convert(family(2), http.url("new.uws"), rank=2)


def test_remote_summary_and_errors_match_local(served):
    http, local = served
    st = uwsfmt.open(http.url("fam.uws"))
    s = st.summary()
    assert s["store_bytes"] is None  # HTTP cannot list: the size is unknown, not wrong
    assert s["n_models"] == local.n_models
    assert np.array_equal(st.errors(), local.errors())


def test_convert_reads_safetensors_sources_in_place_from_s3(s3, bucket, tmp_path):
    from safetensors.torch import save_file

    fam = family(4)
    c = s3.client()
    for k, sd in fam.items():
        save_file(sd, str(tmp_path / f"{k}.safetensors"))
        c.upload_file(str(tmp_path / f"{k}.safetensors"), bucket, f"src/{k}.safetensors")
    local = uwsfmt.convert(sorted(str(p) for p in tmp_path.glob("*.safetensors")), tmp_path / "local.uws", rank=4)
    for i, sources in enumerate((f"s3://{bucket}/src/*.safetensors", f"s3://{bucket}/src/")):
        st = uwsfmt.convert(sources, tmp_path / f"r{i}.uws", rank=4)
        same_models(st, local)
        assert [m["source"] for m in st.manifest["models"]] == [m["source"] for m in local.manifest["models"]]
    with pytest.raises(uwsfmt.errors.SourceError, match="matches no object"):
        uwsfmt.convert(f"s3://{bucket}/nothing/*.safetensors", tmp_path / "x.uws")
    with pytest.raises(uwsfmt.errors.SourceError, match="only .safetensors files"):
        uwsfmt.convert([f"s3://{bucket}/src/m0.bin"], tmp_path / "y.uws")
