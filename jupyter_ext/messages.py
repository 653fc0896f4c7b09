"""Words the views show: errors as the library phrases them, default names for exports."""

from __future__ import annotations

import logging
import re

from uwsfmt import UWSError

log = logging.getLogger("jupyter_ext")


def describe_error(e: BaseException) -> str:
    """One-line-ish message for a view: the library's own words, never a traceback.

    >>> describe_error(FileNotFoundError(2, "No such file or directory", "a.uws"))
    'No such file or directory: a.uws'
    """
    if isinstance(e, UWSError):
        return str(e)
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return f"{e.strerror or type(e).__name__}: {e.filename}" if getattr(e, "filename", None) else str(e)
    log.debug("unexpected error in a view", exc_info=e)
    return f"Unexpected {type(e).__name__}: {e}"


def default_export_path(model_id: str, fmt: str) -> str:
    """A file (safetensors, kohya) or folder (peft, hf) name for a model, safe on every filesystem.

    >>> default_export_path("org/model:v1", "safetensors")
    'org_model_v1.safetensors'
    """
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", model_id).strip("._") or "model"
    return f"{stem}.safetensors" if fmt in ("safetensors", "kohya") else f"{stem}-{fmt}"
