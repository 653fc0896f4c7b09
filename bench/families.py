"""Really-trained families for the rate-distortion benchmark, each with held-out members.

Every family is one pretrained base on scikit-learn's digits (8x8 images) and one fine-tune per
task; the first ``n_tasks`` members go into the build, the last ``n_held_out`` (more tasks from
the same distribution) are appended afterwards, as a new fine-tune would be. Families:

- :func:`transformer_family`: a small pre-LN transformer classifier (image rows as 8 tokens,
  learned positions, ``depth`` blocks of fused-qkv attention + MLP, LayerNorms, a head).
- :func:`conv_family`: a small CNN (three 3x3 convolutions, a hidden linear layer and a head).
- :func:`mlp_family`: the MLP family of :func:`bench.trained.trained_family`.
- :func:`lora_family`: PEFT LoRA adapters of the transformer's linear layers.
- :func:`synthetic_bench_family`: synthetic shared-subspace or i.i.d. deltas (no training).

A task (:class:`DigitsTask`) is one orientation of the images (rotation / flip), a shift by at
most one pixel and a permutation of the ten labels, all drawn per task from a keyed generator,
so members differ everywhere while sharing one starting point. Everything is deterministic
(seeded, single-threaded torch; the caller's RNG state and thread count are restored).

Each family has ``members`` / ``held_out`` (``{model_id: state_dict}``), ``sources`` /
``held_out_sources`` (what ``uwsfmt.convert`` / ``Store.append`` take: the same state dicts, or
PEFT adapter folders), ``evaluate(model_id, state_dict) -> score`` (held-out accuracy in %, higher
is better) and ``read_back(store, model_id)``, which gives what ``evaluate`` takes from a store.

>>> fam = transformer_family(n_tasks=2, n_held_out=1, base_epochs=1, finetune_epochs=1)
>>> sorted(fam.members), sorted(fam.held_out)
(['task-000', 'task-001'], ['task-002'])
>>> 0.0 <= fam.evaluate("task-002", fam.held_out["task-002"]) <= 100.0
True
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from bench.trained import private_torch_state, train, trained_family
from uwsfmt.testing.families import keyed_generator, model_ids, synthetic_family

StateDict = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class DigitsTask:
    """One fine-tuning task on 8x8 digits: orientation (0..7), a shift and a label permutation."""

    orientation: int  # dihedral transform: rotation by 90 * (k % 4) degrees, flipped when k >= 4
    shift: tuple[int, int]  # (rows, columns) moved, zeros shifted in
    label_map: torch.Tensor  # new label of each original class

    @property
    def description(self) -> str:
        flip = " + flip" if self.orientation >= 4 else ""
        labels = ",".join(str(int(c)) for c in self.label_map)
        return f"digits rotated {90 * (self.orientation % 4)} deg{flip}, shifted {self.shift}; label c -> [{labels}][c]"

    def apply(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        img = x.reshape(-1, 8, 8)
        img = torch.rot90(img, self.orientation % 4, dims=(1, 2))
        if self.orientation >= 4:
            img = img.flip(2)
        img = _shifted(img, *self.shift)
        return img.reshape(x.shape[0], 64).contiguous(), self.label_map[y]


def _shifted(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    out = torch.zeros_like(img)
    h, w = img.shape[1:]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = img[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def digits_tasks(n: int, seed: int) -> dict[str, DigitsTask]:
    """``n`` tasks ``task-000``...: orientation ``t % 8``, shift and permutation drawn per task."""
    tasks = {}
    for t, mid in enumerate(model_ids("task", n)):
        g = keyed_generator(seed, "rd-task", t)
        shift = tuple(int(v) for v in torch.randint(-1, 2, (2,), generator=g))
        tasks[mid] = DigitsTask(t % 8, (shift[0], shift[1]), torch.randperm(10, generator=g))
    return tasks


@dataclass(frozen=True)
class DigitsData:
    """The digits train / test split (inputs scaled to [0, 1], float32; labels int64)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @classmethod
    def load(cls, seed: int, test_fraction: float = 0.3) -> DigitsData:
        from sklearn import datasets
        from sklearn.model_selection import train_test_split

        d = datasets.load_digits()
        x_tr, x_te, y_tr, y_te = train_test_split(d.data, d.target, test_size=test_fraction, random_state=seed % 2**32,
                                                  stratify=d.target)
        f = lambda a: torch.tensor(a, dtype=torch.float32) / 16.0  # noqa: E731
        return cls(f(x_tr), torch.tensor(y_tr), f(x_te), torch.tensor(y_te))

    def all_orientations(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The training split in all 8 orientations with the true labels (the base's pretraining)."""
        xs = [DigitsTask(k, (0, 0), torch.arange(10)).apply(self.x_train, self.y_train)[0] for k in range(8)]
        return torch.cat(xs), self.y_train.repeat(8)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy (%) of ``model`` on ``(x, y)``."""
    model.eval()
    with torch.no_grad():
        return 100.0 * (model(x).argmax(dim=1) == y).double().mean().item()


# ---------------------------------------------------------------------------- architectures


class Block(nn.Module):
    """A pre-LN transformer block: fused-qkv self-attention and a GELU MLP, each residual."""

    def __init__(self, width: int, heads: int, mlp: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, mlp)
        self.fc2 = nn.Linear(mlp, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        # written out (not scaled_dot_product_attention) so that torch.func.vmap batches it
        att = torch.softmax(q @ k.transpose(-2, -1) * (w // self.heads) ** -0.5, dim=-1) @ v
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, w))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class DigitsTransformer(nn.Module):
    """8x8 digits as 8 tokens (one per image row) -> ``depth`` pre-LN blocks -> LayerNorm -> mean -> head.

    State dict names: ``embed``, ``pos``, ``blocks.<i>.{norm1,qkv,proj,norm2,fc1,fc2}``, ``norm``, ``head``.
    """

    def __init__(self, width: int = 64, depth: int = 2, heads: int = 4, mlp: int = 128, n_classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.pos = nn.Parameter(0.02 * torch.randn(8, width))
        self.blocks = nn.ModuleList(Block(width, heads, mlp) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.reshape(-1, 8, 8)) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(dim=1))


class DigitsCNN(nn.Module):
    """Three 3x3 convolutions (ReLU; 2x2 max-pool after the 2nd and 3rd) -> hidden linear -> head.

    State dict names: ``conv1``, ``conv2``, ``conv3``, ``fc``, ``head`` (``.weight``/``.bias``).
    """

    def __init__(self, channels: int = 32, hidden: int = 128, n_classes: int = 10):
        super().__init__()
        c = channels
        self.conv1 = nn.Conv2d(1, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, 2 * c, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * c, 2 * c, 3, padding=1)
        self.fc = nn.Linear(2 * c * 4, hidden)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x.reshape(-1, 1, 8, 8)))
        h = nn.functional.max_pool2d(torch.relu(self.conv2(h)), 2)
        h = nn.functional.max_pool2d(torch.relu(self.conv3(h)), 2)
        return self.head(torch.relu(self.fc(h.flatten(1))))


# ---------------------------------------------------------------------------- families


@dataclass
class BenchFamily:
    """A family for the rate-distortion benchmark: members built into a store, held-out members
    appended afterwards, and a score (higher is better) for any state dict of any of them."""

    name: str
    metric: str  # what evaluate returns, e.g. "accuracy (%)"
    members: dict[str, StateDict]
    held_out: dict[str, StateDict]
    score: Callable[[str, Mapping[str, torch.Tensor]], float] = field(repr=False)
    description: str = ""
    sources: object = None  # what convert() takes; default: members
    held_out_sources: dict[str, object] | None = None  # model id -> what append() takes; default: held_out
    source_bytes: int | None = None  # default: the state dicts as safetensors files
    reader: Callable[[object, str], Mapping[str, torch.Tensor]] | None = field(default=None, repr=False)
    train_seconds: dict[str, float] = field(default_factory=dict)  # where building the family went

    def __post_init__(self) -> None:
        if self.sources is None:
            self.sources = self.members
        if self.held_out_sources is None:
            self.held_out_sources = dict(self.held_out)

    def evaluate(self, model_id: str, state_dict: Mapping[str, torch.Tensor]) -> float:
        """Score of ``state_dict`` on ``model_id``'s task (e.g. held-out accuracy in %)."""
        return self.score(model_id, state_dict)

    def read_back(self, store, model_id: str) -> Mapping[str, torch.Tensor]:
        """What :meth:`evaluate` takes, read from a store (default: ``store.state_dict``)."""
        return self.reader(store, model_id) if self.reader else store.state_dict(model_id)

    @property
    def all_models(self) -> dict[str, StateDict]:
        return {**self.members, **self.held_out}


def train_together(forward: Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor],
                   stacked: Mapping[str, torch.Tensor], xs: torch.Tensor, ys: torch.Tensor,
                   epochs: int, lr: float, batch: int, gens: list[torch.Generator]) -> dict[str, torch.Tensor]:
    """Train T copies of a model at once; the trained values of ``stacked``, (T, ...) each.

    ``forward(params, x)`` is one copy's logits for a batch ``x`` given its trained parameters
    (everything else it closes over, shared and frozen); ``stacked`` holds their initial
    values, stacked over the copies. Copy ``t`` sees ``(xs[t], ys[t])`` in the order ``gens[t]``
    draws each epoch. One Adam over the stacked tensors is T independent Adams (it is elementwise
    and each copy's loss only reaches its own slice), so this trains exactly what T separate
    loops would, with T times fewer (and larger) operations: on a small CPU the per-operation
    overhead is what costs.
    """
    from torch.func import vmap

    params = {k: v.detach().clone().requires_grad_() for k, v in stacked.items()}
    opt = torch.optim.Adam(params.values(), lr=lr)
    batched = vmap(forward)
    n_copies, n = ys.shape
    for _ in range(epochs):
        orders = torch.stack([torch.randperm(n, generator=g) for g in gens])
        for start in range(0, n, batch):
            idx = orders[:, start:start + batch]
            x = torch.gather(xs, 1, idx[..., None].expand(-1, -1, xs.shape[-1]))
            logits = batched(params, x)
            loss = n_copies * nn.functional.cross_entropy(logits.flatten(0, 1), torch.gather(ys, 1, idx).flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return {k: v.detach() for k, v in params.items()}


def functional(model: nn.Module) -> Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]:
    """``forward(params, x)`` of ``model`` for :func:`train_together`: ``params`` replaces the
    parameters it names; the others (and the buffers) are ``model``'s own, frozen."""
    from torch.func import functional_call

    fixed = {k: v.detach() for k, v in [*model.named_parameters(), *model.named_buffers()]}
    return lambda p, x: functional_call(model, ({k: v for k, v in fixed.items() if k not in p}, p), (x,))


def task_inputs(tasks: Mapping[str, DigitsTask], data: DigitsData, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Every task's view of a split, stacked: inputs (T, N, 64) and labels (T, N)."""
    x, y = (data.x_train, data.y_train) if split == "train" else (data.x_test, data.y_test)
    views = [t.apply(x, y) for t in tasks.values()]
    return torch.stack([v[0] for v in views]), torch.stack([v[1] for v in views])


def _finetuned_family(name: str, make: Callable[[], nn.Module], n_tasks: int, n_held_out: int, seed: int,
                      base_epochs: int, finetune_epochs: int, lr: float, finetune_lr: float, description: str
                      ) -> tuple[BenchFamily, StateDict, dict[str, DigitsTask], DigitsData]:
    """Pretrain ``make()`` on every orientation, then fine-tune all of it on each task."""
    data = DigitsData.load(seed)
    tasks = digits_tasks(n_tasks + n_held_out, seed)
    t0 = time.perf_counter()
    with private_torch_state(seed):
        model = make()
        xb, yb = data.all_orientations()
        train(model, xb, yb, base_epochs, lr, 128, keyed_generator(seed, name, "base-order"))
        base = {k: v.detach().clone() for k, v in model.state_dict().items()}
        t1 = time.perf_counter()
        xs, ys = task_inputs(tasks, data)
        trained = train_together(functional(model), {k: v.expand(len(tasks), *v.shape) for k, v in model.named_parameters()},
                                 xs, ys, finetune_epochs, finetune_lr, 64,
                                 [keyed_generator(seed, name, "order", t) for t in range(len(tasks))])
        tuned = {mid: {k: (trained[k][t] if k in trained else v).clone() for k, v in base.items()}
                 for t, mid in enumerate(tasks)}
    with private_torch_state(seed):
        scratch = make()

    def score(model_id: str, sd: Mapping[str, torch.Tensor]) -> float:
        scratch.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()})
        x, y = tasks[model_id].apply(data.x_test, data.y_test)
        return accuracy(scratch, x, y)

    ids = list(tuned)
    fam = BenchFamily(name, "accuracy (%)", {m: tuned[m] for m in ids[:n_tasks]}, {m: tuned[m] for m in ids[n_tasks:]},
                      score, description, train_seconds={"base": t1 - t0, "fine-tunes": time.perf_counter() - t1})
    return fam, base, tasks, data


def transformer_family(n_tasks: int = 40, n_held_out: int = 8, seed: int = 0, *, width: int = 64, depth: int = 2,
                       heads: int = 4, mlp: int = 128, base_epochs: int = 3, finetune_epochs: int = 5,
                       lr: float = 3e-3, finetune_lr: float = 2e-3) -> BenchFamily:
    """Full fine-tunes of a small pretrained transformer (:class:`DigitsTransformer`), one per task.

    The base trains ``base_epochs`` on every orientation (Adam, ``lr``, batch 128); each member
    fine-tunes every parameter for ``finetune_epochs`` (Adam, ``finetune_lr``, batch 64). The
    family also keeps ``base`` / ``make_model`` / ``tasks`` / ``data`` as attributes for
    :func:`lora_family`. 40 + 8 members at width 64 take about a minute on one core.
    """
    def make() -> nn.Module:
        return DigitsTransformer(width, depth, heads, mlp)

    desc = f"pre-LN transformer, width {width}, {depth} blocks, {heads} heads, MLP {mlp}; full fine-tunes"
    fam, base, tasks, data = _finetuned_family("transformer", make, n_tasks, n_held_out, seed, base_epochs, finetune_epochs,
                                               lr, finetune_lr, desc)
    fam.base, fam.make_model, fam.tasks, fam.data = base, make, tasks, data  # type: ignore[attr-defined]
    return fam


def conv_family(n_tasks: int = 40, n_held_out: int = 8, seed: int = 0, *, channels: int = 16, hidden: int = 128,
                base_epochs: int = 3, finetune_epochs: int = 5, lr: float = 3e-3, finetune_lr: float = 2e-3) -> BenchFamily:
    """Full fine-tunes of a small pretrained CNN (:class:`DigitsCNN`), one per task (as for the transformer)."""
    def make() -> nn.Module:
        return DigitsCNN(channels, hidden)

    desc = f"CNN, {channels}-{2 * channels}-{2 * channels} channels, hidden {hidden}; full fine-tunes"
    return _finetuned_family("conv", make, n_tasks, n_held_out, seed, base_epochs, finetune_epochs, lr, finetune_lr, desc)[0]


def mlp_family(n_tasks: int = 40, n_held_out: int = 8, seed: int = 0, *, hidden: int = 256, **kw) -> BenchFamily:
    """:func:`bench.trained.trained_family` on digits with ``n_tasks + n_held_out`` tasks; the last
    ``n_held_out`` are held out (its tasks: orientation and label permutation, no shift)."""
    tf = trained_family(n_tasks=n_tasks + n_held_out, hidden=hidden, seed=seed, **kw)
    ids = list(tf.state_dicts)
    return BenchFamily("mlp", "accuracy (%)", {m: tf.state_dicts[m] for m in ids[:n_tasks]},
                       {m: tf.state_dicts[m] for m in ids[n_tasks:]}, tf.evaluate,
                       f"MLP 64-{hidden}-{hidden}-10 with LayerNorm; full fine-tunes")


#: the transformer's linear layers that get a LoRA adapter
LORA_MODULES = ("qkv", "proj", "fc1", "fc2", "head")


def lora_family(base: BenchFamily, workdir: str, rank: int = 8, epochs: int = 6, lr: float = 1e-2, seed: int = 0
                ) -> BenchFamily:
    """PEFT LoRA adapters (rank ``rank``, alpha ``2 * rank``) of the linear layers of
    ``base``'s pretrained transformer (:func:`transformer_family`), one per task of ``base`` (the
    same tasks and held-out split), saved with ``save_pretrained`` under ``workdir/<task>``.

    Members are the adapters' state dicts (their ``adapter_model.safetensors``); sources are the
    folders. ``evaluate`` takes adapter factors (``...lora_A.weight`` / ``...lora_B.weight``)
    or dense updates ``s B A`` keyed by module (what ``Store.delta`` gives), adds them to the base
    and scores the result.
    """
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    pretrained: StateDict = base.base  # type: ignore[attr-defined]
    make, tasks, data = base.make_model, base.tasks, base.data  # type: ignore[attr-defined]
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(LORA_MODULES), lora_dropout=0.0)
    t0 = time.perf_counter()
    with private_torch_state(seed):
        inits = []  # each adapter's own initialisation (PEFT's: A random, B zero)
        for t in range(len(tasks)):
            torch.manual_seed(keyed_generator(seed, "lora-init", t).initial_seed())
            model = make()
            model.load_state_dict(pretrained)
            peft_model = get_peft_model(model, cfg)
            inits.append({k: v.detach() for k, v in peft_model.named_parameters() if v.requires_grad})
        xs, ys = task_inputs(tasks, data)
        plain = make()
        plain.load_state_dict(pretrained)
        forward = functional(plain)

        def merged(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            # W + s B A computed once per step: the same function as PEFT's x W^T + s (x A^T) B^T,
            # in fewer operations
            weights = {}
            for module in modules:
                a, b = p[f"base_model.model.{module}.lora_A.default.weight"], p[f"base_model.model.{module}.lora_B.default.weight"]
                weights[f"{module}.weight"] = pretrained[f"{module}.weight"] + scale * b @ a
            return forward(weights, x)

        scale = cfg.lora_alpha / cfg.r
        modules = [k.removeprefix("base_model.model.").removesuffix(".lora_A.default.weight") for k in inits[0] if ".lora_A." in k]
        trained = train_together(merged, {k: torch.stack([i[k] for i in inits]) for k in inits[0]}, xs, ys, epochs, lr, 64,
                                 [keyed_generator(seed, "lora-order", t) for t in range(len(tasks))])
        folders: dict[str, str] = {}
        params = dict(peft_model.named_parameters())
        for t, mid in enumerate(tasks):
            with torch.no_grad():
                for k, v in trained.items():
                    params[k].copy_(v[t])
            folders[mid] = os.path.join(workdir, mid)
            peft_model.save_pretrained(folders[mid])
    adapters = {m: load_file(os.path.join(f, "adapter_model.safetensors")) for m, f in folders.items()}
    with private_torch_state(seed):
        scratch = make()

    def score(model_id: str, sd: Mapping[str, torch.Tensor]) -> float:
        weights = {k: v.clone() for k, v in pretrained.items()}
        for module, d in lora_updates(sd, folders[model_id]).items():
            name = module.removeprefix("base_model.model.") + ".weight"
            weights[name] = weights[name] + d.to(torch.float32)
        scratch.load_state_dict(weights)
        x, y = tasks[model_id].apply(data.x_test, data.y_test)
        return accuracy(scratch, x, y)

    ids = list(folders)
    n = len(base.members)
    return BenchFamily(
        "lora", "accuracy (%)", {m: adapters[m] for m in ids[:n]}, {m: adapters[m] for m in ids[n:]}, score,
        f"PEFT LoRA r={rank} on {', '.join(LORA_MODULES)} of the transformer family's base",
        sources=[folders[m] for m in ids[:n]], held_out_sources={m: folders[m] for m in ids[n:]},
        source_bytes=sum(os.path.getsize(os.path.join(f, "adapter_model.safetensors")) for f in folders.values()),
        reader=read_lora_updates, train_seconds={"adapters": time.perf_counter() - t0})


def lora_updates(sd: Mapping[str, torch.Tensor], folder: str) -> dict[str, torch.Tensor]:
    """Dense updates by module from adapter factors (scaled by ``lora_alpha / r`` of the adapter's
    config in ``folder``) and/or dense updates already keyed by module."""
    with open(os.path.join(folder, "adapter_config.json")) as f:
        cfg = json.load(f)
    scale = cfg["lora_alpha"] / cfg["r"]
    out = {}
    for k, v in sd.items():
        if k.endswith(".lora_A.weight"):
            module = k.removesuffix(".lora_A.weight")
            out[module] = scale * sd[module + ".lora_B.weight"].double() @ v.double()
        elif not k.endswith(".lora_B.weight"):
            out[k] = v.double()
    return out


def read_lora_updates(store, model_id: str) -> dict[str, torch.Tensor]:
    """A LoRA store's model as :func:`lora_updates` takes it: the dense update ``s B A`` of each
    module with a product basis (``Store.delta``), the factors of modules stored as plain tensors."""
    entries = store.manifest["tensors"]
    out = {e["name"]: store.delta(model_id, e["name"]) for e in entries if e.get("lora") is not None}
    plain = [e["name"] for e in entries if e.get("lora") is None]
    if plain:
        out.update(store.state_dict(model_id, names=plain))
    return out


def synthetic_bench_family(name: str, n_models: int, n_held_out: int, shapes: Mapping[str, tuple[int, ...]],
                           seed: int = 0, **kw) -> BenchFamily:
    """A synthetic family (``uwsfmt.testing.families.synthetic_family``); its score is minus the
    worst relative weight error (%) over tensors, so that a "drop" is that error."""
    fam = synthetic_family(n_models=n_models + n_held_out, shapes=shapes, seed=seed, **kw)
    ids = list(fam)
    originals = dict(fam)

    def score(model_id: str, sd: Mapping[str, torch.Tensor]) -> float:
        worst = 0.0
        for n, w in originals[model_id].items():
            if w.is_floating_point():
                w64 = w.double()
                worst = max(worst, float((sd[n].double() - w64).norm() / w64.norm().clamp_min(1e-30)))
        return -100.0 * worst

    return BenchFamily(name, "-(worst relative error, %)", {m: fam[m] for m in ids[:n_models]},
                       {m: fam[m] for m in ids[n_models:]}, score, f"synthetic ({kw})")
