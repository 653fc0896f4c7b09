"""The converter's options, one place for the notebook widget and the JupyterLab panel.

A form is a mapping of the options below (as the view sends them). ``normalize`` types and
checks a form from JSON, ``problem`` says what does not fit, and ``convert_kwargs`` /
``add_kwargs`` turn it into the keyword arguments of ``uwsfmt.convert`` / ``Store.extend``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from uwsfmt import ConfigError
from uwsfmt.writer.options import CHOICES

# the library's lists (uwsfmt.writer.options.CHOICES), as the form shows them
RESIDUAL_BITS = (0, *sorted(CHOICES["residual_bits"], reverse=True))  # 0: no residual
MODES = CHOICES["side"]
MEAN_DTYPES = CHOICES["mean_dtype"]  # how family means are stored (uwsfmt.convert's mean_dtype)
BASIS_METHODS = CHOICES["basis_method"]

#: every option of the form and its default (the view sends them all with each button)
DEFAULTS: dict[str, Any] = {
    "sources": "", "output": "", "action": "create", "skip_existing": True, "rank_mode": "auto", "tau": 0.99,
    "rank": 16, "center": True, "mode": "auto", "residual_bits": 0, "max_error": None, "basis": "exact",
    "mean_dtype": "auto", "device": "cpu", "overwrite": False,
}
_TYPES: dict[str, tuple[type, ...]] = {
    "action": (str,), "skip_existing": (bool,), "rank_mode": (str,), "tau": (int, float), "rank": (int,),
    "center": (bool,), "mode": (str,), "residual_bits": (int,), "max_error": (int, float, type(None)), "basis": (str,),
    "mean_dtype": (str,), "device": (str,), "overwrite": (bool,),
}


def available_devices() -> list[str]:
    """Devices a build can run on here: "cpu", plus "cuda" only when torch sees a GPU.

    >>> available_devices()[0]
    'cpu'
    """
    devices = ["cpu"]
    try:
        import torch

        if torch.cuda.is_available():
            devices.append("cuda")
    except Exception:  # noqa: BLE001 - no torch, no CUDA
        pass
    return devices


def normalize(form: Mapping[str, Any]) -> dict[str, Any]:
    """The options of ``form`` (defaults for those missing), each checked for its JSON type.

    >>> normalize({"rank_mode": "rank", "rank": 4})["rank"]
    4
    >>> normalize({"rank": "many"})
    Traceback (most recent call last):
    ...
    uwsfmt.errors.ConfigError: option 'rank': expected int, got 'many' (str)
    """
    if not isinstance(form, Mapping):
        raise ConfigError(f"options: expected an object of converter options, got {type(form).__name__}")
    out = {k: v for k, v in DEFAULTS.items() if k not in ("sources", "output")}
    for name, value in form.items():
        if name not in _TYPES:
            continue  # sources/output are checked by the caller; unknown names are ignored like the widget does
        ok = _TYPES[name]
        if isinstance(value, bool) and bool not in ok:
            ok = ()  # JSON true is not a number here
        if not isinstance(value, ok):
            names = "/".join("null" if t is type(None) else t.__name__ for t in _TYPES[name])
            raise ConfigError(f"option {name!r}: expected {names}, got {value!r} ({type(value).__name__})")
        out[name] = value
    return out


def problem(form: Mapping[str, Any], *, devices: list[str], modes: tuple[str, ...] | list[str] = MODES,
            output: str = "", output_is_dir: bool = False, output_is_file: bool = False) -> str | None:
    """What does not fit in the form's options (None: all fit). ``output``: the store path as shown."""
    action = form.get("action")
    max_error = form.get("max_error")
    if action not in ("create", "add"):
        return f"Unknown action {action!r}; choose create (a new store) or add (to an existing store)."
    if max_error is not None and max_error < 0:
        return f"The error budget must be >= 0 (relative error, e.g. 0.001), not {max_error:g}."
    if form.get("device") not in devices:
        return f"Device {form.get('device')!r} is not available here; choose one of {', '.join(devices)}."
    if action == "add":
        if not output:
            return "Enter the path of the store to add the models to, e.g. family.uws."
        if not output_is_dir:
            return (f"{output} is not a store directory to add to" + (" (a zipped store is read-only: unpack it first)"
                    if output_is_file else "") + ". Choose 'create a new store' to make one.")
        return None
    rank_mode, tau, rank = form.get("rank_mode"), form.get("tau"), form.get("rank")
    if rank_mode not in ("auto", "tau", "rank"):
        return f"Unknown rank choice {rank_mode!r}."
    if rank_mode == "tau" and not (0.0 < tau <= 1.0):
        return f"The explained-variance threshold tau must be in (0, 1], not {tau:g}."
    if rank_mode == "rank" and rank < 0:
        return f"The rank must be a whole number >= 0, not {rank}."
    if form.get("mode") not in modes:
        return f"Unknown basis side {form.get('mode')!r}; choose one of {', '.join(modes)}."
    if form.get("residual_bits") not in RESIDUAL_BITS:
        return f"Unknown residual {form.get('residual_bits')!r}; choose one of {', '.join(map(str, RESIDUAL_BITS))} bits (0: none)."
    if form.get("basis") not in BASIS_METHODS:
        return f"Unknown basis method {form.get('basis')!r}; choose {' or '.join(BASIS_METHODS)}."
    if form.get("mean_dtype") not in MEAN_DTYPES:
        return f"Unknown mean storage {form.get('mean_dtype')!r}; choose {', '.join(MEAN_DTYPES)}."
    if not output:
        return "Enter the output path of the new store, e.g. family.uws."
    return None


def convert_kwargs(form: Mapping[str, Any]) -> dict:
    """The keyword arguments ``form`` passes to ``uwsfmt.convert`` besides sources/out (its
    one-by-one keywords, which it maps onto ``Fidelity`` / ``BuildOptions``).

    >>> kw = convert_kwargs({**DEFAULTS, "rank_mode": "rank", "rank": 4, "mode": "left", "residual_bits": 4})
    >>> kw["rank"], kw["mode"], kw["residual_bits"], kw["center"]
    (4, 'left', 4, 'mean')
    """
    kw: dict[str, Any] = {"rank": None, "tau": None}
    if form["rank_mode"] == "rank":
        kw["rank"] = int(form["rank"])
    elif form["rank_mode"] == "tau":
        kw["tau"] = float(form["tau"])
    kw["center"] = "mean" if form["center"] else "none"  # the form's checkbox: subtract the family mean first
    kw["device"] = form["device"] or None
    if form["mode"] != MODES[0]:  # the library's default otherwise
        kw["mode"] = form["mode"]
    if form["residual_bits"]:
        kw["residual_bits"] = int(form["residual_bits"])
    if form["max_error"] is not None:
        kw["max_error"] = float(form["max_error"])
    if form["basis"] != BASIS_METHODS[0]:
        kw["basis"] = form["basis"]
    if form["mean_dtype"] != "auto":
        kw["mean_dtype"] = form["mean_dtype"]
    if form["overwrite"]:
        kw["overwrite"] = True
    return kw


def add_kwargs(form: Mapping[str, Any]) -> dict:
    """The keyword arguments ``form`` passes to ``Store.extend`` when adding to a store (the store's
    own bases decide ranks, sides and residuals; only these apply).

    >>> add_kwargs({**DEFAULTS, "max_error": 0.01})
    {'device': 'cpu', 'skip_existing': True, 'max_error': 0.01}
    """
    kw: dict[str, Any] = {"device": form["device"] or None, "skip_existing": bool(form["skip_existing"])}
    if form["max_error"] is not None:
        kw["max_error"] = float(form["max_error"])
    return kw
