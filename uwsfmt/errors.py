"""One exception hierarchy for everything uwsfmt raises on purpose.

Every message names what was wrong, where (file, tensor, model) and what to do next.
"""

from __future__ import annotations


class UWSError(Exception):
    """Root of all errors raised by uwsfmt. Catch this to catch them all."""


class SourceError(UWSError):
    """A source checkpoint cannot be read (corrupt, unsupported, unsafe)."""


class ConflictError(SourceError):
    """Source checkpoints do not form one family (shape clashes, missing tensors, ...).

    ``problems`` lists every conflict found, so users fix them all at once.
    """

    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = list(problems or [])
        if self.problems:
            message = message + "\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)


class ConfigError(UWSError):
    """Arguments to a uwsfmt call are invalid (bad rank, unknown mode, ...)."""


class StoreError(UWSError):
    """A store cannot be created, opened or written."""


class StoreExistsError(StoreError):
    """The output path already exists and overwriting was not asked for."""


class FormatError(StoreError):
    """A store does not follow the UWS specification (corrupt, tampered, incomplete)."""


class VersionError(FormatError):
    """The store's format version is not one this library can read."""


class LockError(StoreError):
    """Another writer holds the store's lock."""


class NotFoundError(UWSError, KeyError):
    """A model id or tensor name is not in the store."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class BudgetError(UWSError):
    """An error budget cannot be met with the available encodings."""


def os_reason(e: OSError) -> str:
    """An OSError in a message: its reason and, where it names one, the file."""
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    return f"{e.strerror or e}{where}"
