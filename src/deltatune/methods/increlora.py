"""IncreLoRA — incremental rank allocation (Zhang et al. 2023, arXiv:2308.12043).

    h = W x + s · B (Λ ⊙ A x)          s = α / r₀, r₀ the initial rank (also once grown)

Every layer starts at a small rank ``r₀`` in AdaLoRA's SVD-like form (``A`` ``(r, in)``, ``Λ``
``(r, 1)`` stored as ``E``, ``B`` ``(out, r)``; ``A``, ``B`` ~ N(0, 0.02), ``Λ = 0``: the model
starts as the base) and gains rank during training until a total budget is reached.
``IncreLoraSchedule`` (the method's ``schedule_class``, driven by ``deltatune.Scheduler`` or the
Trainer's ``DeltaCallback``), after optimizer step t (from 1):

* scores each layer: ``I = mean |θ ∇θ|`` over its trained entries of ``A``, ``Λ``, ``B``,
  smoothed per layer ``Ī ← β₁ Ī + (1−β₁) I``, ``U ← β₂ U + (1−β₂) |I − Ī|``, score ``Ī · U``;
* when ``t > warmup`` and ``t % interval == 0``, adds ``step_rank`` components to each of the
  ``top_h`` best-scoring layers (ties: the earlier layer; never beyond ``min(in, out)``) until the
  budget — ``total_rank``, or ``target_rank ×`` layers — is reached.

New components have ``Λ = 0``: they start with zero effect, so the output does not jump. With
*advance learning* (the paper's, on by default) each layer also holds ``step_rank`` reserved
components beyond its rank: they add exactly nothing to the output, yet their ``A`` rows and ``B``
columns get the gradient a component with ``Λ = 1`` would, and nothing flows back into the
layer's input from them (on linear layers a custom backward computes just those two gradients,
never forming the reserves' output; on convolutions a straight-through zero of the detached
input), so they learn useful directions before they join; joining moves them, with their
optimizer state, in front of freshly drawn reserves. With the *restart warmup* (the paper's), the
entries that join at an allocation — the new ``Λ`` entries and the freshly drawn rows — get their
own learning-rate warm-up over ``restart_warmup`` steps (``core.schedule.EntryWarmup``: their
update scaled by ``k / L`` on the ``k``-th step), so a component does not start at the run's full
rate. Growth resizes ``A``, ``E`` and ``B`` in
place with ``remap_parameter`` (the optimizer keeps its parameters; new entries start with zero
state) and records the per-module ``added`` (and, once the budget is reached and the reserves are
dropped, ``reserve = 0``) with ``set_module_fields``, so ``save`` writes the grown shapes and
``load`` rebuilds them. New rows are drawn from the schedule's seeded generator (saved in its
state), so a resumed run grows exactly as an uninterrupted one.

The orthogonality regulariser ``w · mean(‖AAᵀ − I‖_F, ‖BᵀB − I‖_F)`` (AdaLoRA's, reserves
included) is the schedule's ``loss()``: add ``scheduler.loss()`` to the task loss.

Deliberate differences from the reference code: the scale stays ``α / r₀`` (the reference divides
by the current rank, so every growth would rescale the trained components: an output jump); the
reserves' effect is an exact zero with unit-``Λ`` gradients (the reference gives them a frozen
``Λ = 1e-5``, a small effect and gradients near Adam's ε); layers are scored from the gradients
already on their own entries (the reference scores the dense ``ΔW`` through a backward hook, a
full ``out × in`` product per step); the restart warmup ramps the new entries' rate linearly up
to the run's rate over ``restart_warmup`` steps (the reference gives each growth its own
parameter group, with a warm-up over the run's warm-up length and then its own linear decay).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..core.errors import ConfigError, StateError
from ..core.geometry import LayerInfo
from ..core.lifecycle import merged_adapters
from ..core.registry import register
from ..core.schedule import EntryWarmup, Schedule, remap_parameter, set_module_fields
from .lora import LoraConfig, LoraDelta

#: Standard deviation of new ``A`` rows and ``B`` columns (the reference code's).
INIT_STD = 0.02


def _count(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


@dataclass(frozen=True, kw_only=True)
class IncreLoraConfig(LoraConfig):
    """IncreLoRA hyper-parameters (LoRA's ``alpha``, ``dropout``, ``rslora``, ``bias``: see
    ``LoraConfig``; the reference code's names in brackets).

    Args:
        rank: ``r₀``, every layer's initial rank (``lora_r``); the scale stays ``α / r₀``.
        alpha: ``α`` (``lora_alpha``). The defaults are the reference's GLUE settings.
        target_rank: the average rank per layer at the end: the budget is ``target_rank ×``
            the number of adapted layers (``target_rank``).
        total_rank: the budget as a total rank instead (``target_total_rank``).
        step_rank: components added to a chosen layer per allocation (``incre_rank_num``).
        top_h: layers grown per allocation (``top_h``).
        warmup: optimizer steps before the first allocation (``init_warmup``).
        interval: optimizer steps between allocations (``incre_interval``).
        restart_warmup: the paper's restart warmup: optimizer steps over which the learning
            rate of entries that join at an allocation (their ``Λ``, fresh ``A`` rows and ``B``
            columns) ramps up from zero (``None``: ``interval``; 0: none).
        beta1: EMA factor of the sensitivity.
        beta2: EMA factor of the uncertainty.
        advance_learning: keep ``step_rank`` reserved components per layer, trained before they
            join (``advance_learn``).
        orth_reg_weight: weight ``w`` of the orthogonality regulariser (the schedule's loss).
        seed: seed of the schedule's generator for new components.
        added: components this layer has gained. Set per module by the schedule, as an
            override; not meant to be set by hand.
        reserve: reserved components this layer holds (``None``: ``step_rank`` with advance
            learning, else 0). Set to 0 per module once the budget is reached.
    """

    rank: int = 1
    alpha: float | None = 32.0
    target_rank: int = 2
    total_rank: int | None = None
    step_rank: int = 1
    top_h: int = 12
    warmup: int = 500
    interval: int = 500
    restart_warmup: int | None = None
    beta1: float = 0.85
    beta2: float = 0.85
    advance_learning: bool = True
    orth_reg_weight: float = 0.1
    added: int = 0
    reserve: int | None = None

    def validate(self) -> None:
        super().validate()
        if self.init != "default" or self.freeze_a:
            raise ConfigError("IncreLoRA has its own initialisation (Λ = 0, A and B ~ N(0, "
                              "0.02)) and trains every factor; keep init='default', "
                              "freeze_a=False")
        for field, low in (("target_rank", 1), ("step_rank", 1), ("top_h", 1), ("warmup", 0),
                           ("interval", 1), ("added", 0)):
            if not _count(getattr(self, field), low):
                raise ConfigError(f"{field} must be an integer >= {low}, got "
                                  f"{getattr(self, field)!r}")
        for field in ("total_rank", "reserve", "restart_warmup"):
            value = getattr(self, field)
            low = 1 if field == "total_rank" else 0
            if value is not None and not _count(value, low):
                raise ConfigError(f"{field} must be None or a "
                                  f"{'positive' if low else 'non-negative'} integer, got "
                                  f"{value!r}")
        for field in ("beta1", "beta2"):
            value = getattr(self, field)
            if not (isinstance(value, (int, float)) and 0 < value < 1):
                raise ConfigError(f"{field} must be in (0, 1), got {value!r}")
        if not isinstance(self.advance_learning, bool):
            raise ConfigError(f"advance_learning must be True or False, got "
                              f"{self.advance_learning!r}")
        if not (isinstance(self.orth_reg_weight, (int, float))
                and 0 <= self.orth_reg_weight < math.inf):
            raise ConfigError(f"orth_reg_weight must be a finite number >= 0, got "
                              f"{self.orth_reg_weight!r}")

    @property
    def active_rank(self) -> int:
        """The layer's rank: ``rank + added``."""
        return self.rank + self.added

    @property
    def reserved(self) -> int:
        """The reserved components the layer holds."""
        if self.reserve is not None:
            return self.reserve
        return self.step_rank if self.advance_learning else 0


# ---------------------------------------------------------------------------- the schedule
class IncreLoraSchedule(Schedule):
    """IncreLoRA's rank growth for one adapter (see the module docstring).

    Raises:
        ConfigError: the budget is below the layers' current ranks, or above what they can hold
            (``min(in, out)`` each).
    """

    remaps = True  # ranks change size

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__(model, name)
        config, deltas = self.config, self.deltas()
        self.paths = list(deltas)
        #: The total rank the adapter grows to.
        self.budget = config.total_rank or config.target_rank * len(deltas)
        current = sum(d.rank for d in deltas.values())
        room = sum(min(d.info.in_dim, d.info.out_dim) for d in deltas.values())
        if not current <= self.budget <= room:
            raise ConfigError(
                f"IncreLoRA adapter {name!r}: the budget {self.budget} (total_rank, or "
                f"target_rank × {len(deltas)} layers) must lie between the layers' current total "
                f"rank {current} and the most they can hold, {room}")
        self.generator = torch.Generator().manual_seed(config.seed)
        #: Per layer, in model order: smoothed sensitivity Ī and uncertainty U.
        self.sensitivity = torch.zeros(len(deltas), dtype=torch.float64)
        self.uncertainty = torch.zeros(len(deltas), dtype=torch.float64)
        self.finished = current == self.budget and not any(d.reserved for d in deltas.values())
        length = config.interval if config.restart_warmup is None else config.restart_warmup
        #: The restart warmup of the entries that joined at recent allocations.
        self.warmup = EntryWarmup(length)

    def total(self) -> int:
        """The adapter's current total rank."""
        return sum(d.rank for d in self.deltas().values())

    def ranks(self) -> dict[str, int]:
        """``{path: rank}`` of every layer."""
        return {p: d.rank for p, d in self.deltas().items()}

    def done(self, step: int) -> bool:
        return self.finished and not self.warmup

    def loss(self) -> Tensor | None:
        """The weighted orthogonality regulariser (``None`` when its weight is 0)."""
        if not self.config.orth_reg_weight:
            return None
        terms = []
        for delta in self.deltas().values():
            for cov in (delta.A @ delta.A.T, delta.B.T @ delta.B):  # (r + k, r + k)
                eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
                terms.append(torch.linalg.matrix_norm(cov - eye))
        return self.config.orth_reg_weight * (sum(terms) / len(terms))

    def step(self, step: int, optimizer: torch.optim.Optimizer | None) -> None:
        if self.finished and not self.warmup:
            return
        if self.name in merged_adapters(self.model):
            raise StateError(f"IncreLoRA adapter {self.name!r} is merged; unmerge it before "
                             "training it")
        deltas = self.deltas()  # one walk of the model per step, not one per warming range

        def parameter(key: str) -> Tensor:
            path, name = key.rsplit(":", 1)
            return getattr(deltas[path], name)

        self.warmup.apply(step, parameter)
        c = self.config
        if not self.finished:
            self.update_scores()
            if self.total() >= self.budget or (step > c.warmup and step % c.interval == 0):
                before = {p: (d.rank, d.A.shape[0]) for p, d in deltas.items()}
                self.allocate(optimizer)
                for path, delta in deltas.items():  # what joined: Λ entries, fresh A/B rows
                    rank, rows = before[path]
                    self.warmup.add(f"{path}:E", 0, rank, delta.rank, step)
                    self.warmup.add(f"{path}:A", 0, rows, delta.A.shape[0], step)
                    self.warmup.add(f"{path}:B", 1, rows, delta.A.shape[0], step)
        self.warmup.snapshot(step, parameter)

    @torch.no_grad()
    def update_scores(self) -> None:
        """Fold the current gradients into each layer's Ī and U.

        Raises:
            StateError: the factors have no gradient (called after ``zero_grad``, or frozen).
        """
        sums = []
        for path, delta in self.deltas().items():
            r, total, count = delta.rank, 0.0, 0
            in_use = ((delta.A, (slice(0, r),)), (delta.E, ()), (delta.B, (..., slice(0, r))))
            for p, used in in_use:
                if p.grad is None:
                    raise StateError(
                        f"IncreLoRA adapter {self.name!r}: {path} has no gradient. Call "
                        "scheduler.step() after optimizer.step() and before zero_grad(), with "
                        "the adapter trainable (deltatune.load(..., trainable=True))")
                part = p.detach()[used].float()  # the components in use, not the reserves
                total = total + (part * p.grad[used].float()).abs().sum()
                count += part.numel()
            sums.append(total / count)
        ipt = torch.stack(sums).to("cpu", torch.float64)  # one device sync per step
        b1, b2 = self.config.beta1, self.config.beta2
        self.sensitivity = b1 * self.sensitivity + (1 - b1) * ipt
        self.uncertainty = b2 * self.uncertainty + (1 - b2) * (ipt - self.sensitivity).abs()

    def allocate(self, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
        """Grow the ``top_h`` best-scoring layers by ``step_rank`` each (within the budget);
        once the budget is reached, drop every reserve and finish.

        Returns:
            ``{path: components added}`` by this allocation.
        """
        c, deltas = self.config, self.deltas()
        left = self.budget - self.total()
        score = (self.sensitivity * self.uncertainty).tolist()
        order = sorted(range(len(deltas)), key=lambda i: (-score[i], i))
        grown: dict[str, int] = {}
        for i in order:
            if len(grown) == c.top_h or left == 0:
                break
            path = self.paths[i]
            room = min(deltas[path].info.in_dim, deltas[path].info.out_dim) - deltas[path].rank
            if room > 0:
                grown[path] = min(c.step_rank, left, room)
                left -= grown[path]
        fields = {}
        for path, delta in deltas.items():
            n = grown.get(path, 0)
            reserve = delta.config.reserved if left else 0
            if n or reserve != delta.reserved:
                delta.grow(n, reserve, self.generator, optimizer)
                fields[path] = {"added": delta.config.added + n, "reserve": reserve}
        if fields:
            set_module_fields(self.model, self.name, fields)
        self.finished = left == 0
        return grown

    # ---------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"paths": self.paths, "sensitivity": self.sensitivity,
                "uncertainty": self.uncertainty, "generator": self.generator.get_state(),
                "finished": self.finished, "warmup": self.warmup.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if list(state["paths"]) != self.paths:
            raise StateError(f"the schedule state of IncreLoRA adapter {self.name!r} is for "
                             "other layers; load the adapter saved with it")
        self.sensitivity = state["sensitivity"].to(torch.float64).cpu()
        self.uncertainty = state["uncertainty"].to(torch.float64).cpu()
        self.generator.set_state(state["generator"].cpu().to(torch.uint8))
        self.finished = bool(state["finished"])
        self.warmup.load_state_dict(state.get("warmup", {"records": [], "snapshots": []}))


class _AdvanceLearning(torch.autograd.Function):
    """``out`` unchanged (in place: no copy, and later in-place ops on it stay legal); in
    backward, the reserved rows ``a`` ``(k, in)`` and columns ``b`` ``(out, k)`` of a linear
    layer get the gradient of ``s · b (a x)`` — ``s (g b)ᵀ x`` and ``s gᵀ (x aᵀ)`` — without that
    product ever being formed, and ``x`` gets nothing."""

    @staticmethod
    def forward(ctx: Any, out: Tensor, x: Tensor, a: Tensor, b: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(x, a, b)
        ctx.scale = scale
        ctx.mark_dirty(out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, a, b = ctx.saved_tensors
        dtype = a.dtype  # the compute dtype (under autocast, x may be wider)
        x = x.reshape(-1, x.shape[-1]).to(dtype)  # (N, in)
        g = grad.reshape(-1, grad.shape[-1]).to(dtype)  # (N, out)
        needs = ctx.needs_input_grad
        grad_a = (g @ b).mul_(ctx.scale).t() @ x if needs[2] else None  # (k, in)
        grad_b = (g.t() @ (x @ a.t())).mul_(ctx.scale) if needs[3] else None  # (out, k)
        return grad, None, grad_a, grad_b, None


# ---------------------------------------------------------------------------- the delta
@register("increlora", config=IncreLoraConfig)
class IncreLoraDelta(LoraDelta):
    """``y + s · B (Λ ⊙ A x)`` on one layer, plus reserved components of zero effect."""

    layer_kinds = frozenset({"linear", "conv"})
    schedule_class = IncreLoraSchedule
    examples = ({}, {"rank": 3, "alpha": 6, "rslora": True, "bias": True, "added": 1},
                {"rank": 1, "advance_learning": False, "dropout": 0.1},
                {"rank": 2, "alpha": 1000, "step_rank": 2, "gate": True})

    def __init__(self, info: LayerInfo, config: IncreLoraConfig, path: str) -> None:
        super().__init__(info, config, path)  # the scale: α / r₀
        rows = config.active_rank + config.reserved
        self.A = nn.Parameter(torch.empty(rows, info.in_dim))  # (r + k, in)
        self.B = nn.Parameter(torch.empty(info.out_dim, rows))  # (out, r + k)
        self.E = nn.Parameter(torch.zeros(config.active_rank, 1))  # Λ: (r, 1)

    @classmethod
    def num_trainable(cls, info: LayerInfo, config: IncreLoraConfig) -> int:
        rows = config.active_rank + config.reserved
        return rows * (info.in_dim + info.out_dim) + config.active_rank \
            + (info.out_dim if config.bias else 0)

    @property
    def rank(self) -> int:
        """The layer's current rank (components in use)."""
        return self.E.shape[0]

    @property
    def reserved(self) -> int:
        """The reserved components the layer holds now."""
        return self.A.shape[0] - self.E.shape[0]

    @torch.no_grad()
    def reset_parameters(self, base: nn.Module) -> None:
        nn.init.normal_(self.A, mean=0.0, std=INIT_STD)
        nn.init.normal_(self.B, mean=0.0, std=INIT_STD)
        nn.init.zeros_(self.E)

    # --------------------------------------------------------------------------- compute
    def factors(self) -> tuple[Tensor, Tensor]:
        """``(Λ ⊙ A[:r], B[:, :r])``: the update's ``(r, in)`` and ``(out, r)`` factors."""
        r = self.rank
        return self.A[:r] * self.E, self.B[:, :r]

    def _advance(self, x: Tensor, out: Tensor) -> Tensor:
        """``out``, with the reserves' advance learning attached: their ``A`` rows and ``B``
        columns get the gradient of a ``Λ = 1`` component, and nothing else changes — neither
        the value nor the gradient reaching the layer's input (a component that is not in the
        forward must not send gradient to earlier layers). On linear layers a custom backward
        computes exactly those two gradients; elsewhere a straight-through zero
        ``z − z.detach()`` of the detached input."""
        if not (self.reserved and self.training and torch.is_grad_enabled()):
            return out
        r = self.rank
        a, b = self.cast(self.A[r:], out), self.cast(self.B[:, r:], out)
        if self.info.kind == "linear":
            return _AdvanceLearning.apply(out, x.detach(), a, b, self.scale)
        h = self.info.apply_in(x.detach(), a)  # (N, k, *spatial)
        z = self.info.apply_out(h, b) * self.scale
        return out + (z - z.detach())

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self._advance(x, super().forward(x, y))

    def effect(self, x: Tensor, y: Tensor) -> Tensor:
        return self._advance(x, super().effect(x, y))

    def state_tensors(self) -> dict[str, Tensor]:
        out = {"A": self.A, "B": self.B, "E": self.E}
        if self.bias is not None:
            out["bias"] = self.bias
        return out

    # ----------------------------------------------------------------------------- growth
    @torch.no_grad()
    def grow(self, n: int, reserve: int, generator: torch.Generator,
             optimizer: torch.optim.Optimizer | None = None) -> None:
        """Add ``n`` components (``Λ = 0``) and hold ``reserve`` reserved ones afterwards.

        Reserved components join first (keeping their rows and optimizer state); missing rows
        are drawn from ``generator`` (N(0, 0.02)). ``n = 0`` only resizes the reserve.
        """
        r, rows = self.rank, self.A.shape[0]
        new_rows = r + n + reserve
        kept = min(rows, new_rows)
        fresh = new_rows - kept
        a_new = torch.randn(fresh, self.A.shape[1], generator=generator) * INIT_STD
        b_new = torch.randn(self.B.shape[0], fresh, generator=generator) * INIT_STD
        index = torch.arange(kept)
        a = torch.cat([self.A.detach()[:kept], a_new.to(self.A)])
        b = torch.cat([self.B.detach()[:, :kept], b_new.to(self.B)], dim=1)
        remap_parameter(self.A, a, dim=0, src=index, dst=index, optimizer=optimizer)
        remap_parameter(self.B, b, dim=1, src=index, dst=index, optimizer=optimizer)
        e = torch.cat([self.E.detach(), self.E.new_zeros(n, 1)])
        remap_parameter(self.E, e, dim=0, src=torch.arange(r), dst=torch.arange(r),
                        optimizer=optimizer)



__all__ = ["IncreLoraConfig", "IncreLoraDelta", "IncreLoraSchedule"]
