"""Real PEFT LoRA adapters, trained in seconds on CPU, for the LoRA tests and the benchmark.

One small base network (token embedding -> two hidden layers -> head) is "pretrained" on one
synthetic task; each adapter is then trained by peft on its own task (a random teacher
network). Adapters differ in rank (4 and 8), in PEFT options (rsLoRA, rank_pattern /
alpha_pattern) and in target modules (one adapter leaves the embedding out); all of them save
a copy of the head (modules_to_save). Everything is deterministic (seeded, CPU) and offline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

VOCAB, SEQ, D_EMB, D_HID, N_OUT = 48, 6, 32, 96, 5


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D_EMB)
        self.fc1 = nn.Linear(D_EMB, D_HID)
        self.fc2 = nn.Linear(D_HID, D_HID)
        self.head = nn.Linear(D_HID, N_OUT)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens).mean(dim=1)
        h = torch.tanh(self.fc1(h))
        h = torch.tanh(self.fc2(h))
        return self.head(h)


def make_base(seed: int = 0) -> TinyNet:
    """The shared base: a fixed init trained briefly on task ``-1``."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = TinyNet()
    _train(net, net.parameters(), _task(-1, seed), steps=60, lr=1e-2, g=g)
    return net.eval()


def inputs(n: int = 256, seed: int = 123) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, SEQ), generator=g)


def _task(t: int, seed: int):
    """A task: tokens -> soft targets of a random teacher (so every adapter learns something different)."""
    g = torch.Generator().manual_seed(10_000 + 97 * t + seed)
    table = torch.randn(VOCAB, N_OUT, generator=g)
    mix = torch.randn(N_OUT, N_OUT, generator=g)

    def target(tokens: torch.Tensor) -> torch.Tensor:
        return torch.tanh(table[tokens].mean(dim=1) @ mix)
    return target


def _train(model: nn.Module, params, target, *, steps: int, lr: float, g: torch.Generator) -> None:
    opt = torch.optim.Adam([p for p in params if p.requires_grad], lr=lr)
    for _ in range(steps):
        x = torch.randint(0, VOCAB, (64, SEQ), generator=g)
        loss = torch.nn.functional.mse_loss(model(x), target(x))
        opt.zero_grad()
        loss.backward()
        opt.step()


@dataclass
class AdapterSpec:
    name: str
    task: int
    r: int
    alpha: float
    target_modules: tuple[str, ...] = ("emb", "fc1", "fc2")
    use_rslora: bool = False
    rank_pattern: dict | None = None
    alpha_pattern: dict | None = None


def default_specs(n_tasks: int = 8) -> list[AdapterSpec]:
    """Ranks 4 and 8 alternating; task 1 uses rsLoRA, task 2 rank/alpha patterns, task 3 no embedding."""
    specs = []
    for t in range(n_tasks):
        r = 4 if t % 2 == 0 else 8
        s = AdapterSpec(f"task-{t:02d}", t, r, alpha=2.0 * r)
        if t == 1:
            s.use_rslora = True
        if t == 2:
            s.rank_pattern, s.alpha_pattern = {"fc2": 6}, {"fc2": 3.0}
        if t == 3:
            s.target_modules = ("fc1", "fc2")
        specs.append(s)
    return specs


def train_adapters(folder: str | Path, specs: list[AdapterSpec] | None = None, *, seed: int = 0, steps: int = 40,
                   dtype: torch.dtype = torch.float32, shared_init: bool = False) -> tuple[TinyNet, list[Path]]:
    """Train one PEFT adapter per spec on the base; save each with ``save_pretrained``.

    ``shared_init``: every adapter starts from the same random A (one seed for all, as when a
    training script fixes its seed); otherwise each adapter draws its own.
    Returns the base (eval mode) and the adapter folders, in spec order.
    """
    from peft import LoraConfig, get_peft_model

    folder = Path(folder)
    base = make_base(seed)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    dirs = []
    for spec in specs or default_specs():
        net = TinyNet()
        net.load_state_dict(state)
        cfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, target_modules=list(spec.target_modules), modules_to_save=["head"],
                         use_rslora=spec.use_rslora, rank_pattern=spec.rank_pattern or {}, alpha_pattern=spec.alpha_pattern or {},
                         lora_dropout=0.0, init_lora_weights=True)
        g = torch.Generator().manual_seed(seed * 1000 + spec.task)
        with torch.random.fork_rng():
            torch.manual_seed(seed * 1000 + (0 if shared_init else spec.task))  # PEFT's init of A uses the global generator
            model = get_peft_model(net, cfg)
        _train(model, model.parameters(), _task(spec.task, seed), steps=steps, lr=2e-2, g=g)
        out = folder / spec.name
        model.save_pretrained(str(out))
        if dtype != torch.float32:
            _cast_adapter(out, dtype)
        dirs.append(out)
    return base, dirs


def _cast_adapter(folder: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import load_file, save_file

    p = folder / "adapter_model.safetensors"
    sd = {k: v.to(dtype) for k, v in load_file(str(p)).items()}
    save_file(sd, str(p), metadata={"format": "pt"})


def load_adapter(base: TinyNet, folder: str | Path) -> nn.Module:
    """PeftModel.from_pretrained on a fresh copy of the base (the way users load an adapter)."""
    from peft import PeftModel

    net = TinyNet()
    net.load_state_dict(base.state_dict())
    return PeftModel.from_pretrained(net, str(folder)).eval()


def adapter_config(folder: str | Path) -> dict:
    return json.loads((Path(folder) / "adapter_config.json").read_text())
