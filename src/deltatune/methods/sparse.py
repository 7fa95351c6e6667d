"""Sparse deltas: train chosen entries of the base weights, kept as indices + values.

    W' = W + Δ,    Δ = scatter(indices, values)  (zero elsewhere)

A scorer ranks every entry of the targeted weights; the best-scored ones train:

* ``"fisher"`` — FISH Mask (Sung et al. 2021, arXiv:2111.09839): the diagonal empirical Fisher
  ``F = (1/N) Σ_i (∂ℓ_i/∂W)²`` over the N samples of ``data=`` (per-sample gradients);
* ``"sensitivity"`` — SPT (He et al. 2023, arXiv:2303.08566): ``E_batches[(∂L/∂W)²]``, the
  first-order loss reduction of tuning one entry, from mini-batch gradients;
* ``"magnitude"`` — SaRA (Hu et al. 2024, arXiv:2409.06633): the smallest ``|W|``; no data;
* ``"random"`` — a seeded uniformly random mask (a baseline); no data.

Budget: a module's share is ``max(1, round(density · numel))`` (or its ``entries``). With
``scope="model"`` (the papers' choice) the shares' sum goes to the best entries over all targeted
weights at once, each module keeping at least its own best (none is left empty); ``"tensor"``
keeps each module's top share (``"random"`` always does). The model-wide top-k needs every
module's scores before any delta is built: after the calibration pass, ``SparseDelta.allocate``
splits the budget with ``core.calibration.split_top_k`` (the k-th best score found by bisection,
exact, without a concatenated copy) and writes each module's count as a per-module ``entries``
override; each delta keeps its
own top ``entries``. The counts are saved with the config: ``load`` needs no data.

The only trainable tensor is ``values`` ``(k,)``, so gradients and optimizer state are k-sized;
``indices`` (sorted; int32 where it fits) is a buffer. Merging adds Δ; saving writes indices +
values (8 bytes per entry against 4 per entry of a dense copy); deltas of several tasks add up
on a layer and combine as task vectors (``deltatune.merging``). Unmerged, the layer runs with the
dense ``W + Δ`` (the core's weight form), which autograd keeps for backward.

SaRA's schedule (``SparseSchedule``, driven by ``deltatune.Scheduler``): ``loss()`` is
``nuclear_weight · ‖Δ_ℓ‖_*`` for one layer ℓ drawn per step (SaRA's one-SVD-per-step estimate of
the mean over layers); every ``reselect_every`` steps each layer re-selects its ``entries``
smallest ``|W + Δ|``: staying entries keep their values and optimizer state, new ones start at
zero, leaving ones keep their learned value as a frozen part of Δ (``frozen_indices`` /
``frozen_values``, sized by per-module ``frozen`` overrides so save and load rebuild them).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..core.calibration import split_top_k
from ..core.config import DeltaConfig
from ..core.delta import Delta, Params
from ..core.distributed import gathered
from ..core.errors import ConfigError, StateError
from ..core.geometry import LayerInfo, dense_weight
from ..core.lifecycle import delta_layers, merged_adapters
from ..core.registry import register
from ..core.schedule import Schedule, remap_parameter, set_module_fields
from ..core.targeting import Matcher, module_config

SCORERS = ("fisher", "sensitivity", "magnitude", "random")
SCOPES = ("model", "tensor")
#: The calibration statistic each data-driven scorer reads.
STATISTIC = {"fisher": "fisher", "sensitivity": "weight_grad_sq"}
_ADAPTER_WIDE = ("scorer", "scope", "reselect_every", "nuclear_weight", "seed")


def _count(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


@dataclass(frozen=True, kw_only=True)
class SparseConfig(DeltaConfig):
    """Sparse-delta hyper-parameters (targeting fields: see ``DeltaConfig``).

    Args:
        density: each module's share of entries, in ``(0, 1]``: ``max(1, round(density·numel))``.
        scorer: ``"fisher"``, ``"sensitivity"`` (both need ``data=`` in ``inject``),
            ``"magnitude"`` or ``"random"``.
        scope: ``"model"``: the shares' sum goes to the best entries model-wide; ``"tensor"``:
            each module keeps its own top share.
        entries: entries on a module (written per module by the model-wide allocation);
            ``None``: the density's share.
        frozen: learned entries a module keeps frozen after re-selection (written per module by
            the schedule).
        reselect_every: SaRA's progressive re-selection period in optimizer steps
            (``"magnitude"`` only); ``None``: the mask stays fixed.
        nuclear_weight: SaRA's ``λ`` of ``λ · ‖Δ‖_*`` (added through ``Scheduler.loss()``).
        seed: seed of the random mask and of the layer each step's nuclear norm reads.
    """

    density: float = 0.01
    scorer: str = "fisher"
    scope: str = "model"
    entries: int | None = None
    frozen: int = 0
    reselect_every: int | None = None
    nuclear_weight: float = 0.0
    seed: int = 0

    def validate(self) -> None:
        if not (isinstance(self.density, (int, float)) and not isinstance(self.density, bool)
                and 0.0 < self.density <= 1.0):
            raise ConfigError(f"density must be a fraction in (0, 1], got {self.density!r}")
        if self.scorer not in SCORERS:
            raise ConfigError(f"scorer must be one of {SCORERS}, got {self.scorer!r}")
        if self.scope not in SCOPES:
            raise ConfigError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.entries is not None and not _count(self.entries, 1):
            raise ConfigError(f"entries must be None or a positive integer, got {self.entries!r}")
        if not _count(self.frozen, 0):
            raise ConfigError(f"frozen must be a non-negative integer, got {self.frozen!r}")
        if self.reselect_every is not None and not (_count(self.reselect_every, 1)
                                                    and self.scorer == "magnitude"):
            raise ConfigError("reselect_every is a positive step count for scorer='magnitude' "
                              f"(re-selection reads only the weights); got {self.reselect_every!r}"
                              f" with scorer={self.scorer!r}")
        if not (isinstance(self.nuclear_weight, (int, float)) and self.nuclear_weight >= 0
                and math.isfinite(self.nuclear_weight)):
            raise ConfigError(f"nuclear_weight must be a finite number >= 0, got "
                              f"{self.nuclear_weight!r}")
        if not _count(self.seed, 0):
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
        for key, values in (self.overrides or {}).items():
            wide = sorted(set(values) & set(_ADAPTER_WIDE))
            if wide:
                raise ConfigError(f"overrides[{key!r}] sets {wide}, which hold for the whole "
                                  "adapter; set them on the config itself")

    def share(self, numel: int) -> int:
        """A module's budget: ``entries``, else ``max(1, round(density · numel))``."""
        if self.entries is not None:
            return self.entries
        return max(1, min(numel, math.floor(self.density * numel + 0.5)))


# ---------------------------------------------------------------------------- selection
def scores(info: LayerInfo, config: SparseConfig, path: str, base: nn.Module,
           stats: Mapping[str, Tensor] | None) -> Tensor:
    """One module's entry scores, flat in the native weight layout, fp32, higher = kept.

    Raises:
        ConfigError: a non-finite score (NaN / Inf in the weights or gradients), or a weight
            that is not floating point for ``"magnitude"``.
    """
    if config.scorer == "magnitude":
        weight = dense_weight(base)
        if not weight.is_floating_point():
            raise ConfigError(f"{path}: scorer='magnitude' reads the weight, and this one is "
                              f"{weight.dtype} (quantized?); use scorer='fisher' or exclude it")
        out = -weight.detach().float().reshape(-1).abs()
    else:
        out = info.weight_from_matrix(stats[STATISTIC[config.scorer]]).reshape(-1).float()
    if not torch.isfinite(out).all():
        raise ConfigError(f"{path}: the {config.scorer} scores are not finite (NaN or Inf in the "
                          "weights or the calibration gradients); check the data and the loss")
    return out


def _with_entries(matcher: Matcher, config: SparseConfig, counts: Mapping[str, int]
                  ) -> SparseConfig:
    """``config`` with an exact-path ``entries`` override per module (deepest paths first, so
    each module finds its own entry), keeping the values the module matched before."""
    user = dict(config.overrides or {})
    own = {}
    for path in sorted(counts, key=lambda p: -p.count(".")):
        matched = next((dict(v) for k, v in user.items() if matcher.entry_matches(path, k)), {})
        own[path] = {**matched, "entries": counts[path]}
    return config.replace(overrides={**own, **{k: v for k, v in user.items() if k not in own}})


# ---------------------------------------------------------------------------- the schedule
class SparseSchedule(Schedule):
    """SaRA's nuclear-norm regulariser (``loss``) and progressive re-selection (``step``) for one
    sparse adapter; does nothing when neither is configured, or the adapter is frozen."""

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__(model, name)
        self.generator = torch.Generator().manual_seed(self.config.seed)
        #: Whether the adapter trains: one loaded frozen (for inference) is left alone.
        self.enabled = any(d.values.requires_grad for d in self.deltas().values())
        self.remaps = bool(self.config.reselect_every)  # re-selection moves the values
        #: The layer whose nuclear norm this step's ``loss`` reads (``None``: no regulariser).
        self.layer = self._draw()

    def _draw(self) -> str | None:
        if not (self.config.nuclear_weight and self.enabled):
            return None
        paths = list(self.deltas())
        return paths[int(torch.randint(len(paths), (1,), generator=self.generator))]

    def loss(self) -> Tensor | None:
        if self.layer is None:
            return None
        delta = self.deltas()[self.layer]
        matrix = delta.info.weight_matrix(delta.dense()).float()  # (out, in)
        return self.config.nuclear_weight * torch.linalg.matrix_norm(matrix, ord="nuc")

    def step(self, step: int, optimizer: torch.optim.Optimizer | None) -> None:
        every = self.config.reselect_every
        if every and step % every == 0 and self.enabled:
            if self.name in merged_adapters(self.model):
                raise StateError(f"sparse adapter {self.name!r} is merged; unmerge it before "
                                 "training (re-selection reads W + Δ)")
            frozen = {}
            for path, layer in delta_layers(self.model).items():
                if self.name in layer.deltas:
                    delta = layer.deltas[self.name]
                    delta.reselect(layer.base_layer, optimizer)
                    frozen[path] = {"frozen": delta.num_frozen}
            set_module_fields(self.model, self.name, frozen)
        self.layer = self._draw()

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "layer": self.layer or ""}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        layer = state["layer"] or None
        if layer is not None and layer not in self.deltas():
            raise StateError(f"the schedule state of sparse adapter {self.name!r} names layer "
                             f"{layer!r}, which it does not adapt; load the adapter saved with it")
        self.generator.set_state(state["generator"].cpu().to(torch.uint8))
        self.layer = layer


# ---------------------------------------------------------------------------- the delta
@register("sparse", config=SparseConfig)
class SparseDelta(Delta):
    """``W + scatter(indices, values)`` on one layer: chosen entries of the weight train."""

    form = "weight"
    mergeable = True
    layer_kinds = frozenset({"linear", "conv", "embedding"})
    calibration = frozenset(STATISTIC.values())
    schedule_class = SparseSchedule
    examples = ({}, {"scorer": "sensitivity", "density": 0.3},
                {"scope": "tensor", "density": 0.1, "dtype": "float32"})

    def __init__(self, info: LayerInfo, config: SparseConfig, path: str) -> None:
        super().__init__(info, config, path)
        numel = math.prod(info.weight_shape)
        k = config.share(numel)
        if k > numel:
            raise ConfigError(f"{path}: entries={k} exceeds its weight's {numel} entries")
        index = torch.int32 if numel <= torch.iinfo(torch.int32).max else torch.int64
        self.values = nn.Parameter(torch.zeros(k))
        self.register_buffer("indices", torch.zeros(k, dtype=index))
        f = config.frozen
        self.register_buffer("frozen_indices", torch.zeros(f, dtype=index) if f else None)
        self.register_buffer("frozen_values", torch.zeros(f) if f else None)

    @classmethod
    def num_trainable(cls, info: LayerInfo, config: SparseConfig) -> int:
        return config.share(math.prod(info.weight_shape))

    @classmethod
    def calibration_for(cls, config: SparseConfig) -> frozenset[str]:
        return frozenset({STATISTIC[config.scorer]} if config.scorer in STATISTIC else ())

    @classmethod
    def allocate(cls, model: nn.Module, config: SparseConfig, targets: Mapping[str, LayerInfo],
                 stats: Mapping[str, Mapping[str, Tensor]]) -> DeltaConfig:
        """The model-wide top-k as per-module ``entries`` (see the module docstring)."""
        if config.scope == "tensor" or config.scorer == "random":
            return config
        matcher = Matcher(model)
        budget = sum(module_config(matcher, config, p).share(math.prod(i.weight_shape))
                     for p, i in targets.items())
        ranked = ((p, scores(i, config, p, matcher.modules[p], stats.get(p)))
                  for p, i in targets.items())  # one module's scores at a time
        return _with_entries(matcher, config, split_top_k(ranked, budget))

    @property
    def num_frozen(self) -> int:
        """Entries kept frozen after re-selection."""
        return 0 if self.frozen_values is None else self.frozen_values.numel()

    @torch.no_grad()
    def reset_parameters(self, base: nn.Module) -> None:
        c, k = self.config, self.values.numel()
        numel = math.prod(self.info.weight_shape)
        if c.scorer == "random":
            seed = (c.seed * 1_000_003 + zlib.crc32(self.path.encode())) % 2**63
            chosen = torch.randperm(numel, generator=torch.Generator().manual_seed(seed))[:k]
        else:
            stats = self.calibration_stats if c.scorer in STATISTIC else None
            chosen = torch.topk(scores(self.info, c, self.path, base, stats), k,
                                sorted=False).indices
        self.indices.copy_(chosen.sort().values)
        self.values.zero_()

    # --------------------------------------------------------------------------- compute
    def dense(self) -> Tensor:
        """Δ in the native weight layout (differentiable w.r.t. ``values``; FSDP2-sharded
        ``values``, as outside a forward, are gathered, differentiably)."""
        index, values = self.indices, gathered(self.values)
        if self.frozen_values is not None:
            index = torch.cat([index, self.frozen_indices])
            values = torch.cat([values, self.frozen_values.to(values.dtype)])
        flat = values.new_zeros(math.prod(self.info.weight_shape))
        return flat.index_put((index.long(),), values).view(self.info.weight_shape)

    def delta_params(self) -> Params:
        return {"weight": self.dense()}

    @torch.no_grad()
    def reselect(self, base: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Keep the ``entries`` smallest ``|W + Δ|`` (SaRA's progressive step, see the module
        docstring); the optimizer state of staying entries moves with them."""
        old, values, k = self.indices.long(), self.values.detach(), self.values.numel()
        fidx = self.frozen_indices.long() if self.frozen_values is not None else old[:0]
        fval = self.frozen_values if self.frozen_values is not None else values[:0]
        current = dense_weight(base).detach().float().reshape(-1).clone()
        current.index_add_(0, old, values.float()).index_add_(0, fidx, fval.float())
        new = torch.topk(-current.abs(), k, sorted=False).indices.sort().values
        src, hit = _positions(old, new)  # where each new entry sat among the old ones
        fsrc, fhit = _positions(fidx, new)
        fresh = torch.zeros_like(values)
        fresh[hit] = values[src[hit]]
        fresh[fhit] = fval[fsrc[fhit]].to(values.dtype)
        dst = torch.arange(k, device=new.device)
        remap_parameter(self.values, fresh, dim=0, src=src[hit], dst=dst[hit],
                        optimizer=optimizer)
        leave, fstay = ~_positions(new, old)[1], ~_positions(new, fidx)[1]
        keep_i = torch.cat([fidx[fstay], old[leave]])
        keep_v = torch.cat([fval[fstay].to(values.dtype), values[leave]])
        order = keep_i.argsort()
        self.indices.copy_(new)
        self.frozen_indices = keep_i[order].to(self.indices.dtype) if keep_i.numel() else None
        self.frozen_values = keep_v[order].clone() if keep_i.numel() else None


def _positions(sorted_index: Tensor, query: Tensor) -> tuple[Tensor, Tensor]:
    """For each ``query`` entry, its position in ``sorted_index`` and whether it is there."""
    if sorted_index.numel() == 0:
        return torch.zeros_like(query), torch.zeros_like(query, dtype=torch.bool)
    pos = torch.searchsorted(sorted_index, query).clamp_(max=sorted_index.numel() - 1)
    return pos, sorted_index[pos] == query


__all__ = ["SCOPES", "SCORERS", "SparseConfig", "SparseDelta", "SparseSchedule", "scores"]
