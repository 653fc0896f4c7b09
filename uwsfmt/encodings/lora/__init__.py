"""LoRA modules as one tensor entry each: a basis over the updates s*B*A (never formed densely),
a small core per adapter, read back as factors. One module per step: statistics, plan, fit,
encode, records, decode (the registered Encoding)."""

from uwsfmt.encodings.lora.bases import FACTORED_SHARE, SWEEP_BATCH, SWEEP_BATCH_BYTES, fit, fit_budget, fit_budgeted
from uwsfmt.encodings.lora.cores import ENCODE_RUN_BYTES, encode, factor_matrices, read_back
from uwsfmt.encodings.lora.decode import BASIS_FACTOR_DTYPES, LORA, PRODUCT_BATCH, Lora, delta, read
from uwsfmt.encodings.lora.planning import MAX_META_VALUE, ModulePlan, plan
from uwsfmt.encodings.lora.records import check_record, factor_names, model_ranks, model_record, rank_of, stored_rank
from uwsfmt.encodings.lora.stats import ProductGramSketch, ProductGramStats, core, factor_cores, factors

__all__ = ["ProductGramSketch", "ProductGramStats", "core", "factor_cores", "factors", "MAX_META_VALUE", "ModulePlan", "plan", "FACTORED_SHARE", "SWEEP_BATCH", "SWEEP_BATCH_BYTES", "fit", "fit_budget", "fit_budgeted", "ENCODE_RUN_BYTES", "encode", "factor_matrices", "read_back", "check_record", "factor_names", "model_ranks", "model_record", "rank_of", "stored_rank", "BASIS_FACTOR_DTYPES", "LORA", "Lora", "PRODUCT_BATCH", "delta", "read"]
