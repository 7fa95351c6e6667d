"""Full fine-tuning as a delta, and two schedules that train part of it at a time.

* ``"full"``: a dense ``ΔW`` (and ``Δb`` where the layer has a bias) on every targeted layer,
  zero at init: ``W' = W + ΔW``. Mergeable, saved like any delta; the base stays untouched.
* ``"lisa"`` — LISA, layerwise importance sampled AdamW (Pan et al. 2024, arXiv:2403.17919):
  every ``interval`` optimizer steps, ``active_layers`` (γ) of the model's repeated blocks are
  drawn uniformly without replacement and only their deltas train; the modules outside the
  blocks (embeddings, output head, final norm — the paper's E and H layers, whose sampling
  probability is 1) always train unless ``train_outside_blocks=False``.
* ``"hft"`` — Half Fine-Tuning (Hui et al. 2024, arXiv:2404.18466): every ``stage_steps`` steps
  half of the modules of each category — the targeted modules sharing a parent (a block's
  attention projections, its FFN matrices, its norms …) — are drawn to train (``fraction``; an
  odd count rounds up or down at random, so half on average), the rest stay frozen.

The schedules (``deltatune.Scheduler``) freeze by ``requires_grad_(False)``: autograd computes no
weight gradient for frozen deltas, their ``.grad`` is cleared and their optimizer state dropped
when they leave training, so gradient and optimizer memory are those of the trained part only; a
delta that comes back starts with fresh optimizer state (LISA's per-period AdamW). Like every
weight-form delta, each adapted layer runs with ``W + ΔW``, which autograd keeps for the input
gradient: one copy of the targeted weights in activation memory, frozen layers included.
Build the optimizer over every delta parameter before the ``Scheduler`` (frozen ones are skipped
by torch optimizers: no gradient, no state); an adapter whose parameters are all frozen (loaded
for inference) is left frozen. The generator and the trained set are checkpointed,
so a resumed run continues bit for bit. Without a schedule (or after training) these are plain
``"full"`` deltas.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.config import DeltaConfig
from ..core.delta import Delta, Params
from ..core.errors import ConfigError, StateError
from ..core.geometry import LayerInfo
from ..core.registry import register
from ..core.schedule import Schedule
from ..core.targeting import Matcher


def _count(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _adapter_wide(config: DeltaConfig, fields: tuple[str, ...]) -> None:
    for key, values in (config.overrides or {}).items():
        wide = sorted(set(values) & set(fields))
        if wide:
            raise ConfigError(f"overrides[{key!r}] sets {wide}, which hold for the whole adapter;"
                              " set them on the config itself")


@dataclass(frozen=True, kw_only=True)
class FullConfig(DeltaConfig):
    """Dense weight-delta hyper-parameters (targeting fields: see ``DeltaConfig``; the default
    targets are every Linear, HF Conv1D, Conv, Embedding and norm layer).

    Args:
        bias: also train the bias of layers that have one.
    """

    bias: bool = True

    def validate(self) -> None:
        if not isinstance(self.bias, bool):
            raise ConfigError(f"bias must be True or False, got {self.bias!r}")


@register("full", config=FullConfig)
class FullDelta(Delta):
    """``W + ΔW`` (and ``b + Δb``) on one layer: every entry of its weight trains."""

    form = "weight"
    mergeable = True
    ties = True  # tied embeddings: one ΔW, as full fine-tuning of the tied weight trains one
    default_targets = ".*"
    layer_kinds = frozenset({"linear", "conv", "embedding", "norm"})
    examples = ({}, {"bias": False, "dtype": "float32"})

    def __init__(self, info: LayerInfo, config: FullConfig, path: str) -> None:
        super().__init__(info, config, path)
        self.delta = nn.ParameterDict({"weight": nn.Parameter(torch.zeros(info.weight_shape))})
        if config.bias and info.bias == "own":
            self.delta["bias"] = nn.Parameter(torch.zeros(info.out_dim))

    @classmethod
    def num_trainable(cls, info: LayerInfo, config: FullConfig) -> int:
        weight = torch.Size(info.weight_shape).numel()
        return weight + (info.out_dim if config.bias and info.bias == "own" else 0)

    @torch.no_grad()
    def reset_parameters(self, base: nn.Module) -> None:
        for value in self.delta.values():
            value.zero_()

    def delta_params(self) -> Params:
        return dict(self.delta.items())


# ---------------------------------------------------------------------------- schedules
class LayerwiseSchedule(Schedule):
    """Trains the modules ``choose()`` returns for ``period`` steps at a time, the adapter's
    other deltas frozen (see the module docstring). Subclasses define ``period`` and
    ``choose``."""

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__(model, name)
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.paths = list(self.deltas())
        #: Whether the adapter trains at all: one loaded frozen (for inference) is left alone.
        self.enabled = any(p.requires_grad for d in self.deltas().values()
                           for p in d.parameters())
        self.prepare()
        #: The module paths whose deltas train in the current period.
        self.trained: tuple[str, ...] = self.choose()
        self._apply(None)

    def prepare(self) -> None:
        """Group ``self.paths`` into what ``choose`` draws from (default: nothing to do)."""

    @property
    def period(self) -> int:
        """Steps between two draws."""
        raise NotImplementedError

    def choose(self) -> tuple[str, ...]:
        """The paths to train next (draws from ``self.generator``)."""
        raise NotImplementedError

    def _apply(self, optimizer: torch.optim.Optimizer | None) -> None:
        if not self.enabled:
            return
        deltas = self.deltas()
        # by parameter: a tied delta (one ΔW shared by an embedding and the output layer)
        # trains when either of its layers is drawn
        trained = {id(p) for path in self.trained for p in deltas[path].parameters()}
        for delta in deltas.values():
            for p in delta.parameters():
                on = id(p) in trained
                if not on:
                    p.grad = None
                    if optimizer is not None:
                        optimizer.state.pop(p, None)
                p.requires_grad_(on)

    def step(self, step: int, optimizer: torch.optim.Optimizer | None) -> None:
        if step % self.period == 0:
            self.trained = self.choose()
            self._apply(optimizer)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "trained": list(self.trained)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        trained = tuple(state["trained"])
        unknown = sorted(set(trained) - set(self.paths))
        if unknown:
            raise StateError(f"the schedule state of adapter {self.name!r} trains {unknown}, "
                             "which it does not adapt; load the adapter saved with it")
        self.generator.set_state(state["generator"].cpu().to(torch.uint8))
        self.trained = trained
        self._apply(None)

    def _pick(self, n: int, of: int) -> list[int]:
        return sorted(torch.randperm(of, generator=self.generator)[:n].tolist())


class LisaSchedule(LayerwiseSchedule):
    """LISA: γ blocks drawn every ``interval`` steps, modules outside the blocks always on."""

    def prepare(self) -> None:
        matcher = Matcher(self.model)
        self.blocks: dict[tuple[str, int], list[str]] = {}
        self.outside: list[str] = []
        for path in self.paths:
            position = matcher.block_position(path)
            if position is None:
                self.outside.append(path)
            else:
                self.blocks.setdefault(position, []).append(path)
        if not self.blocks:
            raise ConfigError(f"LISA adapter {self.name!r} adapts no module inside the model's "
                              "repeated blocks (transformer layers), so it has no layer to "
                              "sample; target modules inside them, or use method 'full'")

    @property
    def period(self) -> int:
        return self.config.interval

    def choose(self) -> tuple[str, ...]:
        keys = list(self.blocks)
        picked = self._pick(min(self.config.active_layers, len(keys)), len(keys))
        chosen = {p for i in picked for p in self.blocks[keys[i]]}
        if self.config.train_outside_blocks:
            chosen.update(self.outside)
        return tuple(p for p in self.paths if p in chosen)

    @property
    def sampled_layers(self) -> list[tuple[str, int]]:
        """``(block list, index)`` of the blocks training in the current period."""
        trained = set(self.trained)
        return [k for k, paths in self.blocks.items() if trained.intersection(paths)]


class HftSchedule(LayerwiseSchedule):
    """HFT: a ``fraction`` of each category's modules drawn every ``stage_steps`` steps."""

    def prepare(self) -> None:
        self.groups: dict[str, list[str]] = {}
        for path in self.paths:
            self.groups.setdefault(path.rpartition(".")[0], []).append(path)

    @property
    def period(self) -> int:
        return self.config.stage_steps

    def choose(self) -> tuple[str, ...]:
        chosen: set[str] = set()
        for paths in self.groups.values():
            share = self.config.fraction * len(paths)
            n = int(share) + int(torch.rand(1, generator=self.generator) < share - int(share))
            chosen.update(paths[i] for i in self._pick(n, len(paths)))
        return tuple(p for p in self.paths if p in chosen)


# ---------------------------------------------------------------------------- methods
@dataclass(frozen=True, kw_only=True)
class LisaConfig(FullConfig):
    """LISA hyper-parameters (``bias`` and targeting: see ``FullConfig``).

    Args:
        active_layers: γ, the blocks trained at a time.
        interval: K, optimizer steps between two draws.
        train_outside_blocks: always train the modules outside the repeated blocks
            (embeddings, output head, final norm), as the paper does.
        seed: seed of the draws.
    """

    active_layers: int = 2
    interval: int = 20
    train_outside_blocks: bool = True
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        for field in ("active_layers", "interval"):
            if not _count(getattr(self, field), 1):
                raise ConfigError(f"{field} must be a positive integer, got "
                                  f"{getattr(self, field)!r}")
        if not isinstance(self.train_outside_blocks, bool):
            raise ConfigError("train_outside_blocks must be True or False, got "
                              f"{self.train_outside_blocks!r}")
        if not _count(self.seed, 0):
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
        _adapter_wide(self, ("active_layers", "interval", "train_outside_blocks", "seed"))


@register("lisa", config=LisaConfig)
class LisaDelta(FullDelta):
    """A ``"full"`` delta trained by ``LisaSchedule``."""

    schedule_class = LisaSchedule
    examples = ({}, {"active_layers": 1, "interval": 3, "bias": False})


@dataclass(frozen=True, kw_only=True)
class HftConfig(FullConfig):
    """HFT hyper-parameters (``bias`` and targeting: see ``FullConfig``).

    Args:
        fraction: the share of each category's modules trained at a time (the paper's half).
        stage_steps: optimizer steps per stage (e.g. one epoch); a new half is drawn after it.
        seed: seed of the draws.
    """

    fraction: float = 0.5
    stage_steps: int = 100
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        if not (isinstance(self.fraction, (int, float)) and not isinstance(self.fraction, bool)
                and 0.0 < self.fraction <= 1.0):
            raise ConfigError(f"fraction must be in (0, 1], got {self.fraction!r}")
        if not _count(self.stage_steps, 1):
            raise ConfigError(f"stage_steps must be a positive integer, got "
                              f"{self.stage_steps!r}")
        if not _count(self.seed, 0):
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
        _adapter_wide(self, ("fraction", "stage_steps", "seed"))


@register("hft", config=HftConfig)
class HftDelta(FullDelta):
    """A ``"full"`` delta trained by ``HftSchedule``."""

    schedule_class = HftSchedule
    examples = ({}, {"fraction": 0.25, "stage_steps": 5})


__all__ = ["FullConfig", "FullDelta", "HftConfig", "HftDelta", "HftSchedule", "LayerwiseSchedule",
           "LisaConfig", "LisaDelta", "LisaSchedule"]
