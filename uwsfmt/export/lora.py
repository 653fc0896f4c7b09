"""Store -> adapters people's tools load: PEFT folders and kohya / A1111 files.

Registered in :data:`uwsfmt.export.EXPORTERS` as ``peft`` and ``kohya``. The factors come from
:meth:`uwsfmt.Store.state_dict` (rank min(k, r), the adapter's scale folded in), so the written
config gives every module scale 1: ``lora_alpha = r`` (no rsLoRA), with ``rank_pattern`` /
``alpha_pattern`` for modules whose rank differs from the most common one. Everything else of
the adapter's own config (target modules, modules_to_save, task type, base model, ...) is
written back as it was.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from uwsfmt.reader.store import ModelRef, StoreReader

import json
import os
import re
from collections import Counter

from safetensors.torch import save_file

from uwsfmt.errors import ConfigError
from uwsfmt.export.registry import exporter, store_name
from uwsfmt.sources.peft import CONFIG, module_key

#: keys of adapter_config.json that the export rewrites (the scale lives in the factors now)
SCALE_KEYS = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora")


def _adapter(store, model, fmt: str) -> dict:
    entry = store.model_entry(model)
    ad = entry.get("adapter") or {}
    if ad.get("format") != fmt:
        have = ad.get("format") or "not adapters"
        hint = {"peft": "--format peft", "kohya": "--format kohya"}.get(have, "--format safetensors")
        raise ConfigError(
            f"{store.path}: model {entry['id']!r} came from {have!r} sources, so it cannot be exported as {fmt!r} "
            f"(its key names belong to another tool); use {hint}"
        )
    return ad


def lora_ranks(store: StoreReader, sd: dict) -> dict[str, int]:
    """{module: exported rank} of the LoRA modules present in ``sd``."""
    out = {}
    for e in store.manifest["tensors"]:
        rec = e.get("lora")
        if rec is not None and rec["a"] in sd:
            out[e["name"]] = int(sd[rec["a"]].shape[0])
    return out


def _drop_empty(store, sd: dict, ranks: dict[str, int]) -> dict:
    """Modules whose kept rank is 0 are left out (a LoRA layer of rank 0 is not loadable)."""
    for e in store.manifest["tensors"]:
        rec = e.get("lora")
        if rec is not None and ranks.get(e["name"]) == 0:
            for n in (rec["a"], rec["b"], rec.get("alpha")):
                sd.pop(n, None)
    return sd


def peft_config(config: dict, ranks: dict[str, int]) -> dict:
    """The adapter's config with ranks and alphas that make every module's scale 1."""
    config = dict(config)
    live = {module_key(m): r for m, r in ranks.items() if r > 0}
    if not live:
        return config
    common = Counter(live.values()).most_common(1)[0][0]
    config.update(r=common, lora_alpha=common, use_rslora=False)
    # patterns are regexes matched against the end of the module name: escape the full names
    config["rank_pattern"] = {re.escape(k): r for k, r in live.items() if r != common}
    config["alpha_pattern"] = {re.escape(k): r for k, r in live.items() if r != common}
    return config


def _prepare_dir(out: str) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"{out}: a PEFT adapter is a folder; {out} is a file")
    os.makedirs(out, exist_ok=True)


@exporter("peft")
def export_peft(store: StoreReader, model: ModelRef, out: str, **_: Any) -> str:
    """Write a PEFT adapter folder that ``PeftModel.from_pretrained(base, out)`` loads.

    >>> store.export("task-3", "task-3-adapter", format="peft")  # doctest: +SKIP
    """
    ad = _adapter(store, model, "peft")
    if "peft_config" not in ad:
        raise ConfigError(f"{store.path}: model {store.model_entry(model)['id']!r} has no recorded adapter_config.json")
    sd = store.state_dict(model)
    ranks = lora_ranks(store, sd)
    sd = _drop_empty(store, sd, ranks)
    config = peft_config(ad["peft_config"], ranks) if ranks else dict(ad["peft_config"])
    _prepare_dir(out)
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(out, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, CONFIG), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    return out


@exporter("kohya")
def export_kohya(store: StoreReader, model: ModelRef, out: str, **_: Any) -> str:
    """Write a kohya / A1111 LoRA ``.safetensors``: lora_down = A', lora_up = B', alpha = rank
    (scale 1), the source file's metadata kept."""
    ad = _adapter(store, model, "kohya")
    sd = store.state_dict(model)
    sd = _drop_empty(store, sd, lora_ranks(store, sd))
    meta = dict(ad.get("metadata") or {})
    entry = store.model_entry(model)
    meta.update({"uwsfmt.store": store_name(store), "uwsfmt.model": entry["id"]})
    save_file({k: v.contiguous() for k, v in sd.items()}, out, metadata=meta)
    return out
