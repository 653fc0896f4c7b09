"""Real PEFT adapters -> store -> PEFT folders that PeftModel.from_pretrained loads.

The adapters are trained by peft itself on a tiny base (tests/peft_family.py): several tasks,
ranks 4 and 8, rsLoRA, rank/alpha patterns, one adapter without the embedding LoRA, and a
saved head (modules_to_save) in each.
"""

from __future__ import annotations

import json

import pytest
import torch

import uwsfmt
from tests.peft_family import adapter_config, inputs, load_adapter

pytest.importorskip("peft")


def _outputs(model, x):
    with torch.no_grad():
        return model(x)


def _merged_outputs(base, store, model_id, x):
    """The base with the store's dense deltas (L C R^T) added, and the store's head: what the
    store says the adapted network is, computed without PEFT."""
    from tests.peft_family import TinyNet

    net = TinyNet()
    sd = {k: v.clone() for k, v in base.state_dict().items()}
    for e in store.manifest["tensors"]:
        if e.get("lora"):
            layer = e["name"].removeprefix("base_model.model.")
            sd[f"{layer}.weight"] += store.delta(model_id, e["name"])
    factors = store.state_dict(model_id)
    sd["head.weight"] = factors["base_model.model.head.weight"]
    sd["head.bias"] = factors["base_model.model.head.bias"]
    net.load_state_dict(sd)
    return _outputs(net.eval(), x)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_lossless_rank_round_trips_every_adapter(tmp_path, peft_family):
    base, dirs = peft_family
    store = uwsfmt.convert([str(d) for d in dirs], tmp_path / "s.uws", rank=64)
    assert store.n_models == len(dirs)
    x = inputs()
    for d in dirs:
        out = store.export(d.name, str(tmp_path / "out" / d.name), format="peft")
        y_src = _outputs(load_adapter(base, d), x)
        y_out = _outputs(load_adapter(base, out), x)
        assert _rel(y_out, y_src) < 1e-5, d.name
        # the exported config keeps what the adapter was (targets, saved modules), scale 1 per module
        cfg, src = adapter_config(out), adapter_config(d)
        assert sorted(cfg["target_modules"]) == sorted(src["target_modules"])
        assert cfg["modules_to_save"] == ["head"] and cfg["use_rslora"] is False
    assert max(store.errors()[:, :].max(axis=0)) < 1e-5


def test_compressed_export_matches_the_store_reconstruction(tmp_path, peft_family):
    base, dirs = peft_family
    store = uwsfmt.convert([str(d) for d in dirs], tmp_path / "s.uws", rank=5)
    x = inputs()
    ranks_seen = set()
    for d in dirs:
        out = store.export(d.name, str(tmp_path / "out" / d.name), format="peft")
        cfg = adapter_config(out)
        ranks_seen.add(cfg["r"])
        assert cfg["r"] <= 5
        y_peft = _outputs(load_adapter(base, out), x)
        assert _rel(y_peft, _merged_outputs(base, store, d.name, x)) < 1e-5, d.name
        # and the stored error is what the factors really lose against the source adapter
        src = load_adapter(base, d)
        i = store.model_index(d.name)
        for e, err in zip(store.manifest["tensors"], store.manifest["models"][i]["error"]):
            if not e.get("lora") or store.manifest["models"][i]["adapter"]["ranks"][store._tensor_index[e["name"]]] == 0:
                continue
            layer = src.base_model.model.get_submodule(e["name"].removeprefix("base_model.model."))
            true = layer.get_delta_weight("default")
            got = store.delta(d.name, e["name"])
            assert abs(_rel(got, true) - err) < 1e-4
    assert ranks_seen <= {4, 5}


def test_mixed_ranks_patterns_and_missing_modules_are_honoured(tmp_path, peft_family):
    base, dirs = peft_family
    store = uwsfmt.convert([str(d) for d in dirs], tmp_path / "s.uws", rank=64)
    emb = "base_model.model.emb"
    # task-03 trained no embedding LoRA: rank 0 in the model table, nothing exported for it
    assert store.manifest["models"][3]["adapter"]["ranks"][store._tensor_index[emb]] == 0
    sd = store.state_dict("task-03")
    assert not any(k.startswith(emb + ".") for k in sd)
    assert torch.count_nonzero(store.delta("task-03", emb)) == 0
    # task-02 has fc2 at rank 6 (rank_pattern): its factors keep rank 6; the export says so
    sd2 = store.state_dict("task-02")
    assert sd2["base_model.model.fc2.lora_A.weight"].shape == (6, 96)
    out = store.export("task-02", str(tmp_path / "t2"), format="peft")
    cfg = json.loads((tmp_path / "t2" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and list(cfg["rank_pattern"].values()) == [6]
    assert _rel(_outputs(load_adapter(base, out), inputs()), _outputs(load_adapter(base, dirs[2]), inputs())) < 1e-5
    # embeddings are stored as B A (fan_in_fan_out): delta() gives the weight's layout
    assert store.delta("task-00", emb).shape == (48, 32)


def test_bf16_adapters_export_in_bf16_with_exact_head(tmp_path):
    from tests.peft_family import default_specs, train_adapters

    base, dirs = train_adapters(tmp_path / "ad", default_specs(3), steps=10, dtype=torch.bfloat16)
    store = uwsfmt.convert([str(d) for d in dirs], tmp_path / "s.uws", rank=64)
    sd = store.state_dict("task-01")
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    from safetensors.torch import load_file

    src = load_file(str(dirs[1] / "adapter_model.safetensors"))
    assert torch.equal(sd["base_model.model.head.weight"].view(torch.int16), src["base_model.model.head.weight"].view(torch.int16))
    out = store.export("task-01", str(tmp_path / "o"), format="peft")
    y = _outputs(load_adapter(base, out), inputs())
    y0 = _outputs(load_adapter(base, dirs[1]), inputs())
    assert _rel(y, y0) < 2e-2  # bf16 factors: rounding only


def test_factor_wise_mode_round_trips_same_rank_adapters(tmp_path, peft_family):
    base, dirs = peft_family
    # the paper's mode needs one rank per module and every module in every adapter
    same = [d for d in dirs if adapter_config(d)["r"] == 8 and "emb" in adapter_config(d)["target_modules"]]
    assert len(same) >= 3
    store = uwsfmt.convert([str(d) for d in same], tmp_path / "f.uws", rank=64, lora_mode="factors")
    assert not any(e.get("lora") for e in store.manifest["tensors"])
    for d in same:
        out = store.export(d.name, str(tmp_path / "o" / d.name), format="peft")
        assert adapter_config(out)["r"] == adapter_config(d)["r"]  # config unchanged: factors stored as they were
        assert _rel(_outputs(load_adapter(base, out), inputs()), _outputs(load_adapter(base, d), inputs())) < 1e-5


def test_append_an_adapter_and_export_it(tmp_path, peft_family):
    base, dirs = peft_family
    store = uwsfmt.convert([str(d) for d in dirs[:-1]], tmp_path / "s.uws", rank=64)
    store.append(str(dirs[-1]))
    assert store.model_ids[-1] == dirs[-1].name
    out = store.export(dirs[-1].name, str(tmp_path / "o"), format="peft")
    y = _outputs(load_adapter(base, out), inputs())
    # an appended adapter is projected onto bases built without it: close, not exact
    assert _rel(y, _merged_outputs(base, store, dirs[-1].name, inputs())) < 1e-5


def test_gpt2_conv1d_fan_in_fan_out_adapters(tmp_path):
    """transformers' GPT-2 stores its projections transposed (Conv1D): PEFT's fan_in_fan_out."""
    transformers = pytest.importorskip("transformers")
    from peft import LoraConfig, PeftModel, get_peft_model

    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=16, vocab_size=50)
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(cfg).eval()
    state = {k: v.clone() for k, v in base.state_dict().items()}

    def fresh():
        m = transformers.GPT2LMHeadModel(cfg)
        m.load_state_dict(state)
        return m.eval()

    dirs = []
    for i, r in enumerate((4, 8, 4)):
        torch.manual_seed(100 + i)
        m = get_peft_model(fresh(), LoraConfig(r=r, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True))
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)  # as if trained (PEFT starts B at zero)
        m.save_pretrained(str(tmp_path / f"gpt-{i}"))
        dirs.append(tmp_path / f"gpt-{i}")
    store = uwsfmt.convert([str(d) for d in dirs], tmp_path / "g.uws", rank=64)
    x = torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(1))
    for d in dirs:
        out = store.export(d.name, str(tmp_path / "o" / d.name), format="peft")
        src = PeftModel.from_pretrained(fresh(), str(d)).eval()
        got = PeftModel.from_pretrained(fresh(), out).eval()
        with torch.no_grad():
            assert _rel(got(x).logits, src(x).logits) < 1e-5
        # delta() is in the Conv1D weight's (in, out) layout, like PEFT's own delta
        name = "base_model.model.transformer.h.0.attn.c_attn"
        layer = src.base_model.model.get_submodule("transformer.h.0.attn.c_attn")
        assert _rel(store.delta(d.name, name), layer.get_delta_weight("default")) < 1e-5
