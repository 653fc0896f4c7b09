"""A model folder's small files kept in the store while it is built or appended to (spec section 15).

A Hugging Face model folder or a PEFT adapter folder is more than its tensors: without
``config.json`` and the tokenizer files nobody can load the model again. The build keeps every
other regular file of such a folder:

- as data, never executed: each file is one Zarr array ``files/<sha256>`` of ``uint8`` (its
  bytes), named by the SHA-256 of its content, so a file that every model of the family shares
  is stored once;
- with a size limit per file (``FilePolicy.max_size``, default
  :data:`uwsfmt.format.files.DEFAULT_MAX_FILE_SIZE`), beyond which the build is refused with a
  message saying what to do;
- remote code (``*.py``) only on request (``remote_code=True``); otherwise its names are
  recorded as skipped;
- the weights themselves (safetensors / ``.bin`` shards and other frameworks' weight files)
  are not small files: the tensors are in the store, and the shard layout (``weights``: the
  index file's name and the shard names) is recorded so that an export can lay them out again.

Each model's manifest entry gets a ``folder`` record: ``{"format", "weights": {"index",
"shards"}, "files": {name: {"sha256", "size", "path"}}, "skipped": [names]}``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import numpy as np

from uwsfmt.errors import SourceError
from uwsfmt.format.files import DEFAULT_MAX_FILE_SIZE, blob_path, parse_size, safe_name
from uwsfmt.io import layout
from uwsfmt.sources.base import Checkpoint

#: weights of any framework: never small files (the tensors are stored as tensors)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".ot", ".tflite")
#: remote code, carried only with ``remote_code=True``
CODE_SUFFIXES = (".py",)


@dataclass(frozen=True)
class FilePolicy:
    """What a build keeps of a model folder besides its tensors.

    >>> FilePolicy(max_size="10MiB").max_size
    10485760
    """

    keep: bool = True
    remote_code: bool = False
    max_size: int | str = DEFAULT_MAX_FILE_SIZE  # bytes, or e.g. "10MiB"

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_size", parse_size(self.max_size))  # "10MiB" -> bytes, checked

    @property
    def limit(self) -> int:
        """``max_size`` in bytes (``__post_init__`` parsed it)."""
        assert isinstance(self.max_size, int)
        return self.max_size

    def record(self) -> dict:
        """How the policy is recorded in the manifest's ``build`` (appends follow it)."""
        return {"keep": self.keep, "remote_code": self.remote_code, "max_size": self.max_size}

    @classmethod
    def of(cls, files: FilePolicy | bool | None) -> FilePolicy:
        """``convert(files=...)``: a policy, True / None (the default policy) or False (keep nothing).

        >>> FilePolicy.of(False).keep
        False
        """
        if isinstance(files, FilePolicy):
            return files
        return cls() if files is None or files is True else cls(keep=False)

    @classmethod
    def from_record(cls, rec: dict | None) -> FilePolicy:
        rec = rec or {}
        return cls(bool(rec.get("keep", True)), bool(rec.get("remote_code", False)),
                   int(rec.get("max_size") or DEFAULT_MAX_FILE_SIZE))


@dataclass
class FolderPlan:
    """The files of one checkpoint's folder a build will keep (local paths, checked)."""

    format: str
    weights: dict
    files: dict[str, str] = field(default_factory=dict)  # name -> local path
    skipped: list[str] = field(default_factory=list)


class FolderFiles:
    """The small files one build or append keeps: a policy, each checkpoint's plan (made before
    anything is written, so a file over the limit refuses the whole build at once), and the
    contents already in the store.

    >>> kept = FolderFiles(FilePolicy(), [])
    >>> kept.plans
    {}
    """

    def __init__(self, policy: FilePolicy, cks: list[Checkpoint], written: set[str] | None = None):
        self.policy = policy
        self.plans = {id(ck): plan_folder(ck, policy) for ck in cks}  # by identity: ids may change after planning
        self.written = set(written or ())

    def write(self, zstore, ck: Checkpoint) -> dict | None:
        """Write checkpoint ``ck``'s files (new contents only); its ``folder`` record."""
        return write_files(zstore, self.plans.get(id(ck)), self.written, self.policy)


def plan_folder(ck: Checkpoint, policy: FilePolicy) -> FolderPlan | None:
    """The small files of ``ck``'s folder under ``policy`` (None for checkpoints that are not a
    folder); a SourceError naming the file where one is larger than the limit.

    >>> from uwsfmt.sources import StateDictCheckpoint
    >>> import torch
    >>> plan_folder(StateDictCheckpoint("m", {"w": torch.zeros(1)}), FilePolicy()) is None
    True
    """
    weights = ck.folder_layout()
    if weights is None or not ck.path or not os.path.isdir(ck.path):
        return None
    plan = FolderPlan(ck.format, weights)
    if not policy.keep:
        return plan
    used = set(weights["shards"])
    for entry in sorted(os.scandir(ck.path), key=lambda e: e.name):
        name = entry.name
        if name.startswith(".") or not entry.is_file() or name in used:
            continue  # hidden files (.gitattributes, editor files), folders, FIFOs and devices, the shards
        if name != weights.get("index") and (name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json")):
            continue  # other frameworks' weights and their indexes: not part of this checkpoint
        if name.endswith(CODE_SUFFIXES) and not policy.remote_code:
            plan.skipped.append(name)
            continue
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise SourceError(f"{entry.path!r}: the file name is not valid UTF-8; rename it, or convert with files=False "
                              "(CLI: --no-files) to leave the folder's files out") from None
        if not safe_name(name):
            raise SourceError(f"{entry.path!r}: a file name a store cannot hold; rename it, or convert with files=False "
                              "(CLI: --no-files)")
        size = entry.stat().st_size
        if size > policy.limit:
            raise SourceError(
                f"{entry.path}: {size:,} bytes, above the {policy.max_size:,}-byte limit for a model folder's small files "
                "(config, tokenizer, model card...); raise the limit (files=FilePolicy(max_size=...), CLI: --max-file-size), move the "
                "file out of the folder, or convert with files=False (CLI: --no-files) to keep no files")
        plan.files[name] = entry.path
    return plan


def write_files(zstore, plan: FolderPlan | None, written: set[str], policy: FilePolicy) -> dict | None:
    """Write ``plan``'s files into ``zstore`` (those whose content ``written`` does not hold yet;
    the set is updated) and return the model's ``folder`` record. Call before the manifest
    naming them is committed (spec section 10)."""
    if plan is None:
        return None
    files = {}
    for name, path in plan.files.items():
        try:
            with open(path, "rb") as f:
                data = f.read(policy.limit + 1)
        except OSError as e:
            raise SourceError(f"{path}: cannot read the file ({e.strerror or e})") from None
        if len(data) > policy.limit:  # grew since it was planned
            raise SourceError(f"{path}: now larger than the {policy.max_size:,}-byte limit for small files; raise "
                              "the limit (FilePolicy(max_size=...), CLI: --max-file-size)")
        sha = hashlib.sha256(data).hexdigest()
        if sha not in written:
            layout.write_array(zstore, blob_path(sha), np.frombuffer(data, dtype=np.uint8),
                               attributes={"uws_file": {"sha256": sha, "size": len(data)}})
            written.add(sha)
        files[name] = {"sha256": sha, "size": len(data), "path": blob_path(sha)}
    return {"format": plan.format, "weights": dict(plan.weights), "files": files, "skipped": list(plan.skipped)}
