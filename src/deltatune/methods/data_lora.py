"""LoRA initialised from data: LoRA-GA (gradients) and CorDA (input covariance).

Both start ``B A`` at a nonzero product computed from one calibration pass over a few batches
(``inject(model, config, name, data=..., loss_fn=...)``, see ``core.calibration``) and, as PiSSA
does (``LoraConfig.frozen_copy``), subtract its frozen copy instead of rewriting the base::

    h = W x + s (B A − B₀ A₀) x            B₀ A₀: the initial factors, frozen

so the output at init equals the base and the base weights are never touched. Saved, a delta is
the plain rank-2r LoRA ``[B, −B₀] [A; A₀]``: it loads on the original base, without data.

**LoRA-GA** (Wang et al. 2024, arXiv:2407.05000, Algorithm 1). With ``G = ∂L/∂W`` averaged over
the batches and ``G = U S Vᵀ``::

    A₀ = V[:, :r]ᵀ · ⁴√out / √γ,    B₀ = U[:, r:2r] · ⁴√out / √γ          (direction "ArB2r")

so that LoRA's first step, ``−η s² (B Bᵀ G + G Aᵀ A)``, follows the top-2r part of the full
fine-tuning step ``−η G`` (the sign of ``G`` does not matter: ``B Bᵀ`` and ``Aᵀ A`` ignore it).
``direction`` picks the other splits of the 2r components the reference code offers ("A2rBr":
``B`` from the first r, ``A`` from the next r; "ArBr": interleaved). peft 0.21's ``lora_ga``
differs from the paper: it also multiplies ``B`` by the singular values and scales only ``B``
by the stable factor; we follow the paper and the authors' code.

**CorDA** (Yang et al. 2024, arXiv:2406.05223). With ``C = E[x xᵀ]`` the layer input's
covariance, regularised to ``C' = C + λ·mean(diag C)·I`` (λ from ``damping``, doubled until
``‖C' C'⁻¹ − I‖ < 0.05``, as in the reference code)::

    W C' = U S Vᵀ,   W = Σᵢ uᵢ sᵢ (C'⁻¹ vᵢ)ᵀ,   B₀ = U_r √(S_r/s),   A₀ = √(S_r/s) V_rᵀ C'⁻¹

over the ``r`` largest components (``mode="ipm"``, instruction-previewed: calibrate on the
task's data) or the ``r`` smallest (``mode="kpm"``, knowledge-preserved: calibrate on data whose
knowledge should be kept; the adapted components are the ones it uses least). Given the same
covariance, this is peft's ``corda`` exactly; peft builds its covariance differently (one sample
per forward call, each scaled by its maximum, summed over tokens, averaged over calls). The
product ``s B₀ A₀`` — the part of ``W`` handed to training — does not depend on the scale of
``C``; the balance between ``A`` and ``B`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.errors import ConfigError
from ..core.geometry import LayerInfo, dense_weight
from ..core.registry import register
from .lora import LoraConfig, LoraDelta
from .svd import svd_factors

_DIRECTIONS = ("ArB2r", "A2rBr", "ArBr")
_MODES = ("ipm", "kpm")


@dataclass(frozen=True, kw_only=True)
class _DataInitConfig(LoraConfig):
    """Shared checks: the initialisation is the method's own, with a frozen copy."""

    @property
    def frozen_copy(self) -> bool:
        return True

    def validate(self) -> None:
        super().validate()
        if self.init != "default":
            raise ConfigError(f"{type(self).__name__} initialises from data; leave init at "
                              f"'default' (got {self.init!r})")
        if self.freeze_a:
            raise ConfigError(f"{type(self).__name__} initialises A from data; freeze_a=True "
                              "(a random frozen A) cannot be combined with it")


def _components(info: LayerInfo, needed: int, what: str) -> str | None:
    limit = min(info.in_dim, info.out_dim)
    if needed <= limit:
        return None
    return (f"{what} needs {needed} singular components, and this {info.out_dim}×{info.in_dim} "
            f"layer has {limit}; lower the rank (per module with overrides=) or exclude it")


# ---------------------------------------------------------------------------------- LoRA-GA
@dataclass(frozen=True, kw_only=True)
class LoraGAConfig(_DataInitConfig):
    """LoRA-GA: LoRA's fields (see ``LoraConfig``; ``init`` and ``freeze_a`` stay default).

    Args:
        direction: how the top-2r singular vectors of the gradient split between ``A`` and
            ``B``: "ArB2r" (the paper: ``A`` the first r, ``B`` the next r), "A2rBr", "ArBr".
        stable_gamma: ``γ`` of the stable scale ``⁴√out / √γ`` on both factors.
        svd_iters: ``None`` for an exact SVD of the gradient, else the power iterations of a
            randomised SVD (the reference code uses 4).
    """

    direction: str = "ArB2r"
    stable_gamma: float = 16.0
    svd_iters: int | None = None

    def validate(self) -> None:
        super().validate()
        if self.direction not in _DIRECTIONS:
            raise ConfigError(f"direction must be one of {_DIRECTIONS}, got {self.direction!r}")
        if not (isinstance(self.stable_gamma, (int, float)) and 0 < self.stable_gamma < 1e30):
            raise ConfigError(f"stable_gamma must be a positive number, got "
                              f"{self.stable_gamma!r}")
        if self.svd_iters is not None and (not isinstance(self.svd_iters, int)
                                           or self.svd_iters < 0):
            raise ConfigError(f"svd_iters must be None or a non-negative iteration count, got "
                              f"{self.svd_iters!r}")


@register("lora_ga", config=LoraGAConfig)
class LoraGADelta(LoraDelta):
    """LoRA whose ``A``, ``B`` start from the SVD of the loss gradient (frozen copy subtracted)."""

    calibration = frozenset({"weight_grad"})
    examples = ({}, {"rank": 2, "alpha": 4, "rslora": True, "direction": "A2rBr",
                     "svd_iters": 3},
                {"rank": 1, "direction": "ArBr", "stable_gamma": 4.0, "bias": True})

    def __init__(self, info: LayerInfo, config: LoraGAConfig, path: str) -> None:
        why = self.supports(None, info, config)
        if why:  # a per-module override; a broad selection already left the layer out
            raise ConfigError(f"{path}: {why}")
        super().__init__(info, config, path)

    @classmethod
    def supports(cls, module: nn.Module | None, info: LayerInfo,
                 config: LoraGAConfig) -> str | None:
        return _components(info, 2 * config.rank, "LoRA-GA (2r gradient directions)")

    def initial_factors(self, base: nn.Module) -> tuple[Tensor, Tensor]:
        grad = self.calibration_stats["weight_grad"]  # (out, in)
        r, c = self.config.rank, self.config
        u, _, vh = svd_factors(grad, 2 * r, c.svd_iters)  # (out, 2r), (2r, in)
        if c.direction == "ArB2r":
            a, b = vh[:r], u[:, r:]
        elif c.direction == "A2rBr":
            a, b = vh[r:], u[:, :r]
        else:  # "ArBr": interleaved, B the even components, A the odd ones
            a, b = vh[1::2], u[:, 0::2]
        stable = self.info.out_dim ** 0.25 / c.stable_gamma ** 0.5
        return a * stable, b * stable  # A: (r, in), B: (out, r)


# ------------------------------------------------------------------------------------ CorDA
@dataclass(frozen=True, kw_only=True)
class CordaConfig(_DataInitConfig):
    """CorDA: LoRA's fields (see ``LoraConfig``; ``init`` and ``freeze_a`` stay default).

    Args:
        mode: "ipm" (instruction-previewed: adapt the r largest components of ``W C``) or
            "kpm" (knowledge-preserved: the r smallest).
        damping: initial ``λ`` of the regularisation ``C + λ·mean(diag C)·I`` (doubled until
            the inverse is accurate).
    """

    mode: str = "ipm"
    damping: float = 0.01

    def validate(self) -> None:
        super().validate()
        if self.mode not in _MODES:
            raise ConfigError(f"mode must be 'ipm' or 'kpm', got {self.mode!r}")
        if not (isinstance(self.damping, (int, float)) and 0 < self.damping < 1e6):
            raise ConfigError(f"damping must be a positive number, got {self.damping!r}")


@register("corda", config=CordaConfig)
class CordaDelta(LoraDelta):
    """LoRA on the context-oriented components of ``W`` (frozen copy subtracted)."""

    layer_kinds = frozenset({"linear", "conv"})
    calibration = frozenset({"input_cov"})
    examples = ({}, {"rank": 2, "mode": "kpm", "alpha": 3},
                {"rank": 1, "rslora": True, "gate": True})

    @classmethod
    def supports(cls, module: nn.Module | None, info: LayerInfo,
                 config: CordaConfig) -> str | None:
        return _components(info, config.rank, "CorDA (r components of W C)")

    def initial_factors(self, base: nn.Module) -> tuple[Tensor, Tensor]:
        w = self.info.weight_matrix(dense_weight(base).detach()).float()  # (out, in)
        cov, inv = regularised(self.calibration_stats["input_cov"], self.config.damping,
                               self.path)
        u, s, vh = torch.linalg.svd(w @ cov, full_matrices=False)
        r = self.config.rank
        pick = slice(0, r) if self.config.mode == "ipm" else slice(s.numel() - r, s.numel())
        root = (s[pick] / self.scale).sqrt()
        return root[:, None] * (vh[pick] @ inv), u[:, pick] * root[None, :]  # (r, in), (out, r)


def regularised(cov: Tensor, damping: float, path: str = "") -> tuple[Tensor, Tensor]:
    """``(C', C'⁻¹)`` with ``C' = C + λ·mean(diag C)·I``, ``λ`` doubled from ``damping`` until
    ``‖C' C'⁻¹ − I‖_F < 0.05`` (CorDA's reference code and peft).

    Raises:
        ConfigError: ``C`` is not finite or has no positive diagonal (the data never varied).
    """
    mean = cov.diagonal().mean()
    if not torch.isfinite(cov).all() or not mean > 0:
        raise ConfigError(f"{path}: the calibration covariance is zero or not finite; "
                          "calibrate with (more) real data")
    eye = torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)
    for _ in range(64):
        fixed = cov + eye * (mean * damping)
        inv = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inv, eye).item() < 0.05:
            return fixed, inv
        damping *= 2
    raise ConfigError(f"{path}: the calibration covariance could not be regularised into an "
                      "invertible matrix")


__all__ = ["CordaConfig", "CordaDelta", "LoraGAConfig", "LoraGADelta", "regularised"]
