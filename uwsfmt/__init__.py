"""uwsfmt: families of neural-network checkpoints as shared bases + per-model coefficients.

>>> import uwsfmt
>>> store = uwsfmt.convert(["a.safetensors", "b.safetensors"], "family.uws")  # doctest: +SKIP
>>> sd = store.state_dict("a")  # doctest: +SKIP
"""

from uwsfmt import hf, sources  # noqa: F401  (sources: registers the checkpoint formats; hf: uwsfmt.hf.from_store)
from uwsfmt.api import Store, append, convert, export, extend, open, project
from uwsfmt.errors import (
    BudgetError,
    ConfigError,
    ConflictError,
    FormatError,
    LockError,
    NotFoundError,
    SourceError,
    StoreError,
    StoreExistsError,
    UWSError,
    VersionError,
)
from uwsfmt.evaluate import evaluate
from uwsfmt.packing import pack, unpack
from uwsfmt.validate import validate
from uwsfmt.version import __version__
from uwsfmt.writer.folder_files import FilePolicy
from uwsfmt.writer.options import BuildOptions, Fidelity
from uwsfmt.writer.plan import plan
from uwsfmt.writer.settings import Cancelled

__all__ = [
    "BudgetError", "BuildOptions", "Cancelled", "ConfigError", "ConflictError", "Fidelity", "FilePolicy", "FormatError", "LockError", "NotFoundError",
    "SourceError", "Store", "StoreError", "StoreExistsError", "UWSError", "VersionError", "__version__",
    "append", "convert", "evaluate", "export", "extend", "open", "pack", "plan", "project", "unpack", "validate",
]
