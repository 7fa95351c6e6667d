"""What deltas cost: ``summary`` of a model's deltas and ``cost`` of a config before injecting."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .config import DeltaConfig
from .lifecycle import active_adapters, adapters, delta_layers, merged_adapters
from .registry import get_method
from .targeting import Matcher, module_config, resolve_targets


@dataclass(frozen=True)
class AdapterRow:
    """One delta's line in a ``Summary``."""

    name: str
    method: str
    active: bool
    merged: bool
    modules: int
    params: int
    trainable: int


@dataclass(frozen=True)
class Summary:
    """The deltas of a model and its parameter counts; ``str()`` gives a table."""

    rows: tuple[AdapterRow, ...]
    total_params: int
    trainable_params: int

    @property
    def trainable_share(self) -> float:
        """Trainable parameters as a fraction of all parameters."""
        return self.trainable_params / max(self.total_params, 1)

    def __str__(self) -> str:
        header = ("adapter", "method", "active", "merged", "modules", "params", "trainable")
        body = [(r.name, r.method, _yn(r.active), _yn(r.merged), str(r.modules),
                 f"{r.params:,}", f"{r.trainable:,}") for r in self.rows]
        widths = [max(len(x) for x in col) for col in zip(header, *body, strict=False)]
        fmt = "  ".join(f"{{:<{w}}}" if i < 4 else f"{{:>{w}}}" for i, w in enumerate(widths))
        lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*row) for row in body] or ["(no deltas)"]
        lines.append(f"trainable {self.trainable_params:,} of {self.total_params:,} parameters "
                     f"({100 * self.trainable_share:.4f}%)")
        return "\n".join(lines)

    __repr__ = __str__


def _yn(flag: bool) -> str:
    return "yes" if flag else "no"


def summary(model: nn.Module) -> Summary:
    """Table of a model's deltas: method, state, modules, parameters, trainable counts.

    Args:
        model: any model, with or without deltas.

    Returns:
        A ``Summary`` (print it for the table).
    """
    layers = delta_layers(model).values()
    active, merged = set(active_adapters(model)), set(merged_adapters(model))
    rows = []
    for name, config in adapters(model).items():
        deltas = [layer.deltas[name] for layer in layers if name in layer.deltas]
        params = list({id(p): p for d in deltas for p in d.parameters()}.values())
        rows.append(AdapterRow(
            name=name, method=config.method, active=name in active, merged=name in merged,
            modules=len(deltas), params=sum(p.numel() for p in params),
            trainable=sum(p.numel() for p in params if p.requires_grad)))
    unique = {id(p): p for p in model.parameters()}.values()
    return Summary(tuple(rows), sum(p.numel() for p in unique),
                   sum(p.numel() for p in unique if p.requires_grad))


@dataclass(frozen=True)
class Cost:
    """Trainable parameters and bytes a config would add, computed without injecting."""

    params: int
    bytes: int
    modules: int
    base_params: int

    @property
    def share(self) -> float:
        """Added parameters as a fraction of the base model's."""
        return self.params / max(self.base_params, 1)


def cost(model: nn.Module, config: DeltaConfig) -> Cost:
    """Trainable parameter count and bytes of ``config`` on ``model``, without changing it.

    The deltas are built on the ``meta`` device, so nothing is allocated or initialised.

    Raises:
        TargetError / ConfigError: as ``inject`` would.
    """
    from .inject import build_delta, build_shared
    from .ties import tie_deltas

    spec = get_method(config.method)
    cls = spec.delta_class
    config = cls.complete(model, config)
    targets = resolve_targets(model, config, cls.layer_kinds, cls.default_targets, spec.name,
                              cls.accepts)
    matcher = Matcher(model)
    shared = build_shared(cls, config, targets, matcher, device="meta")
    deltas = {path: build_delta(cls, matcher.modules[path], info,
                                module_config(matcher, config, path), path, device="meta",
                                shared=shared)
              for path, info in targets.items()}
    if cls.ties:
        tie_deltas(deltas, matcher)
    unique_new = {id(p): p for delta in deltas.values() for p in delta.parameters()}
    params = sum(p.numel() for p in unique_new.values())
    nbytes = sum(p.numel() * p.element_size() for p in unique_new.values())
    unique = {id(p): p for p in model.parameters()}.values()
    own = {id(p) for layer in delta_layers(model).values() for p in layer.deltas.parameters()}
    base = sum(p.numel() for p in unique if id(p) not in own)
    return Cost(params=params, bytes=nbytes, modules=len(targets), base_params=base)


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of (unique) parameters, optionally only those requiring grad."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique if p.requires_grad or not trainable_only)


__all__ = ["AdapterRow", "Cost", "Summary", "cost", "count_parameters", "summary"]
