"""Model families made locally and deterministically, for tests, ``uwsfmt demo`` and benchmarks.

No model hub is needed. Three kinds of family:

- :func:`synthetic_family`: exact "shared base + low-rank deltas (+ iid noise)" structure,
  with the ground truth (bases, coefficients, spectra, ranks, tail energies) available from
  :func:`synthetic_family_truth`, plus the awkward tensors a real checkpoint has (biases,
  norms, a frozen tensor, an int64 buffer, a bool mask).
- :func:`vit_like_family` / :func:`iter_vit_like_family`: ViT-B-shaped, streamed one model at
  a time so that 128 ViT-B copies never sit in memory together.
- :func:`lora_family` / :func:`iter_lora_family`: PEFT-style LoRA adapters that share the random
  init of A and a subspace of B, as real LoRA families do.
(Really-trained families, which need scikit-learn, live beside the benchmarks: ``bench/trained.py``.)

Every generator is a pure function of its arguments. Random draws are keyed by
``(seed, tensor name, model index)``, so model ``i`` of a family does not depend on how many
models are asked for: ``synthetic_family(4)`` is a prefix of ``synthetic_family(8)``.
:func:`write_family` writes any of them to disk, one model at a time.
"""

from uwsfmt.testing.families.common import (
    DEFAULT_SHAPES,
    LORA_MODULES,
    Entry,
    Family,
    StateDict,
    check_count,
    compute_dtype,
    keyed_generator,
    make_model_id,
    matrix_shape,
    model_ids,
    orthonormal,
)
from uwsfmt.testing.families.files import write_family, write_peft_family
from uwsfmt.testing.families.lora import iter_lora_family, lora_family, lora_key, peft_adapter_config
from uwsfmt.testing.families.synthetic import FamilyTruth, LowRankSpec, TensorTruth, synthetic_family, synthetic_family_truth
from uwsfmt.testing.families.vit import iter_vit_like_family, vit_like_family

__all__ = ["DEFAULT_SHAPES", "Entry", "Family", "LORA_MODULES", "StateDict", "check_count", "compute_dtype", "keyed_generator", "make_model_id", "matrix_shape", "model_ids", "orthonormal", "FamilyTruth", "LowRankSpec", "TensorTruth", "synthetic_family", "synthetic_family_truth", "iter_vit_like_family", "vit_like_family", "iter_lora_family", "lora_family", "lora_key", "peft_adapter_config", "write_family", "write_peft_family"]
