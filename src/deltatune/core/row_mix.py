"""The forward of one layer whose batch rows chose different deltas (``core.per_sample``
builds it; ``DeltaLayer`` runs it as ``_mix``): slot by slot, each group of deltas computed
together by its class's ``batched_forward`` / ``batched_effect`` / ``batched_pre``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from .delta import Delta
from .selection import Selection

if TYPE_CHECKING:
    from .layers import DeltaLayer


class LayerMix:
    """The forward of one layer whose rows chose different deltas (``DeltaLayer._mix``).

    ``steps[j]``: the groups of slot ``j`` as ``(impl, mode, from_base, tap, selection)``;
    ``pres[j]``: ``(impl, selection)`` of slot ``j``'s input transforms (``None``: none).
    """

    def __init__(self, steps: list[list[tuple]], pres: list[list[tuple]] | None) -> None:
        self.steps = steps
        self.pres = pres
        first = steps[0][0] if len(steps) == 1 and len(steps[0]) == 1 else None
        self.only = (first[0], first[4]) if (pres is None and first is not None
                                             and first[1] == "forward" and first[3] is None) \
            else None

    def forward(self, layer: DeltaLayer, x: Tensor, args: tuple, kwargs: dict) -> Tensor:
        steps, pres = self.steps, self.pres
        if self.only is not None:  # the common case: one batched call (e.g. LoRAs)
            impl, sel = self.only
            return impl.batched_forward(sel, x, layer._base(x, args, kwargs))
        inputs = None
        if pres is not None:  # the input each slot sees: after its own and later pre()s
            inputs = [x] * len(steps)
            for j in range(len(steps) - 1, -1, -1):
                for impl, sel in pres[j]:
                    x = impl.batched_pre(sel, x)
                inputs[j] = x
        y0 = y = layer._base(x, args, kwargs)
        for j, groups in enumerate(steps):
            xj = x if inputs is None else inputs[j]
            for impl, mode, from_base, tap, sel in groups:
                xi = layer._tap_input(sel.deltas[1]) if tap else xj
                if mode == "forward":
                    y = impl.batched_forward(sel, xi, y)
                elif mode == "effect":
                    y = y + impl.batched_effect(sel, xi, y0)
                else:
                    y = _gated(sel, xi, y0 if from_base else y, y)
        return y


def _gated(sel: Selection, x: Tensor, source: Tensor, y: Tensor) -> Tensor:
    """Gated deltas on their rows: ``y + g(z) · effect`` as ``DeltaLayer`` computes it."""
    for k, delta in sel.chosen():
        rows = sel.rows(k, x)
        xr, sr = x.index_select(0, rows), source.index_select(0, rows)
        effect = delta.effect(xr, sr) * delta.gate(delta.gate_input(xr, sr))
        y = y.index_add(0, rows, effect.to(y.dtype))
    return y


def plan_ops(plan: list[Delta], weights: bool, combine: str) -> list[tuple[str, bool]]:
    """``(mode, from_base)`` of each delta of one row's plan, as ``DeltaLayer`` runs it."""
    sum_needed = combine == "sum" and sum(d.reads_output for d in plan) > 1
    simple = not (weights or sum_needed or any(d.reads_tap or d.gated or d.transforms_input
                                               for d in plan))
    if simple:
        return [("forward", False)] * len(plan)
    summed = combine == "sum"
    out = []
    for d in plan:
        if summed and d.reads_output:
            out.append(("gated" if d.gated else "effect", True))
        else:
            out.append(("gated" if d.gated else "forward", False))
    return out


__all__ = ["LayerMix", "plan_ops"]
