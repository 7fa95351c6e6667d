"""Toy methods that exercise core abstractions LoRA does not: an input-position transform, a
non-additive (multiplicative) merge, and a non-mergeable delta. Registered only inside the
``toy_methods`` fixture, so the registry-wide contract suite never sees them."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from deltatune.core import registry
from deltatune.core.config import DeltaConfig
from deltatune.core.delta import Delta, Params


@dataclass(frozen=True, kw_only=True)
class ToyConfig(DeltaConfig):
    pass


class OutputScale(Delta):
    """y ← l ⊙ y; merges as W ← diag(l) W, b ← l ⊙ b."""

    composition = "scale"
    mergeable = True

    def __init__(self, info, config, path):
        super().__init__(info, config, path)
        self.l = nn.Parameter(torch.ones(info.out_dim))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return y * self.cast(self.l, y)

    def merged_params(self, params: Params) -> Params:
        out = {"weight": params["weight"] * self.l.float()[:, None]}
        if params["bias"] is not None:
            out["bias"] = params["bias"] * self.l.float()
        return out

    def unmerged_params(self, params: Params) -> Params:
        out = {"weight": params["weight"] / self.l.float()[:, None]}
        if params["bias"] is not None:
            out["bias"] = params["bias"] / self.l.float()
        return out

    @classmethod
    def num_trainable(cls, info, config) -> int:
        return info.out_dim


class InputScale(Delta):
    """x ← l ⊙ x before the layer; merges as W ← W diag(l)."""

    composition = "scale"
    mergeable = True
    transforms_input = True

    def __init__(self, info, config, path):
        super().__init__(info, config, path)
        self.l = nn.Parameter(torch.ones(info.in_dim))

    def pre(self, x: Tensor) -> Tensor:
        return x * self.cast(self.l, x)

    def merged_params(self, params: Params) -> Params:
        return {"weight": params["weight"] * self.l.float()[None, :]}

    def unmerged_params(self, params: Params) -> Params:
        return {"weight": params["weight"] / self.l.float()[None, :]}

    @classmethod
    def num_trainable(cls, info, config) -> int:
        return info.in_dim


class Shift(Delta):
    """y ← y + b, declared not mergeable."""

    def __init__(self, info, config, path):
        super().__init__(info, config, path)
        self.b = nn.Parameter(torch.zeros(info.out_dim))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return y + self.cast(self.b, y)


TOYS = {"toy-output-scale": OutputScale, "toy-input-scale": InputScale, "toy-shift": Shift}


@dataclass(frozen=True, kw_only=True)
class OutputScaleConfig(ToyConfig):
    pass


@dataclass(frozen=True, kw_only=True)
class InputScaleConfig(ToyConfig):
    pass


@dataclass(frozen=True, kw_only=True)
class ShiftConfig(ToyConfig):
    pass


CONFIGS = {"toy-output-scale": OutputScaleConfig, "toy-input-scale": InputScaleConfig,
           "toy-shift": ShiftConfig}


@pytest.fixture
def toy_methods():
    for name, cls in TOYS.items():
        registry.register(name, config=CONFIGS[name])(cls)
    yield CONFIGS
    for name in TOYS:
        registry._REGISTRY.pop(name, None)
