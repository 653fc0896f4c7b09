"""Really-trained model families for benchmarks and tests: small MLPs trained on scikit-learn's
bundled datasets (one pretrained base, one full fine-tune per task, held-out evaluation).

Kept out of the runtime package: it needs scikit-learn, a test and benchmark dependency.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from uwsfmt.errors import ConfigError, NotFoundError
from uwsfmt.testing.families import StateDict, check_count, keyed_generator, model_ids

TRAINED_DATASETS = ("digits", "wine", "breast_cancer")


class MLP(nn.Module):
    """The trained family's architecture: two hidden layers with LayerNorm, and a head.

    State dict names: ``fc1``, ``norm1``, ``fc2``, ``norm2``, ``head`` (``.weight``/``.bias``).
    """

    def __init__(self, n_features: int, hidden: int, n_classes: int):
        super().__init__()
        self.fc1 = nn.Linear(n_features, hidden)
        self.norm1 = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm1(self.fc1(x)))
        x = torch.relu(self.norm2(self.fc2(x)))
        return self.head(x)


@dataclass(frozen=True)
class _Task:
    description: str
    orientation: int  # dihedral transform of 8x8 images, 0..7 (0 = none)
    feature_mask: torch.Tensor | None  # tabular: 0/1 per feature
    label_map: torch.Tensor  # new label of each original class

    def apply(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.orientation:
            x = _dihedral(x, self.orientation)
        if self.feature_mask is not None:
            x = x * self.feature_mask
        return x, self.label_map[y]


def _dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    side = math.isqrt(x.shape[1])
    img = torch.rot90(x.reshape(-1, side, side), k % 4, dims=(1, 2))
    if k >= 4:
        img = img.flip(2)
    return img.reshape(x.shape[0], -1).contiguous()


@contextmanager
def private_torch_state(seed: int):
    """Seeded, single-threaded torch, restoring the caller's RNG and thread count after."""
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def train(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float,
    batch: int, gen: torch.Generator,
) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch):
            idx = order[start:start + batch]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return 100.0 * (model(x).argmax(dim=1) == y).double().mean().item()


@dataclass
class TrainedFamily:
    """A really-trained family: one pretrained base and one full fine-tune per task.

    ``state_dicts`` maps ``task-000``, ... to state dicts with identical names and shapes
    (heads included); ``tasks`` describes each task; ``base`` is the pretrained model. Use
    :meth:`evaluate` to score any (e.g. reconstructed) state dict on a task's held-out split.
    """

    dataset: str
    n_features: int
    hidden: int
    n_classes: int
    base: StateDict
    state_dicts: dict[str, StateDict]
    tasks: dict[str, str]
    _task_specs: dict[str, _Task] = field(repr=False)
    _split: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] = field(repr=False)

    def make_model(self) -> MLP:
        """A fresh (randomly initialised) module of the family's architecture.

        >>> fam = trained_family(n_tasks=1, base_epochs=1, finetune_epochs=1)
        >>> fam.make_model().load_state_dict(fam.state_dicts["task-000"])
        <All keys matched successfully>
        """
        with private_torch_state(0):
            return MLP(self.n_features, self.hidden, self.n_classes)

    def task_data(
        self, model_id: str, split: Literal["train", "test"] = "test"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs (float32) and labels (int64) of a task's train or held-out test split.

        >>> fam = trained_family(n_tasks=1, base_epochs=1, finetune_epochs=1)
        >>> x, y = fam.task_data("task-000")
        >>> x.shape[1] == fam.n_features
        True
        """
        if model_id not in self._task_specs:
            raise NotFoundError(
                f"model {model_id!r} is not in this trained family; ids: "
                f"{', '.join(self._task_specs)}"
            )
        if split not in ("train", "test"):
            raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
        x_tr, y_tr, x_te, y_te = self._split
        x, y = (x_tr, y_tr) if split == "train" else (x_te, y_te)
        return self._task_specs[model_id].apply(x, y)

    def evaluate(self, model_id: str, state_dict: Mapping[str, torch.Tensor]) -> float:
        """Accuracy (%) of ``state_dict`` on ``model_id``'s task, held-out split.

        Any float dtype is accepted (it is cast to float32 on load).

        >>> fam = trained_family(n_tasks=1, base_epochs=1, finetune_epochs=1)
        >>> 0.0 <= fam.evaluate("task-000", fam.state_dicts["task-000"]) <= 100.0
        True
        """
        x, y = self.task_data(model_id, "test")
        model = self.make_model()
        model.load_state_dict(dict(state_dict))
        return _accuracy(model, x, y)

    def accuracies(self) -> dict[str, float]:
        """Held-out accuracy (%) of each original fine-tune on its own task.

        >>> fam = trained_family(n_tasks=2, base_epochs=1, finetune_epochs=1)
        >>> sorted(fam.accuracies())
        ['task-000', 'task-001']
        """
        return {mid: self.evaluate(mid, sd) for mid, sd in self.state_dicts.items()}


def _load_dataset(name: str):
    from sklearn import datasets

    loader = {
        "digits": datasets.load_digits,
        "wine": datasets.load_wine,
        "breast_cancer": datasets.load_breast_cancer,
    }[name]
    data = loader()
    return data.data, data.target


def trained_family(
    n_tasks: int = 6,
    hidden: int = 64,
    seed: int = 0,
    base_epochs: int = 6,
    finetune_epochs: int = 15,
    *,
    dataset: Literal["digits", "wine", "breast_cancer"] = "digits",
    lr: float = 3e-3,
    finetune_lr: float = 1e-3,
    test_fraction: float = 0.3,
) -> TrainedFamily:
    """Train a small MLP base on a scikit-learn dataset and fine-tune one copy per task.

    ``digits`` (default, 8x8 images): the base is pretrained on the training split seen in
    all 8 orientations (rotations/flips) with the original labels; task t sees one
    orientation (``t % 8``) and a task-specific random permutation of the 10 labels.
    ``wine`` / ``breast_cancer`` (standardised tabular features): the base sees the original
    task; task t drops a random quarter of the features and permutes the labels.

    The base trains with Adam at ``lr`` (batch 128); every fine-tune trains all layers (head
    included) from the base with Adam at ``finetune_lr`` (batch 64), so models differ
    everywhere (relative weight change ~0.3-0.4 per matrix) while sharing one starting
    point, like real fine-tune families. All
    state dicts share names and shapes. The train/test split is stratified and fixed by
    ``seed``; everything is deterministic (seeded, single-threaded torch; the caller's RNG
    state and thread count are restored). Digits with 6 tasks trains in about 1 s on 2 CPU
    cores (plus ~1 s to import scikit-learn) and reaches 96-98% held-out accuracy per task.

    >>> fam = trained_family(n_tasks=2)
    >>> min(fam.accuracies().values()) > 85
    True
    """
    check_count("n_tasks", n_tasks)
    check_count("hidden", hidden)
    check_count("base_epochs", base_epochs, 0)
    check_count("finetune_epochs", finetune_epochs, 0)
    if dataset not in TRAINED_DATASETS:
        raise ConfigError(f"dataset must be one of {TRAINED_DATASETS}, got {dataset!r}")
    from sklearn.model_selection import train_test_split

    x_np, y_np = _load_dataset(dataset)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x_np, y_np, test_size=test_fraction, random_state=seed % 2**32, stratify=y_np
    )
    x_tr = torch.tensor(x_tr, dtype=torch.float32)
    x_te = torch.tensor(x_te, dtype=torch.float32)
    y_tr = torch.tensor(y_tr, dtype=torch.int64)
    y_te = torch.tensor(y_te, dtype=torch.int64)
    if dataset == "digits":
        x_tr, x_te = x_tr / 16.0, x_te / 16.0
    else:  # standardise with training statistics only
        mean, std = x_tr.mean(0), x_tr.std(0).clamp_min(1e-8)
        x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    n_features, n_classes = x_tr.shape[1], int(y_np.max()) + 1

    specs: dict[str, _Task] = {}
    for t, model_id in enumerate(model_ids("task", n_tasks)):
        g = keyed_generator(seed, "task", t)
        perm = torch.randperm(n_classes, generator=g)
        labels = ",".join(str(int(c)) for c in perm)
        if dataset == "digits":
            orientation = t % 8
            rot, flip = orientation % 4, " + flip" if orientation >= 4 else ""
            desc = f"digits rotated {90 * rot} deg{flip}; label c -> [{labels}][c]"
            specs[model_id] = _Task(desc, orientation, None, perm)
        else:
            dropped = torch.randperm(n_features, generator=g)[: max(1, n_features // 4)]
            mask = torch.ones(n_features)
            mask[dropped] = 0.0
            desc = (f"{dataset} without features {sorted(int(i) for i in dropped)}; "
                    f"label c -> [{labels}][c]")
            specs[model_id] = _Task(desc, 0, mask, perm)

    with private_torch_state(seed):
        base_model = MLP(n_features, hidden, n_classes)
        if dataset == "digits":  # auxiliary pretraining: every orientation, true labels
            xb = torch.cat([_dihedral(x_tr, k) if k else x_tr for k in range(8)])
            yb = y_tr.repeat(8)
        else:
            xb, yb = x_tr, y_tr
        train(base_model, xb, yb, base_epochs, lr, 128, keyed_generator(seed, "base-order"))
        base = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
        state_dicts = {}
        for t, (model_id, spec) in enumerate(specs.items()):
            model = MLP(n_features, hidden, n_classes)
            model.load_state_dict(base)
            xt, yt = spec.apply(x_tr, y_tr)
            train(model, xt, yt, finetune_epochs, finetune_lr, 64, keyed_generator(seed, "order", t))
            state_dicts[model_id] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return TrainedFamily(
        dataset=dataset,
        n_features=n_features,
        hidden=hidden,
        n_classes=n_classes,
        base=base,
        state_dicts=state_dicts,
        tasks={mid: spec.description for mid, spec in specs.items()},
        _task_specs=specs,
        _split=(x_tr, y_tr, x_te, y_te),
    )
