"""The generated families have the structure their docstrings promise."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from bench.trained import trained_family
from uwsfmt.errors import ConfigError, NotFoundError
from uwsfmt.testing.families import (
    iter_vit_like_family,
    lora_family,
    lora_key,
    synthetic_family,
    synthetic_family_truth,
    vit_like_family,
    write_family,
    write_peft_family,
)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[m].keys() == b[m].keys()
        and all(a[m][k].dtype == b[m][k].dtype and torch.equal(a[m][k], b[m][k]) for k in a[m])
        for m in a
    )


def _centred(family: dict, name: str, matrix_shape: tuple[int, int]) -> torch.Tensor:
    w = torch.stack([sd[name].double().reshape(matrix_shape) for sd in family.values()])
    return w - w.mean(dim=0)


# ---------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_prefix_stable():
    a = synthetic_family(n_models=4, seed=7)
    assert _same(a, synthetic_family(n_models=4, seed=7))
    other = synthetic_family(n_models=4, seed=8)
    assert not torch.equal(a["model-000"]["conv.weight"], other["model-000"]["conv.weight"])
    bigger = synthetic_family(n_models=6, seed=7)
    assert _same(a, {k: bigger[k] for k in a})


@pytest.mark.parametrize("n_models,rank", [(8, 4), (3, 4), (6, 5)])
def test_synthetic_centred_deltas_have_the_stated_rank(n_models, rank):
    fam, truth = synthetic_family(n_models=n_models, rank=rank, return_truth=True)
    assert truth.model_ids == tuple(fam)
    for name, t in truth.tensors.items():
        assert t.flat_rank == min(rank, n_models - 1)
        assert t.mode_rank == rank
        d = _centred(fam, name, t.matrix_shape)
        # flat PCA: models x (m*n)
        s = torch.linalg.svdvals(d.reshape(n_models, -1))
        assert int((s > 1e-5 * s[0]).sum()) == t.flat_rank
        torch.testing.assert_close(s[: t.flat_rank], t.flat_singular_values()[: t.flat_rank],
                                   rtol=1e-5, atol=0)
        # left mode: m x (models*n); its column space is span(left)
        u, s, _ = torch.linalg.svd(torch.cat(list(d), dim=1), full_matrices=False)
        assert int((s > 1e-5 * s[0]).sum()) == t.mode_rank
        torch.testing.assert_close(s[:rank], t.mode_singular_values(), rtol=1e-5, atol=0)
        cosines = torch.linalg.svdvals(u[:, :rank].T @ t.left)
        assert cosines.min() > 1 - 1e-8
        # right mode: n x (models*m), column space span(right)
        v = torch.linalg.svd(torch.cat([x.T for x in d], dim=1), full_matrices=False)[0]
        assert torch.linalg.svdvals(v[:, :rank].T @ t.right).min() > 1 - 1e-8


def test_synthetic_noise_free_tail_energy_is_exact():
    fam, truth = synthetic_family(n_models=10, rank=6, return_truth=True, extra=False)
    t = truth.tensors["blocks.0.attn.qkv.weight"]
    s2 = torch.linalg.svdvals(_centred(fam, t.name, t.matrix_shape).reshape(10, -1)) ** 2
    for k in range(7):
        assert t.tail_energy(k) == pytest.approx(float(s2[k:].sum() / s2.sum()), abs=1e-6)
    assert t.tail_energy(6) < 1e-12
    assert t.tail_energy(0, "left") == 1.0


def test_synthetic_noisy_tail_energy_matches_projection_on_true_basis():
    fam, truth = synthetic_family(n_models=10, rank=6, noise=0.01, return_truth=True, seed=3)
    t = truth.tensors["blocks.0.mlp.fc1.weight"]
    d = _centred(fam, t.name, t.matrix_shape)
    h = torch.cat(list(d), dim=1)
    order = t.centred_coefficients.norm(dim=0).argsort(descending=True)
    for k in (2, 4, 6):
        left = t.left[:, order[:k]]
        measured = float((h - left @ (left.T @ h)).norm() ** 2 / h.norm() ** 2)
        assert measured == pytest.approx(t.tail_energy(k, "left"), rel=0.05)


def test_synthetic_extra_tensors():
    fam = synthetic_family(n_models=5)
    sds = list(fam.values())
    for sd in sds[1:]:
        assert torch.equal(sd["embed.frozen.weight"], sds[0]["embed.frozen.weight"])
        assert torch.equal(sd["position_ids"], sds[0]["position_ids"])
        assert not torch.equal(sd["blocks.0.attn.qkv.bias"], sds[0]["blocks.0.attn.qkv.bias"])
        assert not torch.equal(sd["blocks.0.norm1.weight"], sds[0]["blocks.0.norm1.weight"])
        assert not torch.equal(sd["blocks.0.mlp.keep_mask"], sds[0]["blocks.0.mlp.keep_mask"])
    assert sds[0]["position_ids"].dtype == torch.int64
    assert sds[0]["blocks.0.mlp.keep_mask"].dtype == torch.bool
    assert sds[0]["blocks.0.norm1.weight"].mean().item() == pytest.approx(1.0, abs=0.05)
    truth = synthetic_family_truth(n_models=5)
    assert set(truth.shared) == {"embed.frozen.weight", "position_ids"}
    assert set(truth.tensors) | set(truth.shared) | set(truth.dense) == set(sds[0])
    assert set(synthetic_family(2, extra=False)["model-000"]) == set(truth.tensors)


def test_synthetic_dtypes_shapes_and_scale():
    fam = synthetic_family(3, shapes={"w": (40, 20)}, dtype=torch.bfloat16, delta_scale=0.1)
    w = [sd["w"] for sd in fam.values()]
    assert all(x.dtype == torch.bfloat16 and x.shape == (40, 20) for x in w)
    assert fam["model-000"]["embed.frozen.weight"].dtype == torch.bfloat16
    assert fam["model-000"]["position_ids"].dtype == torch.int64
    fam = synthetic_family(n_models=64, shapes={"w": (40, 20)}, extra=False, delta_scale=0.1)
    d = torch.stack([sd["w"] for sd in fam.values()])
    rms = (d - d.mean(0)).pow(2).mean().sqrt().item()
    assert 0.07 < rms < 0.13  # expected delta RMS = delta_scale


def test_synthetic_truth_without_models_matches_returned_truth():
    _, t1 = synthetic_family(n_models=4, seed=2, return_truth=True)
    t2 = synthetic_family_truth(n_models=4, seed=2)
    for name in t1.tensors:
        assert torch.equal(t1.tensors[name].left, t2.tensors[name].left)
        assert torch.equal(t1.tensors[name].coefficients, t2.tensors[name].coefficients)


def test_synthetic_bad_arguments_raise_config_error():
    with pytest.raises(ConfigError, match="2\\+ dimensions"):
        synthetic_family(shapes={"bias": (4,)})
    with pytest.raises(ConfigError, match="reserved"):
        synthetic_family(shapes={"position_ids": (4, 4)})
    with pytest.raises(ConfigError, match="n_models"):
        synthetic_family(n_models=0)


# ---------------------------------------------------------------- ViT-like


def test_vit_like_shapes_iterator_and_truth():
    kw = dict(blocks=2, width=16, rank=3, image_size=32, seed=1)
    fam, truth = vit_like_family(3, return_truth=True, **kw)
    sd = fam["model-002"]
    assert sd["blocks.1.attn.qkv.weight"].shape == (48, 16)
    assert sd["blocks.1.attn.proj.weight"].shape == (16, 16)
    assert sd["blocks.0.mlp.fc1.weight"].shape == (64, 16)
    assert sd["blocks.0.mlp.fc2.weight"].shape == (16, 64)
    assert sd["patch_embed.proj.weight"].shape == (16, 3, 16, 16)
    assert sd["pos_embed"].shape == (1, 5, 16)
    assert {"blocks.1.norm2.weight", "blocks.1.mlp.fc2.bias", "norm.bias"} <= set(sd)
    assert _same(fam, dict(iter_vit_like_family(3, **kw)))
    t = truth.tensors["blocks.1.mlp.fc1.weight"]
    assert t.rank == 3 and 0 < t.tail_energy(3, "left") < 0.2


def test_vit_like_iterator_is_lazy():
    it = iter_vit_like_family(10**6, blocks=1, width=8, image_size=16)
    assert next(it)[0] == "model-000000"


# ---------------------------------------------------------------- LoRA


def test_lora_shapes_names_and_shared_structure():
    fam = lora_family(4, layers=2, width=64, rank=8, shared_rank=3, seed=5)
    assert list(fam) == ["adapter-000", "adapter-001", "adapter-002", "adapter-003"]
    sd = fam["adapter-001"]
    assert len(sd) == 2 * 4 * 2
    a, b = sd[lora_key(1, "o_proj", "A")], sd[lora_key(1, "o_proj", "B")]
    assert a.shape == (8, 64) and b.shape == (64, 8)
    expected = "base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"
    assert lora_key(1, "o_proj", "A") == expected
    # A shares its init: adapters differ only by a small drift
    a0 = fam["adapter-000"][lora_key(1, "o_proj", "A")]
    assert 0 < (a - a0).norm() < 0.2 * a0.norm()
    # all B's columns live (up to noise) in one shared 3-dim subspace
    bs = torch.cat([f[lora_key(0, "q_proj", "B")] for f in fam.values()], dim=1).double()
    s = torch.linalg.svdvals(bs)
    assert s[3] < 0.2 * s[2]
    assert _same(fam, lora_family(4, layers=2, width=64, rank=8, shared_rank=3, seed=5))


def test_lora_null_variants():
    fam = lora_family(3, layers=1, modules=("q_proj",), width=32, rank=4,
                      shared_rank=0, shared_init=False, dtype=torch.float16)
    a = [sd[lora_key(0, "q_proj", "A")] for sd in fam.values()]
    assert a[0].dtype == torch.float16
    assert (a[1] - a[0]).norm() > 0.5 * a[0].norm()


# ---------------------------------------------------------------- writing


def test_write_family_streams_loadable_safetensors(tmp_path):
    fam = synthetic_family(n_models=3)
    paths = write_family(iter(fam.items()), tmp_path / "out")
    assert [p.name for p in paths] == [f"{m}.safetensors" for m in fam]
    assert _same(fam, {p.stem: load_file(p) for p in paths})
    pt = write_family(fam, tmp_path / "pt", fmt="pt")
    assert _same(fam, {p.stem: torch.load(p, weights_only=True) for p in pt})
    with pytest.raises(ConfigError, match="safe file name"):
        write_family({"../evil": fam["model-000"]}, tmp_path)


def test_write_peft_family(tmp_path):
    fam = lora_family(2, layers=1, modules=("q_proj", "v_proj"), width=16, rank=4)
    dirs = write_peft_family(fam, tmp_path, alpha=8)
    config = json.loads((dirs[0] / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert _same(fam, {d.name: load_file(d / "adapter_model.safetensors") for d in dirs})


# ---------------------------------------------------------------- trained


@pytest.fixture(scope="module")
def trained():
    return trained_family(n_tasks=4, seed=0)


def test_trained_family_is_accurate_and_diverse(trained):
    accs = trained.accuracies()
    assert list(accs) == ["task-000", "task-001", "task-002", "task-003"]
    assert min(accs.values()) > 85
    names = set(trained.base)
    assert all(set(sd) == names for sd in trained.state_dicts.values())
    sds = list(trained.state_dicts.values())
    for name in names:
        shapes = {sd[name].shape for sd in sds}
        assert len(shapes) == 1
        # every layer is fine-tuned, and every model differs from the others
        for i, sd in enumerate(sds):
            assert not torch.equal(sd[name], trained.base[name])
            assert all(not torch.equal(sd[name], other[name]) for other in sds[i + 1:])
    # the fine-tunes are task-specific: one model is poor on another's task
    assert trained.evaluate("task-001", trained.state_dicts["task-000"]) < 50


def test_trained_family_is_deterministic_and_evaluates_any_dtype(trained):
    again = trained_family(n_tasks=4, seed=0)
    assert _same(trained.state_dicts, again.state_dicts)
    sd16 = {k: v.to(torch.bfloat16) for k, v in trained.state_dicts["task-002"].items()}
    assert trained.evaluate("task-002", sd16) > 80
    x, y = trained.task_data("task-002", "train")
    assert x.shape == (len(y), trained.n_features)
    with pytest.raises(NotFoundError):
        trained.evaluate("task-999", sd16)


def test_trained_family_leaves_global_torch_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    trained_family(n_tasks=1, base_epochs=1, finetune_epochs=1)
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("dataset", ["wine", "breast_cancer"])
def test_trained_family_tabular_variants(dataset):
    fam = trained_family(n_tasks=3, dataset=dataset)
    assert min(fam.accuracies().values()) > 85
    assert fam.tasks["task-000"].startswith(dataset)
