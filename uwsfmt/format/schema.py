"""Validation of the manifest against the JSON Schema shipped in spec/schema/.

The schema checks the document's shape; :func:`check_consistency` checks what a schema cannot
(lengths that must agree, slots inside their packs).
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

from uwsfmt.errors import FormatError

SCHEMA_FILE = "manifest.schema.json"


@functools.cache
def manifest_schema() -> dict:
    return json.loads(resources.files("uwsfmt.format").joinpath("schema", SCHEMA_FILE).read_text())


@functools.cache
def _fast_validator():
    # Opening a store validates its whole manifest (500 models x 300 tensors = 150k error values).
    # fastjsonschema compiles the schema to Python once (~50 ms) and checks that in ~60 ms, where
    # jsonschema takes ~1.5 s plus ~1.8 s to import; jsonschema then only words the message.
    import fastjsonschema

    return fastjsonschema.compile(manifest_schema())


@functools.cache
def _validator():
    import jsonschema

    cls = jsonschema.validators.validator_for(manifest_schema())
    return cls(manifest_schema())


def schema_problem(m: Any) -> str | None:
    """The first schema violation in ``m`` as ``"at PATH: message"``, or None when it is valid."""
    import fastjsonschema

    try:
        _fast_validator()(m)
        return None
    except fastjsonschema.JsonSchemaValueException as fast:
        # a readable message, with the path, from jsonschema's best match
        import jsonschema

        err = jsonschema.exceptions.best_match(_validator().iter_errors(m))
        if err is None:  # the two validators disagree: report what the fast one saw
            return f"at {fast.name}: {fast.message}"
        loc = "/".join(str(p) for p in err.absolute_path) or "(root)"
        return f"at {loc}: {err.message}"


def validate_manifest(m: dict, where: str = "store") -> None:
    """Raise :class:`FormatError` naming the first problem if ``m`` is not a valid manifest."""
    try:
        problem = schema_problem(m)
    except RecursionError as e:  # a hostile, deeply nested document
        raise FormatError(f"{where}: the manifest is nested too deeply to be UWS metadata; the store is damaged or hostile") from e
    if problem is not None:
        msg = problem if len(problem) < 300 else problem[:300] + "..."
        raise FormatError(f"{where}: the manifest is not valid UWS 1.x metadata {msg}")
    check_consistency(m, where)


def check_consistency(m: dict, where: str) -> None:
    n_t = len(m["tensors"])
    packs = m["packs"]
    for i, t in enumerate(m["models"]):
        for key in ("error", "delta_error"):
            if len(t[key]) != n_t:
                raise FormatError(f"{where}: model {t['id']!r} has {len(t[key])} {key} values for {n_t} tensors")
    ids = [x["id"] for x in m["models"]]
    if len(set(ids)) != len(ids):
        raise FormatError(f"{where}: the model table lists the same id twice")
    names = [x["name"] for x in m["tensors"]]
    if len(set(names)) != len(names):
        raise FormatError(f"{where}: the tensor table lists the same name twice")
    known = set(names)
    for t in m["models"]:
        for x in t.get("exceptions") or ():
            if x["tensor"] not in known:
                raise FormatError(f"{where}: model {t['id']!r} has an exception for tensor {x['tensor']!r}, which the store does not hold")
    for t in m["tensors"]:
        slots = []
        if t["encoding"] == "dense" and "pack" in t.get("data", {}):
            slots.append(t["data"])
        if t["encoding"] == "subspace":
            slots.append(t["coefficients"])
            if isinstance(t["coefficients"].get("scales"), dict):  # quantized coefficients (format 1.2)
                slots.append(t["coefficients"]["scales"])
            r = t.get("residual") or {}
            slots += [r[k] for k in ("codes", "scales", "values") if k in r]
        for s in slots:
            if s["length"] == 0:
                continue
            p = packs.get(s["pack"])
            if p is None or s["offset"] + s["length"] > p["width"]:
                raise FormatError(f"{where}: tensor {t['name']!r} points outside pack {s['pack']!r}; the manifest is damaged")
