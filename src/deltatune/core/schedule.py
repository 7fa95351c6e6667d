"""The per-step protocol for methods that change what trains during training.

AdaLoRA prunes singular values under a budget, DyLoRA samples a rank per step, IncreLoRA grows
ranks, dynamic rank distribution drops rank-1 components: each is a ``Schedule``, one object per
adapter, built by its method (``Delta.schedule_class``). A ``Scheduler`` drives the schedules of
every adapter in a model with one call per optimizer step::

    scheduler = dt.Scheduler(model, optimizer)
    for batch in data:
        loss = model(**batch).loss + scheduler.loss()   # a schedule's regulariser, if any
        loss.backward()
        optimizer.step()
        scheduler.step()          # after optimizer.step(), before the gradients are zeroed
        optimizer.zero_grad()

(the HF Trainer callback in ``integrations.transformers`` makes the same call). ``step()``
returns True when the trainable parameters changed (shapes, or which of them train); under
``DistributedDataParallel`` the wrapper must then be built again, since its gradient buckets
follow the parameters it was built with (``if scheduler.step(): ddp = DDP(model)``; build the
first one after the ``Scheduler``, which may already freeze some). Schedules read
the gradients still on the parameters, and change the deltas through two operations written
once here, which keep the optimizer's state consistent with the parameters:

* ``remap_parameter``: give a parameter a new size along one axis, moving chosen slices
  (pruning, growth, reordering); the optimizer's per-entry state (Adam's moments …) and the
  gradient move with them, new entries start with zero state. The ``nn.Parameter`` object is
  kept, so optimizers, gradient hooks and parameter groups need no rebuilding.
* ``mask_parameter``: zero chosen entries of a parameter and of its optimizer state.

A schedule that changes a module's shape records it with ``set_module_fields``, as a per-module
override in the adapter's config, so ``save`` writes the shapes and ``load`` rebuilds them.

Checkpoints: ``Scheduler.state_dict()`` (tensors and plain values) or ``Scheduler.save(dir)``
(safetensors + JSON, no pickle) hold the step count and each schedule's state (importance
averages, random-generator states, …). Resuming is ``load`` of the saved adapter, a new
optimizer loaded from its state dict, and ``Scheduler.load``: training continues bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import DeltaConfig
from .delta import Delta
from .distributed import is_sharded
from .errors import AdapterFileError, AdapterNameError, StateError
from .lifecycle import adapters, delta_layers
from .registry import get_method
from .targeting import Matcher, module_config

STATE_FILE = "deltatune_schedule.json"
TENSORS_FILE = "deltatune_schedule.safetensors"
_OWN_FILES = {STATE_FILE, TENSORS_FILE}


# ------------------------------------------------------------------------ the protocol
class Schedule:
    """One adapter's per-step rule. Subclasses implement ``step`` and extend the state.

    Args:
        model: the model holding the adapter.
        name: the adapter's name.
    """

    #: Whether ``step`` reallocates parameters (``remap_parameter``: rank pruned or grown,
    #: entries re-selected), which FSDP2-sharded parameters cannot follow.
    remaps: bool = False

    def __init__(self, model: nn.Module, name: str) -> None:
        self.model = model
        self.name = name

    @property
    def config(self) -> DeltaConfig:
        """The adapter's whole config (as saved)."""
        return adapters(self.model)[self.name]

    def deltas(self) -> dict[str, Delta]:
        """``{module path: delta}`` of this adapter, in model order."""
        return {p: layer.deltas[self.name] for p, layer in delta_layers(self.model).items()
                if self.name in layer.deltas}

    def step(self, step: int, optimizer: torch.optim.Optimizer | None) -> None:
        """Called once per optimizer step, after ``optimizer.step()`` and before the gradients
        are zeroed. ``step`` counts from 1 (the number of optimizer steps taken so far)."""
        raise NotImplementedError

    def loss(self) -> Tensor | None:
        """A term the method adds to the training objective before ``backward`` (a regulariser,
        already weighted), or ``None`` (the default): nothing to add now."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold to resume identically: tensors and JSON values."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of ``state_dict``."""

    def done(self, step: int) -> bool:
        """Whether the schedule has nothing left to change after ``step`` (default: never)."""
        return False


class Scheduler:
    """Drives the ``Schedule`` of every scheduled adapter in a model, one call per step.

    Args:
        model: a model with deltas.
        optimizer: the optimizer training them (its state is remapped when parameters change
            shape; ``None`` where no optimizer state exists, e.g. in tests of a schedule).
        names: adapters to drive (default: every adapter whose method has a schedule). A named
            adapter without a schedule is an error.

    An adapter whose method has no schedule is simply not driven, so a training loop can always
    make the call; ``len(scheduler)`` is the number of schedules.

    Raises:
        AdapterNameError: a named adapter does not exist.
        StateError: a named adapter has no schedule, or a schedule that reallocates parameters
            (``Schedule.remaps``) would drive FSDP2-sharded deltas.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 names: str | Iterable[str] | None = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.num_steps = 0
        known = adapters(model)
        chosen = list(known) if names is None else ([names] if isinstance(names, str)
                                                    else list(names))
        self.schedules: dict[str, Schedule] = {}
        self._warned = False
        for name in chosen:
            if name not in known:
                raise AdapterNameError(f"no adapter named {name!r}; the model has {list(known)}")
            cls = get_method(known[name].method).delta_class.schedule_class
            if cls is None:
                if names is not None:
                    raise StateError(f"adapter {name!r} ({known[name].method}) does not change "
                                     "during training; it has no schedule to drive")
                continue
            self.schedules[name] = schedule = cls(model, name)
            if schedule.remaps and any(is_sharded(p) for d in schedule.deltas().values()
                                       for p in d.parameters()):
                raise StateError(
                    f"adapter {name!r} ({known[name].method}) reallocates its parameters as it "
                    "trains (ranks pruned or grown, entries re-selected), which FSDP2-sharded "
                    "parameters cannot follow; train it with DistributedDataParallel (built "
                    "again whenever Scheduler.step() returns True) or in one process")

    def __len__(self) -> int:
        return len(self.schedules)

    def step(self) -> bool:
        """One optimizer step was taken: let every schedule act on it.

        Returns:
            Whether the driven adapters' trainable parameters changed — a shape (rank grown or
            pruned) or which of them train (LISA's, HFT's layer sampling). A
            ``DistributedDataParallel`` wrapper built before must then be built again
            (``ddp = DDP(model, …)``): its gradient buckets follow the parameters it was built
            with. The optimizer needs nothing: it keeps the same parameter objects.
        """
        self.num_steps += 1
        before = self._signature()
        for schedule in self.schedules.values():
            schedule.step(self.num_steps, self.optimizer)
        changed = self._signature() != before
        if changed and not self._warned and _distributed():
            self._warned = True
            warnings.warn(
                f"step {self.num_steps}: the schedule of adapter(s) {sorted(self.schedules)} "
                "changed which delta parameters train or their shapes; a "
                "DistributedDataParallel wrapper must be rebuilt now (Scheduler.step() returns "
                "True when this happens: `if scheduler.step(): ddp = DDP(model, ...)`), or its "
                "next forward fails", stacklevel=2)
        return changed

    def _signature(self) -> list[tuple]:
        """``(id, shape, requires_grad)`` of every parameter of the driven adapters."""
        return [(id(p), tuple(p.shape), p.requires_grad) for s in self.schedules.values()
                for d in s.deltas().values() for p in d.parameters()]

    def loss(self) -> Tensor | float:
        """The sum of the schedules' ``loss()`` terms, to add to the task loss before
        ``backward`` (``0.0`` when none has one)."""
        terms = [t for s in self.schedules.values() if (t := s.loss()) is not None]
        return sum(terms[1:], terms[0]) if terms else 0.0

    def done(self) -> bool:
        """Whether every schedule has finished changing its adapter."""
        return all(s.done(self.num_steps) for s in self.schedules.values())

    # ------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """``{"num_steps": n, "schedules": {name: schedule state}}``."""
        return {"num_steps": self.num_steps,
                "schedules": {n: s.state_dict() for n, s in self.schedules.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict``'s output (the adapters must already have the saved shapes,
        e.g. loaded with ``deltatune.load`` from the same checkpoint).

        Raises:
            StateError: the state is for other adapters.
        """
        saved = state.get("schedules", {})
        if set(saved) != set(self.schedules):
            raise StateError(f"the schedule state is for adapters {sorted(saved)}, but this "
                             f"scheduler drives {sorted(self.schedules)}")
        self.num_steps = int(state["num_steps"])
        for name, schedule in self.schedules.items():
            schedule.load_state_dict(saved[name])

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``state_dict()`` to directory ``path`` atomically (JSON + safetensors)."""
        from safetensors.torch import save_file

        from .state import atomic_directory

        tensors: dict[str, Tensor] = {}
        plain = _split(self.state_dict(), "", tensors)
        with atomic_directory(Path(path), own_files=_OWN_FILES) as tmp:
            save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()},
                      str(tmp / TENSORS_FILE), metadata={"format": "pt"})
            (tmp / STATE_FILE).write_text(json.dumps(plain, indent=1) + "\n")
        return Path(path)

    def load(self, path: str | os.PathLike) -> None:
        """Read what ``save`` wrote into this scheduler.

        Raises:
            AdapterFileError: missing or unreadable files.
            StateError: the state is for other adapters.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        root = Path(path)
        try:
            plain = json.loads((root / STATE_FILE).read_text())
            tensors = load_file(str(root / TENSORS_FILE))
        except (OSError, json.JSONDecodeError, SafetensorError, ValueError) as exc:
            raise AdapterFileError(f"{root} holds no readable schedule state: {exc}") from exc
        self.load_state_dict(_join(plain, tensors))


_TENSOR = "__tensor__"


def _split(value: Any, key: str, tensors: dict[str, Tensor]) -> Any:
    """``value`` with every tensor replaced by a reference into ``tensors``."""
    if isinstance(value, Tensor):
        tensors[key] = value
        return {_TENSOR: key}
    if isinstance(value, Mapping):
        return {str(k): _split(v, f"{key}.{k}" if key else str(k), tensors)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]
    return value


def _join(value: Any, tensors: Mapping[str, Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {_TENSOR}:
            if value[_TENSOR] not in tensors:
                raise AdapterFileError(f"the schedule state lacks tensor {value[_TENSOR]!r}")
            return tensors[value[_TENSOR]]
        return {k: _join(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    return value


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# ------------------------------------------------------------ changing what trains
def _optimizer_states(param: Tensor, optimizer: torch.optim.Optimizer | None) -> list[dict]:
    return [optimizer.state[param]] if optimizer is not None and param in optimizer.state else []


@torch.no_grad()
def remap_parameter(param: nn.Parameter, new: Tensor, *, dim: int, src: Tensor, dst: Tensor,
                    optimizer: torch.optim.Optimizer | None = None) -> None:
    """Give ``param`` the value ``new`` (another size along ``dim``) in place, moving state.

    Slices ``src`` of the old parameter's gradient and optimizer state (every state tensor of
    the parameter's shape: Adam's moments, …) move to slices ``dst`` of the new; the other
    slices start at zero. Scalar state (a step count) is kept. The caller computes ``new``
    itself (typically ``new[dst] = old[src]`` plus freshly initialised slices).

    Args:
        param: the parameter; the same object afterwards (optimizers keep referring to it).
        new: its new value, equal to the old one on every axis but ``dim``.
        dim: the axis that changes size.
        src: indices into the old parameter along ``dim``.
        dst: indices into the new one, as many as ``src``.
        optimizer: whose state to remap (``None``: only the gradient).

    Raises:
        ValueError: shapes differ on another axis, or ``src`` and ``dst`` differ in length.
    """
    old_shape = param.shape
    dim = dim % param.dim()
    if new.dim() != param.dim() or any(a != b for i, (a, b) in enumerate(
            zip(new.shape, old_shape, strict=True)) if i != dim):
        raise ValueError(f"remap_parameter changes one axis ({dim}); {tuple(old_shape)} → "
                         f"{tuple(new.shape)} changes others")
    src, dst = src.to(param.device, torch.long), dst.to(param.device, torch.long)
    if src.shape != dst.shape:
        raise ValueError(f"src and dst must match, got {tuple(src.shape)} and {tuple(dst.shape)}")

    def moved(t: Tensor) -> Tensor:
        out = t.new_zeros(new.shape)
        return out.index_copy_(dim, dst, t.index_select(dim, src))

    for state in _optimizer_states(param, optimizer):
        for key, value in state.items():
            if isinstance(value, Tensor) and value.shape == old_shape and value.dim() > 0:
                state[key] = moved(value)
    grad = None if param.grad is None else moved(param.grad)
    param.grad = None
    new = new.to(device=param.device, dtype=param.dtype)
    if new.shape != old_shape:
        # ``.data =`` keeps autograd's cached gradient accumulator of the leaf when only the
        # shape changes; while a graph is still alive (the last step's ``loss``), the next
        # backward would then expect the old shape. Changing the dtype drops that cache.
        param.data = new.new_empty(0, dtype=torch.float64 if new.dtype != torch.float64
                                   else torch.float32)
    param.data = new
    param.grad = grad


@torch.no_grad()
def mask_parameter(param: nn.Parameter, keep: Tensor,
                   optimizer: torch.optim.Optimizer | None = None) -> None:
    """Zero the entries of ``param`` where ``keep`` is false, and of its optimizer state.

    ``keep`` broadcasts to the parameter's shape (e.g. ``(r, 1)`` masks rows). Adam's moments
    are zeroed too, so a masked entry does not keep moving on momentum alone.
    """
    keep = keep.to(param.device, torch.bool)
    param.masked_fill_(~keep, 0)
    for state in _optimizer_states(param, optimizer):
        for value in state.values():
            if isinstance(value, Tensor) and value.shape == param.shape and value.dim() > 0:
                value.masked_fill_(~keep, 0)


class EntryWarmup:
    """A learning-rate warm-up for entries that join a parameter during training.

    A schedule that grows a parameter (IncreLoRA's new components) registers the new entries
    with ``add``; after each optimizer step, ``apply`` scales the update each such entry just
    received by ``min(1, k / length)``, ``k`` the optimizer steps since it joined:
    ``θ ← θ₀ + w (θ − θ₀)``, with ``θ₀`` the value ``snapshot`` kept after the previous step. For
    an optimizer whose update is proportional to the learning rate (SGD, Adam, AdamW, …) this is
    the entry's own learning rate ramping up linearly from zero, on top of the run's schedule,
    without splitting the parameter into optimizer groups. Entries are ranges along one axis;
    a parameter may grow or be truncated at its end (ranges past the end are clipped), not
    reordered, and the ranges on one parameter must not overlap. In ``Schedule.step`` (right
    after ``optimizer.step()``): ``apply``, then the step's own changes, then ``snapshot``.

    Args:
        length: optimizer steps of the ramp (0: no warm-up; ``add`` records nothing).
    """

    def __init__(self, length: int) -> None:
        self.length = length
        #: ``[key, dim, start, stop, born]`` per warming range.
        self.records: list[list] = []
        self.snapshots: list[Tensor] = []

    def __bool__(self) -> bool:
        return bool(self.records)

    def add(self, key: str, dim: int, start: int, stop: int, step: int) -> None:
        """Entries ``[start, stop)`` along ``dim`` of parameter ``key`` joined at ``step``."""
        if self.length and stop > start:
            self.records.append([key, dim, start, stop, step])

    @torch.no_grad()
    def apply(self, step: int, resolve: Callable[[str], Tensor]) -> None:
        """Scale the update of optimizer step ``step`` on every warming entry (``resolve``
        maps a key to its parameter)."""
        # ranges added since the last ``snapshot`` (at the end of the list) have no update yet
        for (key, dim, start, stop, born), before in zip(self.records, self.snapshots,
                                                          strict=False):
            weight = min(1.0, (step - born) / self.length)
            if weight < 1.0:
                now = resolve(key).detach().narrow(dim, start, stop - start)
                now.copy_(torch.lerp(before.to(now.device, torch.float32), now.float(), weight))

    @torch.no_grad()
    def snapshot(self, step: int, resolve: Callable[[str], Tensor]) -> None:
        """Drop the ranges whose ramp ends with the next step's update (clipping them to their
        parameter's size) and keep the current values of the others."""
        kept, self.snapshots = [], []
        for key, dim, start, stop, born in self.records:
            param = resolve(key)
            stop = min(stop, param.shape[dim])
            if stop <= start or step + 1 - born >= self.length:
                continue
            kept.append([key, dim, start, stop, born])
            self.snapshots.append(param.detach().narrow(dim, start, stop - start).clone())
        self.records = kept

    def state_dict(self) -> dict[str, Any]:
        return {"records": [list(r) for r in self.records], "snapshots": list(self.snapshots)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.records = [[str(k), int(d), int(a), int(b), int(t)]
                        for k, d, a, b, t in state["records"]]
        self.snapshots = [t.clone() for t in state["snapshots"]]


def set_module_fields(model: nn.Module, name: str,
                      fields: Mapping[str, Mapping[str, Any]]) -> None:
    """Record per-module config values (e.g. a grown or pruned ``rank``) for adapter ``name``.

    Each ``{module path: {field: value}}`` becomes an override for that exact module in the
    adapter's config, merged with the override it already matched, so ``save`` writes it and
    ``load`` builds the module with it; each delta's own ``config`` is updated too.

    Raises:
        AdapterNameError: no adapter ``name``.
        ConfigError: a value the method refuses.
    """
    config = adapters(model).get(name)
    if config is None:
        raise AdapterNameError(f"no adapter named {name!r}; the model has {list(adapters(model))}")
    matcher = Matcher(model)
    deltas = {p: layer.deltas[name] for p, layer in delta_layers(model).items()
              if name in layer.deltas}
    before = {p: d.config for p, d in deltas.items()}

    def matched(overrides: dict, path: str) -> dict:
        return next((dict(v) for k, v in overrides.items() if matcher.entry_matches(path, k)), {})

    overrides = dict(config.overrides or {})
    pending = {p: dict(v) for p, v in fields.items()}
    while True:
        for path, values in pending.items():
            current = matched(overrides, path)
            overrides.pop(path, None)
            overrides = {path: {**current, **values}, **overrides}
        # Keys match as dotted-name suffixes ("fc" also matches "inner.fc"): exact-path keys
        # first, deepest first, so each module finds its own entry before a shorter one's.
        exact = sorted((k for k in overrides if k in deltas), key=lambda k: -k.count("."))
        overrides = {**{k: overrides[k] for k in exact}, **overrides}
        new = config.replace(overrides=overrides)
        configs = {p: module_config(matcher, new, p) for p in deltas}  # validates; no change yet
        # A module that now matches another module's new entry keeps its own values.
        pending = {p: {f.name: getattr(before[p], f.name) for f in dataclasses.fields(c)
                       if getattr(c, f.name) != getattr(before[p], f.name)}
                   for p, c in configs.items() if p not in fields and c != before[p]}
        if not pending:
            break
    for path, delta in deltas.items():
        delta.adapter_config = new
        delta.config = configs[path]

__all__ = ["EntryWarmup", "Schedule", "Scheduler", "mask_parameter", "remap_parameter",
           "set_module_fields"]
