"""Bottleneck adapters: sequential, parallel and scaled parallel (taxonomy: He et al. 2022).

    f(z) = W_up σ(W_down z + b_down) + b_up   bottleneck r ≪ d, σ pointwise
    sequential: h ← h + s·f(h)  Houlsby et al. 2019 (1902.00751); Pfeiffer et al. 2021 (2005.00247)
    parallel:   h ← h + s·f(x)  He et al. 2022 (2110.04366); s = 4: their "scaled PA"
    gated:      f(z) ← sigmoid(w_g·z + b_g) · f(z)   UniPELT, Mao et al. 2022 (2110.07577)

Placement. A sub-layer target (``"attn"``, ``"xattn"``, ``"ffn"``) selects the sub-layer's output
projection: a sequential adapter rewrites that projection's output ``h`` before the residual add
(Houlsby: ``["attn", "ffn"]``; Pfeiffer: ``["ffn"]``, the default); a parallel adapter reads the
sub-layer's *input* ``x`` (the tap, e.g. the input of Llama's ``mlp`` or BERT's
``intermediate``) and adds ``s · f(x)`` to the projection's output. A module name (or a layer's
canonical name such as ``"ffn.up"``) puts a parallel adapter beside that one layer, reading its
input (``f``: in_dim → out_dim).

Residual placement. On a sub-layer target the adapter acts *before* the block's residual add
(``h ← h + s·f(h)``, then ``x + h``). Targeting the norm that follows the add in post-LN models
(BERT / RoBERTa: ``attention.output.LayerNorm``, ``output.LayerNorm``) puts it *after* the Add &
Norm instead (``u ← u + s·f(u)``, ``u = LN(x + h)``), where AdapterHub's Pfeiffer configuration
sits on BERT (the suffix ``"output.LayerNorm"`` matches both norms of a layer, after attention
and after the FFN; a regex picks one); every norm over the last axis can carry an adapter.

``s`` is a fixed float or, with ``learned_scale``, a trained scalar initialised to ``scale``.
With ``gate=True`` the core's gate multiplies ``s·f``: one scalar per token of ``z``.
Dropout acts on the bottleneck activation, in training only. ``W_up = 0`` at init (the adapter
starts as the identity); ``W_down`` is Kaiming-uniform (``"kaiming"``, He et al.'s code) or
``N(0, 0.02²)`` (``"bert"``, AdapterHub's), biases start at zero.

Several adapters on one layer (``deltatune.activate``): by default their effects add, each
sequential adapter reading the same base output (``h + f_a(h) + f_b(h)``); with
``combine="stack"`` a sequential adapter reads the output of those before it
(``h_a + f_b(h_a)``, AdapterHub's ``Stack``); ``weights=`` gives a weighted sum. Adapters are
nonlinear in ``h``, so they are not mergeable into the base weights.

Presets (partials of ``AdapterConfig``): ``houlsby()``, ``pfeiffer()``, ``parallel_adapter()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.errors import ConfigError, ShapeMismatchError
from ..core.geometry import LayerInfo
from ..core.registry import register

_POSITIONS = ("sequential", "parallel")
_INITS = ("bert", "kaiming")
_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor] | None] = {
    "relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh, "identity": None}
#: Reduction factor used when neither ``bottleneck`` nor ``reduction_factor`` is given.
DEFAULT_REDUCTION = 16


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


@dataclass(frozen=True, kw_only=True)
class AdapterConfig(DeltaConfig):
    """Bottleneck adapter hyper-parameters (targeting fields: see ``DeltaConfig``).

    Args:
        position: ``"sequential"`` (``h + s·f(h)``) or ``"parallel"`` (``h + s·f(x)``).
        bottleneck: the bottleneck size ``r``. Give at most one of ``bottleneck`` and
            ``reduction_factor``; with neither, ``reduction_factor=16``.
        reduction_factor: ``r = max(1, out_dim // reduction_factor)`` per adapted layer.
        activation: ``σ``: ``"relu"``, ``"gelu"``, ``"silu"``, ``"tanh"`` or ``"identity"``.
        scale: ``s`` (He et al. use 4 for a parallel FFN adapter).
        learned_scale: train ``s`` as a scalar parameter initialised to ``scale``.
        dropout: dropout probability on the bottleneck activation (training only).
        bias: biases ``b_down``, ``b_up`` in the two projections.
        init: ``W_down`` init, ``"bert"`` (``N(0, 0.02²)``) or ``"kaiming"`` (uniform);
            ``W_up``, biases and ``b_g`` start at zero, so the adapter starts as the identity.
    """

    position: str = "sequential"
    bottleneck: int | None = None
    reduction_factor: float | None = None
    activation: str = "gelu"
    scale: float = 1.0
    learned_scale: bool = False
    dropout: float = 0.0
    bias: bool = True
    init: str = "bert"

    def validate(self) -> None:
        if self.position not in _POSITIONS:
            raise ConfigError(f"position must be one of {_POSITIONS}, got {self.position!r}")
        if self.bottleneck is not None and self.reduction_factor is not None:
            raise ConfigError("give either bottleneck or reduction_factor, not both (an override "
                              "that sets one must set the other to None)")
        if self.bottleneck is not None and not (
                isinstance(self.bottleneck, int) and not isinstance(self.bottleneck, bool)
                and self.bottleneck >= 1):
            raise ConfigError(f"bottleneck must be a positive integer, got {self.bottleneck!r}")
        if self.reduction_factor is not None and not (
                _number(self.reduction_factor) and self.reduction_factor > 0):
            raise ConfigError(f"reduction_factor must be a positive number, got "
                              f"{self.reduction_factor!r}")
        if self.activation not in _ACTIVATIONS:
            raise ConfigError(f"activation must be one of {sorted(_ACTIVATIONS)}, got "
                              f"{self.activation!r}")
        if not _number(self.scale):
            raise ConfigError(f"scale must be a finite number, got {self.scale!r}")
        for name in ("learned_scale", "bias"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not (_number(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in _INITS:
            raise ConfigError(f"init must be one of {_INITS}, got {self.init!r}")

    def bottleneck_for(self, out_dim: int) -> int:
        """The bottleneck size ``r`` on a layer with ``out_dim`` outputs."""
        if self.bottleneck is not None:
            return self.bottleneck
        factor = DEFAULT_REDUCTION if self.reduction_factor is None else self.reduction_factor
        return max(1, int(out_dim // factor))


def houlsby(**kwargs: Any) -> AdapterConfig:
    """Houlsby et al. (2019): sequential adapters after the attention and the FFN sub-layers
    (GELU, small-normal init); ``kwargs`` override any field."""
    return AdapterConfig(**{"position": "sequential", "targets": ("attn", "ffn"),
                            "activation": "gelu", "init": "bert", **kwargs})


def pfeiffer(**kwargs: Any) -> AdapterConfig:
    """Pfeiffer et al. (2021): one sequential adapter after the FFN sub-layer (ReLU);
    ``kwargs`` override any field."""
    return AdapterConfig(**{"position": "sequential", "targets": ("ffn",),
                            "activation": "relu", "init": "bert", **kwargs})


def parallel_adapter(scale: float = 4.0, **kwargs: Any) -> AdapterConfig:
    """He et al. (2022)'s scaled parallel adapter beside the FFN: ``h + s·f(x)``, ReLU,
    Kaiming init, ``r = d / 2`` unless ``bottleneck`` or ``reduction_factor`` is given."""
    size = {} if {"bottleneck", "reduction_factor"} & set(kwargs) else {"reduction_factor": 2}
    return AdapterConfig(**{"position": "parallel", "targets": ("ffn",), "activation": "relu",
                            "init": "kaiming", "scale": scale, **size, **kwargs})


def _input_dim(info: LayerInfo, config: AdapterConfig) -> int:
    """Width of the adapter's input: the layer input for an untapped parallel adapter, else
    the hidden size (the layer output, or the sub-layer input, which has the same width)."""
    return info.in_dim if config.position == "parallel" and info.tap is None else info.out_dim


@register("adapter", config=AdapterConfig)
class AdapterDelta(Delta):
    """``y + s · W_up σ(W_down z + b_down) + b_up`` with ``z = y`` (sequential) or ``x``."""

    default_targets = ("ffn",)
    layer_kinds = frozenset({"linear", "norm"})
    gating = "output"
    examples = (
        {},
        {"position": "parallel", "bottleneck": 3, "init": "kaiming"},
        {"position": "parallel", "scale": 4.0, "learned_scale": True, "activation": "gelu",
         "reduction_factor": 4, "dropout": 0.1},
        {"gate": True, "bias": False, "activation": "silu", "bottleneck": 2},
        {"position": "parallel", "gate": True, "learned_scale": True, "activation": "tanh"},
    )

    @classmethod
    def supports(cls, module: nn.Module, info: LayerInfo, config: AdapterConfig) -> str | None:
        if info.channels_first:
            return (f"{type(module).__name__} normalises channels on axis 1; an adapter reads "
                    "features on the last axis (target LayerNorm / RMSNorm or Linear layers)")
        return None

    def __init__(self, info: LayerInfo, config: AdapterConfig, path: str) -> None:
        super().__init__(info, config, path)
        self.sequential = config.position == "sequential"
        self.reads_output = self.sequential  # sequential adapters read the layer output
        self.reads_tap = config.position == "parallel" and info.tap is not None
        self.in_dim = _input_dim(info, config)
        r = config.bottleneck_for(info.out_dim)
        self.rank = r
        self.make_projections(self.in_dim, info.out_dim, r)
        self.down_bias = nn.Parameter(torch.zeros(r)) if config.bias else None
        self.up_bias = nn.Parameter(torch.zeros(info.out_dim)) if config.bias else None
        self.learned_scale = (nn.Parameter(torch.full((), float(config.scale)))
                              if config.learned_scale else None)
        self.scale = float(config.scale)
        self.act = _ACTIVATIONS[config.activation]
        self.dropout = float(config.dropout)

    # ------------------------------------------------------------------ the two projections
    def make_projections(self, d_in: int, d_out: int, r: int) -> None:
        """Create ``W_down`` (r, d_in) and ``W_up`` (d_out, r) (Compacter builds PHM factors)."""
        self.down = nn.Parameter(torch.empty(r, d_in))  # (r, in)
        self.up = nn.Parameter(torch.empty(d_out, r))  # (out, r)

    def down_weight(self) -> Tensor:
        """``W_down``, (r, d_in)."""
        return self.down

    def up_weight(self) -> Tensor:
        """``W_up``, (d_out, r)."""
        return self.up

    @torch.no_grad()
    def reset_projections(self) -> None:
        """``W_down``: Kaiming-uniform or N(0, 0.02²); ``W_up = 0`` (identity at init)."""
        if self.config.init == "kaiming":
            nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))  # nn.Linear's own init
        else:
            nn.init.normal_(self.down, std=0.02)
        nn.init.zeros_(self.up)

    @classmethod
    def projection_params(cls, d_in: int, d_out: int, r: int, config: AdapterConfig) -> int:
        """Trainable parameters of the two projections on one layer."""
        return r * d_in + d_out * r

    @classmethod
    def num_trainable(cls, info: LayerInfo, config: AdapterConfig) -> int:
        d_in, d_out, r = _input_dim(info, config), info.out_dim, config.bottleneck_for(info.out_dim)
        return cls.projection_params(d_in, d_out, r, config) + (r + d_out if config.bias else 0) \
            + (1 if config.learned_scale else 0)

    @torch.no_grad()
    def reset_parameters(self, base: nn.Module) -> None:
        self.reset_projections()
        for bias in (self.down_bias, self.up_bias):
            if bias is not None:
                nn.init.zeros_(bias)
        if self.learned_scale is not None:
            self.learned_scale.fill_(self.scale)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        z, a = self._bottleneck(x, y)
        if self.learned_scale is None:  # y + s·W_up a, one fused GEMM
            out = self.info.add_out(y, a, self.cast(self.up_weight(), y), self.scale)
            return out if self.up_bias is None else out.add_(self.cast(self.up_bias, y),
                                                             alpha=self.scale)
        return y + self._up(z, a, y)

    def effect(self, x: Tensor, y: Tensor) -> Tensor:
        z, a = self._bottleneck(x, y)
        return self._up(z, a, y)

    def _bottleneck(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The adapter input ``z`` and its bottleneck activation ``σ(W_down z + b_down)``."""
        z = y if self.sequential else x
        if self.reads_tap and z.shape[-1] != self.in_dim:
            raise ShapeMismatchError(
                f"{self.path}: the input of {self.info.tap!r} has {z.shape[-1]} features, but "
                f"this parallel adapter expects {self.in_dim} (the layer's output width); target "
                "the layer by its own name to read its input instead")
        b = None if self.down_bias is None else self.cast(self.down_bias, z)
        a = F.linear(z, self.cast(self.down_weight(), z), b)  # (..., r)
        if self.act is not None:
            a = self.act(a)
        if self.dropout and self.training:
            a = F.dropout(a, self.dropout, training=True)
        return z, a

    def gate_input(self, x: Tensor, y: Tensor) -> Tensor:
        return y if self.sequential else x  # the adapter's own input z

    @classmethod
    def gate_dim(cls, info: LayerInfo, config: AdapterConfig) -> int:
        return _input_dim(info, config)

    def _up(self, z: Tensor, a: Tensor, y: Tensor) -> Tensor:
        """``s · (W_up a + b_up)``: what the adapter adds to ``y`` (the core applies a gate)."""
        b = None if self.up_bias is None else self.cast(self.up_bias, y)
        u = F.linear(a, self.cast(self.up_weight(), y), b)  # (..., out)
        if self.learned_scale is not None:
            return u * self.cast(self.learned_scale, y)
        return u * self.scale if self.scale != 1.0 else u

    def extra_repr(self) -> str:
        where = f", tap={self.info.tap}" if self.reads_tap else ""
        return (f"{self.method}: {self.path}, {self.config.position}, "
                f"{self.in_dim}->{self.rank}->{self.info.out_dim}{where}")


__all__ = ["AdapterConfig", "AdapterDelta", "houlsby", "parallel_adapter", "pfeiffer"]
