"""The uwsfmt server extension's REST endpoints, through a real jupyter_server (pytest-jupyter).

Every endpoint is called as the JupyterLab panels call it; refused paths (``..``, absolute,
symlinks out of the root, hidden) and malformed requests must get a 4xx with a clear message.
"""

from __future__ import annotations

import base64
import json
import os
import time

import numpy as np
import pytest
import torch

pytest.importorskip("pytest_jupyter")
pytest.importorskip("jupyter_server")

pytest_plugins = ["pytest_jupyter.jupyter_server"]

import uwsfmt  # noqa: E402
from tests.jupyter_family import family as _family  # noqa: E402
from tests.jupyter_family import write as _write  # noqa: E402


@pytest.fixture
def jp_server_config():
    return {"ServerApp": {"jpserver_extensions": {"jupyter_ext": True}}}


@pytest.fixture
def root(jp_root_dir):
    _write(jp_root_dir / "ckpts", _family(4))
    uwsfmt.convert(str(jp_root_dir / "ckpts"), str(jp_root_dir / "fam.uws"), rank=2, device="cpu").close()
    return jp_root_dir


@pytest.fixture
def api(jp_fetch, jp_serverapp, root):
    """``api(method, route, body=None, **query)`` -> (status, json)."""

    async def call(method: str, route: str, body=None, raw: bytes | None = None, **query):
        kw = {"method": method, "raise_error": False}
        if query:
            kw["params"] = query
        if method in ("POST", "PUT"):
            kw["body"] = raw if raw is not None else json.dumps(body if body is not None else {})
        r = await jp_fetch("uwsfmt", *route.split("/"), **kw)
        return r.code, json.loads(r.body or b"null")

    return call


async def _wait(api, job_id: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code, st = await api("GET", f"jobs/{job_id}")
        assert code == 200, st
        if st["status"] in ("done", "error", "cancelled"):
            return st
        import asyncio

        await asyncio.sleep(0.05)
    raise TimeoutError(f"job {job_id} still running after {timeout}s")


# ------------------------------------------------------------------ reading
async def test_config_lists_devices_and_choices(api):
    code, cfg = await api("GET", "config")
    assert code == 200 and cfg["devices"][0] == "cpu"
    assert cfg["modes"][0] == "auto" and 4 in cfg["residual_choices"] and cfg["defaults"]["action"] == "create"


async def test_store_matches_the_library(api, root):
    code, view = await api("GET", "store", path="fam.uws")
    assert code == 200, view
    with uwsfmt.open(root / "fam.uws") as st:
        errs = st.errors()
        assert view["summary"]["n_models"] == st.n_models == 4
        assert view["summary"]["n_tensors"] == len(st.tensor_names)
        assert [m["id"] for m in view["models"]] == st.model_ids
        assert [t["name"] for t in view["tensors"]] == st.tensor_names
    assert view["path"] == "fam.uws" and view["export_dir"] == "" and view["export_formats"] == ["safetensors"]
    heat = np.frombuffer(base64.b64decode(view["errors"]), "<f4").reshape(view["heatmap"]["rows"], view["heatmap"]["cols"])
    np.testing.assert_allclose(heat, errs.astype(np.float32), equal_nan=True)
    assert view["summary"]["error_max"] == pytest.approx(float(np.nanmax(errs)))


async def test_errors_of_one_model(api, root):
    code, r = await api("GET", "errors", path="fam.uws", model="m2")
    assert code == 200, r
    with uwsfmt.open(root / "fam.uws") as st:
        expect = st.errors()[st.model_index("m2")]
        assert r["tensors"] == st.tensor_names
    np.testing.assert_allclose([np.nan if v is None else v for v in r["error"]], expect, equal_nan=True)
    code, r = await api("GET", "errors", path="fam.uws", model="nope")
    assert code == 404 and "nope" in r["message"]


async def test_spectrum_with_null_baseline(api, root):
    with uwsfmt.open(root / "fam.uws") as st:
        table = st.tensor_table()
    sub = next(t["name"] for t in table if t["encoding"] == "subspace")
    code, sp = await api("GET", "spectrum", path="fam.uws", tensor=sub)
    assert code == 200, sp
    assert sp["name"] == sub and len(sp["eigenvalues"]) == len(sp["null"]) > 0 and sp["kept"] == 2
    assert sp["n_above_null"] is not None and 0 <= sp["explained_at_kept"] <= 1
    other = [t["name"] for t in table if t["encoding"] != "subspace"]
    if other:
        code, sp = await api("GET", "spectrum", path="fam.uws", tensor=other[0])
        assert code == 200 and "no spectrum" in sp["unavailable"]
    code, r = await api("GET", "spectrum", path="fam.uws", tensor="no.such.tensor")
    assert code == 404 and "no.such.tensor" in r["message"]


async def test_validate(api, root):
    code, r = await api("POST", "validate", {"path": "fam.uws"})
    assert code == 200 and r["valid"] is True and r["problems"] == []
    code, r = await api("POST", "validate", {"path": "ckpts"})
    assert code in (200, 400)
    assert (code == 400 and r["message"]) or r["valid"] is False


async def test_export_writes_next_to_the_store_and_refuses_to_overwrite(api, root):
    code, r = await api("POST", "export", {"path": "fam.uws", "model": "m1", "format": "safetensors"})
    assert code == 200, r
    assert r["output"] == "m1.safetensors" and (root / "m1.safetensors").is_file()
    from safetensors.torch import load_file

    got = load_file(str(root / "m1.safetensors"))
    with uwsfmt.open(root / "fam.uws") as st:
        expect = st.state_dict("m1")
    assert set(got) == set(expect) and all(torch.equal(got[k], expect[k]) for k in got)
    code, r = await api("POST", "export", {"path": "fam.uws", "model": "m1", "format": "safetensors"})
    assert code == 409 and "already exists" in r["message"]
    code, r = await api("POST", "export", {"path": "fam.uws", "model": "m1", "output": "out/m1.safetensors"})
    assert code == 404 and "out" in r["message"]
    code, r = await api("POST", "export", {"path": "fam.uws", "model": "m1", "format": "peft", "output": "x"})
    assert code == 400 and "safetensors" in r["message"]
    code, r = await api("POST", "export", {"path": "fam.uws", "model": "zz", "output": "zz.safetensors"})
    assert code == 404 and "zz" in r["message"] and not (root / "zz.safetensors").exists()


async def test_plan(api):
    code, r = await api("POST", "plan", {"sources": ["ckpts"]})
    assert code == 200, r
    assert r["n_models"] == 4 and not r["conflicts"] and r["sources"] == ["ckpts"]
    code, r = await api("POST", "plan", {"sources": ["ckpts/m3.safetensors"], "output": "fam.uws",
                                         "options": {"action": "add", "skip_existing": True}})
    assert code == 200 and r["existing"] == ["m3"] and r["new"] == []


# ------------------------------------------------------------------ jobs
async def test_convert_job_runs_reports_and_is_listed(api, root):
    code, job = await api("POST", "jobs", {"sources": ["ckpts/*.safetensors"], "output": "new.uws",
                                           "options": {"rank_mode": "rank", "rank": 1}})
    assert code == 201, job
    assert job["status"] in ("queued", "running", "done") and job["output"] == "new.uws"
    st = await _wait(api, job["id"])
    assert st["status"] == "done", st
    assert st["report"]["summary"]["n_models"] == 4 and "4 models" in st["message"]
    assert st["progress"]["total"] > 0 and st["progress"]["done"] == st["progress"]["total"]
    with uwsfmt.open(root / "new.uws") as s:
        ranks = [t["rank"] for t in s.tensor_table() if t["encoding"] == "subspace"]
        assert s.n_models == 4 and ranks and all(max(x or 0 for x in (r if isinstance(r, list) else [r])) == 1 for r in ranks)
    code, lst = await api("GET", "jobs")
    assert code == 200 and job["id"] in [j["id"] for j in lst["jobs"]]
    code, r = await api("POST", "jobs", {"sources": ["ckpts"], "output": "new.uws"})
    assert code == 409 and "already exists" in r["message"]


async def test_add_job_appends(api, root, tmp_path):
    _write(root / "more", {k: v for k, v in _family(6).items() if k in ("m4", "m5")})
    code, job = await api("POST", "jobs", {"sources": ["more"], "output": "fam.uws", "options": {"action": "add"}})
    assert code == 201, job
    st = await _wait(api, job["id"])
    assert st["status"] == "done", st
    assert st["report"]["summary"]["n_models"] == 6 and st["message"].startswith("Added 2 model(s)")
    code, view = await api("GET", "store", path="fam.uws")  # the cache sees the new generation
    assert view["summary"]["n_models"] == 6


async def test_cancel_leaves_nothing(api, root, monkeypatch):
    import functools

    real = uwsfmt.convert

    @functools.wraps(real)  # the same signature: the options are mapped onto convert's parameters
    def slow_convert(sources, out, *, progress=None, cancel=None, **kw):
        def slow(done, total, message=""):
            progress(done, total, message)
            time.sleep(0.05)

        return real(sources, out, progress=slow, cancel=cancel, **kw)

    monkeypatch.setattr(uwsfmt, "convert", slow_convert)
    code, job = await api("POST", "jobs", {"sources": ["ckpts"], "output": "gone.uws"})
    assert code == 201, job
    code, r = await api("DELETE", f"jobs/{job['id']}")
    assert code == 200 and r["status"] in ("cancelling", "cancelled", "done")
    st = await _wait(api, job["id"])
    assert st["status"] == "cancelled", st
    assert not (root / "gone.uws").exists()
    assert not [p for p in os.listdir(root) if "gone" in p]  # no temporary build left either
    code, r = await api("DELETE", "jobs/0123456789ab")
    assert code == 404 and "no such job" in r["message"]


# ------------------------------------------------------------------ refused paths
@pytest.fixture
def outside(root, tmp_path_factory):
    out = tmp_path_factory.mktemp("outside")
    _write(out / "ck", _family(2))
    uwsfmt.convert(str(out / "ck"), str(out / "secret.uws"), rank=1, device="cpu").close()
    os.symlink(out / "secret.uws", root / "link.uws")
    os.symlink(out / "ck", root / "linkdir")
    (root / "inner").mkdir()
    os.symlink(out / "ck" / "m0.safetensors", root / "inner" / "m0.safetensors")
    return out


@pytest.mark.parametrize("bad", ["../outside/secret.uws", "link.uws", "ABS", "fam.uws/../../x.uws", "~/x.uws"])
async def test_store_paths_outside_the_root_are_refused(api, outside, bad):
    path = str(outside / "secret.uws") if bad == "ABS" else bad
    code, r = await api("GET", "store", path=path)
    assert code == 403, r
    assert "outside the server's root" in r["message"] or "absolute paths are refused" in r["message"]


async def test_every_endpoint_refuses_outside_paths(api, outside, root):
    absolute = str(outside / "secret.uws")
    checks = [
        ("GET", "spectrum", None, {"path": "link.uws", "tensor": "x"}),
        ("GET", "errors", None, {"path": absolute, "model": "m0"}),
        ("POST", "validate", {"path": "../secret.uws"}, {}),
        ("POST", "export", {"path": "link.uws", "model": "m0"}, {}),
        ("POST", "export", {"path": "fam.uws", "model": "m0", "output": absolute + ".st"}, {}),
        ("POST", "export", {"path": "fam.uws", "model": "m0", "output": "linkdir/m0.safetensors"}, {}),
        ("POST", "plan", {"sources": ["linkdir"]}, {}),
        ("POST", "plan", {"sources": ["inner"]}, {}),  # a folder holding a symlink that leads out
        ("POST", "plan", {"sources": ["../*/ck"]}, {}),
        ("POST", "jobs", {"sources": ["ckpts"], "output": "../escaped.uws"}, {}),
        ("POST", "jobs", {"sources": [absolute], "output": "x.uws"}, {}),
        ("POST", "jobs", {"sources": ["ckpts"], "output": "link.uws", "options": {"action": "add"}}, {}),
    ]
    for method, route, body, query in checks:
        code, r = await api(method, route, body, **query)
        assert code == 403, (method, route, body, query, r)
        assert "root" in r["message"] or "symlink" in r["message"], r
    assert not (root.parent / "escaped.uws").exists() and not os.path.exists(absolute + ".st")
    assert sorted(os.listdir(outside / "ck")) == ["m0.safetensors", "m1.safetensors"]


async def test_hidden_paths_are_refused(api, root):
    (root / ".hidden").mkdir()
    code, r = await api("POST", "plan", {"sources": [".hidden"]})
    assert code == 403 and "hidden" in r["message"]


# ------------------------------------------------------------------ malformed requests
@pytest.mark.parametrize("method,route,body,query,words", [
    ("GET", "store", None, {}, "'path' is missing"),
    ("GET", "spectrum", None, {"path": "fam.uws"}, "'tensor' is missing"),
    ("GET", "store", None, {"path": "nope.uws"}, "nope.uws"),
    ("GET", "store", None, {"path": "ckpts/m0.safetensors"}, "m0.safetensors"),
    ("POST", "validate", b"{not json", {}, "not valid JSON"),
    ("POST", "validate", [1, 2], {}, "must be a JSON object"),
    ("POST", "validate", {"path": 3}, {}, "non-empty string"),
    ("POST", "validate", {"path": "fam.uws", "deep": "yes"}, {}, "true or false"),
    ("POST", "export", {"path": "fam.uws"}, {}, "model"),
    ("POST", "export", {"path": "fam.uws", "model": "m0", "overwrite": 1}, {}, "true or false"),
    ("POST", "plan", {"sources": "ckpts", "options": []}, {}, "options"),
    ("POST", "plan", {"sources": {"a": 1}}, {}, "list of paths"),
    ("POST", "plan", {"sources": []}, {}, "at least one"),
    ("POST", "plan", {"sources": [""]}, {}, "non-empty path"),
    ("POST", "jobs", {"sources": ["ckpts"], "output": "x.uws", "options": {"rank": "many"}}, {}, "option 'rank'"),
    ("POST", "jobs", {"sources": ["ckpts"], "output": "x.uws", "options": {"tau": True}}, {}, "option 'tau'"),
    ("POST", "jobs", {"sources": ["ckpts"], "output": "x.uws", "options": {"rank_mode": "tau", "tau": 2.0}}, {}, "tau"),
    ("POST", "jobs", {"sources": ["ckpts"], "output": "x.uws", "options": {"device": "tpu"}}, {}, "not available"),
    ("POST", "jobs", {"sources": ["ckpts"]}, {}, "output path"),
    ("POST", "jobs", {"sources": ["ckpts"], "output": "ckpts/m0.safetensors", "options": {"action": "add"}}, {},
     "not a store directory"),
    ("POST", "jobs", {"sources": ["ckpts"], "output": "no/such/dir.uws"}, {}, "does not exist"),
    ("POST", "jobs", {"sources": ["nothing/*.pt"], "output": "x.uws"}, {}, "matches no file"),
])
async def test_malformed_requests_get_a_clear_4xx(api, root, method, route, body, query, words):
    raw = body if isinstance(body, bytes) else None
    code, r = await api(method, route, None if raw else body, raw=raw if raw else (json.dumps(body).encode() if body is not None else None), **query)
    assert 400 <= code < 500, (code, r)
    assert words in r["message"], r["message"]
    assert not (root / "x.uws").exists()


async def test_requests_without_credentials_are_refused(jp_serverapp, http_server_client, root, jp_base_url):
    from tornado.httpclient import HTTPClientError

    with pytest.raises(HTTPClientError) as e:
        await http_server_client.fetch(f"{jp_base_url}uwsfmt/store?path=fam.uws")
    assert e.value.code == 403
    with pytest.raises(HTTPClientError) as e:  # no token, no XSRF cookie: refused before anything is written
        await http_server_client.fetch(f"{jp_base_url}uwsfmt/export", method="POST",
                                       body=json.dumps({"path": "fam.uws", "model": "m0"}))
    assert e.value.code == 403 and not (root / "m0.safetensors").exists()


async def test_zipped_store_is_served_like_a_folder(api, root):
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "uwsfmt.cli", "pack", str(root / "fam.uws"), str(root / "fam.uws.zip")],
                   check=True, capture_output=True)
    code, view = await api("GET", "store", path="fam.uws.zip")
    assert code == 200, view
    assert view["summary"]["zipped"] is True and view["summary"]["n_models"] == 4
    code, r = await api("POST", "validate", {"path": "fam.uws.zip"})
    assert code == 200 and r["valid"] is True
    code, r = await api("POST", "jobs", {"sources": ["ckpts"], "output": "fam.uws.zip", "options": {"action": "add"}})
    assert code == 400 and "zipped store is read-only" in r["message"]
