"""Toy methods that exercise core abstractions LoRA does not: an input-position transform, a
non-additive (multiplicative) merge, a non-mergeable delta, a sequential form that reads the
output, a parallel form that reads a sub-layer tap, and a weight-form delta. Registered only
inside the ``toy_methods`` fixture, so the registry-wide contract suite never sees them."""

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


class Sequential(Delta):
    """y ← y + W y (a sequential form: it reads the output), not mergeable."""

    reads_output = True

    def __init__(self, info, config, path):
        super().__init__(info, config, path)
        self.W = nn.Parameter(torch.zeros(info.out_dim, info.out_dim))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return y + self.effect(x, y)

    def effect(self, x: Tensor, y: Tensor) -> Tensor:
        return y @ self.cast(self.W, y).t()


class Parallel(Delta):
    """y ← y + W x, where x is the tapped sub-layer input when there is one."""

    def __init__(self, info, config, path):
        super().__init__(info, config, path)
        self.reads_tap = info.tap is not None
        width = info.out_dim if self.reads_tap else info.in_dim
        self.W = nn.Parameter(torch.zeros(info.out_dim, width))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return y + x @ self.cast(self.W, x).t()


class WeightBias(Delta):
    """A weight-form delta: the layer runs with bias + Δb (created where missing)."""

    form = "weight"
    mergeable = True
    layer_kinds = frozenset({"linear", "norm"})

    def __init__(self, info, config, path):
        super().__init__(info, config, path)
        self.db = nn.Parameter(torch.zeros(info.out_dim))

    def delta_params(self) -> Params:
        return {"bias": self.db}

    @classmethod
    def num_trainable(cls, info, config) -> int:
        return info.out_dim


class _Gain(nn.Module):
    def __init__(self):
        super().__init__()
        self.g = nn.Parameter(torch.empty(3))

    def reset_parameters(self):
        nn.init.ones_(self.g)


class SharedGain(Delta):
    """y ← y + (Σ g) · b: a per-layer shift b times a gain vector g shared by every layer."""

    def __init__(self, info, config, path):
        super().__init__(info, config, path)
        self.b = nn.Parameter(torch.zeros(info.out_dim))

    @classmethod
    def build_shared(cls, config, targets):
        return _Gain()

    @classmethod
    def num_shared(cls, config, targets) -> int:
        return 3

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return y + self.cast(self.shared.g.sum() * self.b, y)

    @classmethod
    def num_trainable(cls, info, config) -> int:
        return info.out_dim


TOYS = {"toy-shared": SharedGain, "toy-output-scale": OutputScale,
        "toy-input-scale": InputScale, "toy-shift": Shift,
        "toy-sequential": Sequential, "toy-parallel": Parallel, "toy-weight-bias": WeightBias}


@dataclass(frozen=True, kw_only=True)
class OutputScaleConfig(ToyConfig):
    pass


@dataclass(frozen=True, kw_only=True)
class InputScaleConfig(ToyConfig):
    pass


@dataclass(frozen=True, kw_only=True)
class ShiftConfig(ToyConfig):
    pass


@dataclass(frozen=True, kw_only=True)
class SequentialConfig(ToyConfig):
    pass


@dataclass(frozen=True, kw_only=True)
class ParallelConfig(ToyConfig):
    pass


@dataclass(frozen=True, kw_only=True)
class WeightBiasConfig(ToyConfig):
    pass


@dataclass(frozen=True, kw_only=True)
class SharedConfig(ToyConfig):
    pass


CONFIGS = {"toy-shared": SharedConfig, "toy-output-scale": OutputScaleConfig,
           "toy-input-scale": InputScaleConfig,
           "toy-shift": ShiftConfig, "toy-sequential": SequentialConfig,
           "toy-parallel": ParallelConfig, "toy-weight-bias": WeightBiasConfig}


@pytest.fixture
def toy_methods():
    for name, cls in TOYS.items():
        registry.register(name, config=CONFIGS[name])(cls)
    yield CONFIGS
    for name in TOYS:
        registry._REGISTRY.pop(name, None)
