"""HUT — Hadamard updated transformation (Zhang, Zhou & Chen 2024, arXiv:2409.13501).

    W' = W ⊙ (1 + s · B A)          s = α / r;  A: (r, in), B: (out, r), B = 0 at init

A multiplicative update: every weight is rescaled by a low-rank pattern, so the update stays
tied to the pretrained weight (``ΔW = s · W ⊙ B A``). Trainable parameters are LoRA's,
``r (in + out)``. Linear and HF Conv1D layers (``LayerInfo``'s matrix form).

Forward. The Hadamard product does not factor through ``x``, so each call forms the update
``W ⊙ B A`` once, ``(out, in)`` in the activation dtype (``out·in·r`` flops, one weight-sized
temporary, which autograd keeps for the input gradient), and adds ``s (W ⊙ B A) x`` to the
base output with one fused GEMM. The alternative, ``Σ_k b_k ⊙ W (a_k ⊙ x)``, avoids the
temporary but runs ``r`` GEMMs of the base's size per call. For inference, merge: it is exact
and then free.

Composition. Unmerged, each HUT delta reads the layer's own weight, so several on one layer add
their effects: ``W ⊙ (1 + s_a B_a A_a + s_b B_b A_b)``. Merging writes ``W ⊙ (1 + s B A)``
computed from the weight it folds into, so a HUT delta merges first on its layer
(``merges_first``) and alone; unmerging divides by ``1 + s B A`` (refused where an entry is
zero: those weights were erased).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta, Params
from ..core.errors import ConfigError, MergeError
from ..core.geometry import LayerInfo, dense_weight
from ..core.registry import register

#: Entries of ``1 + s B A`` closer to zero than this cannot be divided out on unmerge.
_ERASED = 1e-6


@dataclass(frozen=True, kw_only=True)
class HUTConfig(DeltaConfig):
    """HUT hyper-parameters (targeting fields: see ``DeltaConfig``).

    Args:
        rank: ``r``, the rank of the multiplicative pattern ``B A``.
        alpha: ``α``; the pattern is scaled by ``α / r`` (``None``: ``α = r``, scale 1).
    """

    rank: int = 8
    alpha: float | None = None

    def validate(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ConfigError(f"rank must be a positive integer, got {self.rank!r}")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float))
                                           and math.isfinite(self.alpha)):
            raise ConfigError(f"alpha must be a finite number or None, got {self.alpha!r}")

    @property
    def scale(self) -> float:
        """The factor applied to ``B A``."""
        return (self.rank if self.alpha is None else self.alpha) / self.rank


@register("hut", config=HUTConfig)
class HUTDelta(Delta):
    """``y + s (W ⊙ B A) x`` on one Linear / HF Conv1D layer."""

    layer_kinds = frozenset({"linear"})
    mergeable = True
    merges_first = True  # the fold reads the weight it multiplies
    gating = "output"
    examples = ({}, {"rank": 3, "alpha": 6}, {"rank": 2, "gate": True})

    def __init__(self, info: LayerInfo, config: HUTConfig, path: str) -> None:
        super().__init__(info, config, path)
        self.scale = config.scale
        self.A = nn.Parameter(torch.empty(config.rank, info.in_dim))  # (r, in)
        self.B = nn.Parameter(torch.empty(info.out_dim, config.rank))  # (out, r)

    @classmethod
    def num_trainable(cls, info: LayerInfo, config: HUTConfig) -> int:
        return config.rank * (info.in_dim + info.out_dim)

    @torch.no_grad()
    def reset_parameters(self, base: nn.Module) -> None:
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.zeros_(self.B)

    def bind(self, base: nn.Module) -> None:
        """Keep a plain reference to the base layer (not a submodule: not saved, not moved)."""
        self.__dict__["_base_layer"] = base

    def _weight(self) -> Tensor:
        """The base layer's weight as an ``(out, in)`` matrix (a view)."""
        base = self.__dict__.get("_base_layer")
        if base is None:
            raise MergeError(f"{self.path}: HUT reads its base layer's weight; attach it with "
                             "deltatune.inject or deltatune.load")
        return self.info.weight_matrix(dense_weight(base))

    # --------------------------------------------------------------------------- compute
    def _update(self, like: Tensor) -> Tensor:
        """``W ⊙ B A`` in ``like``'s dtype, ``(out, in)`` (unscaled)."""
        w = self.cast(self._weight(), like)
        pattern = self.cast(self.B, like) @ self.cast(self.A, like)  # (out, in)
        # In place when W is frozen: the product's backward then needs W only.
        return pattern * w if w.requires_grad else pattern.mul_(w)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.info.add_out(y, x, self._update(y), self.scale)

    def effect(self, x: Tensor, y: Tensor) -> Tensor:
        return F.linear(x, self._update(y)) * self.scale

    def _pattern(self) -> Tensor:
        """``s B A`` in fp32, ``(out, in)``."""
        return self.scale * (self.B.detach().float() @ self.A.detach().float())

    def delta_params(self) -> Params:
        """``ΔW = s · W ⊙ B A`` for the weight the base layer holds now (while unmerged)."""
        w = self._weight().detach().float()
        return {"weight": self.info.weight_from_matrix(w * self._pattern())}

    # ------------------------------------------------------------------------------ merge
    def merged_params(self, params: Params) -> Params:
        w = self.info.weight_matrix(params["weight"])  # (out, in), fp32
        return {"weight": self.info.weight_from_matrix(w + w * self._pattern())}

    def unmerged_params(self, params: Params) -> Params:
        factor = 1 + self._pattern()  # (out, in)
        erased = int((factor.abs() < _ERASED).sum())
        if erased:
            raise MergeError(f"{self.path}: 1 + s·B A is zero at {erased} entries, so the merge "
                             "erased those weights and unmerging cannot restore them; reload "
                             "the base weights instead")
        w = self.info.weight_matrix(params["weight"])
        return {"weight": self.info.weight_from_matrix(w / factor)}


__all__ = ["HUTConfig", "HUTDelta"]
