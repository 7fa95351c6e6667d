"""SSF — Scaling & Shifting your Features (Lian et al. 2022, arXiv:2210.08823).

    y ← γ ⊙ y + β          (per output channel, after a Linear / HF Conv1D / Conv / norm layer)

``γ = 1`` and ``β = 0`` at init, so the model starts as the base; ``init_std=σ`` draws
``γ ~ N(1, σ²)`` and ``β ~ N(0, σ²)`` instead, as the paper's code does (σ = 0.02).

Merging re-parameterises the layer itself, exactly (fp32 math in the core):

* Linear / HF Conv1D / Conv: ``W' = diag(γ) W`` (a convolution's whole kernel of each output
  channel is scaled), ``b' = γ ⊙ b + β``;
* norm layers: ``w' = γ ⊙ w``, ``b' = γ ⊙ b + β``.

A missing bias is created by the merge (and removed by unmerge). ``β`` can only be folded into a
layer that has, or would use, a bias, so SSF refuses norms without one (``RMSNorm``,
``T5LayerNorm``): target the Linear layers that read their output instead. Unmerging divides by
``γ`` and is refused if some ``|γ|`` is about zero.

Two SSF deltas on one layer compose as affine maps, the later applied to the earlier's output:
``γ_b ⊙ (γ_a ⊙ y + β_a) + β_b`` (``composition = "affine"``).

Default targets: ``"all-linear"``. ``targets=".*"`` also adapts every norm and convolution
layer (the paper's placement after every operation), skipping norms without a bias.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta, Params
from ..core.errors import ConfigError, MergeError
from ..core.geometry import LayerInfo
from ..core.registry import register

#: Unmerging divides by γ; below this magnitude the base weights cannot be recovered reliably.
MIN_SCALE = 1e-4


@dataclass(frozen=True, kw_only=True)
class SSFConfig(DeltaConfig):
    """SSF hyper-parameters (targeting fields: see ``DeltaConfig``).

    Args:
        init_std: ``σ`` of the initial ``γ ~ N(1, σ²)``, ``β ~ N(0, σ²)``; ``0`` (default)
            starts at the identity ``γ = 1``, ``β = 0``. The paper's code uses ``0.02``.
    """

    init_std: float = 0.0

    def validate(self) -> None:
        std = self.init_std
        if isinstance(std, bool) or not isinstance(std, (int, float)) or not (
                math.isfinite(std) and std >= 0):
            raise ConfigError(f"init_std must be a finite number >= 0, got {std!r}")


@register("ssf", config=SSFConfig)
class SSFDelta(Delta):
    """``γ ⊙ y + β`` per output channel of one layer."""

    layer_kinds = frozenset({"linear", "conv", "norm"})
    mergeable = True
    composition = "affine"
    examples = ({},)

    def __init__(self, info: LayerInfo, config: SSFConfig, path: str) -> None:
        super().__init__(info, config, path)
        self.gamma = nn.Parameter(torch.ones(info.out_dim))  # (out,)
        self.beta = nn.Parameter(torch.zeros(info.out_dim))  # (out,)

    @classmethod
    def supports(cls, module: nn.Module, info: LayerInfo, config: SSFConfig) -> str | None:
        if info.bias != "none":
            return None
        return (f"{type(module).__name__} has no bias, so SSF's shift β could not be folded into "
                "it on merge; target the Linear layers that read its output instead (e.g. "
                "q_proj, k_proj, v_proj, gate_proj, up_proj)")

    @classmethod
    def num_trainable(cls, info: LayerInfo, config: SSFConfig) -> int:
        return 2 * info.out_dim

    @torch.no_grad()
    def reset_parameters(self, base: nn.Module) -> None:
        std = self.config.init_std
        if std:
            nn.init.normal_(self.gamma, mean=1.0, std=std)
            nn.init.normal_(self.beta, mean=0.0, std=std)
        else:
            nn.init.ones_(self.gamma)
            nn.init.zeros_(self.beta)

    # --------------------------------------------------------------------------- compute
    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        shape = self.info.channel_shape(y.dim())  # (out,) or (out, 1, …) for channels-first
        return torch.addcmul(self.cast(self.beta, y).view(shape), y,
                             self.cast(self.gamma, y).view(shape))

    def _per_channel(self, weight: Tensor, gamma: Tensor, *, divide: bool = False) -> Tensor:
        """``diag(γ) W`` (or ``diag(γ)⁻¹ W``) in the native layout; ``γ ⊙ w`` for a norm."""
        if self.info.kind == "norm":
            return weight / gamma if divide else weight * gamma
        matrix = self.info.weight_matrix(weight)  # (out, in); conv: (out, in_ch · kernel)
        matrix = matrix / gamma[:, None] if divide else matrix * gamma[:, None]
        return self.info.weight_from_matrix(matrix)

    def merged_params(self, params: Params) -> Params:
        gamma, beta = self.gamma.float(), self.beta.float()
        bias = params["bias"]
        return {"weight": self._per_channel(params["weight"], gamma),
                "bias": beta if bias is None else torch.addcmul(beta, gamma, bias)}

    def unmerged_params(self, params: Params) -> Params:
        gamma, beta = self.gamma.float(), self.beta.float()
        small = (gamma.abs() < MIN_SCALE).nonzero().flatten().tolist()
        if small:
            raise MergeError(
                f"cannot unmerge SSF from {self.path}: |γ| < {MIN_SCALE:g} in {len(small)} "
                f"channel(s) (e.g. channel {small[0]}: γ = {gamma[small[0]].item():.3g}), so "
                "dividing by γ cannot restore the base weights; nothing was changed. Reload the "
                "base weights instead, or keep the delta merged")
        out: Params = {"weight": self._per_channel(params["weight"], gamma, divide=True)}
        if params["bias"] is not None:
            out["bias"] = (params["bias"] - beta) / gamma
        return out


__all__ = ["MIN_SCALE", "SSFConfig", "SSFDelta"]
