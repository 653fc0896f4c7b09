"""Registry of checkpoint formats and discovery of a family from paths, folders and globs."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Mapping

import fsspec
import torch

from uwsfmt.errors import SourceError
from uwsfmt.io import remote
from uwsfmt.sources.base import Checkpoint, Format, StateDictCheckpoint

_FORMATS: dict[str, Format] = {}

#: one checkpoint: a path, a Checkpoint object, or a state dict
Source = str | os.PathLike | Checkpoint | dict[str, torch.Tensor]
#: a family of checkpoints: paths, folders, globs, Checkpoint objects, or ``{model_id: state_dict}``
Sources = str | os.PathLike | Iterable[str | os.PathLike | Checkpoint] | Mapping[str, Mapping[str, torch.Tensor]]


def register_format(fmt: Format) -> Format:
    """Add a checkpoint format; adding a format touches only its own module."""
    _FORMATS[fmt.name] = fmt
    return fmt


def formats() -> dict[str, Format]:
    return dict(_FORMATS)


def model_id_for(path: str) -> str:
    """Default model id: the file stem, or the directory name."""
    p = os.path.normpath(path)
    base = os.path.basename(p)
    if os.path.isdir(p):
        return base
    stem, _ = os.path.splitext(base)
    return stem


def detect_format(path: str) -> Format:
    """The registered format that recognises ``path`` (highest priority first)."""
    for fmt in sorted(_FORMATS.values(), key=lambda f: -f.priority):
        try:
            if fmt.detect(path):
                return fmt
        except OSError:
            continue
    raise SourceError(
        f"{path}: not a checkpoint uwsfmt recognises (known formats: {', '.join(sorted(_FORMATS))}). "
        "Pass format=... (CLI: --format) to force one."
    )


def open_checkpoint(path: str | os.PathLike, *, format: str | None = None, id: str | None = None) -> Checkpoint:
    """Open one checkpoint file or folder.

    >>> ck = open_checkpoint("model.safetensors")  # doctest: +SKIP
    """
    path = os.fspath(path)
    if remote.is_url(path):
        if format is None and not path.split("?")[0].endswith(".safetensors"):
            raise SourceError(f"{remote.redact(path)}: only .safetensors files are read from URLs (in place); copy other "
                              "checkpoints (folders, PEFT adapters, torch files) to local disk first")
    elif not os.path.exists(path):
        raise SourceError(f"{path}: no such file or directory")
    if format is not None:
        if format not in _FORMATS:
            raise SourceError(f"unknown format {format!r}; known: {', '.join(sorted(_FORMATS))}")
        fmt = _FORMATS[format]
    else:
        fmt = detect_format(path)
    return fmt.open(path, id or model_id_for(path))


def _expand(source: str) -> list[str]:
    """A path, a glob, or a folder of checkpoints -> checkpoint paths (URLs: a glob, a prefix
    ending in ``/`` (its ``.safetensors`` objects), or one object)."""
    if remote.is_url(source):
        return _expand_url(source)
    if any(ch in source for ch in "*?["):
        hits = sorted(glob.glob(source))
        if not hits:
            raise SourceError(f"{source}: the pattern matches no file")
        return hits
    if not os.path.exists(source):
        raise SourceError(f"{source}: no such file or directory")
    if os.path.isdir(source):
        # a folder that is itself one checkpoint (HF folder, PEFT adapter) vs a folder of them
        try:
            detect_format(source)
            return [source]
        except SourceError:
            pass
        entries = sorted(os.listdir(source))
        found = []
        for e in entries:
            p = os.path.join(source, e)
            if e.startswith("."):
                continue
            try:
                detect_format(p)
                found.append(p)
            except SourceError:
                continue
        if not found:
            raise SourceError(
                f"{source}: the folder holds no checkpoint uwsfmt recognises "
                f"(looked for: {', '.join(sorted(_FORMATS))})"
            )
        return found
    return [source]


def _expand_url(source: str) -> list[str]:
    protocol = remote.scheme(source)
    if not any(ch in source for ch in "*?[") and not source.endswith("/"):
        return [source]
    try:
        fs, key = fsspec.core.url_to_fs(source)
        hits = sorted(fs.glob(key if not source.endswith("/") else key.rstrip("/") + "/*.safetensors"))
    except (OSError, ValueError) as e:
        raise SourceError(f"{remote.redact(source)}: cannot list the sources ({remote.reason(e)})") from e
    if not hits:
        raise SourceError(f"{remote.redact(source)}: matches no object")
    return [f"{protocol}://{h}" if "://" not in h else h for h in hits]


def discover(
    sources: Sources,
    *,
    format: str | None = None,
) -> list[Checkpoint]:
    """Turn user input into a list of checkpoints (one per model).

    Accepts paths, globs, folders (of checkpoints, or one checkpoint folder), Checkpoint
    objects, or a mapping ``{model_id: state_dict}``.
    """
    out: list[Checkpoint] = []
    items: Iterable = ()
    if isinstance(sources, Mapping):
        out = [StateDictCheckpoint(str(k), dict(v)) for k, v in sources.items()]
    else:
        items = [sources] if isinstance(sources, (str, os.PathLike)) else sources  # one path, not its characters
    for s in items:
        if isinstance(s, Checkpoint):
            out.append(s)
        elif isinstance(s, Mapping):
            raise SourceError("pass in-memory state dicts as a mapping {model_id: state_dict}")
        else:
            for p in _expand(os.fspath(s)):
                out.append(open_checkpoint(p, format=format))
    if not out:
        raise SourceError("no source checkpoints given: pass at least one file, folder or glob")
    return out
