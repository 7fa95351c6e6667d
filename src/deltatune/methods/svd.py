"""Deltas in the frozen top-``r`` singular basis of the base weight ``W = U Σ Vᵀ``.

LoRA-XS (Bałazy et al. 2024, arXiv:2405.17604) trains an ``r × r`` matrix ``R`` between the
frozen factors; SVFit (Sun et al. 2024, arXiv:2409.05926) trains the top-``r`` singular values::

    LoRA-XS:   h = W x + s · U_r Σ_r R V_rᵀ x          s = α / r;  R: (r, r), zero at init
    SVFit:     h = W x + U_r diag(Δσ) V_rᵀ x           Δσ: (r,), zero at init

Both are one piece, ``_SVDBasisDelta``: frozen ``U`` ``(out, r)`` and ``Vh`` ``(r, in)`` from
``svd_factors`` of the weight, and a small trained core between them (the subclass's ``mix``).
Linear and HF Conv1D layers (through ``LayerInfo``'s matrix form); both merge exactly.

The frozen factors are *saved* with the delta, not regenerated on load. Singular vectors are
defined up to sign (and up to rotation where singular values repeat), and LAPACK builds,
devices and torch versions do pick different signs: flipping a pair ``(u_i, v_i)`` leaves
SVFit's ``u_i Δσ_i v_iᵀ`` unchanged but turns LoRA-XS's ``U R Vᵀ`` into ``U D R D Vᵀ``, another
update. A regenerated basis would also follow the base it is loaded on (ported, re-quantised,
bf16-rounded). Saved, the factors cost ``r (out + in)`` values per layer — one rank-``r`` LoRA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta, Params
from ..core.errors import ConfigError
from ..core.geometry import LayerInfo, dense_weight
from ..core.registry import register


def svd_factors(weight: Tensor, rank: int,
                iters: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The top-``rank`` singular triplets of an ``(out, in)`` matrix, in fp32.

    Args:
        weight: the matrix (any float dtype; computed in fp32).
        rank: how many components to keep (at most ``min(out, in)``).
        iters: ``None`` for a full SVD, else the power iterations of a randomised SVD
            (Halko et al. 2011, oversampled by 10), much faster on large matrices.

    Returns:
        ``(U, σ, Vᵀ)`` of shapes ``(out, r)``, ``(r,)``, ``(r, in)``, ``σ`` descending.
    """
    w = weight.detach().float()
    if iters is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    u, s, v = torch.svd_lowrank(w, q=min(rank + 10, *w.shape), niter=iters)
    return u[:, :rank], s[:rank], v[:, :rank].t()


@dataclass(frozen=True, kw_only=True)
class _SVDConfig(DeltaConfig):
    """Fields shared by the singular-basis methods.

    Args:
        rank: ``r``, how many top singular components form the frozen basis (at most
            ``min(in, out)`` of each targeted layer; smaller layers are left out of a broad
            selection).
        dropout: dropout probability on the input of the low-rank path.
        svd_iters: ``None`` for an exact SVD at injection, else the iterations of a fast
            randomised SVD (the factors are saved, so either way a load reproduces them).
    """

    rank: int = 8
    dropout: float = 0.0
    svd_iters: int | None = None

    def validate(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ConfigError(f"rank must be a positive integer, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.svd_iters is not None and (not isinstance(self.svd_iters, int)
                                           or self.svd_iters < 0):
            raise ConfigError(f"svd_iters must be None or a non-negative iteration count, got "
                              f"{self.svd_iters!r}")


def _too_big(info: LayerInfo, rank: int) -> str | None:
    limit = min(info.in_dim, info.out_dim)
    if rank <= limit:
        return None
    return (f"rank {rank} exceeds min(in, out) = {limit} of this {info.out_dim}×{info.in_dim} "
            f"layer, whose SVD has only {limit} components; lower the rank (per module with "
            "overrides=) or exclude the layer")


class _SVDBasisDelta(Delta):
    """``y + s · U core(Vh x)``: frozen singular basis, trained core (subclasses: ``mix``)."""

    layer_kinds = frozenset({"linear"})
    mergeable = True
    gating = "output"
    scale: float = 1.0

    def __init__(self, info: LayerInfo, config: _SVDConfig, path: str) -> None:
        super().__init__(info, config, path)
        why = _too_big(info, config.rank)
        if why:  # a per-module override; a broad selection already left the layer out
            raise ConfigError(f"{path}: {why}")
        self.dropout = config.dropout
        # Frozen and saved (see the module docstring): persistent buffers, never parameters.
        self.register_buffer("U", torch.empty(info.out_dim, config.rank))  # (out, r)
        self.register_buffer("Vh", torch.empty(config.rank, info.in_dim))  # (r, in) = V_rᵀ

    @classmethod
    def supports(cls, module: nn.Module, info: LayerInfo, config: _SVDConfig) -> str | None:
        return _too_big(info, config.rank)

    @torch.no_grad()
    def reset_parameters(self, base: nn.Module) -> None:
        c = self.config
        u, s, vh = svd_factors(self.info.weight_matrix(dense_weight(base)), c.rank, c.svd_iters)
        self.U.copy_(self.left_factor(u, s))
        self.Vh.copy_(vh)
        self.reset_core()

    # ------------------------------------------------------------------- the subclass's core
    def left_factor(self, u: Tensor, s: Tensor) -> Tensor:
        """The frozen ``(out, r)`` factor stored in ``U`` (default: ``U_r``)."""
        return u

    def reset_core(self) -> None:
        """Initialise the trained core (identity at init: zero)."""

    def mix(self, h: Tensor) -> Tensor:
        """Apply the trained core to ``h = Vh x``, ``(..., r)`` → ``(..., r)``."""
        raise NotImplementedError

    def core(self) -> Tensor:
        """The trained core as an ``(r, r)`` matrix (for merging)."""
        raise NotImplementedError

    # --------------------------------------------------------------------------- compute
    def _path(self, x: Tensor, y: Tensor) -> Tensor:
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout, training=True)
        return self.mix(self.info.apply_in(x, self.cast(self.Vh, y)))  # (..., r)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.info.add_out(y, self._path(x, y), self.cast(self.U, y), self.scale)

    def effect(self, x: Tensor, y: Tensor) -> Tensor:
        return self.info.apply_out(self._path(x, y), self.cast(self.U, y)) * self.scale

    def delta_params(self) -> Params:
        delta = self.U.float() @ self.core().float() @ self.Vh.float()  # (out, in)
        return {"weight": self.info.weight_from_matrix(self.scale * delta)}


# ------------------------------------------------------------------------------- LoRA-XS
@dataclass(frozen=True, kw_only=True)
class LoraXSConfig(_SVDConfig):
    """LoRA-XS hyper-parameters (``rank``, ``dropout``, ``svd_iters``: see ``_SVDConfig``).

    Args:
        alpha: ``α``; the update is scaled by ``α / r`` (``None``: ``α = r``, scale 1).
        init_std: standard deviation of ``R``'s Gaussian init; ``0`` (default) starts at
            zero, exactly the base model. The reference implementation uses ``1e-5``.
    """

    alpha: float | None = None
    init_std: float = 0.0

    def validate(self) -> None:
        super().validate()
        if self.alpha is not None and not (isinstance(self.alpha, (int, float))
                                           and math.isfinite(self.alpha)):
            raise ConfigError(f"alpha must be a finite number or None, got {self.alpha!r}")
        if not (isinstance(self.init_std, (int, float)) and 0.0 <= self.init_std < math.inf):
            raise ConfigError(f"init_std must be a finite number >= 0, got {self.init_std!r}")

    @property
    def scale(self) -> float:
        """The factor applied to ``U_r Σ_r R V_rᵀ``."""
        return (self.rank if self.alpha is None else self.alpha) / self.rank


@register("lora_xs", config=LoraXSConfig)
class LoraXSDelta(_SVDBasisDelta):
    """``y + s · U_r Σ_r R V_rᵀ x``; ``U`` holds ``U_r Σ_r`` (as in the reference code)."""

    examples = ({}, {"rank": 3, "alpha": 6, "dropout": 0.1, "svd_iters": 2},
                {"rank": 2, "gate": True})

    def __init__(self, info: LayerInfo, config: LoraXSConfig, path: str) -> None:
        super().__init__(info, config, path)
        self.scale = config.scale
        self.R = nn.Parameter(torch.zeros(config.rank, config.rank))  # (r, r)

    @classmethod
    def num_trainable(cls, info: LayerInfo, config: LoraXSConfig) -> int:
        return config.rank * config.rank

    def left_factor(self, u: Tensor, s: Tensor) -> Tensor:
        return u * s  # U_r Σ_r: (out, r)

    def reset_core(self) -> None:
        if self.config.init_std > 0:
            nn.init.normal_(self.R, std=self.config.init_std)
        else:
            nn.init.zeros_(self.R)

    def mix(self, h: Tensor) -> Tensor:
        return F.linear(h, self.cast(self.R, h))  # R h: (..., r)

    def core(self) -> Tensor:
        return self.R


# --------------------------------------------------------------------------------- SVFit
@dataclass(frozen=True, kw_only=True)
class SVFitConfig(_SVDConfig):
    """SVFit hyper-parameters: ``rank`` (how many top singular values train), ``dropout``,
    ``svd_iters`` (see ``_SVDConfig``)."""


@register("svfit", config=SVFitConfig)
class SVFitDelta(_SVDBasisDelta):
    """``y + U_r diag(Δσ) V_rᵀ x``: the top-``r`` singular values of ``W`` become ``σ + Δσ``."""

    examples = ({}, {"rank": 2, "gate": True})

    def __init__(self, info: LayerInfo, config: SVFitConfig, path: str) -> None:
        super().__init__(info, config, path)
        self.sigma = nn.Parameter(torch.zeros(config.rank))  # Δσ: (r,)

    @classmethod
    def num_trainable(cls, info: LayerInfo, config: SVFitConfig) -> int:
        return config.rank

    def reset_core(self) -> None:
        nn.init.zeros_(self.sigma)

    def mix(self, h: Tensor) -> Tensor:
        return h * self.cast(self.sigma, h)  # diag(Δσ) h: (..., r)

    def core(self) -> Tensor:
        return torch.diag(self.sigma)


__all__ = ["LoraXSConfig", "LoraXSDelta", "SVFitConfig", "SVFitDelta", "svd_factors"]
