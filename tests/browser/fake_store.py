"""A stand-in for an opened ``uwsfmt.Store`` with the same inspection methods and made-up data.

Used by the headless widget tests and by browser notebooks (copied next to them), so widgets can
be exercised at any size (500 models x 300 tensors) without building a real store.
"""

from __future__ import annotations

import numpy as np


class FakeStore:
    """Deterministic fake family: every 3rd tensor dense, every 5th shared, the rest subspace."""

    format_version = "1.0"

    def __init__(self, n_models: int = 4, n_tensors: int = 6, *, seed: int = 0, path: str = "fake.uws"):
        rng = np.random.default_rng(seed)
        self.path = path
        self.model_ids = [f"model-{i:03d}" for i in range(n_models)]
        self.tensor_names = [f"layers.{j // 3}.{('q', 'k', 'v')[j % 3]}.weight" for j in range(n_tensors)]
        self._enc = ["shared" if j % 5 == 4 else "dense" if j % 3 == 2 else "subspace" for j in range(n_tensors)]
        err = 10.0 ** rng.uniform(-6, -1, size=(n_models, n_tensors))
        err[:, [j for j, e in enumerate(self._enc) if e != "subspace"]] = 0.0
        self._errors = err
        self.spectrum_calls: list[str] = []
        self.exports: list[tuple] = []
        self.export_error: Exception | None = None

    def summary(self) -> dict:
        enc = {e: self._enc.count(e) for e in ("subspace", "shared", "dense") if e in self._enc}
        return {
            "path": self.path, "format_version": self.format_version, "n_models": len(self.model_ids),
            "n_tensors": len(self.tensor_names), "encodings": enc, "store_bytes": 10_000_000,
            "source_bytes": 250_000_000, "ratio": 25.0, "device": "cpu", "created": "2026-01-02T03:04:05+00:00",
            "error_mean": float(self._errors.mean()), "error_max": float(self._errors.max()),
            "settings": {"tau": 0.99, "rank": None, "center": "mean"},
        }

    def tensor_table(self) -> list[dict]:
        out = []
        for j, name in enumerate(self.tensor_names):
            sub = self._enc[j] == "subspace"
            col = self._errors[:, j]
            out.append({
                "name": name, "shape": [64, 32], "dtype": "bfloat16" if j % 2 else "float32",
                "encoding": self._enc[j], "rank": (4 + j % 7) if sub else None,
                "explained_variance": 0.99 + 0.0001 * (j % 10) if sub else None,
                "error_mean": float(col.mean()) if len(col) else None, "error_max": float(col.max()) if len(col) else None,
                "mode": "left" if sub else None, "residual_bits": 8 if sub and j % 4 == 0 else None,
            })
        return out

    def model_table(self) -> list[dict]:
        return [{
            "id": m, "path": f"/data/{m}.safetensors", "format": "safetensors", "sha256": f"{i:064x}",
            "size": 3_000_000 + i, "added": "2026-01-02T03:04:05+00:00",
            "error_mean": float(self._errors[i].mean()), "error_max": float(self._errors[i].max()),
        } for i, m in enumerate(self.model_ids)]

    def errors(self) -> np.ndarray:
        return self._errors.copy()

    def spectrum(self, name: str) -> dict:
        self.spectrum_calls.append(name)
        j = self.tensor_names.index(name)
        if self._enc[j] != "subspace":
            raise KeyError(f"{self.path}: tensor {name!r} is {self._enc[j]}, it has no spectrum")
        n = 32
        k = 4 + j % 7
        vals = np.concatenate([np.geomspace(100, 5, k), np.geomspace(0.05, 0.001, n - k)])
        null = np.linspace(0.3, 0.01, n)
        cum = np.cumsum(vals) / vals.sum()
        return {"eigenvalues": vals, "kept": k, "tau": 0.99, "null": null, "explained": cum, "side": "left"}

    def export(self, model_id: str, path: str, format: str = "safetensors") -> str:
        if self.export_error is not None:
            raise self.export_error
        self.exports.append((model_id, path, format))
        return path
