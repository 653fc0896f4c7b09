"""Model families made locally and deterministically, for tests, ``uwsfmt demo`` and benchmarks
(synthetic, ViT-like and LoRA families with their ground truth; no scikit-learn needed)."""
