"""Property-based tests (hypothesis) of the metadata reader, the validator and name escaping.

Whatever the input: a valid result or uwsfmt's own error type (:class:`uwsfmt.UWSError`),
never another exception, never a write anywhere (readers) or outside the store (writers).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import uuid
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import uwsfmt
from uwsfmt.format import naming
from uwsfmt.format.schema import validate_manifest

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], derandomize=True)

# ---------------------------------------------------------------------------- name escaping

names = st.text(min_size=0, max_size=300) | st.sampled_from(["..", ".", "/", "a/../b", "%2e%2e", "~1", "x" * 5000, "__x", "."])
SAFE_NODE = re.compile(r"^[A-Za-z0-9._%~-]+$")


def unescape(node: str) -> str:
    return re.sub(rb"%([0-9A-F]{2})", lambda m: bytes([int(m.group(1), 16)]), node.encode()).decode("utf-8", "surrogatepass")


@FUZZ
@given(name=names | st.text(alphabet=st.characters(codec=None, categories=None), max_size=50))
def test_escape_gives_one_safe_path_segment(name):
    node = naming.escape(name)
    assert SAFE_NODE.match(node) and not node.startswith((".", "_")) and node not in (".", "..")
    assert len(node) <= naming.MAX_NODE_LEN
    assert os.path.normpath(os.path.join("/store/tensors", node)).startswith("/store/tensors/")
    if "~" not in node:  # not shortened: escaping is invertible, so distinct names get distinct nodes
        assert unescape(node) == name if name else node == "%"  # "" -> "%" (a literal % is "%25")


@FUZZ
@given(st.lists(names, max_size=30, unique=True))
def test_unique_nodes_never_collide_even_ignoring_case(ns):
    nodes = naming.unique_nodes(ns)
    assert len(nodes) == len(ns)
    assert len({n.lower() for n in nodes}) == len(nodes)
    assert all(SAFE_NODE.match(n) and not n.startswith((".", "_")) for n in nodes)


@FUZZ
@given(st.one_of(st.text(max_size=5000), st.none(), st.integers(), st.binary(max_size=10)))
def test_check_string_never_raises(s):
    out = naming.check_string(s, "model id")
    assert isinstance(out, list) and all(isinstance(x, str) for x in out)
    assert out == [] or not (isinstance(s, str) and s and len(s) <= 4096 and "\ud800" not in s)


# ---------------------------------------------------------------------------- JSON values

json_scalars = st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=20)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A small store holding every encoding (subspace with residual, shared, dense, per-model, an exception)."""
    from .crash_harness import make_sources

    work = tmp_path_factory.mktemp("fuzz")
    srcs = make_sources(work / "src")
    st_ = uwsfmt.convert(srcs[:4], work / "ref.uws", max_error=0.01, min_numel=64)
    st_.append(srcs[5], id="late")
    manifest = copy.deepcopy(st_.manifest)
    st_.close()
    return work / "ref.uws", manifest


@FUZZ
@given(doc=json_values)
def test_validate_manifest_on_arbitrary_json(doc):
    try:
        validate_manifest(doc, "fuzz")
    except uwsfmt.FormatError:
        pass


def _paths(obj, prefix=()):
    """Every (path, value) inside a JSON document."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _set(doc, path, value):
    if not path:
        return value
    cur = doc
    for p in path[:-1]:
        cur = cur[p]
    cur[path[-1]] = value
    return doc


mutation = st.tuples(st.integers(min_value=0, max_value=10**6), st.sampled_from(["replace", "delete", "number", "string", "grow"]),
                     json_values)


def _mutate(manifest: dict, muts) -> dict:
    m = copy.deepcopy(manifest)
    for pick, how, value in muts:
        paths = [p for p, _ in _paths(m) if p]
        if not paths:
            break
        path = paths[pick % len(paths)]
        parent = m
        for p in path[:-1]:
            parent = parent[p]
        old = parent[path[-1]]
        if how == "delete":
            del parent[path[-1]]
        elif how == "number":
            _set(m, path, (old * 3 + 7) if isinstance(old, (int, float)) and not isinstance(old, bool) else 10**9)
        elif how == "string":
            _set(m, path, "../../x" if isinstance(old, str) else str(old))
        elif how == "grow" and isinstance(old, list):
            old.extend(old[:2] or [value])
        else:
            _set(m, path, value)
    return m


@settings(FUZZ, max_examples=300)
@given(muts=st.lists(mutation, min_size=1, max_size=3))
def test_fast_schema_check_agrees_with_jsonschema(reference, muts):
    # opening a store checks the schema with fastjsonschema (compiled, fast); jsonschema is the
    # reference implementation of the same schema file: they must accept exactly the same manifests
    import fastjsonschema
    import jsonschema

    from uwsfmt.format.schema import _fast_validator, manifest_schema

    m = _mutate(reference[1], muts)
    try:
        _fast_validator()(m)
        fast_ok = True
    except fastjsonschema.JsonSchemaValueException:
        fast_ok = False
    ref_ok = jsonschema.validators.validator_for(manifest_schema())(manifest_schema()).is_valid(m)
    assert fast_ok == ref_ok, m


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def _use(store_path) -> None:
    """What a user does with a store: open, validate (deep), read every model and one tensor."""
    with uwsfmt.open(store_path) as s:
        s.validate(deep=True)
        for i in range(min(s.n_models, 6)):
            s.state_dict(i)
        if s.n_models and s.tensor_names:
            s.tensor(0, s.tensor_names[0])
        s.summary()


def _use_writes_nothing(work: Path, store: Path) -> None:
    """:func:`_use` on ``store`` gives a result or a UWSError, and nothing under ``work`` changes."""
    before = _listing(work)
    try:
        _use(store)
    except uwsfmt.UWSError:
        pass
    assert _listing(work) == before  # reading and validating never write
    shutil.rmtree(work)


@settings(FUZZ, max_examples=120)
@given(muts=st.lists(mutation, min_size=1, max_size=3))
def test_reader_and_validator_on_mutated_manifests(reference, tmp_path_factory, muts):
    ref, manifest = reference
    m = _mutate(manifest, muts)
    work = tmp_path_factory.mktemp("mut")
    store = work / "s.uws"
    shutil.copytree(ref, store)
    doc = json.loads((store / "zarr.json").read_text())
    doc["attributes"]["uws"] = m
    try:
        (store / "zarr.json").write_text(json.dumps(doc))
    except (TypeError, ValueError):
        assume(False)
    _use_writes_nothing(work, store)


@settings(FUZZ, max_examples=60)
@given(raw=st.binary(max_size=2000) | json_values.map(lambda v: json.dumps(v).encode()) |
       json_values.map(lambda v: json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {"uws": v}}).encode()))
def test_reader_on_arbitrary_root_documents(reference, tmp_path_factory, raw):
    ref, _ = reference
    work = tmp_path_factory.mktemp("raw")
    store = work / "s.uws"
    shutil.copytree(ref, store)
    (store / "zarr.json").write_bytes(raw)
    _use_writes_nothing(work, store)


array_fields = st.sampled_from(["shape", "data_type", "chunk_grid", "codecs", "fill_value", "chunk_key_encoding", "zarr_format",
                                "node_type", "dimension_names", "attributes"])


@settings(FUZZ, max_examples=80)
@given(which=st.integers(min_value=0, max_value=10**6), field=array_fields, value=json_values)
def test_reader_on_mutated_array_metadata(reference, tmp_path_factory, which, field, value):
    ref, _ = reference
    work = tmp_path_factory.mktemp("arr")
    store = work / "s.uws"
    shutil.copytree(ref, store)
    metas = sorted(p for p in store.rglob("zarr.json") if json.loads(p.read_text()).get("node_type") == "array")
    meta = metas[which % len(metas)]
    doc = json.loads(meta.read_text())
    doc[field] = value
    meta.write_text(json.dumps(doc))
    _use_writes_nothing(work, store)


@settings(FUZZ, max_examples=40)
@given(which=st.integers(min_value=0, max_value=10**6), pos=st.floats(min_value=0, max_value=1), data=st.binary(min_size=1, max_size=8),
       truncate=st.booleans())
def test_reader_on_corrupted_chunks(reference, tmp_path_factory, which, pos, data, truncate):
    ref, _ = reference
    work = tmp_path_factory.mktemp("chunk")
    store = work / "s.uws"
    shutil.copytree(ref, store)
    chunks = sorted(p for p in store.rglob("*") if p.is_file() and "/c/" in p.relative_to(store).as_posix())
    target = chunks[which % len(chunks)]
    raw = bytearray(target.read_bytes())
    at = int(pos * max(0, len(raw) - 1))
    raw = raw[:at] if truncate else raw[:at] + data + raw[at + len(data):]
    target.write_bytes(bytes(raw))
    try:
        _use(store)
    except uwsfmt.UWSError:
        pass
    shutil.rmtree(work)


# ---------------------------------------------------------------------------- writers stay inside the store


@settings(FUZZ, max_examples=12)
@given(tensor_names=st.lists(names.filter(lambda s: len(s) <= 4096 and "\ud800" not in s), min_size=1, max_size=6, unique=True),
       ids=st.lists(st.text(min_size=1, max_size=40), min_size=2, max_size=3, unique=True))
def test_convert_and_append_stay_inside_the_store(tmp_path_factory, tensor_names, ids):
    work = tmp_path_factory.mktemp("names")
    out = work / "inner" / "s.uws"
    out.parent.mkdir()
    g = torch.Generator().manual_seed(0)
    base = {n: torch.randn(8, 8, generator=g) for n in tensor_names}
    fam = {mid: {k: v + 0.1 * i for k, v in base.items()} for i, mid in enumerate(ids)}
    try:
        s = uwsfmt.convert(fam, out, rank=1, min_numel=16)
    except uwsfmt.UWSError:
        assert not out.exists()
    else:
        s.append({k: v * 2 for k, v in base.items()}, id=f"late/../{uuid.uuid4().hex[:4]}")
        for mid in s.model_ids:
            assert set(s.state_dict(mid)) == set(tensor_names)
        assert s.validate() == []
        s.close()
    escaped = [p for p in work.rglob("*") if not (p == out.parent or p.is_relative_to(out))]
    assert not escaped, escaped
    shutil.rmtree(work)
