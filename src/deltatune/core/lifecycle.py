"""The life of named deltas on a model: activate, disable, delete, merge, unmerge, unload.

All state lives in the model's ``DeltaLayer`` wrappers; these functions read it from the tree,
so there is no second registry to fall out of sync.

Quantized base layers (``geometry.QuantizedWeight``, ``deltatune.quant``): merging reads the
dequantized weight and writes ``W + ΔW`` back by re-quantizing it, which rounds the result to
the quantization grid — lossy, so ``merge`` / ``unmerge`` / ``unload`` refuse unless given
``allow_lossy=True``. ``unload(merge=True, dequantize=True)`` is the exact alternative: every
quantized layer becomes a plain full-precision one first, and the deltas merge into that.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .config import DeltaConfig
from .delta import Delta, Params
from .errors import AdapterNameError, ConfigError, MergeError, StateError
from .geometry import base_params, creatable, is_quantized, weight_dtype
from .layers import DeltaLayer
from .registry import get_method
from .ties import fold_once, is_tied_twin, tied_params


def delta_layers(model: nn.Module) -> dict[str, DeltaLayer]:
    """``{logical module name: DeltaLayer}`` for every wrapped layer, in model order."""
    from .targeting import walk

    out: dict[str, DeltaLayer] = {}
    seen: set[int] = set()
    for name, module in walk(model):
        if isinstance(module, DeltaLayer) and id(module) not in seen:
            seen.add(id(module))
            out[name] = module
    return out


def adapters(model: nn.Module) -> dict[str, DeltaConfig]:
    """``{name: config}`` of every delta in ``model``, in order of first appearance."""
    out: dict[str, DeltaConfig] = {}
    for layer in delta_layers(model).values():
        for name, delta in layer.deltas.items():
            out.setdefault(name, delta.adapter_config)
    return out


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the active deltas, in activation order."""
    out: list[str] = []
    for layer in delta_layers(model).values():
        out.extend(n for n in layer.active if n not in out)
    return out


def merged_adapters(model: nn.Module) -> list[str]:
    """Names of the deltas folded into the base weights (on at least one layer)."""
    out: list[str] = []
    for layer in delta_layers(model).values():
        out.extend(n for n in layer.merged if n not in out)
    return out


def _names(model: nn.Module, names: str | Iterable[str] | None, default: list[str]) -> list[str]:
    if names is None:
        return default
    names = [names] if isinstance(names, str) else list(names)
    known = adapters(model)
    for name in names:
        if name not in known:
            raise AdapterNameError(f"no adapter named {name!r}; the model has {list(known)}")
    return names


def activate(model: nn.Module, names: str | Sequence[str], *, combine: str = "sum",
             weights: Sequence[float] | Mapping[str, float] | None = None) -> None:
    """Make exactly ``names`` active, in that order (an empty list deactivates all).

    Args:
        model: a model with deltas.
        names: the deltas to activate, in order.
        combine: how deltas on one layer combine: ``"sum"`` (sequential forms all read the
            base output and their effects add; other deltas apply in order, which sums
            additive deltas and multiplies scaling ones, as merging does) or ``"stack"``
            (each delta applies to the previous one's output).
        weights: one weight per name (a list in ``names`` order, or a mapping): the output is
            the base output plus the weighted sum of the deltas' effects (weights summing to
            one give a weighted average). Only for additive-composition deltas.

    Raises:
        AdapterNameError: an unknown name.
        ConfigError: a bad ``combine`` or ``weights``.
        StateError: a merged delta would be deactivated (its effect is in the weights), or
            weights are set while deltas are merged.
    """
    names = _names(model, names, [])
    if len(set(names)) != len(names):
        raise AdapterNameError(f"duplicate names in {names}")
    if combine not in ("sum", "stack"):
        raise ConfigError(f"combine must be 'sum' or 'stack', got {combine!r}")
    dropped = [n for n in merged_adapters(model) if n not in names]
    if dropped:
        raise StateError(f"{dropped} are merged into the base weights and cannot be "
                         "deactivated; unmerge them first (deltatune.unmerge)")
    mode: str | tuple[float, ...] = combine
    if weights is not None:
        mode = _check_weights(model, names, weights)
    for layer in delta_layers(model).values():
        layer.set_active(names, mode)


def combination(model: nn.Module) -> str | dict[str, float]:
    """How the active deltas combine: "sum", "stack", or ``{name: weight}``."""
    weights: dict[str, float] = {}
    for layer in delta_layers(model).values():
        if not layer.active:
            continue
        if isinstance(layer.combine, str):
            return layer.combine
        weights.update((n, layer.weight_of(n)) for n in layer.active)
    return weights or "sum"


def _check_weights(model: nn.Module, names: list[str],
                   weights: Sequence[float] | Mapping[str, float]) -> tuple[float, ...]:
    if isinstance(weights, Mapping):
        missing = sorted(set(names) - set(weights)) + sorted(set(weights) - set(names))
        if missing:
            raise ConfigError(f"weights must give exactly the activated names {names}; "
                              f"mismatched: {missing}")
        weights = [weights[n] for n in names]
    weights = tuple(float(w) for w in weights)
    if len(weights) != len(names) or not all(math.isfinite(w) for w in weights):
        raise ConfigError(f"weights must be {len(names)} finite numbers, one per name in "
                          f"{names}; got {weights}")
    if merged_adapters(model):
        raise StateError("weights cannot be set while deltas are merged; unmerge first")
    for name, config in adapters(model).items():
        if name in names:
            cls = get_method(config.method).delta_class
            if cls.composition != "add" or cls.transforms_input:
                raise ConfigError(f"{name!r} ({config.method}) scales its layer instead of "
                                  "adding to it, so it cannot be weighted; activate it "
                                  "without weights")
    return weights


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Context in which ``model`` behaves as its base model (every delta bypassed).

    Raises:
        StateError: some deltas are merged; their effect cannot be bypassed without
            unmerging, which must be asked for explicitly.
    """
    merged = merged_adapters(model)
    if merged:
        raise StateError(f"{merged} are merged into the base weights; call "
                         "deltatune.unmerge(model) before using disabled()")
    layers = list(delta_layers(model).values())
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, flag in zip(layers, before, strict=True):
            layer.disabled = flag


def delete(model: nn.Module, name: str) -> None:
    """Remove the delta ``name``; layers left without deltas are unwrapped.

    Raises:
        AdapterNameError: unknown name.
        StateError: the delta is merged (unmerge it, or ``unload(merge=True)`` to keep it).
    """
    _names(model, name, [])
    if name in merged_adapters(model):
        raise StateError(f"{name!r} is merged into the base weights; unmerge it first, or use "
                         "deltatune.unload(model, merge=True) to keep it in the weights")
    for path, layer in delta_layers(model).items():
        if name in layer.deltas:
            layer.remove(name)
            if not layer.deltas:
                _unwrap(model, path, layer)
    _sync_sequence(model)


def merge(model: nn.Module, names: str | Iterable[str] | None = None, *,
          safe: bool = True, allow_lossy: bool = False) -> None:
    """Fold deltas into the base weights (default: every active, unmerged delta).

    Merging a delta twice is a no-op. With ``safe=True`` every merged weight is computed and
    checked for NaN/Inf before any weight is written, so a failure leaves the model untouched.

    Args:
        model: the model with deltas.
        names: the deltas to merge (default: every active, unmerged one).
        safe: check every merged weight before writing any.
        allow_lossy: allow merging into quantized weights, which re-quantizes ``W + ΔW``
            (rounding it, and with it the delta, to the quantization grid).

    Raises:
        AdapterNameError: an unknown name.
        StateError: a named delta is not active.
        MergeError: a method is not mergeable, a weight is tied to another module, a weight is
            stored quantized and ``allow_lossy`` is not set, or (safe mode) the result is not
            finite.
    """
    names = _names(model, names, active_adapters(model))
    active = active_adapters(model)
    inactive = [n for n in names if n not in active]
    if inactive:
        raise StateError(f"{inactive} are not active; activate them before merging")
    todo = _merge_plan(model, names)
    for path, layer, deltas in todo:  # check first, write only if every layer passes
        if safe or (not allow_lossy and is_quantized(layer.base_layer)):
            _fold(path, layer, deltas, write=False, check=safe, lossy=allow_lossy)
    written: set[tuple[int, str]] = set()  # (tied weight, delta): folded in once
    for path, layer, deltas in todo:
        _fold(path, layer, deltas, write=True, check=False, lossy=True, written=written)


def unmerge(model: nn.Module, names: str | Iterable[str] | None = None, *,
            allow_lossy: bool = False) -> None:
    """Restore the base weights from merged deltas (default: all merged deltas).

    Every restored weight is computed and checked before any is written.

    Args:
        model: the model with merged deltas.
        names: the deltas to unmerge (default: every merged one).
        allow_lossy: allow writing quantized weights, which re-quantizes ``W' − ΔW`` (so the
            restored base differs from the original by the rounding).

    Raises:
        AdapterNameError: an unknown name.
        MergeError: a non-additive delta merged after one of ``names`` stays merged (unmerge
            it too), a weight is stored quantized and ``allow_lossy`` is not set, or the
            restored weights are not finite.
    """
    names = _names(model, names, merged_adapters(model))
    todo = []
    for path, layer in delta_layers(model).items():
        targets = [n for n in layer.merged if n in names]
        if not targets:
            continue
        kept_after = [n for n in layer.merged[layer.merged.index(targets[0]):]
                      if n not in names]
        if kept_after and not all(_additive(layer.deltas[n]) for n in [*targets, *kept_after]):
            raise MergeError(f"{path}: {kept_after} were merged after {targets} and do not "
                             "commute with them; unmerge them too")
        todo.append((path, layer, targets))
    for write in (False, True):
        written: set[tuple[int, str]] = set()  # (tied weight, delta): restored once
        for path, layer, targets in todo:
            _unfold(path, layer, targets, write=write, lossy=allow_lossy, written=written)


def unload(model: nn.Module, *, merge: bool = False, safe: bool = True,
           allow_lossy: bool = False, dequantize: bool = False) -> nn.Module:
    """Remove every wrapper and return a plain model.

    Args:
        model: the model with deltas.
        merge: fold the active deltas into the weights first (inactive ones are dropped);
            otherwise merged deltas are unmerged, giving back the base model.
        safe: as in ``merge``.
        allow_lossy: as in ``merge``: allow (un)merging into quantized weights.
        dequantize: first replace every quantized layer (``deltatune.quant``) by a plain
            full-precision one (in the dtype it computes in), so that merging is exact: with
            ``merge=True`` the result holds ``W + ΔW`` unrounded.

    Returns:
        ``model``, holding no deltatune modules.

    Raises:
        MergeError: as ``merge`` / ``unmerge`` (quantized weights without ``allow_lossy`` or
            ``dequantize``).
    """
    pending = [n for n in active_adapters(model) if n not in merged_adapters(model)]
    if dequantize:
        if merge and pending:
            _merge_plan(model, pending)  # what cannot merge is refused before anything changes
        dequantize_bases(model)
    if merge:
        if pending:
            _merge(model, pending, safe=safe, allow_lossy=allow_lossy)
    elif merged_adapters(model):
        unmerge(model, allow_lossy=allow_lossy)
    for path, layer in delta_layers(model).items():
        _unwrap(model, path, layer)
    _sync_sequence(model)
    return model


_merge = merge  # `unload`'s keyword argument shadows the function's name


def dequantize_bases(model: nn.Module) -> nn.Module:
    """Replace every quantized layer of ``model`` (wrapped by deltas or not) by its plain
    full-precision equivalent (``QuantizedWeight.dequantized``), in place; deltas stay attached
    and merged ones stay merged.

    Returns:
        ``model``.
    """
    from .inject import set_module
    from .targeting import walk

    dense: dict[int, nn.Module] = {}
    for name, module in list(walk(model)):
        if isinstance(module, DeltaLayer):
            base = module.base_layer
            if is_quantized(base):
                module.base_layer = dense.setdefault(id(base), base.dequantized())
                for delta in module.deltas.values():
                    delta.bind(module.base_layer)
                module.refresh()
        elif is_quantized(module):
            set_module(model, name, dense.setdefault(id(module), module.dequantized()))
    if dense:
        _sync_sequence(model)
    return model


# ------------------------------------------------------------------------------ internals
def _sync_sequence(model: nn.Module) -> None:
    from . import per_sample
    from .sequence import sync

    sync(model)
    per_sample.sync(model)


def _unwrap(model: nn.Module, path: str, layer: DeltaLayer) -> None:
    from .inject import set_module
    from .targeting import walk

    layer.release()
    for alias in [name for name, m in walk(model) if m is layer]:
        set_module(model, alias, layer.base_layer)


def _additive(delta: Delta) -> bool:
    return type(delta).merged_params is Delta.merged_params


def _merge_plan(model: nn.Module, names: list[str]) -> list[tuple[str, DeltaLayer, list[str]]]:
    tied = tied_params(model)
    layers = delta_layers(model)
    todo = []
    for path, layer in layers.items():
        pending = [n for n in layer.active if n in names and n not in layer.merged]
        if not pending:
            continue
        for name in pending:
            delta = layer.deltas[name]
            if layer.weight_of(name) != 1.0:
                raise MergeError(f"{name!r} is active with weight {layer.weight_of(name)}; "
                                 "merging folds deltas in at weight 1. Activate without "
                                 "weights first (or combine deltas with deltatune's merging "
                                 "tools)")
            if delta.gated:
                raise MergeError(f"{name!r} on {path} is gated: its gate depends on the input, "
                                 "so it cannot be folded into the weights; keep it unmerged")
            if not delta.mergeable:
                raise MergeError(f"{delta.method!r} deltas cannot be merged into the weights "
                                 f"({name!r} on {path}); keep them unmerged or deactivate them")
            if delta.merges_first and (layer.merged or name != pending[0]):
                raise MergeError(f"{name!r} ({delta.method}) folds the whole weight of {path} "
                                 f"and must merge first there, but {layer.merged or pending[0]} "
                                 "would come before it; unmerge those (or merge it alone first)")
        readers = [n for n in layer.active if n not in layer.merged and n not in pending
                   and layer.deltas[n].merges_first]
        if readers:
            raise MergeError(f"{readers} ({layer.deltas[readers[0]].method}) on {path} read the "
                             f"layer's own weight, which merging {pending} would change under "
                             "them; merge them too (they fold first), or deactivate them first")
        # Merged deltas act first; merging one after an unmerged delta that does not commute
        # with it would change the output.
        last = layer.active.index(pending[-1])
        before = [n for n in layer.active[:last] if n not in layer.merged and n not in pending]
        if before and not all(_additive(layer.deltas[n]) for n in [*before, *pending]):
            raise MergeError(f"{path}: {before} come before {pending} in the active order and "
                             "do not commute with them; merge them too (or first)")
        shared = {key: owners for key, param in layer.base_layer.named_parameters(recurse=False)
                  if (owners := [n for n in tied.get(id(param), []) if n != path])}
        if shared:  # refused only if a delta would write a tied parameter (BitFit may not)
            params = _params32(layer)
            for name in pending:
                written = set(layer.deltas[name].merged_params(params)) & set(shared)
                for key in sorted(written):
                    if not is_tied_twin(layers, layer.deltas[name], name, shared[key], names):
                        raise MergeError(
                            f"the {key} of {path} is shared with {shared[key]}; merging "
                            f"{name!r} would change every module that shares it. Untie them "
                            "first (e.g. config.tie_word_embeddings=False and a copied weight)"
                            ", or adapt every module sharing it with a method whose deltas "
                            "are tied too (full, LISA, HFT)")
        todo.append((path, layer, pending))
    return todo


def _params32(layer: DeltaLayer) -> Params:
    return {key: value.detach().float() if value is not None else None
            for key, value in base_params(layer.base_layer).items()}


def _refuse_lossy(path: str, layer: DeltaLayer, name: str, new: Params, what: str) -> None:
    base = layer.base_layer
    if new.get("weight") is not None and is_quantized(base):
        raise MergeError(
            f"{path} stores its weight quantized ({base.scheme}); {what} {name!r} would "
            "re-quantize the result, rounding it (and the delta with it) to the quantization "
            "grid. Nothing was changed. Pass allow_lossy=True to accept that, keep the delta "
            "unmerged, or get an exact full-precision merged model with "
            "deltatune.unload(model, merge=True, dequantize=True)")


@torch.no_grad()
def _fold(path: str, layer: DeltaLayer, names: list[str], *, write: bool, check: bool,
          lossy: bool, written: set[tuple[int, str]] | None = None) -> None:
    params = _params32(layer)
    for name in names:
        new = fold_once(layer, name, layer.deltas[name].merged_params(params), params, written)
        if not lossy:
            _refuse_lossy(path, layer, name, new, "merging")
        if check:
            _check_finite(path, name, new, "merging")
            for key in new:
                if params.get(key) is None and not creatable(layer.base_layer, key):
                    raise MergeError(
                        f"merging {name!r} into {path} needs a {key!r} parameter, which "
                        f"{type(layer.base_layer).__name__} does not have and would ignore; "
                        "keep this delta unmerged")
        if write:
            created = [k for k in new if params.get(k) is None]
            if created:
                layer.created[name] = created
            _write(layer, name, new)
            layer.merged.append(name)
        params = {**params, **new}
    if write:
        layer.refresh()


@torch.no_grad()
def _unfold(path: str, layer: DeltaLayer, names: list[str], *, write: bool, lossy: bool,
            written: set[tuple[int, str]] | None = None) -> None:
    params = _params32(layer)
    for name in reversed(names):
        new = fold_once(layer, name, layer.deltas[name].unmerged_params(params), params, written)
        created = layer.created.get(name, [])
        for key in created:
            new[key] = None
        if not lossy:
            _refuse_lossy(path, layer, name, new, "unmerging")
        _check_finite(path, name, new, "unmerging")
        if write:
            for key in layer.created.pop(name, []):
                setattr(layer.base_layer, key, None)
            _write(layer, name, {k: v for k, v in new.items() if v is not None})
            layer.merged.remove(name)
        params = {**params, **new}
    if write:
        layer.refresh()


def _check_finite(path: str, name: str, new: Params, what: str) -> None:
    for key, value in new.items():
        if value is not None and not torch.isfinite(value).all():
            raise MergeError(f"{what} {name!r} into {path}.{key} gives NaN or Inf values; "
                             "nothing was changed. Check the delta's parameters "
                             "(e.g. a diverged training run)")


@torch.no_grad()
def _write(layer: DeltaLayer, name: str, new: Params) -> None:
    base = layer.base_layer
    for key, value in new.items():
        current = getattr(base, key, None)
        if key == "weight" and is_quantized(base):
            base.requantize_weight(value)  # lossy: the caller was given allow_lossy=True
        elif current is None:
            setattr(base, key, nn.Parameter(value.to(weight_dtype(base)), requires_grad=False))
        else:
            current.copy_(value)
