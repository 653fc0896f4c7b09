"""The LoRA records of tensor entries and model entries: ranks, scales, factor names."""

from __future__ import annotations

from uwsfmt.encodings.lora.planning import MAX_META_VALUE
from uwsfmt.errors import ConflictError, FormatError
from uwsfmt.sources.base import Checkpoint, LoraPair


def rank_of(e: dict, r: int) -> int:
    """Rank of the factors a reader returns: min(kl, kr, the adapter's own rank)."""
    kl, kr = e["rank"]
    return max(0, min(kl or 0, kr or 0, r))


def model_record(entries: list[dict], ck: Checkpoint, ranks: dict[str, int] | None = None) -> dict:
    """Per-model LoRA facts for the model table: each entry's adapter rank (0 = module absent)
    and what an export needs to write an adapter its tools load (PEFT config, file metadata)."""
    lora_entries = [e for e in entries if e.get("lora") is not None]
    meta = ck.metadata() or {}
    pairs = ck.lora_pairs()
    if not lora_entries and not pairs:
        return {}
    rec: dict = {"format": ck.format}
    known = {e["name"] for e in lora_entries}
    extra = [m for m in pairs if m not in known] if lora_entries else []
    if extra:
        raise ConflictError(f"{ck.path or ck.id}: adapter {ck.id!r} has LoRA modules the store has no basis for "
                            f"({', '.join(map(repr, extra[:5]))}); rebuild the store with this adapter included")
    if lora_entries:
        infos = ck.infos() if any(e["name"] not in (ranks or {}) for e in lora_entries) else {}  # once, not per module
        rec["ranks"] = [None if e.get("lora") is None else (ranks or {}).get(e["name"], _rank_from(infos, pairs, e)) for e in entries]
    else:  # factor-wise store: the scales stay in the adapter's own config
        rec["scales"] = {m: p.scale for m, p in pairs.items()}
    if "peft_config" in meta:
        rec["peft_config"] = meta["peft_config"]
    st_meta = meta.get("safetensors_metadata")
    if st_meta:
        rec["metadata"] = {k: v for k, v in st_meta.items() if isinstance(v, str) and len(v) <= MAX_META_VALUE}
    return {"adapter": rec}


def _rank_from(infos: dict, pairs: dict[str, LoraPair], e: dict) -> int:
    p = pairs.get(e["name"])
    return 0 if p is None else int(infos[p.a].shape[0])


def model_ranks(store, idx: int) -> list | None:
    return ((store.manifest["models"][idx].get("adapter") or {}).get("ranks"))


def stored_rank(store, ranks: list | None, e: dict) -> int:
    if ranks is None:
        return max(e["rank"][0] or 0, e["rank"][1] or 0)
    r = ranks[store.tensor_position(e["name"])]
    return 0 if r is None else int(r)


def check_record(e: dict) -> dict:
    """The entry's ``lora`` record, checked (a damaged or hostile manifest fails here, clearly)."""
    rec = e.get("lora")
    ok = (isinstance(rec, dict) and isinstance(rec.get("a"), str) and isinstance(rec.get("b"), str)
          and all(isinstance(rec.get(k), list) and all(isinstance(x, int) and x >= 0 for x in rec[k]) for k in ("a_tail", "b_tail"))
          and isinstance(rec.get("alpha"), (str, type(None))) and e.get("encoding") == "subspace" and e.get("mode") == "both"
          and e.get("center") == "none" and e.get("left") and e.get("right"))
    if not ok:

        raise FormatError(f"tensor {e.get('name')!r}: malformed LoRA record (needs a subspace entry, mode 'both', centre 'none', "
                          "and lora = {a, b, a_tail, b_tail, alpha}); the store is damaged")
    assert isinstance(rec, dict)  # checked in ok
    return rec


def factor_names(e: dict) -> list[str]:
    rec = check_record(e)
    return [rec["a"], rec["b"]] + ([rec["alpha"]] if rec.get("alpha") else [])
