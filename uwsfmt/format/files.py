"""Model folder files in a store (spec section 15): where they live and which names they may have.

A model folder's small files (config, tokenizer, chat template, model card, ...) are kept as
content-addressed ``uint8`` arrays ``files/<sha256>``; a model's manifest entry maps each file
name to its content (:mod:`uwsfmt.writer.folder_files` writes them, :mod:`uwsfmt.reader.files`
reads them). They are data, never executed.
"""

from __future__ import annotations

import re

from uwsfmt.errors import ConfigError

#: the group holding the files
FILES = "files"
#: the default largest small file a build keeps: above the largest tokenizer files in common use
#: (Gemma's tokenizer.json is ~33 MB), far below any weights file
DEFAULT_MAX_FILE_SIZE = 64 << 20
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def blob_path(sha256: str) -> str:
    """Where the file with this content lives in a store.

    >>> blob_path("ab" * 32)[:9]
    'files/aba'
    """
    return f"{FILES}/{sha256}"


def safe_name(name: object) -> bool:
    """Whether ``name`` may be a kept file's name: one plain path segment, not hidden, no
    control characters (the schema's ``file_name``).

    >>> safe_name("tokenizer.json"), safe_name("../x"), safe_name("a/b")
    (True, False, False)
    """
    return (isinstance(name, str) and 0 < len(name) <= 255 and not name.startswith(".")
            and not any(c in name for c in "/\\:") and all(ord(c) >= 32 for c in name))


def parse_size(value: int | str) -> int:
    """A byte count from an int or a string such as ``"10MiB"``, ``"200KB"`` or ``"5GB"``.

    >>> parse_size("200KB"), parse_size("10MiB"), parse_size(42)
    (200000, 10485760, 42)
    """
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
        if m is None or m.group(2).lower() not in _UNITS:
            raise ConfigError(f"size {value!r} is not a byte count; write e.g. 5000000, '200KB', '10MiB' or '5GB'")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ConfigError(f"size {value!r} must be positive")
    return n
