"""Selected-parameter methods: train chosen parameters of the frozen base layers themselves.

* BitFit (Ben Zaken et al. 2022, arXiv:2106.10199) trains only the biases:

      y = W x + (b + Δb)

* LayerNorm tuning (Zhao et al. 2023, arXiv:2312.11420; peft's ``LN_TUNING``) trains only the
  affine parameters of the normalisation layers:

      y = (w + Δw) ⊙ norm(x) + (b + Δb)

Both are ``form = "weight"`` deltas: a delta holds ``Δθ`` (zero at init, so the model starts as
the base) for its chosen base parameters, each of shape ``(out_dim,)``; the base layer runs once
with ``θ + Δθ`` whatever its forward is (``torch.func.functional_call``). Merging adds ``Δθ``,
unmerging subtracts it. A bias the layer lacks is learned only where its forward would use one
(``geometry.creatable``: Linear, HF Conv1D, Conv, LayerNorm, GroupNorm, BatchNorm); merging
creates it and unmerging removes it again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import DeltaConfig
from ..core.delta import Delta, Params
from ..core.errors import ConfigError
from ..core.geometry import LayerInfo
from ..core.registry import register

_AFFINE = ("weight", "bias")


class SelectedParamsDelta(Delta):
    """``Δθ`` for the base parameters named by ``keys(info, config)``, each ``(out_dim,)``.

    Subclasses choose the keys, the layer kinds and which modules they refuse (``supports``).
    """

    form = "weight"
    mergeable = True
    default_targets = ".*"

    def __init__(self, info: LayerInfo, config: DeltaConfig, path: str) -> None:
        super().__init__(info, config, path)
        self.delta = nn.ParameterDict({key: nn.Parameter(torch.zeros(info.out_dim))
                                       for key in self.keys(info, config)})

    @classmethod
    def keys(cls, info: LayerInfo, config: DeltaConfig) -> tuple[str, ...]:
        """Names of the base parameters this delta trains on a layer."""
        raise NotImplementedError

    @classmethod
    def num_trainable(cls, info: LayerInfo, config: DeltaConfig) -> int:
        return info.out_dim * len(cls.keys(info, config))

    @torch.no_grad()
    def reset_parameters(self, base: nn.Module) -> None:
        for value in self.delta.values():
            value.zero_()

    def delta_params(self) -> Params:
        return dict(self.delta.items())


# ------------------------------------------------------------------------------------ BitFit
@dataclass(frozen=True, kw_only=True)
class BitFitConfig(DeltaConfig):
    """BitFit hyper-parameters (targeting fields: see ``DeltaConfig``).

    The default targets are every module with a bias (Linear, HF Conv1D, Conv, norm layers),
    task heads included.

    Args:
        add_missing: also learn a bias for layers that have none but whose forward would use
            one (Linear / Conv without bias, ``LayerNorm(bias=False)``), e.g. on Llama or T5,
            which have no biases at all. Merging creates the bias; unmerging removes it.
    """

    add_missing: bool = False

    def validate(self) -> None:
        if not isinstance(self.add_missing, bool):
            raise ConfigError(f"add_missing must be True or False, got {self.add_missing!r}")


@register("bitfit", config=BitFitConfig)
class BitFitDelta(SelectedParamsDelta):
    """``y = W x + (b + Δb)``: only the layer's bias trains."""

    layer_kinds = frozenset({"linear", "conv", "norm"})
    examples = ({}, {"add_missing": True})

    @classmethod
    def keys(cls, info: LayerInfo, config: DeltaConfig) -> tuple[str, ...]:
        return ("bias",)

    @classmethod
    def supports(cls, module: nn.Module, info: LayerInfo, config: BitFitConfig) -> str | None:
        if info.bias == "own":
            return None
        name = type(module).__name__
        if info.bias == "none":
            return f"{name} has no bias and its forward would not use one"
        if not config.add_missing:
            return (f"{name} has no bias; set add_missing=True to learn one (merging then "
                    "creates it in the layer)")
        return None


# ------------------------------------------------------------------------- LayerNorm tuning
@dataclass(frozen=True, kw_only=True)
class LNTuningConfig(DeltaConfig):
    """LayerNorm-tuning hyper-parameters (targeting fields: see ``DeltaConfig``).

    The default targets are every normalisation layer with affine parameters (LayerNorm,
    RMSNorm and Hugging Face's ``*RMSNorm`` / ``T5LayerNorm``, GroupNorm, BatchNorm).

    Args:
        params: which affine parameters train, among ``"weight"`` (the gain) and ``"bias"``;
            a layer without a bias (RMSNorm) trains only its weight, ``LayerNorm(bias=False)``
            learns one (merging creates it).
    """

    params: Sequence[str] = _AFFINE

    def validate(self) -> None:
        if isinstance(self.params, str) or not isinstance(self.params, Sequence):
            raise ConfigError(f"params must be a list such as ['weight', 'bias'], got "
                              f"{self.params!r}")
        bad = [p for p in self.params if p not in _AFFINE]
        if bad or not self.params or len(set(self.params)) != len(self.params):
            raise ConfigError(f"params must list 'weight' and/or 'bias', each once, got "
                              f"{list(self.params)!r}")


@register("ln_tuning", config=LNTuningConfig)
class LNTuningDelta(SelectedParamsDelta):
    """``y = (w + Δw) ⊙ norm(x) + (b + Δb)``: only the norm layer's affine parameters train."""

    layer_kinds = frozenset({"norm"})
    examples = ({}, {"params": ("weight",)})

    @classmethod
    def keys(cls, info: LayerInfo, config: LNTuningConfig) -> tuple[str, ...]:
        return tuple(k for k in _AFFINE if k in config.params
                     and (k == "weight" or info.bias != "none"))

    @classmethod
    def supports(cls, module: nn.Module, info: LayerInfo, config: LNTuningConfig) -> str | None:
        if not cls.keys(info, config):
            return f"{type(module).__name__} has no bias to tune; add 'weight' to params"
        return None


__all__ = ["BitFitConfig", "BitFitDelta", "LNTuningConfig", "LNTuningDelta",
           "SelectedParamsDelta"]
