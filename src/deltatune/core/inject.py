"""``inject``: place a named delta into an unmodified model."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from . import per_sample
from .calibration import calibrate, provide
from .config import DeltaConfig
from .delta import Delta, Gate
from .errors import AdapterNameError, ConfigError, TargetError
from .geometry import LayerInfo, is_quantized
from .layers import DeltaLayer
from .lifecycle import activate, active_adapters, adapters, combination, delta_layers
from .registry import get_method
from .sequence import sync
from .targeting import Matcher, module_config, resolve_targets, walk
from .ties import tie_deltas

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]{0,127}")
_RESERVED = frozenset(dir(nn.ModuleDict())) | {"__base__"}


def check_name(name: str) -> str:
    """Validate an adapter name (it becomes a directory name and a module key).

    Raises:
        AdapterNameError: empty, too long, a reserved word, or characters outside
            ``[A-Za-z0-9_-]`` (no path separators, no dots).
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in _RESERVED:
        raise AdapterNameError(
            f"invalid adapter name {name!r}: use 1-128 letters, digits, '_' or '-' (not "
            "starting with '-'; no dots or path separators, since names become directory "
            "names), and not a reserved word")
    return name


def inject(
    model: nn.Module,
    config: DeltaConfig,
    name: str = "default",
    *,
    trainable: bool = True,
    data: Iterable[Any] | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
) -> nn.Module:
    """Add a named delta to ``model`` in place and make it active; the base is frozen.

    Args:
        model: any ``nn.Module`` container (a Hugging Face model or plain torch).
        config: a registered method's config, e.g. ``LoraConfig(rank=8)``.
        name: the delta's name (see ``check_name``).
        trainable: whether the new delta's parameters require grad.
        data: for methods that initialise from data (``Delta.calibration_for(config)``: LoRA-GA,
            CorDA, LoRA-SB, sparse deltas scored by Fisher information …), a few batches —
            dicts of keyword tensors, tuples or tensors — run through the model once
            (``core.calibration``); other methods (and configs) take none.
        loss_fn: ``loss_fn(output, batch)`` → scalar loss, for inits that read gradients;
            default: the model output's ``loss``.

    Returns:
        ``model`` itself, with every base parameter frozen, the new delta active alongside
        the deltas already active, and other deltas' trainability unchanged.

    Raises:
        AdapterNameError: invalid or taken name.
        ConfigError: the config's method is not registered; data missing for a method that
            initialises from it (or given to one that does not), or no loss to take.
        TargetError: targets match nothing the method can adapt.
    """
    spec = get_method(config.method) if config.method else None
    if spec is None or not isinstance(config, spec.config_class):
        raise ConfigError(f"{type(config).__name__} is not a registered method's config")
    cls = spec.delta_class
    config = cls.complete(model, config)
    targets = resolve_targets(model, config, cls.layer_kinds, cls.default_targets, spec.name,
                              cls.accepts)
    needs = cls.calibration_for(config)
    if not needs and data is not None:
        raise ConfigError(f"{spec.name!r} does not initialise from data"
                          f"{' with this config' if cls.calibration else ''}; drop data=")
    check_name(name)
    stats = calibrate(model, targets, needs, data, loss_fn=loss_fn,
                      method=spec.name) if needs else {}
    config = cls.allocate(model, config, targets, stats)
    with provide(stats):  # read by the deltas' reset_parameters, freed after
        return attach(model, config, name, targets, trainable=trainable, init=True)


def attach(
    model: nn.Module,
    config: DeltaConfig,
    name: str,
    targets: Mapping[str, LayerInfo],
    *,
    trainable: bool,
    init: bool,
) -> nn.Module:
    """Build one delta per target module and wrap the modules (shared by inject and load).

    Every delta is built before the model is touched, so a failure leaves it unchanged.
    """
    check_name(name)
    if name in adapters(model):
        raise AdapterNameError(f"an adapter named {name!r} already exists; pick another name "
                               "or delete it first with deltatune.delete(model, name)")
    cls: type[Delta] = get_method(config.method).delta_class
    matcher = Matcher(model)
    shared = build_shared(cls, config, targets, matcher, init=init)
    built = []
    for path, info in targets.items():
        base = matcher.modules[path]
        delta = build_delta(cls, base, info, module_config(matcher, config, path), path,
                            init=init, shared=shared)
        built.append((path, info, delta, _tap_modules(matcher, delta)))
    if cls.ties:
        tie_deltas({path: delta for path, _, delta, _ in built}, matcher)
    mode = combination(model)
    layers = delta_layers(model)
    for path, info, delta, taps in built:
        delta.adapter_config = config
        layer = layers.get(path)
        if layer is None:
            layer = DeltaLayer(matcher.modules[path], info)
            for alias in matcher.aliases[path]:
                set_module(model, alias, layer)
        layer.train(layer.base_layer.training)  # new modules follow the model's mode
        delta.train(layer.base_layer.training)
        delta.bind(layer.base_layer)
        layer.add(name, delta, matcher.modules[info.tap] if delta.reads_tap else None, taps)
        delta.requires_grad_(trainable)
    _freeze_base(model)
    sync(model)
    per_sample.sync(model)  # the adapter_names= hooks; drops cached per-sample plans
    if isinstance(mode, dict):  # keep the weights; the new delta joins at weight 1
        activate(model, [*active_adapters(model), name], weights={**mode, name: 1.0})
    else:
        activate(model, [*active_adapters(model), name], combine=mode)
    return model


def _tap_modules(matcher: Matcher, delta: Delta) -> dict[str, nn.Module]:
    """The modules at ``delta.taps`` (logical paths).

    Raises:
        TargetError: a path names no module of the model.
    """
    missing = [p for p in delta.taps if p not in matcher.modules]
    if missing:
        raise TargetError(f"{delta.path}: the {delta.method!r} delta reads the inputs of "
                          f"{missing}, which this model does not have; it was made for another "
                          "architecture (or depth)")
    return {p: matcher.modules[p] for p in delta.taps}


def build_delta(cls: type[Delta], base: nn.Module, info: LayerInfo, config: DeltaConfig,
                path: str, *, init: bool = True, device: torch.device | str | None = None,
                shared: nn.Module | None = None) -> Delta:
    """One delta for ``base``, on its device (or ``device``) and in the config's dtype.

    Parameters are created and initialised in fp32 (the same random stream whatever the final
    dtype), then cast. On the ``meta`` device nothing is initialised (used by ``cost``).
    ``shared`` (from ``build_shared``) becomes the delta's ``shared`` submodule.
    """
    dtype, device = _placement(base, config, path, device)
    if config.gate and not cls.gating:
        raise ConfigError(f"{cls.method!r} deltas cannot be gated ({path}): a gate multiplies "
                          "one added effect, and this method's is a weight change or a "
                          "scaling; drop gate=True")
    with torch.device(device):
        delta = cls(info, config, path)
        if config.gate and cls.gating == "output":
            delta.gate = Gate(cls.gate_dim(info, config))
    if shared is not None:
        delta.shared = shared
    if init and device.type != "meta":
        delta.reset_parameters(base)
        if delta.gate is not None:
            delta.gate.reset_parameters()
    return delta.to(dtype=dtype)


def build_shared(cls: type[Delta], config: DeltaConfig, targets: Mapping[str, LayerInfo],
                 matcher: Matcher, *, init: bool = True,
                 device: torch.device | str | None = None) -> nn.Module | None:
    """The adapter-wide shared module of ``cls`` (``None`` for most methods), placed like the
    deltas on the first target's device and dtype, initialised in fp32 then cast."""
    first = next(iter(targets))
    dtype, device = _placement(matcher.modules[first], config, first, device)
    with torch.device(device):
        shared = cls.build_shared(config, targets)
    if shared is None:
        return None
    if init and device.type != "meta" and hasattr(shared, "reset_parameters"):
        shared.reset_parameters()
    return shared.to(dtype=dtype)


def _placement(base: nn.Module, config: DeltaConfig, path: str,
               device: torch.device | str | None) -> tuple[torch.dtype, torch.device]:
    weight = next(base.parameters(), None)
    if weight is None:
        raise TargetError(f"{path!r} has no parameters to take a device and dtype from")
    native = base.weight_dtype if is_quantized(base) else weight.dtype  # dequantized dtype
    dtype = getattr(torch, config.dtype) if config.dtype else native
    if not dtype.is_floating_point:
        raise ConfigError(f"{path!r} has {weight.dtype} weights; set dtype= in the config "
                          "to choose the delta's floating-point dtype")
    return dtype, torch.device(device) if device is not None else weight.device


def _freeze_base(model: nn.Module) -> None:
    own = {id(p) for layer in delta_layers(model).values() for p in layer.deltas.parameters()}
    for p in model.parameters():
        if id(p) not in own:
            p.requires_grad_(False)


def set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the module at logical ``path`` (seeing through wrappers) with ``new``."""
    parent_path, _, attr = path.rpartition(".")
    parent = dict(walk(model))[parent_path]
    if isinstance(parent, DeltaLayer):
        parent = parent.base_layer
    setattr(parent, attr, new)
