"""Compacter: adapters whose projections are low-rank PHM layers (Karimi Mahabadi et al. 2021,
"Compacter: Efficient Low-Rank Hypercomplex Adapter Layers", arXiv:2106.04647).

    W = Σ_{i=1}^{n} A_i ⊗ (s_i t_iᵀ)      A_i ∈ R^{n×n} ("slow", shared by every layer),
                                           s_i ∈ R^{d_out/n × k}, t_i ∈ R^{k × d_in/n} ("fast")

Each bottleneck adapter projection (``W_down``: d → r, ``W_up``: r → d) is a parameterised
hypercomplex multiplication layer: a sum of ``n`` Kronecker products of a small *rule* matrix
``A_i`` and a rank-``k`` matrix. With ``shared_rules`` (the paper's Compacter) the rules are one
tensor ``(n, n, n)`` shared by every projection of every layer of the adapter — tied, counted
once and saved once; without it each layer keeps its own (PHM-Adapter). Everything else —
placement (``"ffn"``: Compacter++, ``["attn", "ffn"]``: Compacter), sequential or parallel
position, activation, gating, scaling, how several adapters combine — is the bottleneck adapter
of ``adapter.py``; ``CompacterConfig`` extends ``AdapterConfig`` with the PHM fields.

Init: rules ``A_i ~ N(0, 1/n)``; fast factors so that the product matrix has the variance of the
adapter's own init (``N(0, 0.02²)`` or Kaiming-uniform's); the up projection's ``s`` starts at
zero, so the adapter starts as the identity.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.errors import ConfigError
from ..core.geometry import LayerInfo
from ..core.registry import register
from .adapter import AdapterConfig, AdapterDelta


@dataclass(frozen=True, kw_only=True)
class CompacterConfig(AdapterConfig):
    """Compacter hyper-parameters (the adapter fields: see ``AdapterConfig``).

    Args:
        phm_dim: ``n``, the number of Kronecker summands and the rule size; the adapter's
            input, output and bottleneck widths must be multiples of it.
        phm_rank: ``k``, the rank of each fast matrix ``s_i t_iᵀ`` (the paper uses 1).
        shared_rules: share the rules ``A_i`` across all layers (Compacter) or keep one set
            per layer (PHM-Adapter).
    """

    phm_dim: int = 4
    phm_rank: int = 1
    shared_rules: bool = True

    def validate(self) -> None:
        super().validate()
        for name in ("phm_dim", "phm_rank"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.shared_rules, bool):
            raise ConfigError(f"shared_rules must be True or False, got {self.shared_rules!r}")
        if self.bottleneck is not None and self.bottleneck % self.phm_dim:
            raise ConfigError(f"bottleneck={self.bottleneck} must be a multiple of "
                              f"phm_dim={self.phm_dim}")

    def bottleneck_for(self, out_dim: int) -> int:
        """The adapter's bottleneck, rounded down to a multiple of ``phm_dim`` (at least it)."""
        if self.bottleneck is not None:
            return self.bottleneck
        return max(self.phm_dim, super().bottleneck_for(out_dim) // self.phm_dim * self.phm_dim)


class _Rules(nn.Module):
    """The slow weights ``A`` (n, n, n) shared by every PHM projection of one adapter."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.rules = nn.Parameter(torch.empty(n, n, n))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.rules, std=1 / math.sqrt(self.rules.shape[0]))


def phm_weight(rules: Tensor, s: Tensor, t: Tensor) -> Tensor:
    """``Σ_i A_i ⊗ (s_i t_i)`` as a ``(n·p, n·q)`` matrix, from rules ``(n, n, n)``, ``s``
    ``(n, p, k)`` and ``t`` ``(n, k, q)``."""
    n, p, q = rules.shape[0], s.shape[1], t.shape[2]
    b = torch.bmm(s, t)  # (n, p, q)
    # kron(A, B)[a·p + c, b·q + d] = A[a, b] · B[c, d]
    return torch.einsum("iab,icd->acbd", rules, b).reshape(n * p, n * q)


@register("compacter", config=CompacterConfig)
class CompacterDelta(AdapterDelta):
    """A bottleneck adapter whose ``W_down`` and ``W_up`` are low-rank PHM layers."""

    examples = (
        {},  # phm_dim 4, r = d / 16: adapts the zoo's Hugging Face models (d = 64)
        {"phm_dim": 2, "bottleneck": 2},
        {"phm_dim": 2, "phm_rank": 2, "shared_rules": False, "position": "parallel",
         "bottleneck": 4, "init": "kaiming"},
        {"phm_dim": 2, "reduction_factor": 2, "gate": True, "learned_scale": True,
         "activation": "silu"},  # no dead units on 2-wide bottlenecks
    )

    def make_projections(self, d_in: int, d_out: int, r: int) -> None:
        n, k = self.config.phm_dim, self.config.phm_rank
        self.down_s = nn.Parameter(torch.empty(n, r // n, k))  # W_down: (r, d_in)
        self.down_t = nn.Parameter(torch.empty(n, k, d_in // n))
        self.up_s = nn.Parameter(torch.empty(n, d_out // n, k))  # W_up: (d_out, r)
        self.up_t = nn.Parameter(torch.empty(n, k, r // n))
        self.rules = None if self.config.shared_rules else nn.Parameter(torch.empty(n, n, n))

    def _rules(self) -> Tensor:
        return self.shared.rules if self.rules is None else self.rules

    def down_weight(self) -> Tensor:
        return phm_weight(self._rules(), self.down_s, self.down_t)

    def up_weight(self) -> Tensor:
        return phm_weight(self._rules(), self.up_s, self.up_t)

    @torch.no_grad()
    def reset_projections(self) -> None:
        n, k = self.config.phm_dim, self.config.phm_rank
        d_in = self.down_t.shape[2] * n
        if self.rules is not None:
            nn.init.normal_(self.rules, std=1 / math.sqrt(n))
        # var(W) = n · var(A) · k · var(s) · var(t) = k · var(s) with var(A) = 1/n, var(t) = 1
        target = 0.02**2 if self.config.init == "bert" else 1 / (3 * d_in)
        nn.init.normal_(self.down_s, std=math.sqrt(target / k))
        nn.init.normal_(self.down_t)
        nn.init.zeros_(self.up_s)
        nn.init.normal_(self.up_t)

    @classmethod
    def build_shared(cls, config: CompacterConfig,
                     targets: Mapping[str, LayerInfo]) -> nn.Module | None:
        return _Rules(config.phm_dim) if config.shared_rules else None

    @classmethod
    def num_shared(cls, config: CompacterConfig, targets: Mapping[str, LayerInfo]) -> int:
        return config.phm_dim**3 if config.shared_rules else 0

    @classmethod
    def projection_params(cls, d_in: int, d_out: int, r: int, config: CompacterConfig) -> int:
        own_rules = 0 if config.shared_rules else config.phm_dim**3
        return config.phm_rank * (r + d_in + d_out + r) + own_rules

    @classmethod
    def supports(cls, module: nn.Module, info: LayerInfo, config: CompacterConfig) -> str | None:
        n = config.phm_dim
        widths = {info.out_dim} | ({info.in_dim} if config.position == "parallel" else set())
        bad = sorted(w for w in widths if w % n)
        if bad:
            return (f"its width {bad[0]} is not a multiple of phm_dim={n}; pick a phm_dim that "
                    "divides the hidden size, or exclude this layer")
        return super().supports(module, info, config)
