"""DyLoRA — dynamic search-free low-rank adaptation (Valipour et al. 2023, arXiv:2210.07558).

    h = W x + (α / b) · B[:, :b] A[:b] x          b ~ U{r_min, …, r_max}, one draw per step

One LoRA of rank ``r_max`` is trained so that each of its truncations to the first ``b``
components works on its own: every training step uses a random ``b`` (the paper's nested
dropout), drawn by ``DyLoraSchedule`` (the method's ``schedule_class``, driven by
``deltatune.Scheduler`` or the Trainer's ``DeltaCallback``) from a seeded generator whose state is
saved in the checkpoint, one ``b`` for all of the adapter's layers (each layer clamps it to its own
``[min_rank, rank]``). After training any ``b`` in ``[r_min, r_max]`` is usable without
retraining: ``set_eval_rank`` picks the rank evaluation and merging use (default ``r_max``), and
``truncate`` shrinks the factors for good (recorded as per-module ``rank`` overrides, so ``save``
writes the small tensors and ``load`` rebuilds them).

Update mode (``update``). ``"frozen"`` (the default; the paper's frozen mode): a step at rank
``b`` trains only the ``b``-th component — row ``b`` of ``A``, column ``b`` of ``B`` — the first
``b − 1`` enter the forward detached; ``"all"`` trains every component ``≤ b``. Components a step
does not train get no gradient, but an optimizer still moves them (AdamW's decoupled weight decay,
momentum left from earlier steps), so after each optimizer step the schedule puts them back to
their values from before it: they are bit for bit unchanged (their optimizer state keeps decaying
with zero gradients, as it would for any parameter without gradient).

Built on LoRA (``DyLoraConfig`` is a ``LoraConfig``): Linear, HF Conv1D, Conv and Embedding layers,
dropout, bias delta, gates, merging and saving are LoRA's. Without a schedule (or in ``eval()``)
the delta is a plain LoRA at its eval rank. ``alpha=None`` means ``α = r_max``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..core.delta import Params
from ..core.distributed import like
from ..core.errors import AdapterNameError, ConfigError, MergeError, StateError
from ..core.geometry import LayerInfo
from ..core.lifecycle import adapters, delta_layers, merged_adapters
from ..core.registry import register
from ..core.schedule import Schedule, remap_parameter, set_module_fields
from .lora import LoraConfig, LoraDelta

_UPDATES = ("frozen", "all")


def _count(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


@dataclass(frozen=True, kw_only=True)
class DyLoraConfig(LoraConfig):
    """DyLoRA hyper-parameters (LoRA's ``alpha``, ``dropout``, ``rslora``, ``bias``, ``init``:
    see ``LoraConfig``).

    Args:
        rank: ``r_max``, the largest rank trained (and the factors' size).
        min_rank: ``r_min``, the smallest rank trained.
        eval_rank: the rank used in evaluation and merging (``None``: ``r_max``).
        update: ``"frozen"`` (train only the sampled ``b``-th component, the paper's default)
            or ``"all"`` (every component up to ``b``).
        seed: seed of the schedule's rank sampler.
    """

    rank: int = 8
    min_rank: int = 1
    eval_rank: int | None = None
    update: str = "frozen"

    def validate(self) -> None:
        super().validate()
        if self.init == "pissa" or self.freeze_a:
            raise ConfigError("DyLoRA truncates its factors to any rank; init='pissa' (a frozen "
                              "full-rank copy) and freeze_a=True (a regenerated A) are not "
                              "supported with it")
        if not (_count(self.min_rank, 1) and self.min_rank <= self.rank):
            raise ConfigError(f"min_rank must be an integer in [1, rank={self.rank}], got "
                              f"{self.min_rank!r}")
        if self.eval_rank is not None and not (_count(self.eval_rank, 1)
                                               and self.min_rank <= self.eval_rank <= self.rank):
            raise ConfigError(f"eval_rank must be None or an integer in [min_rank={self.min_rank}"
                              f", rank={self.rank}], got {self.eval_rank!r}")
        if self.update not in _UPDATES:
            raise ConfigError(f"update must be one of {_UPDATES}, got {self.update!r}")

    @property
    def alpha_value(self) -> float:
        """``α`` (``alpha``, or ``r_max`` when it is ``None``)."""
        return float(self.rank if self.alpha is None else self.alpha)

    def scale_at(self, b: int) -> float:
        """The scale of the rank-``b`` truncation: ``α / b`` (``α / √b`` with ``rslora``)."""
        return self.alpha_value / (math.sqrt(b) if self.rslora else b)


# ---------------------------------------------------------------------------- the schedule
class DyLoraSchedule(Schedule):
    """Samples the training rank of one DyLoRA adapter every step (see the module docstring).

    The rank for the next step is drawn after each optimizer step (the first one when the
    schedule is built); the components that step did not train are restored to their values
    from before it.
    """

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__(model, name)
        self.generator = torch.Generator().manual_seed(self.config.seed)
        #: The rank of the current step (drawn from ``[min_rank, rank]`` of the adapter).
        self.rank = self._draw()
        self._apply()
        #: ``{path: (A, B)}`` as they were before the current step's optimizer update.
        self._before: dict[str, tuple[Tensor, Tensor]] = {}
        self._before = self._snapshot()

    def _draw(self) -> int:
        c = self.config
        return int(torch.randint(c.min_rank, c.rank + 1, (1,), generator=self.generator))

    def _apply(self) -> None:
        for delta in self.deltas().values():
            delta.sampled = self.rank

    def _snapshot(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Copies of every layer's factors (into the previous copies where shapes allow)."""
        out = {}
        for path, d in self.deltas().items():
            old = self._before.get(path)
            if old is not None and old[0].shape == d.A.shape and old[1].shape == d.B.shape:
                out[path] = (old[0].copy_(d.A), old[1].copy_(d.B))
            else:
                out[path] = (d.A.detach().clone(), d.B.detach().clone())
        return out

    @torch.no_grad()
    def step(self, step: int, optimizer: torch.optim.Optimizer | None) -> None:
        for path, delta in self.deltas().items():
            a0, b0 = self._before.get(path, (None, None))
            if a0 is None or a0.shape != delta.A.shape:
                continue
            keep = torch.ones(delta.A.shape[0], dtype=torch.bool, device=a0.device)
            keep[delta.trained_components(self.rank)] = False  # (r,) True: restore
            # masks laid out as the factors (FSDP2: sharded the same way)
            keep_a = like(keep[:, None].expand(delta.A.shape).contiguous(), delta.A)
            keep_b = like(keep[None, :].expand(delta.B.shape).contiguous(), delta.B)
            delta.A.copy_(torch.where(keep_a, a0, delta.A))
            delta.B.copy_(torch.where(keep_b, b0, delta.B))
        self.rank = self._draw()
        self._apply()
        self._before = self._snapshot()

    def state_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        c = self.config
        rank = int(state["rank"])
        if not c.min_rank <= rank <= c.rank:
            raise StateError(f"the schedule state of DyLoRA adapter {self.name!r} holds rank "
                             f"{rank}, outside its [{c.min_rank}, {c.rank}]; load the adapter "
                             "saved with it")
        self.generator.set_state(state["generator"].cpu().to(torch.uint8))
        self.rank = rank
        self._apply()
        self._before = self._snapshot()


# ---------------------------------------------------------------------------- the delta
@register("dylora", config=DyLoraConfig)
class DyLoraDelta(LoraDelta):
    """``y + (α/b) · B[:, :b] A[:b] x`` on one layer; ``b`` sampled in training, else the eval
    rank."""

    schedule_class = DyLoraSchedule
    examples = ({}, {"rank": 6, "min_rank": 2, "eval_rank": 4, "alpha": 8},
                {"rank": 4, "update": "all", "rslora": True, "bias": True},
                {"rank": 3, "init": "gaussian", "dropout": 0.1}, {"rank": 3, "gate": True})

    def __init__(self, info: LayerInfo, config: DyLoraConfig, path: str) -> None:
        super().__init__(info, config, path)
        #: The rank a running schedule drew for this training step (``None``: no schedule).
        self.sampled: int | None = None

    @property
    def eval_rank(self) -> int:
        """The rank used outside training (and by merging)."""
        return self.config.eval_rank or self.config.rank

    def rank_in_use(self) -> int:
        """The sampled rank (clamped to this layer's range) in training, else the eval rank."""
        if self.training and self.sampled is not None:
            return min(max(self.sampled, self.config.min_rank), self.config.rank)
        return self.eval_rank

    def trained_components(self, sampled: int) -> slice:
        """The components a training step at rank ``sampled`` updates."""
        b = min(max(sampled, self.config.min_rank), self.config.rank)
        return slice(b - 1, b) if self.config.update == "frozen" else slice(0, b)

    def factors(self) -> tuple[Tensor, Tensor]:
        """``(A[:b], c · B[:, :b])`` with ``c`` turning LoRA's ``α / r_max`` into ``α / b``; in
        a scheduled training step the components not trained enter detached."""
        b = self.rank_in_use()
        a, bm = self.A[:b], self.B[:, :b]  # (b, in), (out, b)
        if self.training and self.sampled is not None and torch.is_grad_enabled():
            lo = self.trained_components(self.sampled).start
            if lo:
                a = torch.cat([a[:lo].detach(), a[lo:]])
                bm = torch.cat([bm[:, :lo].detach(), bm[:, lo:]], dim=1)
        ratio = self.config.scale_at(b) / self.scale
        return a, (bm if ratio == 1.0 else bm * ratio)

    def delta_params(self) -> Params:
        """The eval-rank update ``(α/b) B[:, :b] A[:b]`` in fp32 (whatever the mode)."""
        e = self.eval_rank
        matrix = self.config.scale_at(e) * (self.B[:, :e].float() @ self.A[:e].float())
        weight = self.info.weight_from_matrix(matrix)
        bias = None if self.bias is None else self.bias.float()
        if bias is not None and self.info.kind == "embedding":  # a shift of every table row
            weight, bias = weight + bias, None
        return {"weight": weight, "bias": bias}

    def state_tensors(self) -> dict[str, Tensor]:
        out = {"A": self.A, "B": self.B}
        if self.bias is not None:
            out["bias"] = self.bias
        return out


# ----------------------------------------------------------------------------- after training
def _dylora_deltas(model: nn.Module, name: str, what: str) -> dict[str, DyLoraDelta]:
    config = adapters(model).get(name)
    if not isinstance(config, DyLoraConfig):
        raise AdapterNameError(f"{name!r} is not a DyLoRA adapter; the model has "
                               f"{[f'{n} ({c.method})' for n, c in adapters(model).items()]}")
    if name in merged_adapters(model):
        raise MergeError(f"DyLoRA adapter {name!r} is merged; unmerge it before {what}")
    return {p: layer.deltas[name] for p, layer in delta_layers(model).items()
            if name in layer.deltas}


def _check_rank(path: str, delta: DyLoraDelta, rank: int) -> None:
    c = delta.config
    if not (_count(rank, 1) and c.min_rank <= rank <= c.rank):
        raise ConfigError(f"{path}: rank must be an integer in the trained range [min_rank="
                          f"{c.min_rank}, rank={c.rank}], got {rank!r}")


def set_eval_rank(model: nn.Module, name: str, rank: int) -> None:
    """Use rank ``rank`` of DyLoRA adapter ``name`` outside training and when merging.

    Recorded as a per-module ``eval_rank`` override (saved with the adapter).

    Raises:
        AdapterNameError: no DyLoRA adapter ``name``.
        MergeError: the adapter is merged.
        ConfigError: ``rank`` outside a layer's trained ``[min_rank, rank]``.
    """
    deltas = _dylora_deltas(model, name, "changing its eval rank")
    for path, delta in deltas.items():
        _check_rank(path, delta, rank)
    set_module_fields(model, name, {path: {"eval_rank": rank} for path in deltas})


def truncate(model: nn.Module, name: str, rank: int,
             optimizer: torch.optim.Optimizer | None = None) -> None:
    """Keep only the first ``rank`` components of DyLoRA adapter ``name``, for good.

    The factors shrink in place (with their optimizer state, if ``optimizer`` is given); the new
    ``rank`` (and ``α``, so that the scale stays ``α / b``) are recorded as per-module overrides,
    so ``save`` writes the small tensors and ``load`` rebuilds them.

    Raises:
        AdapterNameError: no DyLoRA adapter ``name``.
        MergeError: the adapter is merged.
        ConfigError: ``rank`` outside a layer's trained ``[min_rank, rank]``.
    """
    deltas = _dylora_deltas(model, name, "truncating it")
    for path, delta in deltas.items():
        _check_rank(path, delta, rank)
    fields = {}
    for path, delta in deltas.items():
        index = torch.arange(rank, device=delta.A.device)
        remap_parameter(delta.A, delta.A.detach()[:rank].clone(), dim=0, src=index, dst=index,
                        optimizer=optimizer)
        remap_parameter(delta.B, delta.B.detach()[:, :rank].clone(), dim=1, src=index,
                        dst=index, optimizer=optimizer)
        c = delta.config
        fields[path] = {"rank": rank, "alpha": c.alpha_value, "eval_rank": None}
    set_module_fields(model, name, fields)


__all__ = ["DyLoraConfig", "DyLoraDelta", "DyLoraSchedule", "set_eval_rank", "truncate"]
