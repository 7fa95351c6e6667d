"""Dynamic rank distribution (Mao et al. 2024, arXiv:2405.17357; the paper calls it "DoRA",
registered here as ``"dynamic_rank"`` so it cannot be confused with weight-decomposed DoRA).

    h = W x + (α / r₀) · Σᵢ cᵢ Bᵢ Aᵢ x          one scalar cᵢ per rank-1 component

Each module starts with ``r₀ = rank`` components: ``Aᵢ`` (a row of ``A``) and ``Bᵢ`` (a column of
``B``) Kaiming-uniform, ``cᵢ = 0`` (so the model starts as the base). During training the
schedule (``DynamicRankSchedule``, driven by ``deltatune.Scheduler``) scores every component by
its share of its module's update,

    sᵢ = ‖cᵢ Bᵢ Aᵢ‖_F / ‖Σⱼ cⱼ Bⱼ Aⱼ‖_F = |cᵢ| ‖Bᵢ‖ ‖Aᵢ‖ / ‖B diag(c) A‖_F,

smoothed by an exponential moving average (β), and prunes the lowest-scored components of the
whole adapter (one global ranking, so ranks move to the modules that need them) every
``interval`` steps between ``prune_from`` and ``prune_until`` (fractions of ``total_steps``),
following the reference code's cubic budget: ``b(t) = N − ⌊(N − b_T) (t / T_p)³⌋`` of the ``N``
initial components are kept, ``t`` steps into a pruning window of ``T_p`` steps, down to the
storage budget ``b_T = round(target_rank × modules)`` total components. Until pruning ends a
regulariser — the paper's Dimensional Equilibrium Modulator, the mean variance of the entries of
every ``Aᵢ`` and ``Bᵢ`` — is added to the loss (``Scheduler.loss()``), so that no component's
size is carried by a few entries and ``|cᵢ|`` tracks the component's contribution.

While pruning, a pruned component is masked (``cᵢ`` and its optimizer state zeroed after every
step; it stays pruned, the budget only shrinks). When pruning ends the pruned rows of ``A``, ``B``
and ``c`` are removed with their optimizer state, and each module's count is recorded as the
per-module override ``kept``, so ``save`` writes only kept components and ``load`` rebuilds them.
A module may end with no component: it then adds nothing (its tensors have size 0).

Deviations from the reference code: pruned components are not revived between pruning steps,
the first pruning step prunes nothing (the reference prunes at least one), and pruned
components are removed rather than kept at ``c = 0``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..core.delta import Delta
from ..core.errors import ConfigError, StateError
from ..core.geometry import LayerInfo
from ..core.registry import register
from ..core.schedule import Schedule, mask_parameter, remap_parameter, set_module_fields
from .lora import LoraConfig, LoraDelta

EPS = 1e-8  # added to ‖ΔW‖_F in the score, as in the reference code
#: Fields of the one budget and schedule an adapter has (not per module).
ADAPTER_WIDE = ("target_rank", "total_steps", "prune_from", "prune_until", "interval", "beta",
                "reg_weight")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


@dataclass(frozen=True, kw_only=True)
class DynamicRankConfig(LoraConfig):
    """Dynamic rank distribution hyper-parameters (and LoRA's: ``alpha``, ``rslora``,
    ``dropout``, ``bias``; the scale ``α / rank`` uses the initial rank throughout).

    Args:
        rank: ``r₀``, the components each module starts with (the paper: 1.5 × target).
        target_rank: the storage budget, as the average number of components per module left
            when pruning ends; the adapter keeps ``round(target_rank × modules)`` in total.
        kept: components a module holds now (``None``: ``rank``); recorded per module by the
            schedule when it removes pruned components, not usually set by hand.
        total_steps: optimizer steps of the training run (needed by the schedule).
        prune_from: fraction of ``total_steps`` after which pruning starts.
        prune_until: fraction of ``total_steps`` at which it ends (at the budget).
        interval: optimizer steps between pruning steps.
        beta: smoothing of the importance scores' moving average.
        reg_weight: weight of the variance regulariser (``Scheduler.loss()``).
    """

    rank: int = 12
    target_rank: float = 8
    kept: int | None = None
    total_steps: int | None = None
    prune_from: float = 0.15
    prune_until: float = 0.5
    interval: int = 100
    beta: float = 0.9
    reg_weight: float = 0.1

    def validate(self) -> None:
        super().validate()
        if self.init != "default" or self.freeze_a:
            raise ConfigError("dynamic rank distribution initialises A and B Kaiming-uniform "
                              "and c = 0; use init='default' and freeze_a=False")
        if self.kept is not None and not (isinstance(self.kept, int) and not isinstance(
                self.kept, bool) and 0 <= self.kept <= self.rank):
            raise ConfigError(f"kept must be an integer in [0, rank={self.rank}], got "
                              f"{self.kept!r}")
        if not _number(self.target_rank) or self.target_rank < 0:
            raise ConfigError(f"target_rank must be a non-negative number, got "
                              f"{self.target_rank!r}")
        if self.total_steps is not None and not (isinstance(self.total_steps, int) and not
                                                 isinstance(self.total_steps, bool) and
                                                 self.total_steps > 0):
            raise ConfigError(f"total_steps must be a positive integer or None, got "
                              f"{self.total_steps!r}")
        if not (_number(self.prune_from) and _number(self.prune_until)
                and 0 <= self.prune_from <= self.prune_until <= 1):
            raise ConfigError("prune_from and prune_until are fractions of total_steps with "
                              f"0 <= prune_from <= prune_until <= 1, got {self.prune_from!r} "
                              f"and {self.prune_until!r}")
        if not (isinstance(self.interval, int) and not isinstance(self.interval, bool)
                and self.interval > 0):
            raise ConfigError(f"interval must be a positive integer, got {self.interval!r}")
        if not (_number(self.beta) and 0 <= self.beta < 1):
            raise ConfigError(f"beta must be in [0, 1), got {self.beta!r}")
        if not (_number(self.reg_weight) and self.reg_weight >= 0):
            raise ConfigError(f"reg_weight must be a non-negative number, got "
                              f"{self.reg_weight!r}")
        wide = sorted({k for v in (self.overrides or {}).values() for k in v} & {*ADAPTER_WIDE})
        if wide:
            raise ConfigError(f"{wide} apply to the whole adapter (one budget, one schedule); "
                              "set them on the config itself, not in overrides")

    @property
    def components(self) -> int:
        """Components a module holds now."""
        return self.rank if self.kept is None else self.kept


class DynamicRankSchedule(Schedule):
    """Scores, masks, then removes components under the budget (see the module docstring).

    Raises:
        ConfigError: ``total_steps`` is not set, or the budget exceeds the components present.
    """

    remaps = True  # ranks change size

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__(model, name)
        config = self.config
        if config.total_steps is None:
            raise ConfigError(f"adapter {name!r}: set DynamicRankConfig.total_steps (the "
                              "optimizer steps of the run) to train it with a Scheduler")
        deltas = self.deltas()
        total = sum(d.c.numel() for d in deltas.values())
        self.budget = math.floor(config.target_rank * len(deltas) + 0.5)
        if self.budget > total:
            raise ConfigError(f"adapter {name!r}: target_rank {config.target_rank} × "
                              f"{len(deltas)} modules = {self.budget} components, more than "
                              f"the {total} it has; lower target_rank or raise rank")
        self.initial = total
        self.start = round(config.total_steps * config.prune_from)
        self.end = round(config.total_steps * config.prune_until)
        if self.end < 1:
            raise ConfigError(f"adapter {name!r}: pruning would end at step {self.end}; raise "
                              "prune_until or total_steps so that it ends at step 1 or later")
        self.last_step = 0
        self.scores = {p: torch.zeros(d.c.shape, device=d.c.device) for p, d in deltas.items()}
        self.keep = {p: torch.ones(d.c.shape, dtype=torch.bool, device=d.c.device)
                     for p, d in deltas.items()}

    def done(self, step: int) -> bool:
        return step >= self.end

    def budget_at(self, step: int) -> int:
        """Components kept after the pruning step at ``step`` (cubic, ``budget`` at the end)."""
        window = self.end - self.start
        progress = 1.0 if window == 0 else min(max(step - self.start, 0) / window, 1.0)
        return self.initial - math.floor((self.initial - self.budget) * progress ** 3)

    def loss(self) -> Tensor | None:
        """``reg_weight ×`` the mean variance of every ``Aᵢ`` and ``Bᵢ``, until pruning ends."""
        if self.last_step >= self.end or not self.config.reg_weight:
            return None
        parts = [d.variances() for d in self.deltas().values()]
        return self.config.reg_weight * torch.cat(parts).mean() if parts else None

    @torch.no_grad()
    def step(self, step: int, optimizer: torch.optim.Optimizer | None) -> None:
        self.last_step = step
        if step > self.end:
            return
        deltas = self.deltas()
        beta = self.config.beta
        for path, delta in deltas.items():
            self.scores[path].mul_(beta).add_(delta.importance(), alpha=1 - beta)
        if step >= self.start and ((step - self.start) % self.config.interval == 0
                                   or step == self.end):
            self._prune(self.budget_at(step))
        if step == self.end:
            self._remove(deltas, optimizer)
            return
        for path, delta in deltas.items():
            if not self.keep[path].all():
                mask_parameter(delta.c, self.keep[path], optimizer)

    def _prune(self, budget: int) -> None:
        """Keep the ``budget`` best-scored components still kept, over the whole adapter."""
        paths = list(self.scores)
        scores = torch.cat([self.scores[p].masked_fill(~self.keep[p], -math.inf) for p in paths])
        order = torch.sort(scores.cpu(), descending=True, stable=True).indices
        keep = torch.zeros(scores.numel(), dtype=torch.bool)
        keep[order[:budget]] = True
        for path, chunk in zip(paths, keep.split([self.keep[p].numel() for p in paths]),
                               strict=True):
            self.keep[path] &= chunk.to(self.keep[path].device)

    def _remove(self, deltas: dict[str, DynamicRankDelta],
                optimizer: torch.optim.Optimizer | None) -> None:
        """Remove pruned components with their optimizer state; record each module's count."""
        for path, delta in deltas.items():
            kept = self.keep[path].nonzero().flatten()
            dst = torch.arange(kept.numel(), device=kept.device)
            for param, dim in ((delta.A, 0), (delta.B, 1), (delta.c, 0)):
                remap_parameter(param, param.detach().index_select(dim, kept), dim=dim,
                                src=kept, dst=dst, optimizer=optimizer)
        set_module_fields(self.model, self.name,
                          {p: {"kept": int(self.keep[p].sum())} for p in deltas})
        self.scores, self.keep = {}, {}

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "initial": self.initial,
                "scores": dict(self.scores), "keep": dict(self.keep)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        deltas = self.deltas()
        for key in ("scores", "keep"):
            if state[key] and set(state[key]) != set(deltas):
                raise StateError(f"adapter {self.name!r}: the schedule state is for modules "
                                 f"{sorted(state[key])}, not {sorted(deltas)}")
        self.last_step, self.initial = int(state["last_step"]), int(state["initial"])
        self.scores = {p: t.to(deltas[p].c.device, torch.float32).clone()
                       for p, t in state["scores"].items()}
        self.keep = {p: t.to(deltas[p].c.device, torch.bool).clone()
                     for p, t in state["keep"].items()}


@register("dynamic_rank", config=DynamicRankConfig)
class DynamicRankDelta(LoraDelta):
    """``y + (α/r₀) · B diag(c) A x`` on one layer: LoRA with a scalar per component."""

    schedule_class = DynamicRankSchedule

    examples = ({}, {"rank": 3, "alpha": 5, "rslora": True, "bias": True},
                {"rank": 4, "kept": 2, "dropout": 0.1}, {"rank": 2, "gate": True})

    def __init__(self, info: LayerInfo, config: DynamicRankConfig, path: str) -> None:
        Delta.__init__(self, info, config, path)
        n = config.components
        self.scale = config.scale
        self.dropout = config.dropout if info.kind != "embedding" else 0.0
        self.A = nn.Parameter(torch.empty(n, info.in_dim))  # (n, in)
        self.B = nn.Parameter(torch.empty(info.out_dim, n))  # (out, n)
        self.c = nn.Parameter(torch.zeros(n))  # (n,)
        self.bias = nn.Parameter(torch.zeros(info.out_dim)) if config.bias else None
        self.register_buffer("A0", None, persistent=False)  # LoRA's frozen copy: none here
        self.register_buffer("B0", None, persistent=False)

    @classmethod
    def num_trainable(cls, info: LayerInfo, config: DynamicRankConfig) -> int:
        return config.components * (info.in_dim + info.out_dim + 1) \
            + (info.out_dim if config.bias else 0)

    @torch.no_grad()
    def reset_parameters(self, base: nn.Module) -> None:
        for p in (self.A, self.B):  # the reference code's kaiming_uniform_ (a = 0)
            if p.numel():
                nn.init.kaiming_uniform_(p)
        nn.init.zeros_(self.c)

    # --------------------------------------------------------------------------- compute
    def factors(self) -> tuple[Tensor, Tensor]:
        """``(diag(c) A, B)``; a module without components gives one zero component, which
        keeps every layer kind's geometry valid (convolutions refuse zero channels)."""
        if not self.c.numel():
            return self.A.new_zeros(1, self.info.in_dim), self.B.new_zeros(self.info.out_dim, 1)
        return self.A * self.c[:, None], self.B

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if not self.c.numel() and self.bias is None:  # pruned to nothing
            return y
        return super().forward(x, y)

    @torch.no_grad()
    def importance(self) -> Tensor:
        """``sᵢ = |cᵢ| ‖Bᵢ‖ ‖Aᵢ‖ / (‖B diag(c) A‖_F + ε)`` in fp32, ``(n,)``, without forming
        ``ΔW``: ``‖B diag(c) A‖²_F = Σᵢⱼ cᵢ cⱼ (BᵀB)ᵢⱼ (AAᵀ)ᵢⱼ``."""
        a, b, c = self.A.float(), self.B.float(), self.c.float()
        total = (torch.outer(c, c) * (b.t() @ b) * (a @ a.t())).sum().clamp_min(0).sqrt()
        return c.abs() * a.norm(dim=1) * b.norm(dim=0) / (total + EPS)

    def variances(self) -> Tensor:
        """The variance of the entries of every ``Aᵢ`` and ``Bᵢ``, ``(2n,)`` (differentiable)."""
        a, b = self.A.float(), self.B.float()
        return torch.cat([a.var(dim=1, correction=int(a.shape[1] > 1)),
                          b.var(dim=0, correction=int(b.shape[0] > 1))])

    # ----------------------------------------------------------------------------- state
    def state_tensors(self) -> dict[str, Tensor]:
        out = {"A": self.A, "B": self.B, "c": self.c}
        if self.bias is not None:
            out["bias"] = self.bias
        return out

    def load_state_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        with torch.no_grad():
            for key, value in tensors.items():
                getattr(self, key).copy_(value)


__all__ = ["DynamicRankConfig", "DynamicRankDelta", "DynamicRankSchedule"]
