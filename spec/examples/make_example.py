"""Regenerate the UWS 1.x conformance examples (``example*.uws``, see ``STORES``) and ``expected/``.

    python spec/examples/make_example.py            # rewrites the checked-in examples
    python spec/examples/make_example.py OUT_DIR    # writes them under OUT_DIR instead

Everything is a function of the constants below (fixed seeds, CPU, float64 generation). Running it
twice on one machine gives the same stores (up to the manifest's timestamps) and the same expected
tensors; on another CPU or BLAS build, the layout, the manifest's structure and the exact parts
are the same, while computed floats (bases, coefficients, and so the rebuilt tensors) may differ
by round-off (spec §6.8), which is why the tests compare regenerations by that rule, not by bits.
``expected/<store>/<model index>.safetensors`` holds what a conforming reader must return for each
model, as read back by uwsfmt when the example was made (for LoRA product-mode modules: the dense
update of §6.3 under the module's name, not the factors, on which readers need not agree).

Several stores, because ``mode``, residual bits, the means' data type and the LoRA mode are
settings per conversion:

- ``example.uws``: built with an error budget (``max_error``), under which the converter picks
  mode, rank and residual bits per tensor, so one store holds left, right and two-sided subspace
  tensors, int4 and int8 residuals (with and without a basis), a bfloat16 subspace tensor, every
  dense / shared case, escaped names, and one appended model whose tensors the bases cannot hold
  (per-model exceptions of kind ``correct`` and ``replace``).
- ``example-flat.uws``: flat PCA (``mode="flat"``), no centring (no mean), a fixed lossy rank, in
  float32 / bfloat16 / float16 / float64, so the final round-to-nearest-even cast matters.
- ``example-half.uws`` (format 1.1): means stored as **float16** (``mean_dtype="float16"``),
  converted to the compute dtype by readers, in float32, bfloat16 and float64 tensors, with
  4-bit residuals; and a tensor whose values lie below float16's normal range, whose mean
  stays float32.
- ``example-r1.uws``, ``example-r2.uws``, ``example-r16.uws``: rank 1 plus a 1-bit, 2-bit and
  float16 residual, in float32 and bfloat16 / float64 / float16.
- ``example-lora.uws``: LoRA product mode from kohya files: float16 factors, a conv module, alpha
  tensors, ranks 4 / 8 / 6 under rank-3 bases, an adapter lacking a module (rank 0).
- ``example-lora-factors.uws``: LoRA factors mode (A and B as ordinary tensors, ``adapter.scales``).
- ``example-qcoef.uws`` (format 1.2): quantized coefficients (section 6.3.1), rank 8 in runs of
  8, 4 and 2 bits, a left (axis 0) and a right (axis 1) tensor, float32 and float64, with 2-bit
  residuals.
- ``example-tall.uws`` (format 1.3): rank 1 plus 4-bit residuals with **per-column scales**
  (section 6.4, ``axis`` 1) over views at least twice as tall as wide, float32 and bfloat16.
- ``example-f8.uws``: float8_e4m3fn / e5m2 dense and shared tensors and an appended model with
  ``replace`` exceptions on float8 and int16 tensors and ``correct`` ones of 1, 2 and 16 bits.

The LoRA examples are built from temporary kohya files; their ``source.path`` is rewritten to the
file's name (informative, §3.6), so no generating machine's path is recorded.
"""

from __future__ import annotations

import os
import shutil
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
STORES = ("example", "example-flat", "example-half", "example-r1", "example-r2", "example-r16", "example-lora",
          "example-lora-factors", "example-f8", "example-qcoef", "example-tall")
N_MODELS = 5
MAX_ERROR = 1e-5
#: model ids are arbitrary strings, never paths: these are deliberately awkward
MODEL_IDS = ("sst2", "mnli/matched", "qa v2", "../not-a-path", "模型-5")
APPENDED_ID = "appended"
LONG_NAME = "model." + "very_long_module_name." * 6 + "weight"


def _gen(*key: int) -> torch.Generator:
    seed = 0
    for k in key:
        seed = seed * 1_000_003 + k
    return torch.Generator().manual_seed(seed)


def _orth(m: int, k: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    return q


def _dyadic(shape, lo: int, hi: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(lo, hi + 1, shape, generator=g, dtype=torch.int64).to(torch.float64)


def family() -> dict[str, dict[str, torch.Tensor]]:
    """The five models of ``example.uws`` (float64 math, cast once to each tensor's dtype)."""
    g = _gen(1)
    b_left = torch.randn(12, 40, generator=g, dtype=torch.float64)
    u_left = _orth(12, 2, g)
    b_both = torch.randn(32, 32, generator=g, dtype=torch.float64)
    u_both, v_both = _orth(32, 2, g), _orth(32, 2, g)
    b_res = torch.randn(16, 32, generator=g, dtype=torch.float64)
    u_res = _orth(16, 2, g)
    b_conv = torch.randn(8, 4, 3, 3, generator=g, dtype=torch.float64)
    # bfloat16: values k / 256 with |k| < 256 are exact in bfloat16, so this family is exactly
    # "base + rank-2 right structure" in its own dtype
    b_bf16 = _dyadic((48, 16), -96, 96, g)
    v_bf16 = _dyadic((16, 2), -1, 1, g)
    frozen = torch.randn(12, 8, generator=g, dtype=torch.float64)
    models = {}
    for i, mid in enumerate(MODEL_IDS):
        g = _gen(2, i)
        n_classes = (2, 3, 2, 4, 3)[i]
        sd = {
            "enc.left.weight": b_left + 0.05 * u_left @ torch.randn(2, 40, generator=g, dtype=torch.float64),
            "enc.both.weight": b_both + 0.05 * u_both @ torch.randn(2, 2, generator=g, dtype=torch.float64) @ v_both.T,
            "enc.resid.weight": b_res + 0.05 * u_res @ torch.randn(2, 32, generator=g, dtype=torch.float64)
            + 4e-5 * torch.randn(16, 32, generator=g, dtype=torch.float64),
            "conv.weight": b_conv + 5e-4 * torch.randn(8, 4, 3, 3, generator=g, dtype=torch.float64),
            "enc.right.weight": (b_bf16 + _dyadic((48, 2), -4, 4, g) @ v_bf16.T) / 256,
            "enc.left.bias": torch.randn(16, generator=g, dtype=torch.float64),
            "enc.norm.weight": 1 + 0.1 * torch.randn(16, generator=g, dtype=torch.float64),
            "enc.norm.bias": 0.1 * torch.randn(16, generator=g, dtype=torch.float64),
            "embed.frozen.weight": frozen,
            "head.weight": torch.randn(n_classes, 8, generator=g, dtype=torch.float64),
            "layer/0..weight %": torch.randn(8, generator=g, dtype=torch.float64),
            "Layer/0..weight %": torch.randn(8, generator=g, dtype=torch.float64),
            LONG_NAME: torch.randn(4, generator=g, dtype=torch.float64),
        }
        dt = {"enc.right.weight": torch.bfloat16, "enc.norm.weight": torch.bfloat16, "enc.norm.bias": torch.float16}
        sd = {k: v.to(dt.get(k, torch.float32)) for k, v in sd.items()}
        sd["logit_scale"] = torch.tensor(2.5)  # 0-D, identical in every model: shared
        sd["position_ids"] = torch.arange(8, dtype=torch.int64).reshape(1, 8)
        sd["num_batches_tracked"] = torch.tensor(1000 * (i + 1) + 7, dtype=torch.int64)
        sd["keep_mask"] = torch.arange(8) % (i + 2) != 0
        models[mid] = sd
    return models


def appended(first: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A sixth model that the store's bases cannot hold within the budget in three tensors."""
    g = _gen(3)
    sd = {k: v.clone() for k, v in first.items()}
    # a direction outside the left basis -> exception "correct" on a subspace tensor
    sd["enc.left.weight"] = (first["enc.left.weight"].double() + 1e-3 * torch.randn(12, 40, generator=g, dtype=torch.float64)).float()
    # a changed frozen tensor -> exception "correct" on a shared tensor
    sd["embed.frozen.weight"] = (first["embed.frozen.weight"].double() + 1e-4 * torch.randn(12, 8, generator=g, dtype=torch.float64)).float()
    # a changed integer buffer -> exception "replace"
    sd["position_ids"] = torch.arange(8, 16, dtype=torch.int64).reshape(1, 8)
    sd["head.weight"] = torch.randn(5, 8, generator=g, dtype=torch.float64).float()  # float64: float32 randn is vectorised by CPU
    sd["num_batches_tracked"] = torch.tensor(123, dtype=torch.int64)
    return sd


def flat_family() -> dict[str, dict[str, torch.Tensor]]:
    """Four models with flat (whole-tensor) structure plus noise, so rank 2 is lossy."""
    g = _gen(4)
    shapes = {"flat.weight": (12, 16), "flat.bf16.weight": (8, 16), "flat.fp16.conv": (8, 2, 3, 3), "flat.f64.weight": (8, 12)}
    dts = {"flat.weight": torch.float32, "flat.bf16.weight": torch.bfloat16, "flat.fp16.conv": torch.float16,
           "flat.f64.weight": torch.float64}
    bases = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    dirs = {k: torch.randn((2, *s), generator=g, dtype=torch.float64) for k, s in shapes.items()}
    models = {}
    for i in range(4):
        g = _gen(5, i)
        sd = {}
        for k, s in shapes.items():
            c = torch.randn(2, generator=g, dtype=torch.float64)
            w = bases[k] + 0.3 * torch.einsum("j,j...->...", c, dirs[k]) + 0.02 * torch.randn(s, generator=g, dtype=torch.float64)
            sd[k] = w.to(dts[k])
        models[f"flat-{i}"] = sd
    return models


def half_family() -> dict[str, dict[str, torch.Tensor]]:
    """Five models of "base + rank-2 deviations + noise" in float32, bfloat16 and float64, and one
    float32 tensor of tiny values (its float16 mean would lose most of its bits)."""
    g = _gen(6)
    shapes = {"half.weight": (24, 16), "half.bf16.weight": (16, 32), "half.f64.weight": (12, 20), "tiny.weight": (8, 16)}
    dts = {"half.bf16.weight": torch.bfloat16, "half.f64.weight": torch.float64}
    scale = {"tiny.weight": 1e-6}
    bases = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    dirs = {k: _orth(s[0], 2, g) for k, s in shapes.items()}
    models = {}
    for i in range(N_MODELS):
        g = _gen(7, i)
        sd = {}
        for k, s in shapes.items():
            w = bases[k] + 0.1 * dirs[k] @ torch.randn(2, s[1], generator=g, dtype=torch.float64) + 0.01 * torch.randn(s, generator=g, dtype=torch.float64)
            sd[k] = (w * scale.get(k, 1.0)).to(dts.get(k, torch.float32))
        models[f"half-{i}"] = sd
    return models


def residual_family(seed: int, shapes: dict[str, tuple[int, int]], dts: dict[str, torch.dtype]) -> dict[str, dict[str, torch.Tensor]]:
    """Four models of "base + rank-2 deviations + noise": at rank 1 the residual carries the rest."""
    g = _gen(8, seed)
    bases = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    dirs = {k: _orth(s[0], 2, g) for k, s in shapes.items()}
    models = {}
    for i in range(4):
        g = _gen(9, seed, i)
        models[f"r{seed}-{i}"] = {
            k: (bases[k] + 0.1 * dirs[k] @ torch.randn(2, s[1], generator=g, dtype=torch.float64)
                + 0.01 * torch.randn(s, generator=g, dtype=torch.float64)).to(dts.get(k, torch.float32))
            for k, s in shapes.items()}
    return models


def qcoef_family() -> dict[str, dict[str, torch.Tensor]]:
    """Ten models of "base + rank-8 deviations of decaying size + noise", one tall and one wide
    tensor (so that the smaller side differs), float32 and float64."""
    shapes, dts = {"q.left.weight": (40, 24), "q.right.f64.weight": (24, 40)}, {"q.right.f64.weight": torch.float64}
    g = _gen(10)
    bases = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    dirs = {k: _orth(min(s), 8, g) for k, s in shapes.items()}
    decay = torch.tensor([2.0 ** -i for i in range(8)], dtype=torch.float64)
    models = {}
    for i in range(10):
        g = _gen(11, i)
        sd = {}
        for k, s in shapes.items():
            coef = decay[:, None] * torch.randn(8, max(s), generator=g, dtype=torch.float64)
            dev = dirs[k] @ coef if s[0] <= s[1] else (dirs[k] @ coef).T
            sd[k] = (bases[k] + 0.1 * dev + 0.01 * torch.randn(s, generator=g, dtype=torch.float64)).to(dts.get(k, torch.float32))
        models[f"q-{i}"] = sd
    return models


#: the residual stores: bits -> (tensor shapes, dtypes other than float32)
RESIDUAL_STORES = {
    1: ({"r1.weight": (24, 16), "r1.bf16.weight": (16, 24)}, {"r1.bf16.weight": torch.bfloat16}),
    2: ({"r2.weight": (16, 20), "r2.f64.weight": (12, 16)}, {"r2.f64.weight": torch.float64}),
    16: ({"r16.weight": (20, 12), "r16.fp16.weight": (16, 16)}, {"r16.fp16.weight": torch.float16}),
}

#: the per-column residual store (format 1.3): views at least twice as tall as wide, like LoRA B factors
TALL_STORE = ({"tall.weight": (48, 6), "tall.bf16.weight": (40, 8)}, {"tall.bf16.weight": torch.bfloat16})

#: kohya-layout LoRA modules: name -> (out, in, conv kernel or None)
LORA_MODULES = {
    "lora_unet_mid_block_attentions_0_proj_in": (40, 32, None),
    "lora_unet_down_blocks_0_resnets_0_conv1": (16, 8, 3),
    "lora_te_text_model_encoder_layers_0_mlp_fc1": (24, 20, None),
}


def lora_files(folder: str, ranks: tuple[int, ...], dtype: torch.dtype, lacking: dict[int, str] | None = None) -> list[str]:
    """Kohya / A1111 LoRA files (``lora_down`` = A, ``lora_up`` = B, an ``alpha`` per module) of
    adapters that share most of their subspace; adapter i has rank ``ranks[i]`` and lacks the
    module ``lacking.get(i)``. Returns the paths written."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    shared = _gen(10)
    common = {mod: (_orth(o, 2, shared), _orth(i * (k or 1) ** 2, 2, shared)) for mod, (o, i, k) in LORA_MODULES.items()}
    paths = []
    for a_i, r in enumerate(ranks):
        g = _gen(11, a_i)
        sd = {}
        for mod, (o, i, k) in LORA_MODULES.items():
            if (lacking or {}).get(a_i) == mod:
                continue
            u, v = common[mod]
            n_in = i * (k or 1) ** 2
            b = torch.cat([u, 0.02 * torch.randn(o, r - 2, generator=g, dtype=torch.float64)], dim=1) * 0.1
            a = torch.cat([v.T, 0.3 * torch.randn(r - 2, n_in, generator=g, dtype=torch.float64)], dim=0)
            a = a + 0.05 * torch.randn(r, n_in, generator=g, dtype=torch.float64)
            sd[f"{mod}.lora_down.weight"] = (a if k is None else a.reshape(r, i, k, k)).to(dtype)
            sd[f"{mod}.lora_up.weight"] = (b if k is None else b.reshape(o, r, 1, 1)).to(dtype)
            sd[f"{mod}.alpha"] = torch.tensor(float(r) / (1 + a_i % 2), dtype=dtype)
        path = os.path.join(folder, f"style-{a_i}.safetensors")
        save_file(sd, path, metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(r)})
        paths.append(path)
    return paths


def f8_family() -> dict[str, dict[str, torch.Tensor]]:
    """Four float8 / float32 models (float8 tensors are stored exactly: dense or shared)."""
    g = _gen(12)
    frozen = torch.linspace(-400, 400, 96, dtype=torch.float64).reshape(8, 12)
    base = torch.randn(24, 16, generator=g, dtype=torch.float64)
    models = {}
    for i in range(4):
        g = _gen(13, i)
        models[f"f8-{i}"] = {
            "f8.e4m3.weight": (4 * torch.randn(8, 16, generator=g, dtype=torch.float64)).to(torch.float8_e4m3fn),
            "f8.e5m2.bias": torch.randn(16, generator=g, dtype=torch.float64).to(torch.float8_e5m2),
            "frozen.e4m3": frozen.to(torch.float8_e4m3fn),
            "frozen.e5m2": (frozen * 100).to(torch.float8_e5m2),
            "frozen.sign": torch.randn(8, 32, generator=_gen(14), dtype=torch.float64).float(),
            "frozen.ternary": torch.randn(8, 32, generator=_gen(15), dtype=torch.float64).float(),
            "frozen.fine": torch.randn(16, 16, generator=_gen(16), dtype=torch.float64).float(),
            "steps": torch.tensor([10 * i, 7], dtype=torch.int32),
            "frozen.steps": torch.arange(6, dtype=torch.int16),
            "w.weight": (base + 0.01 * torch.randn(24, 16, generator=g, dtype=torch.float64)).float(),
        }
    return models


def f8_appended(first: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A fifth model whose frozen tensors changed: float8 and integer ones need ``replace``; a
    change of one magnitude per row with random signs is held exactly by a 1-bit correction, a
    ternary one by 2 bits, a dense random one only by float16 (the budget is 1e-5)."""
    g = _gen(17)
    sd = {k: v.clone() for k, v in first.items()}
    sd["frozen.e4m3"] = (first["frozen.e4m3"].float() * 0.5).to(torch.float8_e4m3fn)
    sd["frozen.e5m2"] = (first["frozen.e5m2"].float() + 64).to(torch.float8_e5m2)
    sd["frozen.steps"] = torch.arange(6, 12, dtype=torch.int16)
    sign = torch.randint(0, 2, (8, 32), generator=g).double() * 2 - 1
    sd["frozen.sign"] = (first["frozen.sign"].double() + 2.0 ** -6 * sign).float()
    tern = torch.randint(-1, 2, (8, 32), generator=g).double()
    sd["frozen.ternary"] = (first["frozen.ternary"].double() + 2.0 ** -6 * tern).float()
    sd["frozen.fine"] = (first["frozen.fine"].double() + 1e-2 * torch.randn(16, 16, generator=g, dtype=torch.float64)).float()
    return sd


def _relabel_sources(path: str) -> None:
    """Record the temporary source files by their file names, not by the generating machine's
    paths (``source`` is informative, §3.6): rewrite the committed root zarr.json atomically."""
    import json

    root_file = os.path.join(path, "zarr.json")
    with open(root_file) as f:
        root = json.load(f)
    for mod in root["attributes"]["uws"]["models"]:
        if mod["source"].get("path"):
            mod["source"]["path"] = os.path.basename(mod["source"]["path"])
    with open(root_file + ".tmp", "w") as f:
        json.dump(root, f, indent=2)
    os.replace(root_file + ".tmp", root_file)


def _write_expected(store, out_dir: str) -> None:
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    lora = [e["name"] for e in store.manifest["tensors"] if e.get("lora")]
    for i, mid in enumerate(store.model_ids):
        sd = store.state_dict(i)
        if lora:  # LoRA product mode: the normative value is the dense update of §6.3, not the factors
            sd = {k: v for k, v in sd.items() if k not in {n for e in store.manifest["tensors"] if e.get("lora")
                                                           for n in (e["lora"]["a"], e["lora"]["b"], e["lora"]["alpha"])}}
            sd.update({name: store.tensor(i, name) for name in lora})
        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(out_dir, f"{i}.safetensors"),
                  metadata={"uws.model_index": str(i), "uws.model_id": mid})


def build(out_dir: str = HERE) -> dict[str, str]:
    """Write both stores and ``expected/`` under ``out_dir``; return {store name: path}."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny GEMMs: threads only add contention, and one thread is reproducible
    try:
        return _build(out_dir)
    finally:
        torch.set_num_threads(threads)


def _build(out_dir: str) -> dict[str, str]:
    import tempfile

    import uwsfmt

    paths = {name: os.path.join(out_dir, f"{name}.uws") for name in STORES}
    expected = os.path.join(out_dir, "expected")
    shutil.rmtree(expected, ignore_errors=True)

    fam = family()
    store = uwsfmt.convert(fam, paths["example"], max_error=MAX_ERROR, min_numel=64, device="cpu", overwrite=True)
    store.append(appended(fam[MODEL_IDS[0]]), id=APPENDED_ID)
    store.close()
    flat = uwsfmt.convert(flat_family(), paths["example-flat"], mode="flat", rank=3, center="none", min_numel=64,
                          device="cpu", overwrite=True)
    flat.close()
    half = uwsfmt.convert(half_family(), paths["example-half"], rank=2, residual_bits=4, mean_dtype="float16", min_numel=64,
                          device="cpu", overwrite=True)
    half.close()
    for bits, (shapes, dts) in RESIDUAL_STORES.items():
        st = uwsfmt.convert(residual_family(bits, shapes, dts), paths[f"example-r{bits}"], rank=1, residual_bits=bits,
                            min_numel=64, device="cpu", overwrite=True)
        st.close()
    with tempfile.TemporaryDirectory() as tmp:
        # product mode: float16 factors, ranks 4 and 8, adapter 3 lacks the text-encoder module,
        # rank 3 bases (a truncation for every adapter)
        src = lora_files(os.path.join(tmp, "product"), (4, 8, 4, 6), torch.float16,
                         lacking={3: "lora_te_text_model_encoder_layers_0_mlp_fc1"})
        st = uwsfmt.convert(src, paths["example-lora"], rank=3, lora_mode="product", device="cpu", overwrite=True)
        st.close()
        # factors mode: float32 factors of one rank, so A and B are subspace tensors of their own
        src = lora_files(os.path.join(tmp, "factors"), (4, 4, 4, 4), torch.float32)
        st = uwsfmt.convert(src, paths["example-lora-factors"], rank=2, lora_mode="factors", min_numel=64, device="cpu",
                            overwrite=True)
        st.close()
    for name in ("example-lora", "example-lora-factors"):
        _relabel_sources(paths[name])
    st = uwsfmt.convert(residual_family(4, *TALL_STORE), paths["example-tall"], rank=1, residual_bits=4, min_numel=64,
                        device="cpu", overwrite=True)
    st.close()
    st = uwsfmt.convert(qcoef_family(), paths["example-qcoef"], rank=8, coefficient_bits="8/4/2", residual_bits=2,
                        min_numel=64, device="cpu", overwrite=True)
    st.close()
    fam8 = f8_family()
    st = uwsfmt.convert(fam8, paths["example-f8"], max_error=MAX_ERROR, min_numel=64, device="cpu", overwrite=True)
    st.append(f8_appended(fam8["f8-0"]), id="f8-appended")
    st.close()
    for name, path in paths.items():
        lock = os.path.join(path, ".uws.lock")  # the appenders' lock file is not part of the store
        if os.path.exists(lock):
            os.remove(lock)
        with uwsfmt.open(path) as st:
            _write_expected(st, os.path.join(expected, name))
    check_coverage(paths)
    return paths


def coverage(paths: dict[str, str]) -> set[str]:
    """The spec features the stores exercise (read from their manifests, not from this script)."""
    import uwsfmt

    have: set[str] = set()
    for path in paths.values():
        with uwsfmt.open(path) as st:
            m = st.manifest
            for e in m["tensors"]:
                enc = e["encoding"]
                have.add(f"encoding:{enc}")
                have.add(f"dtype:{e['dtype']}")
                if e["shape"] == []:
                    have.add(f"0-d:{enc}")
                if enc == "subspace":
                    have.add(f"mode:{e['mode']}")
                    have.add("mean" if e["mean"] else "no-mean")
                    if e["mean"]:
                        have.add(f"mean:{st.array(e['mean']).dtype}:{e['dtype']}")
                    if 0 in e["rank"]:
                        have.add("rank-0")
                    if e["residual"]:
                        have.add(f"residual:{e['residual']['bits']}" + (":rank-0" if 0 in e["rank"] else ""))
                        if e["residual"]["bits"] != 16:
                            have.add(f"residual:axis:{e['residual'].get('axis', 0)}")
                    if "bits" in e["coefficients"]:
                        have.add(f"coefficients:axis:{e['coefficients']['axis']}")
                        have.update(f"coefficients:bits:{b}" for _, b in e["coefficients"]["bits"])
                    if len(e["shape"]) > 2:
                        have.add("view:conv")
                    have.add(f"subspace-dtype:{e['dtype']}")
                    if e.get("lora"):
                        have.add("lora:product")
                        if len(e["lora"]["a_tail"]) > 1:
                            have.add("lora:conv")
                        if e["lora"].get("alpha"):
                            have.add("lora:alpha")
                elif enc == "dense":
                    have.add("dense:per-model" if e["data"].get("per_model") else f"dense:pack:{e['data']['pack']}")
                if "%" in e["node"]:
                    have.add("node:escaped")
                if "~" in e["node"]:
                    have.add("node:suffixed" if len(e["node"]) < 120 else "node:hashed")
            for x in (x for mod in m["models"] for x in mod.get("exceptions") or ()):
                e = st.tensor_entry(x["tensor"])
                have.add(f"exception:{x['kind']}:{e['encoding']}")
                have.add(f"exception:{x['kind']}:{x.get('bits') or e['dtype']}")
            for mod in m["models"]:
                adapter = mod.get("adapter") or {}
                if 0 in (adapter.get("ranks") or ()):
                    have.add("lora:rank-0")
                if adapter.get("scales"):
                    have.add("lora:factors")
    return have


#: what the examples must keep covering when they are regenerated
REQUIRED = {
    "mode:left", "mode:right", "mode:both", "mode:flat", "mean", "no-mean", "residual:4", "residual:8:rank-0",
    "view:conv", "subspace-dtype:bfloat16", "subspace-dtype:float16", "subspace-dtype:float64", "encoding:shared",
    "0-d:shared", "0-d:dense", "dense:per-model", "dense:pack:float32", "dense:pack:uint16", "dense:pack:float16",
    "dense:pack:int64", "dense:pack:bool", "node:escaped", "node:suffixed", "node:hashed",
    "exception:correct:subspace", "exception:correct:shared", "exception:replace:shared",
    "mean:float16:float32", "mean:float16:bfloat16", "mean:float16:float64", "mean:float32:float32", "mean:float32:bfloat16",
    "residual:1", "residual:2", "residual:16", "lora:product", "lora:conv", "lora:alpha", "lora:rank-0", "lora:factors",
    "dtype:float8_e4m3fn", "dtype:float8_e5m2", "exception:replace:float8_e4m3fn", "exception:replace:float8_e5m2",
    "exception:replace:int16", "exception:correct:1", "exception:correct:2", "exception:correct:16", "exception:correct:4",
    "exception:correct:8", "coefficients:axis:0", "coefficients:axis:1", "coefficients:bits:8", "coefficients:bits:4",
    "coefficients:bits:2", "residual:axis:0", "residual:axis:1",
}


def check_coverage(paths: dict[str, str]) -> None:
    missing = REQUIRED - coverage(paths)
    if missing:
        raise RuntimeError(f"the examples no longer cover {sorted(missing)}: the converter's choices changed; "
                           "adjust the families in make_example.py")


if __name__ == "__main__":
    for name, path in build(sys.argv[1] if len(sys.argv) > 1 else HERE).items():
        print(name, path)
