"""Tied base weights (an input embedding shared with the output layer) and the deltas on them.

A method whose deltas change the weight itself (``Delta.ties``: full, LISA, HFT) puts one delta
on a tied weight: ``tie_deltas`` makes the deltas of the layers sharing it share their
parameters when they are built (``inject.attach``, ``accounting.cost``). Save and load then
write and read the shared tensors once (they dedupe shared tensors), and merging folds the one
``ΔW`` into the one weight once (``is_tied_twin`` lets ``lifecycle.merge`` write a tied weight,
``fold_once`` keeps the second layer from adding it again). Merging any other delta into a tied
weight is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from .delta import Delta, Params
from .layers import DeltaLayer

if TYPE_CHECKING:
    from .targeting import Matcher


def tie_deltas(deltas: Mapping[str, Delta], matcher: Matcher) -> None:
    """Make the deltas of layers sharing one base weight share their parameters: each takes
    the first one's parameters of the same name and shape (``ΔW``; a bias the other layer
    lacks stays its own). Autograd then sums both uses' gradients into the one ``ΔW``, as it
    does for the tied weight itself.

    Args:
        deltas: ``{module path: delta}`` of one adapter, before they are attached.
        matcher: the model's ``targeting.Matcher`` (the paths' modules).
    """
    first: dict[int, Delta] = {}
    for path, delta in deltas.items():
        weight = getattr(matcher.modules[path], "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        owner = first.setdefault(id(weight), delta)
        if owner is delta:
            continue
        theirs = dict(owner.named_parameters())
        for name, param in list(delta.named_parameters()):
            other = theirs.get(name)
            if other is not None and other.shape == param.shape:
                module, _, leaf = name.rpartition(".")
                setattr(delta.get_submodule(module), leaf, other)


def tied_params(model: nn.Module) -> dict[int, list[str]]:
    """``{id(parameter): [logical names of the modules that own it]}``."""
    from .targeting import walk

    owners: dict[int, list[str]] = {}
    for name, module in walk(model):
        if isinstance(module, Delta):
            continue
        if isinstance(module, DeltaLayer):
            module = module.base_layer
        for param in module.parameters(recurse=False):
            if name not in owners.setdefault(id(param), []):
                owners[id(param)].append(name)
    return owners


def is_tied_twin(layers: Mapping[str, DeltaLayer], delta: Delta, name: str, others: list[str],
                 names: list[str]) -> bool:
    """Whether every other module sharing a base weight (``others``, among ``layers``) holds
    ``delta``'s tied twin (the same parameters, ``tie_deltas``) under ``name``, merged in the
    same call (``names``): the one ``ΔW`` then goes into the one weight once (``fold_once``)."""
    own = {id(p) for p in delta.parameters()}
    for path in others:
        layer = layers.get(path)
        if (layer is None or name not in layer.deltas or name not in names
                or name in layer.merged
                or not own & {id(p) for p in layer.deltas[name].parameters()}):
            return False
    return True


def fold_once(layer: DeltaLayer, name: str, new: Params, params: Params,
              written: set[tuple[int, str]] | None) -> Params:
    """``new`` (a layer's parameters after merging or unmerging delta ``name``) with each base
    parameter that an earlier layer's tied twin of ``name`` already changed in this call (a tied
    weight) left as it now is, in ``params``; the others are recorded in ``written``."""
    if written is None:
        return new
    out = dict(new)
    for key in new:
        param = getattr(layer.base_layer, key, None)
        if isinstance(param, torch.Tensor):
            if (id(param), name) in written:
                out[key] = params[key]
            else:
                written.add((id(param), name))
    return out


__all__ = ["fold_once", "is_tied_twin", "tie_deltas", "tied_params"]
