"""The Encoding protocol and its registry: one module per encoding, found by the name in a manifest entry.

A tensor entry names its encoding (``"subspace"``, ``"shared"``, ``"dense"``; a LoRA module is a
subspace entry with a ``lora`` record, and gets the ``"lora"`` encoding). Readers, validation
and reports ask the registry for the entry's :class:`Encoding` instead of comparing strings, so
adding an encoding means adding one module that calls :func:`register`.

An unknown encoding name refuses only the tensors that use it (spec section 12): reading one of
them raises a FormatError naming it, the rest of the model reads as usual.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from uwsfmt.errors import ConflictError, FormatError
from uwsfmt.format import dtypes


@dataclass
class ReadContext:
    """One model being read: where its values are and where they go.

    ``reader``: the store (arrays, caches); ``idx``: the model's index; ``rows``: its pack rows
    (pack name -> 1-D tensor on ``device``); ``into``: the caller's tensors to fill where they fit
    (``load_into``), or None; ``dtype``: the dtype asked for (None: each tensor's source dtype);
    ``excepted``: names of tensors this model has an exception for (their rebuild is corrected
    after decoding, so it must stay in the compute dtype).
    """

    reader: Any
    idx: int
    rows: dict[str, torch.Tensor]
    device: torch.device
    into: dict[str, torch.Tensor] | None = None
    dtype: torch.dtype | None = None
    excepted: frozenset[str] | set[str] = field(default_factory=frozenset)
    #: one tensor read on its own from its own slots (``Store.tensor``): kept apart in the caches
    single: bool = False

    def wants(self, name: str) -> bool:
        """Whether the caller gave a tensor of its own for ``name``."""
        return self.into is not None and name in self.into

    def place(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """Copy ``t`` into the caller's tensor ``into[name]`` (casting like ``load_state_dict``)."""
        assert self.into is not None
        d = self.into[name]
        if d is t:
            return d
        if tuple(d.shape) != tuple(t.shape):
            raise ConflictError(f"{self.reader.path}: tensor {name!r} is {list(t.shape)} in the store but {list(d.shape)} "
                                "in the module; load it into a module of the family's architecture")
        d.copy_(t)
        return d

    def returned_dtype(self, e: dict) -> torch.dtype:
        """The dtype a reader returns tensor ``e`` in: the one asked for where the tensor is
        floating point, else its source dtype."""
        return self.dtype if (self.dtype is not None and dtypes.is_float(e["dtype"])) else dtypes.torch_dtype(e["dtype"])


@dataclass
class EncodeContext:
    """One model being written (pass 2 of a build, or an append).

    ``rows``: its pack rows (pack name -> 1-D numpy array) to fill; ``per_model``: tensors stored
    as arrays of their own (name -> tensor); ``fits``: each tensor's shared part (a subspace Fit,
    a shared value); ``error_budget``: the store's (or None); ``corrections``: where a tensor the
    shared part cannot hold within the budget gets its per-model exception (None: refuse
    instead); ``where``: the source, for messages.
    """

    model_id: str
    where: str
    rows: dict[str, Any]
    fits: dict[str, Any]
    per_model: dict[str, torch.Tensor] = field(default_factory=dict)
    error_budget: Any = None
    corrections: dict | None = None
    #: name -> a projected tensor's rebuild and norms, for the caller's budget check (see Subspace.encode)
    rebuilt: dict[str, dict] = field(default_factory=dict)


@dataclass
class EntryContext:
    """One tensor's manifest entry being written by a build, after pass 1 (the driver, in tensor
    order: pack slots are laid out in that order).

    ``node``: the tensor's group path; ``packs``: the build's pack layout (where slots come from);
    ``write(path, array)``: how its shared arrays are written; ``residual_bits`` /
    ``coefficient_scheme``: the tensor's settings (a subspace tensor); ``lora``: a LoRA module's
    plan (:class:`~uwsfmt.encodings.lora.planning.ModulePlan`).
    """

    node: str
    shape: tuple[int, ...] | None
    dtype: str
    packs: Any
    write: Callable[[str, Any], None]
    residual_bits: int | None = None
    coefficient_scheme: Any = None
    lora: Any = None


#: how ``validate`` looks at a stored array: ``expect(path, shape, dtype, what)`` -> the array, or
#: None; a missing array, or one of another shape or dtype (``"a|b"``: either), is noted as a problem
Expect = Callable[[str, Sequence[int] | None, str | None, str], Any]


class Encoding(ABC):
    """How one kind of tensor entry keeps its values, and how a reader gets them back."""

    #: the name in manifest entries (``"lora"``: subspace entries with a ``lora`` record)
    name: ClassVar[str]
    #: True where every model's value is the same stored array (nothing per model)
    shared_value: ClassVar[bool] = False

    @abstractmethod
    def slots(self, e: dict) -> list[dict]:
        """The pack slots one model's values of entry ``e`` occupy (empty: none in the packs)."""

    @abstractmethod
    def read(self, ctx: ReadContext, entries: list[dict]) -> dict[str, torch.Tensor]:
        """One model's tensors of ``entries`` (all of this encoding), by name.

        A tensor may come back in the compute dtype (the reader casts it) or, where the caller
        gave one (``ctx.into``), be the caller's own tensor already filled.
        """

    #: whether a model's values are projected (NaN/Inf in a source then show as a non-finite
    #: error, checked after encoding) rather than copied (checked before)
    projects: ClassVar[bool] = False

    @abstractmethod
    def write_entry(self, e: dict, fit: Any, ctx: EntryContext) -> None:
        """Fill manifest entry ``e`` (its name, node, dtype, shape and budget already there) with
        this encoding's fields and ``encoding``, writing pass 1's shared arrays (``fit``: what
        pass 1 found, e.g. a subspace Fit or the shared value) and taking its pack slots."""

    #: whether a model's values are encoded against pass 1's result (kept for pass 2 and appends)
    keeps_fit: ClassVar[bool] = True

    def encode(self, ctx: EncodeContext, e: dict, w: torch.Tensor) -> tuple[float | None, float | None]:
        """Write one model's tensor ``w`` of entry ``e``; its (relative error, delta error) as a reader gets it back."""
        raise NotImplementedError(f"the {self.name!r} encoding is written by its own batch path")

    def reads_single(self, e: dict) -> bool:
        """Whether one model's tensor ``e`` can be read from its own pack slots alone (``Store.tensor``);
        else it is read through the whole-model path (cached shared values, per-model arrays)."""
        return bool(self.slots(e))

    def shape_may_vary(self, e: dict) -> bool:
        """Whether models may hold entry ``e`` in shapes of their own (else every model has ``e["shape"]``)."""
        return False

    def stored_fit(self, reader: Any, e: dict, device: torch.device) -> Any:
        """What a new model is encoded against (appending): the stored shared part of ``e``, or None."""
        return None

    def output_names(self, e: dict) -> list[str]:
        """The names a model's read gives back for entry ``e`` (a LoRA module: its factors)."""
        return [e["name"]]

    # ------------------------------------------------------------- what a reader checks (validate)

    @property
    def format_name(self) -> str:
        """The value of ``encoding`` in this encoding's entries (a LoRA module is a ``"subspace"`` entry)."""
        return self.name

    #: whether a model's exception (spec §6.6) may apply to this encoding's tensors
    takes_exceptions: ClassVar[bool] = False

    def unknown_value(self, e: dict) -> str | None:
        """A value of entry ``e``'s open fields this reader does not know (spec §12), named; or None."""
        return None

    @abstractmethod
    def check_declared(self, e: dict, what: str, problems: list[str]) -> None:
        """Note in ``problems`` where ``e``'s declared shape and dtype disagree with its own slots and
        fields (spec §3.4, §4, §6); ``what`` names the tensor in messages."""

    @abstractmethod
    def check_stored(self, store: Any, e: dict, what: str, problems: list[str], expect: Expect, tol: float) -> None:
        """Note in ``problems`` where the arrays entry ``e`` of ``store`` names are missing, of the wrong
        shape or dtype, or off by more than ``tol`` from what the spec demands of their values (an
        orthonormal basis), or where ``e`` uses what the store's declared format version does not
        allow; ``expect``: see :data:`Expect`."""


def version_minor(manifest: dict) -> int:
    """The minor version a manifest declares (``"1.3"`` -> 3)."""
    return int(str(manifest["format_version"]).split(".")[1])


REGISTRY: dict[str, Encoding] = {}


def register(enc: Encoding) -> Encoding:
    """Make ``enc`` the encoding for entries that name ``enc.name``."""
    REGISTRY[enc.name] = enc
    return enc


def format_names() -> frozenset[str]:
    """The ``encoding`` values this uwsfmt reads (spec §3.4; a later 1.y may add more, §12)."""
    return frozenset(enc.format_name for enc in REGISTRY.values())


def kind_of(e: dict) -> str:
    """The registry key of entry ``e``: its ``encoding``, or ``"lora"`` for a LoRA module."""
    return "lora" if e.get("lora") is not None else e["encoding"]


def for_entry(e: dict, where: str = "") -> Encoding:
    """The Encoding of entry ``e``; an unknown one is a FormatError naming the tensor."""
    enc = REGISTRY.get(kind_of(e))
    if enc is None:
        raise FormatError(f"{where + ': ' if where else ''}tensor {e.get('name')!r} has encoding {e.get('encoding')!r}, which "
                          f"this uwsfmt does not know (known: {', '.join(sorted(REGISTRY))}); upgrade uwsfmt to read it")
    return enc


def by_encoding(entries: Iterable[dict], where: str = "") -> dict[Encoding, list[dict]]:
    """``entries`` grouped by their Encoding, in first-seen order."""
    out: dict[Encoding, list[dict]] = {}
    for e in entries:
        out.setdefault(for_entry(e, where), []).append(e)
    return out
