"""AdaLoRA — adaptive budget allocation for low-rank adaptation (Zhang et al. 2023,
arXiv:2303.10512).

    h = W x + s · P (Λ ⊙ Q x)          s = α / r, r the initial rank (also once pruned)

The update of each layer is in SVD form: ``P`` ``(out, r)``, ``Q`` ``(r, in)`` (kept nearly
orthogonal by a regulariser) and the singular values ``Λ`` (zero at init: the model starts as the
base). Stored under peft's names: ``A`` = Q, ``E`` = Λ ``(r, 1)``, ``B`` = P. Built on LoRA
(``AdaLoraDelta`` is a ``LoraDelta`` whose down-projection is ``E ⊙ A``): Linear, HF Conv1D and
Conv layers, dropout, gates and merging are LoRA's.

Init: ``Q`` and ``P`` are Gaussian with rows / columns of unit expected norm (std ``1/√in`` and
``1/√out``): near-orthonormal, as the regulariser wants them. peft and the reference code use a
fixed std 0.02 (``init_std=0.02``), the same thing for layers ~2,500 wide, but vanishing factors
(and an update below bf16's resolution) on narrow ones.

``AdaLoraSchedule`` (the method's ``schedule_class``, driven by ``deltatune.Scheduler`` or the
Trainer's ``DeltaCallback``) shares a global rank budget among the layers. After optimizer step
t (from 1), following peft's ``RankAllocator``:

* for t < T − t_f, every entry θ of A, E, B scores ``Ī · U``: sensitivity ``I = |θ ∇θ|``
  smoothed ``Ī ← β₁ Ī + (1−β₁) I``, uncertainty ``U ← β₂ U + (1−β₂) |I − Ī|``; triplet i
  scores ``s(E_i) + mean_j s(A_ij) + mean_j s(B_ji)``;
* budget ``b(t)``: ``b₀ = Σ r`` until ``t_init``, then ``⌊b_T + (b₀ − b_T)(1 − (t − t_init) /
  (T − t_f − t_init))³⌋``, ``b_T = target_rank × modules``; every ``delta_t`` steps of that
  phase the ``b(t)`` best triplets of all layers stay and the others' ``E`` is zeroed with its
  optimizer state (``mask_parameter``);
* at t = T − t_f the best ``b_T`` triplets are kept and the rest *pruned*: each layer shrinks to
  its kept rank (``remap_parameter`` moves the optimizer state), recorded as the per-module
  override ``kept_rank`` so that ``save`` writes small tensors and ``load`` rebuilds the shapes.
  A layer may keep none: its factors are empty and it adds nothing. The last t_f steps fine-tune
  the pruned adapter; a pruned adapter is never scheduled again. ``prune()`` does this on demand.

The orthogonality regulariser ``w · mean(‖AAᵀ − I‖_F, ‖BᵀB − I‖_F)`` over the adapter's
matrices (the reference code's and peft's form; the paper writes squared norms) is added to the
loss explicitly, during training only (peft adds it inside the model's forward whenever labels
are passed, evaluation included, so a loss or perplexity read from peft's output carries it)::

    model = dt.inject(model, dt.AdaLoraConfig(rank=12, target_rank=8, total_steps=n_steps,
                                              tinit=200, tfinal=500, delta_t=10), name="ada")
    scheduler = dt.Scheduler(model, optimizer)
    for batch in loader:
        loss = model(**batch).loss + scheduler.loss()   # the orthogonality regulariser
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()

(``orthogonal_regularization(model, name)`` is the same term for one adapter). With a
``Trainer``, ``callbacks=[DeltaCallback()]`` adds it to every optimizer step's gradients.

Deliberate differences from peft 0.21 (forward and scores are the same): exactly ``b(t)``
triplets stay (peft masks every score tied with the threshold, possibly more, e.g. all of them
while the scores are still zero); masked entries lose their optimizer state, so momentum does not
revive them; after t = T − t_f the pruned triplets are gone, not re-masked each step (so neither
they nor their rows take part in the regulariser); the scale has no ``+1e-5`` in ``α / r``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..core.errors import AdapterNameError, ConfigError, StateError
from ..core.geometry import LayerInfo
from ..core.lifecycle import adapters, delta_layers, merged_adapters
from ..core.registry import register
from ..core.schedule import Schedule, mask_parameter, remap_parameter, set_module_fields
from .lora import LoraConfig, LoraDelta

_FACTORS = ("A", "B", "E")


def _count(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


@dataclass(frozen=True, kw_only=True)
class AdaLoraConfig(LoraConfig):
    """AdaLoRA hyper-parameters (LoRA's ``alpha``, ``dropout``, ``rslora``, ``bias``: see
    ``LoraConfig``; peft's names in brackets).

    Args:
        rank: the initial rank ``r`` of every layer's P Λ Q (``init_r``); the scale stays
            ``α / r`` when the layer is pruned.
        kept_rank: how many of the ``rank`` triplets the layer keeps once pruned (``None``: all).
            Set per module by pruning, as an override; not meant to be set by hand.
        target_rank: the average rank per layer at the end (``target_r``): the final budget is
            ``target_rank ×`` the number of adapted layers.
        total_steps: ``T``, the optimizer steps of the whole schedule (``total_step``);
            needed to schedule the adapter, not to use it.
        tinit: warm-up steps at the full budget.
        tfinal: final steps at the target budget, after pruning.
        delta_t: steps between two allocations while the budget decreases (``deltaT``).
        beta1: EMA factor of the sensitivity.
        beta2: EMA factor of the uncertainty.
        orth_reg_weight: weight ``w`` of ``orthogonal_regularization``.
        init_std: std of ``P`` and ``Q`` at init; ``None``: ``1/√out`` and ``1/√in`` (unit-norm
            singular vectors in expectation); peft's is 0.02.
    """

    rank: int = 12
    kept_rank: int | None = None
    target_rank: int = 8
    total_steps: int | None = None
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    init_std: float | None = None

    def validate(self) -> None:
        super().validate()
        if self.init != "default" or self.freeze_a:
            raise ConfigError("AdaLoRA has its own initialisation (Λ = 0, P and Q Gaussian: see "
                              "init_std) and trains every factor; keep init='default', "
                              "freeze_a=False")
        if self.kept_rank is not None and not (_count(self.kept_rank, 0)
                                               and self.kept_rank <= self.rank):
            raise ConfigError(f"kept_rank must be None or an integer in [0, rank={self.rank}], "
                              f"got {self.kept_rank!r}")
        for field, low in (("target_rank", 0), ("tinit", 0), ("tfinal", 0), ("delta_t", 1)):
            if not _count(getattr(self, field), low):
                raise ConfigError(f"{field} must be an integer >= {low}, got "
                                  f"{getattr(self, field)!r}")
        if self.total_steps is not None:
            if not _count(self.total_steps, 1):
                raise ConfigError(f"total_steps must be a positive integer (the schedule's "
                                  f"length in optimizer steps), got {self.total_steps!r}")
            if self.tinit >= self.total_steps - self.tfinal:
                raise ConfigError(f"tinit={self.tinit} and tfinal={self.tfinal} leave no steps "
                                  f"to lower the budget in total_steps={self.total_steps}; "
                                  "lower them or raise total_steps")
        for field in ("beta1", "beta2"):
            value = getattr(self, field)
            if not (isinstance(value, (int, float)) and 0 < value < 1):
                raise ConfigError(f"{field} must be in (0, 1), got {value!r}")
        for field in ("orth_reg_weight", "init_std"):
            value = getattr(self, field)
            if (value is not None or field != "init_std") and not (
                    isinstance(value, (int, float)) and 0 <= value < math.inf):
                raise ConfigError(f"{field} must be a finite number >= 0, got {value!r}")

    @property
    def active_rank(self) -> int:
        """The number of triplets the layer holds: ``kept_rank`` once pruned, else ``rank``."""
        return self.rank if self.kept_rank is None else self.kept_rank


# ---------------------------------------------------------------------------- the schedule
class AdaLoraSchedule(Schedule):
    """AdaLoRA's budget schedule for one adapter (see the module docstring).

    Raises:
        ConfigError: the adapter has no ``total_steps``, or a final budget above the initial.
    """

    remaps = True  # ranks change size

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__(model, name)
        config = self.config
        if config.total_steps is None:
            raise ConfigError(f"AdaLoRA adapter {name!r} has no total_steps; its schedule needs "
                              "the number of optimizer steps (AdaLoraConfig(total_steps=...)), "
                              "or leave it out of the Scheduler with names=")
        deltas = self.deltas()
        #: ``b₀``: the initial ranks of every layer; ``b_T``: ``target_rank ×`` layers.
        self.initial_budget = sum(d.config.rank for d in deltas.values())
        self.target_budget = config.target_rank * len(deltas)
        if self.target_budget > self.initial_budget:
            raise ConfigError(f"adapter {name!r}: the final budget target_rank × {len(deltas)} "
                              f"layers = {self.target_budget} exceeds the initial ranks' sum "
                              f"{self.initial_budget}; lower target_rank")
        self.pruned = any(d.config.kept_rank is not None for d in deltas.values())
        #: ``{path: {"A"|"B"|"E": tensor}}``: smoothed sensitivity Ī and uncertainty U.
        self.sensitivity: dict[str, dict[str, Tensor]] = {}
        self.uncertainty: dict[str, dict[str, Tensor]] = {}
        #: ``{path: [kept?] * r}`` from the last allocation.
        self.rank_pattern: dict[str, list[bool]] = {}

    @property
    def final_step(self) -> int:
        """``T − t_f``: the step that prunes."""
        return self.config.total_steps - self.config.tfinal

    def budget(self, step: int) -> tuple[int, bool]:
        """``(b(t), whether step t allocates)``; the budget is peft's ``budget_schedule``."""
        c = self.config
        if step <= c.tinit:
            return self.initial_budget, False
        if step > self.final_step:
            return self.target_budget, False
        left = 1 - (step - c.tinit) / (self.final_step - c.tinit)
        budget = int((self.initial_budget - self.target_budget) * (left ** 3)
                     + self.target_budget)
        return budget, step == self.final_step or step % c.delta_t == 0

    def step(self, step: int, optimizer: torch.optim.Optimizer | None) -> None:
        if self.pruned:
            return
        if step < self.final_step:
            self.update_scores()
            budget, allocate = self.budget(step)
            if allocate:
                self.allocate(budget, optimizer)
        else:
            self.prune(optimizer=optimizer)

    def done(self, step: int) -> bool:
        return self.pruned

    def loss(self) -> Tensor | None:
        """The weighted orthogonality regulariser (``orthogonal_regularization``), so that
        ``Scheduler.loss()`` and the Trainer callback add it; ``None`` when its weight is 0."""
        if not self.config.orth_reg_weight:
            return None
        return orthogonal_regularization(self.model, self.name)

    # -------------------------------------------------------------------------- scores
    @torch.no_grad()
    def update_scores(self) -> None:
        """Fold the current gradients into Ī and U.

        Raises:
            StateError: a factor has no gradient (called after ``zero_grad``, or frozen).
        """
        b1, b2 = self.config.beta1, self.config.beta2
        for path, delta in self.deltas().items():
            for key in _FACTORS:
                p = getattr(delta, key)
                if p.grad is None:
                    raise StateError(
                        f"AdaLoRA adapter {self.name!r}: {path}.{key} has no gradient. Call "
                        "scheduler.step() after optimizer.step() and before zero_grad(), with "
                        "the adapter trainable (deltatune.load(..., trainable=True))")
                ipt = (p * p.grad).abs().detach()
                sens = self.sensitivity.setdefault(path, {})
                uncs = self.uncertainty.setdefault(path, {})
                avg = sens[key] if key in sens else torch.zeros_like(p)
                unc = uncs[key] if key in uncs else torch.zeros_like(p)
                avg = b1 * avg + (1 - b1) * ipt
                sens[key] = avg
                uncs[key] = b2 * unc + (1 - b2) * (ipt - avg).abs()

    def triplet_scores(self) -> dict[str, Tensor]:
        """``{path: (r,) scores}``: ``s(E_i) + mean_j s(A_ij) + mean_j s(B_ji)``, ``s = Ī·U``
        (zero before the first update)."""
        out = {}
        for path, delta in self.deltas().items():
            if path not in self.sensitivity:
                out[path] = torch.zeros(delta.E.shape[0], device=delta.E.device)
                continue
            s = {k: self.sensitivity[path][k] * self.uncertainty[path][k] for k in _FACTORS}
            a = s["A"].mean(dim=1)  # (r,)
            b = s["B"].mean(dim=0)  # (r,)
            out[path] = s["E"].view(-1) + (a + b)
        return out

    # ------------------------------------------------------------------------- budget
    def allocate(self, budget: int, optimizer: torch.optim.Optimizer | None = None
                 ) -> dict[str, Tensor]:
        """Keep the ``budget`` best triplets over all layers and zero the others' ``E`` (and
        its optimizer state). Ties go to the earlier layer and index.

        Returns:
            ``{path: (r,) bool}``, which triplets stay.

        Raises:
            StateError: the adapter is merged or pruned.
            ValueError: ``budget`` is not in ``[0, triplets]``.
        """
        self._check_changeable()
        scores = self.triplet_scores()
        flat = torch.cat([s.detach().float().cpu() for s in scores.values()])
        if not 0 <= budget <= flat.numel():
            raise ValueError(f"budget must be in [0, {flat.numel()}], got {budget}")
        keep = torch.zeros(flat.numel(), dtype=torch.bool)
        keep[torch.sort(flat, descending=True, stable=True).indices[:budget]] = True
        out = dict(zip(scores, keep.split([s.numel() for s in scores.values()]), strict=True))
        deltas = self.deltas()
        for path, kept in out.items():
            mask_parameter(deltas[path].E, kept[:, None], optimizer)
        self.rank_pattern = {p: k.tolist() for p, k in out.items()}
        return out

    def prune(self, budget: int | None = None,
              optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
        """Allocate ``budget`` (default: the target budget) and drop the other triplets for
        good: every layer shrinks to its kept rank, moving its optimizer state.

        Returns:
            ``{path: kept rank}`` (also after an earlier prune, which this repeats not).
        """
        if self.pruned:
            return self.ranks()
        kept = self.allocate(self.target_budget if budget is None else budget, optimizer)
        fields = {}  # deeper paths last, so their exact override keys come first
        for path, delta in sorted(self.deltas().items(), key=lambda kv: kv[0].count(".")):
            index = kept[path].nonzero().view(-1).to(delta.E.device)
            dst = torch.arange(index.numel(), device=index.device)
            for key, dim in (("A", 0), ("E", 0), ("B", 1)):
                p = getattr(delta, key)
                remap_parameter(p, p.detach().index_select(dim, index), dim=dim, src=index,
                                dst=dst, optimizer=optimizer)
            fields[path] = {"kept_rank": index.numel()}
        set_module_fields(self.model, self.name, fields)
        self.sensitivity, self.uncertainty = {}, {}
        self.pruned = True
        return self.ranks()

    def ranks(self) -> dict[str, int]:
        """``{path: triplets in use}``: the layer's size once pruned, else the last
        allocation's count (the full rank before any)."""
        out = {}
        for path, delta in self.deltas().items():
            pattern = None if self.pruned else self.rank_pattern.get(path)
            out[path] = delta.E.shape[0] if pattern is None else sum(pattern)
        return out

    def _check_changeable(self) -> None:
        if self.pruned:
            raise StateError(f"AdaLoRA adapter {self.name!r} is already pruned")
        if self.name in merged_adapters(self.model):
            raise StateError(f"AdaLoRA adapter {self.name!r} is merged; unmerge it before "
                             "changing its ranks")

    # ---------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"pruned": self.pruned, "sensitivity": self.sensitivity,
                "uncertainty": self.uncertainty, "rank_pattern": self.rank_pattern}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if bool(state["pruned"]) != self.pruned:
            raise StateError(f"the schedule state of AdaLoRA adapter {self.name!r} was saved "
                             f"{'after' if state['pruned'] else 'before'} pruning, but the "
                             f"adapter here is {'' if self.pruned else 'not '}pruned; load the "
                             "adapter saved with it")
        deltas = self.deltas()
        for part in ("sensitivity", "uncertainty"):
            for path, tensors in state[part].items():
                if path not in deltas or any(tensors[k].shape != getattr(deltas[path], k).shape
                                             for k in _FACTORS):
                    raise StateError(f"the schedule state of {self.name!r} does not fit "
                                     f"module {path!r} here; load the adapter saved with it")
        self.sensitivity = {p: {k: v.to(getattr(deltas[p], k)) for k, v in t.items()}
                            for p, t in state["sensitivity"].items()}
        self.uncertainty = {p: {k: v.to(getattr(deltas[p], k)) for k, v in t.items()}
                            for p, t in state["uncertainty"].items()}
        self.rank_pattern = {p: [bool(b) for b in v] for p, v in state["rank_pattern"].items()}


# ---------------------------------------------------------------------------- the delta
@register("adalora", config=AdaLoraConfig)
class AdaLoraDelta(LoraDelta):
    """``y + s · B (E ⊙ A x)`` on one Linear / HF Conv1D / Conv layer."""

    layer_kinds = frozenset({"linear", "conv"})
    schedule_class = AdaLoraSchedule
    examples = ({}, {"rank": 3, "kept_rank": 2, "alpha": 6, "bias": True, "total_steps": 10},
                {"rank": 2, "dropout": 0.1, "gate": True})

    def __init__(self, info: LayerInfo, config: AdaLoraConfig, path: str) -> None:
        super().__init__(info, config, path)
        k = config.active_rank
        if k != config.rank:  # pruned
            self.A = nn.Parameter(torch.empty(k, info.in_dim))  # Q: (k, in)
            self.B = nn.Parameter(torch.empty(info.out_dim, k))  # P: (out, k)
        self.E = nn.Parameter(torch.empty(k, 1))  # Λ: (k, 1)

    @classmethod
    def num_trainable(cls, info: LayerInfo, config: AdaLoraConfig) -> int:
        return config.active_rank * (info.in_dim + info.out_dim + 1) \
            + (info.out_dim if config.bias else 0)

    @torch.no_grad()
    def reset_parameters(self, base: nn.Module) -> None:
        std = self.config.init_std
        nn.init.normal_(self.A, std=1 / math.sqrt(self.info.in_dim) if std is None else std)
        nn.init.normal_(self.B, std=1 / math.sqrt(self.info.out_dim) if std is None else std)
        nn.init.zeros_(self.E)

    def factors(self) -> tuple[Tensor, Tensor]:
        """``(E ⊙ A, B)``: the low-rank update's ``(k, in)`` and ``(out, k)`` factors."""
        return self.A * self.E, self.B

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if self.E.shape[0]:
            return super().forward(x, y)
        return y + self.effect(x, y)  # pruned to rank 0: a bias delta at most

    def effect(self, x: Tensor, y: Tensor) -> Tensor:
        if self.E.shape[0]:
            return super().effect(x, y)
        if self.bias is None:
            return torch.zeros_like(y)
        return self.cast(self.bias, y).view(self.info.channel_shape(y.dim())).expand_as(y)

    def state_tensors(self) -> dict[str, Tensor]:
        out = {"A": self.A, "B": self.B, "E": self.E}
        if self.bias is not None:
            out["bias"] = self.bias
        return out


# --------------------------------------------------------------------------- regulariser
def orthogonal_regularization(model: nn.Module, name: str | None = None) -> Tensor:
    """AdaLoRA's regulariser, to add to the loss: ``w · mean(‖AAᵀ − I‖_F, ‖BᵀB − I‖_F)`` over
    every layer's factors (pruned-away layers, of rank 0, left out), ``w = orth_reg_weight``.

    Args:
        model: a model with AdaLoRA adapters.
        name: the adapter (default: the sum over every AdaLoRA adapter with trainable factors).

    Returns:
        A scalar tensor with gradients.

    Raises:
        AdapterNameError: no such AdaLoRA adapter (or none at all).
    """
    known = adapters(model)
    if name is not None:
        if not isinstance(known.get(name), AdaLoraConfig):
            raise AdapterNameError(f"{name!r} is not an AdaLoRA adapter; the model has "
                                   f"{[f'{n} ({c.method})' for n, c in known.items()]}")
        names = [name]
    else:
        names = [n for n, c in known.items() if isinstance(c, AdaLoraConfig)]
        layers = delta_layers(model).values()
        names = [n for n in names if any(p.requires_grad for layer in layers
                                         if n in layer.deltas
                                         for p in layer.deltas[n].parameters())]
        if not names:
            raise AdapterNameError("the model has no trainable AdaLoRA adapter to regularise")
    total = None
    for each in names:
        terms = []
        for layer in delta_layers(model).values():
            if each not in layer.deltas or layer.deltas[each].E.shape[0] == 0:
                continue
            delta = layer.deltas[each]
            for cov in (delta.A @ delta.A.T, delta.B.T @ delta.B):  # (k, k)
                eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
                terms.append(torch.linalg.matrix_norm(cov - eye))
        if terms:
            term = known[each].orth_reg_weight * (sum(terms) / len(terms))
            total = term if total is None else total + term
    if total is None:  # every layer pruned to rank 0
        return next(layer.deltas[names[0]] for layer in delta_layers(model).values()
                    if names[0] in layer.deltas).E.new_zeros(())
    return total


__all__ = ["AdaLoraConfig", "AdaLoraDelta", "AdaLoraSchedule", "orthogonal_regularization"]
