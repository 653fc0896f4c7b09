"""Store -> the Hugging Face model folder a model came from (``format="hf"``).

The folder is written as it was read: the kept small files byte for byte (config, generation
config, tokenizer, chat template, model card; spec section 15), and the weights as safetensors
under the source's shard names with its index file, so that ``AutoModel*.from_pretrained(out)``
loads it. Tied weights stay as the source had them (transformers leaves the tied copies out of a
saved folder and ties them again on load). ``max_shard_size`` lays the weights out anew instead
(transformers' own naming: ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``).
Sources read from ``pytorch_model*.bin`` come back as safetensors with the same shard numbering.

The folder is written beside ``out`` and moved into place at the end: an export that fails
leaves no half-written folder, and ``overwrite`` never mixes old shards with new ones.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid

from safetensors.torch import save_file

from uwsfmt.encodings import lora as lora_enc
from uwsfmt.errors import ConfigError, FormatError, StoreExistsError
from uwsfmt.export.registry import exporter, store_name
from uwsfmt.format import dtypes
from uwsfmt.format.files import parse_size, safe_name
from uwsfmt.io.commit import replace_dir
from uwsfmt.reader.files import read_file

#: the index file transformers reads for sharded safetensors
SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"


def is_hf_folder(entry: dict) -> bool:
    """Whether a model entry came from a Hugging Face model folder with its config kept."""
    folder = entry.get("folder") or {}
    return folder.get("format") == "hf_folder" and "config.json" in (folder.get("files") or {})


def export_formats(store, model) -> list[str]:
    """The export formats that apply to one model of ``store``: always ``"safetensors"``;
    ``"hf"`` where it came from a Hugging Face folder whose config the store kept; ``"peft"`` /
    ``"kohya"`` for adapters read from those tools' files.

    >>> export_formats(uwsfmt.open("family.uws"), "ft2")  # doctest: +SKIP
    ['safetensors', 'hf']
    """
    entry = store.model_entry(model)
    out = ["safetensors"]
    if is_hf_folder(entry):
        out.append("hf")
    adapter = entry.get("adapter") or {}
    if adapter.get("format") == "peft" and "peft_config" in adapter:
        out.append("peft")
    elif adapter.get("format") == "kohya":
        out.append("kohya")
    return out


def _tensor_names(store) -> list[str]:
    """The names an exported model's tensors have, in store order (LoRA modules: their factors)."""
    out: list[str] = []
    for e in store.manifest["tensors"]:
        out += lora_enc.factor_names(e) if e.get("lora") is not None else [e["name"]]
    return out


def _safetensors_name(shard: str) -> str:
    """A shard's name as a safetensors file (``pytorch_model-00001-of-00002.bin`` ->
    ``model-00001-of-00002.safetensors``)."""
    if shard.endswith(".safetensors"):
        return shard
    stem = shard[: -len(".bin")] if shard.endswith(".bin") else shard
    if stem.startswith("pytorch_model"):
        stem = "model" + stem[len("pytorch_model"):]
    return stem + ".safetensors"


def _source_layout(store, model, folder: dict, names: list[str]) -> tuple[dict[str, list[str]], str | None, bool]:
    """``({shard file: [tensor names]}, index file name or None, whether the kept index file is
    written as it is)`` for the layout the source had."""
    weights = folder.get("weights") or {}
    shards, index = list(weights.get("shards") or ()), weights.get("index")
    if index is None:
        if len(shards) != 1:
            raise FormatError(f"{store.path}: model {model!r}: the folder record lists {len(shards)} weight files "
                              "and no index; export with max_shard_size to lay the weights out anew")
        return {_safetensors_name(shards[0]): names}, None, False
    try:
        weight_map = json.loads(read_file(store, model, index))["weight_map"]
    except (ValueError, KeyError, TypeError):
        raise FormatError(f"{store.path}: model {model!r}: the kept index {index!r} has no weight_map; export with "
                          "max_shard_size to lay the weights out anew") from None
    if not isinstance(weight_map, dict) or set(weight_map) != set(names):
        raise FormatError(f"{store.path}: model {model!r}: the kept index {index!r} does not list the store's tensors; "
                          "export with max_shard_size to lay the weights out anew")
    layout: dict[str, list[str]] = {}
    for n in names:  # store order within each shard
        layout.setdefault(_safetensors_name(weight_map[n]), []).append(n)
    same = index.endswith(".safetensors.index.json") and all(s.endswith(".safetensors") for s in weight_map.values())
    return layout, index if same else SAFE_INDEX, same


def _new_layout(store, names: list[str], max_bytes: int) -> dict[str, list[str]]:
    """Shards of at most ``max_bytes`` (a larger tensor gets one of its own), in store order,
    named as transformers names them."""
    groups: list[list[str]] = [[]]
    size = 0
    for n in names:
        b = _nbytes(store, n)
        if groups[-1] and size + b > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(n)
        size += b
    if len(groups) == 1:
        return {SAFE_SINGLE: groups[0]}
    k = len(groups)
    return {f"model-{i + 1:05d}-of-{k:05d}.safetensors": g for i, g in enumerate(groups)}


def _nbytes(store, name: str) -> int:
    e = store.tensor_entry(name)
    shape = e.get("shape") or []
    if e.get("lora") is not None:
        return 0  # factors: small, and not part of HF folders
    return math.prod(shape) * dtypes.torch_dtype(e["dtype"]).itemsize


@exporter("hf")
def export_hf(store, model, out: str, *, max_shard_size: int | str | None = None, overwrite: bool = False, **_) -> str:
    """Write one model as the Hugging Face folder it came from; ``from_pretrained(out)`` loads it.

    ``max_shard_size`` (bytes, or e.g. ``"200KB"``, ``"5GB"``): lay the weights out in shards of
    at most this size instead of the source's layout.

    >>> store.export("ft2", "ft2-hf", format="hf")  # doctest: +SKIP
    'ft2-hf'
    """
    entry = store.model_entry(model)
    mid = entry["id"]
    folder = entry.get("folder") or {}
    if not is_hf_folder(entry):
        src = (entry.get("source") or {}).get("format") or "unknown"
        others = " or ".join(f"--format {f}" for f in export_formats(store, model))
        raise ConfigError(f"{store.path}: model {mid!r} did not come from a Hugging Face model folder whose config.json "
                          f"the store kept (its source format: {src}), so it cannot be written back as one; use {others}"
                          + (" (or convert the folders again: stores keep folder files since uwsfmt 0.1)" if src == "hf_folder" else ""))
    files = folder.get("files") or {}
    weights = folder.get("weights") or {}
    bad = [n for n in [*files, *(weights.get("shards") or ()), *([weights["index"]] if weights.get("index") else [])] if not safe_name(n)]
    if bad:
        raise FormatError(f"{store.path}: model {mid!r}: file name {bad[0]!r} is not one plain file name; the store is "
                          "damaged or was tampered with")
    names = _tensor_names(store)
    if max_shard_size is not None:
        layout, keep_index = _new_layout(store, names, parse_size(max_shard_size)), False
        index = SAFE_INDEX if len(layout) > 1 else None
    else:
        layout, index, keep_index = _source_layout(store, mid, folder, names)
    out = os.fspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"{out}: a Hugging Face model is a folder; {out} is a file (choose another path)")
    parent, base = os.path.split(os.path.abspath(out))
    tmp = os.path.join(parent, f".{base}.uws-export-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        for name in files:
            if name == (weights.get("index") or None) and not keep_index:
                continue  # its layout is written anew below
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(read_file(store, mid, name))
        meta = {"format": "pt", "uwsfmt.store": store_name(store), "uwsfmt.model": mid}
        total = 0
        weight_map = {}
        for shard, members in layout.items():
            sd = store.state_dict(mid, names=members)
            total += sum(v.numel() * v.element_size() for v in sd.values())
            weight_map.update({n: shard for n in members})
            save_file({n: sd[n].contiguous() for n in members}, os.path.join(tmp, shard), metadata=meta)
            del sd
        if index is not None and not keep_index:
            with open(os.path.join(tmp, index), "w", encoding="utf-8") as text:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, text, indent=2, sort_keys=True)
                text.write("\n")
        _move_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _move_into_place(tmp: str, out: str, overwrite: bool) -> None:
    if os.path.lexists(out) and not overwrite:
        raise StoreExistsError(f"{out}: appeared while exporting; choose another path or pass overwrite=True (CLI: --overwrite)")
    parent, base = os.path.split(os.path.abspath(out))
    old = replace_dir(tmp, out, os.path.join(parent, f".{base}.uws-replaced-{uuid.uuid4().hex[:8]}"))
    if old is not None:
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.remove(old)
