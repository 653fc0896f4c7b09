"""Straight from a store into transformers: no folder, no temporary files.

:func:`from_store` builds the model from the config the store kept (spec section 15) with its
parameters on the meta device (nothing allocated, nothing initialised: accelerate's
``init_empty_weights`` where installed, else an ordinary construction), gives each parameter
empty memory on the target device, and rebuilds the weights straight into it through
:meth:`uwsfmt.Store.load_into` (the fast path: bases cached on the device, one row read per
pack). Tied weights (an LM head sharing the embedding) stay tied: they are one parameter, filled
once. Buffers computed at construction (rotary frequencies) are kept as constructed.

transformers is needed here only; uwsfmt itself does not depend on it.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import torch

from uwsfmt.errors import ConfigError, ConflictError, NotFoundError
from uwsfmt.numerics.device import resolve_device
from uwsfmt.reader.files import file_names, read_file
from uwsfmt.reader.store import ModelRef


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError("uwsfmt.hf needs transformers: pip install transformers") from None
    return transformers


def _json_file(store, model: ModelRef, name: str) -> dict:
    try:
        data = json.loads(read_file(store, model, name))
    except NotFoundError:
        raise
    except ValueError as e:
        raise ConfigError(f"{store.path}: the kept {name} of model {store.model_entry(model)['id']!r} is not JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{store.path}: the kept {name} of model {store.model_entry(model)['id']!r} is not a JSON object")
    return data


def config(store, model: ModelRef):
    """The transformers config of one model, from the ``config.json`` the store kept.

    >>> cfg = uwsfmt.hf.config(uwsfmt.open("family.uws"), "ft2")  # doctest: +SKIP
    >>> cfg.model_type  # doctest: +SKIP
    'gpt2'
    """
    tf = _transformers()
    mid = store.model_entry(model)["id"]
    if "config.json" not in file_names(store, model):
        raise NotFoundError(f"{store.path}: model {mid!r} has no kept config.json (it was not read from a Hugging Face "
                            "model folder, or was converted with keep_files=False); build the module yourself and use "
                            "store.load_into(module, model)")
    data = _json_file(store, model, "config.json")
    model_type = data.get("model_type")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        hint = " (its auto_map needs remote code, which uwsfmt never runs)" if data.get("auto_map") else ""
        raise ConfigError(f"{store.path}: model {mid!r}: config.json names model_type {model_type!r}, which transformers "
                          f"{tf.__version__} does not know{hint}")
    return CONFIG_MAPPING[model_type].from_dict(data)


def _empty_weights():
    """Parameters on the meta device while a model is constructed (buffers stay real)."""
    try:
        from accelerate import init_empty_weights
    except ImportError:
        return contextlib.nullcontext()
    return init_empty_weights(include_buffers=False)


def _materialize(module: torch.nn.Module, device: torch.device, dtype: torch.dtype | None) -> None:
    """Give every parameter empty memory on ``device`` (floating ones in ``dtype``), keeping tied
    parameters one object; move buffers to ``device``."""
    fresh: dict[int, torch.nn.Parameter] = {}
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) not in fresh:
                want = dtype if (dtype is not None and p.is_floating_point()) else p.dtype
                fresh[id(p)] = torch.nn.Parameter(torch.empty(p.shape, dtype=want, device=device), requires_grad=p.requires_grad)
            mod._parameters[name] = fresh[id(p)]
        for name, b in list(mod._buffers.items()):
            if b is not None and b.device != device:
                mod._buffers[name] = b.to(device)


def _dtype_of(cfg, dtype) -> torch.dtype | None:
    if dtype is not None:
        return dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype))
    want = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    if isinstance(want, torch.dtype):
        return want
    if isinstance(want, str) and isinstance(getattr(torch, want, None), torch.dtype):
        return getattr(torch, want)
    return None


def from_store(store, model: ModelRef, model_class: Any = None, *, device: str | torch.device | None = None,
               dtype: torch.dtype | str | None = None, strict: bool = True):
    """A transformers model of one model of ``store``, built from its kept config, with weights
    rebuilt straight into it (no folder, no temporary file). Returned in eval mode, like
    ``from_pretrained``.

    ``model_class``: e.g. ``AutoModelForCausalLM`` or ``GPT2LMHeadModel`` (default: the config's
    first ``architectures`` entry). ``device``: where it lives (default cpu). ``dtype``: of its
    floating-point parameters (default: the config's ``dtype``, as ``from_pretrained`` does).
    ``strict``: refuse tensors of the store that the model has no place for (False: skip them).
    Parameters the store does not hold are always refused, unless tied to one it does (buffers
    it does not hold keep the values the model's constructor gave them).

    >>> from transformers import AutoModelForCausalLM  # doctest: +SKIP
    >>> lm = uwsfmt.hf.from_store(uwsfmt.open("family.uws"), "ft2", AutoModelForCausalLM, device="cuda")  # doctest: +SKIP
    """
    tf = _transformers()
    cfg = config(store, model)
    mid = store.model_entry(model)["id"]
    if model_class is None:
        arch = (getattr(cfg, "architectures", None) or [None])[0]
        model_class = getattr(tf, arch, None) if isinstance(arch, str) else None
        if model_class is None:
            raise ConfigError(f"{store.path}: model {mid!r}: config.json names no architecture transformers has ({arch!r}); "
                              "pass model_class (e.g. AutoModelForCausalLM)")
    dev = resolve_device(device)
    want = _dtype_of(cfg, dtype)
    with _empty_weights():
        if hasattr(model_class, "from_config"):  # the Auto* classes
            module = model_class.from_config(cfg)
        else:
            module = model_class(cfg)
    _materialize(module, dev, want)
    if hasattr(module, "tie_weights"):  # parameters made on the meta device are not tied yet (accelerate makes new ones)
        module.tie_weights()
    targets = module.state_dict()
    have = set(store.tensor_names)
    unexpected = sorted(have - set(targets))
    if strict and unexpected:
        raise ConflictError(f"{store.path}: model {mid!r} has tensors {type(module).__name__} has no place for: "
                            f"{', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}; pass the model class the "
                            "folder was saved from, or strict=False to leave them out")
    loaded = {k for k in targets if k in have}
    held = {targets[k].untyped_storage().data_ptr() for k in loaded}
    params = dict(module.named_parameters(remove_duplicate=False))  # buffers not in the store keep their constructed values
    missing = sorted(k for k, p in params.items() if k not in have and p.untyped_storage().data_ptr() not in held)
    if missing:
        raise ConflictError(f"{store.path}: model {mid!r} lacks weights {type(module).__name__} needs: "
                            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; pass the model class the folder "
                            "was saved from (e.g. AutoModelForCausalLM for a causal LM)")
    store.load_into(module, mid, strict=False)
    if "generation_config.json" in file_names(store, mid) and getattr(module, "generation_config", None) is not None:
        module.generation_config = tf.GenerationConfig.from_dict(_json_file(store, mid, "generation_config.json"))
    return module.eval()
