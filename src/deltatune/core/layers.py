"""``DeltaLayer``: the wrapper that holds one base layer and its named deltas.

Injection replaces a module of the model with a ``DeltaLayer`` around it; the model's own code
is untouched and calls the wrapper exactly where it called the layer. Attribute reads the wrapper
does not answer itself (``weight``, ``in_features`` …) fall through to the base layer, so model
code that inspects its layers keeps working.

Forward semantics. Active deltas apply in activation order, each one transforming the layer
function: a delta ``d`` turns ``f`` into ``x ↦ d.forward(x', f(x'))`` with ``x' = d.pre(x)``.
Merged deltas live in the base weights and come first. Additive deltas therefore simply sum,
and the unmerged forward always equals the merged one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from .delta import Delta
from .geometry import LayerInfo


class DeltaLayer(nn.Module):
    """A base layer plus a dict of named deltas.

    Args:
        base_layer: the original module (kept as ``base_layer``, weights untouched).
        info: its geometry.
    """

    def __init__(self, base_layer: nn.Module, info: LayerInfo) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.deltas = nn.ModuleDict()
        self.info = info
        #: Names in activation order (merged ones included: their effect is in the weights).
        self.active: tuple[str, ...] = ()
        #: Names folded into the base weights, in merge order.
        self.merged: list[str] = []
        #: Base parameters a merge created (e.g. a bias), by delta name, removed on unmerge.
        self.created: dict[str, list[str]] = {}
        self.disabled = False
        self._plan: tuple[Delta, ...] = ()
        self._post_only = True

    # ----------------------------------------------------------------------------- state
    def add(self, name: str, delta: Delta) -> None:
        """Attach ``delta`` under ``name`` (inactive until ``set_active``)."""
        self.deltas[name] = delta

    def remove(self, name: str) -> None:
        """Detach the delta ``name`` (it must not be merged)."""
        del self.deltas[name]
        self.set_active(n for n in self.active if n != name)

    def set_active(self, names: Iterable[str]) -> None:
        """Make ``names`` (those this layer holds) the active ones, in that order."""
        self.active = tuple(n for n in names if n in self.deltas)
        self.refresh()

    def refresh(self) -> None:
        """Recompute the forward plan after a change of active or merged deltas."""
        merged = set(self.merged)
        self._plan = tuple(self.deltas[n] for n in self.active if n not in merged)
        self._post_only = not any(d.transforms_input for d in self._plan)

    # ----------------------------------------------------------------------------- forward
    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        plan = self._plan
        if not plan or self.disabled:
            return self.base_layer(x, *args, **kwargs)
        if self._post_only:
            y = self.base_layer(x, *args, **kwargs)
            for delta in plan:
                y = delta.forward(x, y)
            return y
        return self._compose(len(plan), x, args, kwargs)

    def _compose(self, n: int, x: Tensor, args: tuple, kwargs: dict) -> Any:
        if n == 0:
            return self.base_layer(x, *args, **kwargs)
        delta = self._plan[n - 1]
        if delta.transforms_input:
            x = delta.pre(x)
        return delta.forward(x, self._compose(n - 1, x, args, kwargs))

    # ----------------------------------------------------------------------------- access
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "deltas") or "_modules" not in self.__dict__:
                raise
            return getattr(self._modules["base_layer"], name)

    def extra_repr(self) -> str:
        merged = f", merged={self.merged}" if self.merged else ""
        return f"active={list(self.active)}{merged}"
