"""Converting a model's Linear layers to quantized storage, loading one quantized, and back."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.errors import ConfigError, StateError, TargetError
from ..core.geometry import is_quantized
from ..core.inject import set_module
from ..core.lifecycle import delta_layers, dequantize_bases
from ..core.targeting import ALL_LINEAR, Matcher, walk
from .linear import QuantizedLinear
from .schemes import make_scheme

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def quantize(model: nn.Module, scheme: str = "nf4", *,
             targets: Sequence[str] | str | None = None,
             exclude: Sequence[str] | str | None = None,
             compute_dtype: torch.dtype | str | None = None, block_size: int = 64,
             scaler_block_size: int = 256, backend: str = "torchao") -> nn.Module:
    """Replace the model's ``nn.Linear`` layers by frozen ``QuantizedLinear`` ones, in place.

    Quantize the base first, then inject deltas (LoRA on an NF4 base is QLoRA); the deltas
    train in the dtype the layers compute in.

    Args:
        model: any ``nn.Module`` (a Hugging Face model or plain torch), without deltas yet.
        scheme: ``"nf4"`` (4-bit NormalFloat, double-quantized scales) or ``"int8"``
            (per-row int8).
        targets: which layers, in deltatune's target syntax (suffix names, canonical names, a
            regex); ``None``: every ``nn.Linear`` but the output head (``"all-linear"``), so
            the LM head and the embeddings stay in full precision.
        exclude: layers to leave in full precision, in the same syntax.
        compute_dtype: the dtype the layers dequantize to and multiply in (the weight is
            converted to it before quantization); ``None``: each layer's own dtype, the matmul
            in the activations' dtype.
        block_size: NF4: weights per quantization block (must divide each weight's size with
            torchao; 64 … 4096 with bitsandbytes).
        scaler_block_size: NF4 with torchao: block scales per second-level scale (the largest
            divisor of a layer's block count not above it is used).
        backend: ``"torchao"`` or ``"bitsandbytes"`` (if installed).

    Returns:
        ``model``, with the selected layers quantized and frozen.

    Raises:
        ConfigError: an unknown scheme / backend / dtype, block sizes that do not fit a layer,
            or the backend is not installed.
        TargetError: targets match nothing, or no ``nn.Linear``, or a layer whose weight is
            shared with another module.
        StateError: a selected layer is already quantized, or the model already has deltas.
    """
    quant = make_scheme(scheme, backend, block_size=block_size,
                        scaler_block_size=scaler_block_size)
    dtype = _dtype(compute_dtype)
    if delta_layers(model):
        raise StateError("the model already has deltas; quantize the base model first, then "
                         "inject (deltas initialise from the weights they are placed on)")
    chosen = _select(model, targets, exclude)
    for name, module in chosen.items():  # every layer checked before any is converted
        quant.check(module.weight.shape, name)
    aliases = Matcher(model).aliases
    for name in list(chosen):
        new = QuantizedLinear.from_linear(chosen.pop(name), quant, dtype)
        for alias in aliases[name]:
            set_module(model, alias, new)
    return model


def load_quantized(path: str | Path, scheme: str = "nf4", *, model_class: Any = None,
                   dtype: torch.dtype | str = torch.bfloat16, **options: Any) -> nn.Module:
    """Load a Hugging Face model from ``path`` and quantize it (``quantize``).

    The checkpoint is loaded in ``dtype`` first, so loading needs the memory of the model in
    that dtype once; the quantized layers then replace the dense ones.

    Args:
        path: a directory written by ``save_pretrained`` (or anything ``from_pretrained`` takes).
        scheme: as in ``quantize``.
        model_class: the ``transformers`` class to load with (default
            ``AutoModelForCausalLM``).
        dtype: the dtype to load the checkpoint in.
        **options: ``quantize``'s keyword arguments (``targets``, ``exclude``,
            ``compute_dtype``, ``block_size``, ``scaler_block_size``, ``backend``), the rest
            go to ``from_pretrained``.

    Returns:
        The loaded, quantized model.

    Raises:
        ConfigError: transformers is not installed, or as ``quantize``.
    """
    keys = ("targets", "exclude", "compute_dtype", "block_size", "scaler_block_size", "backend")
    quant_options = {k: options.pop(k) for k in keys if k in options}
    make_scheme(scheme, quant_options.get("backend", "torchao"),  # fail before loading
                block_size=quant_options.get("block_size", 64),
                scaler_block_size=quant_options.get("scaler_block_size", 256))
    if model_class is None:
        try:
            from transformers import AutoModelForCausalLM
        except ImportError as exc:
            raise ConfigError("load_quantized needs transformers (pip install transformers), "
                              "or pass model_class=") from exc
        model_class = AutoModelForCausalLM
    model = model_class.from_pretrained(str(path), dtype=_dtype(dtype), **options)
    return quantize(model, scheme, **quant_options)


def dequantize(model: nn.Module) -> nn.Module:
    """Replace every ``QuantizedLinear`` by a plain frozen ``nn.Linear`` holding its
    dequantized weight, in place (deltas stay attached; see also
    ``deltatune.unload(model, merge=True, dequantize=True)``).

    Returns:
        ``model``.
    """
    return dequantize_bases(model)


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{logical name: layer}`` of every layer storing its weight quantized (deltas'
    wrappers seen through)."""
    from ..core.layers import DeltaLayer

    out = {}
    for name, module in walk(model):
        layer = module.base_layer if isinstance(module, DeltaLayer) else module
        if is_quantized(layer) and layer not in out.values():
            out[name] = layer
    return out


# ------------------------------------------------------------------------------ internals
def _dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    if value is None or (isinstance(value, torch.dtype) and value in _DTYPES.values()):
        return value
    if isinstance(value, str) and value in _DTYPES:
        return _DTYPES[value]
    raise ConfigError(f"dtype must be one of {sorted(_DTYPES)} (or the torch dtype), got "
                      f"{value!r}")


def _select(model: nn.Module, targets: Sequence[str] | str | None,
            exclude: Sequence[str] | str | None) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers to quantize, by canonical name (aliases once)."""
    matcher = Matcher(model)
    spec = ALL_LINEAR if targets is None else targets
    skipped = set()
    if exclude is not None:
        skipped = {n for group in matcher.select(exclude, "exclude") for n in group}
    shared = _shared_params(model)
    chosen: dict[str, nn.Linear] = {}
    for group in matcher.select(spec, "targets"):
        linear = [n for n in group if isinstance(matcher.modules[n], nn.Linear)]
        if not linear and targets is not None:
            kinds = sorted({type(matcher.modules[n]).__name__ for n in group})
            raise TargetError(f"targets {group[:3]} are {kinds}, not nn.Linear layers; "
                              "deltatune.quant converts nn.Linear layers: name those")
        for name in linear:
            canon = matcher.canonical(name)
            module = matcher.modules[canon]
            if canon in chosen or name in skipped or canon in skipped:
                continue
            if is_quantized(module) or type(module.weight) not in (Tensor, nn.Parameter):
                raise StateError(f"{name} is already quantized ({type(module.weight).__name__}"
                                 " weight); quantize each layer once, or leave it out with "
                                 "exclude=[...]")
            if id(module.weight) in shared:
                raise TargetError(f"the weight of {name} is shared with another module (tied "
                                  "embeddings?); quantizing it would untie them. Leave it out "
                                  "with exclude=[...]")
            chosen[canon] = module
    if not chosen:
        raise TargetError(f"no nn.Linear layer of {type(model).__name__} is left to quantize "
                          f"(targets={targets!r}, exclude={exclude!r})")
    return chosen


def _shared_params(model: nn.Module) -> set[int]:
    """Ids of parameters owned by more than one module object."""
    owners: dict[int, set[int]] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), set()).add(id(module))
    return {pid for pid, mods in owners.items() if len(mods) > 1}


__all__ = ["dequantize", "load_quantized", "quantize", "quantized_layers"]
