"""What a method's batched per-sample code sees: a ``Selection`` (which of a group of deltas
each row of the batch uses, with a cache for stacked weights) and the helpers built on it.

The per-sample machinery (``core.per_sample``) builds selections; methods implement
``Delta.batched_forward`` / ``batched_effect`` / ``batched_pre`` against them (LoRA, DoRA and IA3
gather per-row weights; ``each_delta`` is the generic row-group fallback).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from .delta import Delta

_STACKS = 8  # batched stacks kept per layer
_BATCHED = ("batched_forward", "batched_effect", "batched_pre")


class _Rows(Protocol):
    """The current call's row bookkeeping (``per_sample._Call``)."""

    def index(self, table: tuple[int, ...], n: int, device: torch.device) -> Tensor: ...

    def rows(self, table: tuple[int, ...], k: int, n: int, device: torch.device) -> Tensor: ...


class _HasCall(Protocol):
    call: _Rows


class Selection:
    """Which of a group of deltas (one layer, one slot) each row of the batch uses.

    Attributes:
        deltas: the choices; ``deltas[0]`` is ``None`` (rows with none of these deltas here).
    """

    def __init__(self, state: _HasCall, deltas: tuple[Delta | None, ...], table: tuple[int, ...],
                 stacks: OrderedDict) -> None:
        self.deltas = deltas
        #: The real choices ``deltas[1:]``.
        self.picked: tuple[Delta, ...] = tuple(d for d in deltas if d is not None)
        self._table = table  # distinct row choice -> position in ``deltas``
        self._state = state
        self._stacks = stacks  # the layer's cache of batched stacks
        self._ids = tuple(id(d) for d in deltas)
        self._watched: dict[str, tuple[tuple, list[Tensor]]] = {}

    def chosen(self) -> list[tuple[int, Delta]]:
        """``(k, delta)`` for every real choice (``k >= 1``)."""
        return [(k, d) for k, d in enumerate(self.deltas) if d is not None]

    def index(self, x: Tensor) -> Tensor:
        """``(N,)`` long on ``x``'s device: each of ``x``'s ``N`` rows' position in ``deltas``."""
        return self._state.call.index(self._table, x.shape[0], x.device)

    def rows(self, k: int, x: Tensor) -> Tensor:
        """The rows of ``x`` that chose ``deltas[k]`` (long, on ``x``'s device)."""
        return self._state.call.rows(self._table, k, x.shape[0], x.device)

    def cached(self, tag: str, build: Callable[[], Any], *, like: Tensor,
               watch: Callable[[Delta], Iterable[Tensor | None]]) -> Any:
        """``build()``, kept while every tensor ``watch(delta)`` names (for each choice) keeps its
        data pointer and version, for ``like``'s dtype and device; rebuilt every call when
        autograd needs them (a watched tensor requires grad and grad mode is on)."""
        entry = self._watched.get(tag)
        if entry is None:
            watched = [t for d in self.picked for t in watch(d) if t is not None]
            entry = self._watched[tag] = ((tag, self._ids), watched)
        prefix, watched = entry
        if torch.is_grad_enabled() and any([t.requires_grad for t in watched]):
            return build()
        # A device change moves the watched tensors (new data pointers), so it rebuilds too.
        version = tuple([(t.data_ptr(), t._version) for t in watched])
        key = (prefix, like.dtype, torch.is_inference_mode_enabled())
        hit = self._stacks.get(key)
        if hit is not None and hit[0] == version:
            return hit[1]
        with torch.no_grad():
            value = build()
        self._stacks[key] = (version, value)
        self._stacks.move_to_end(key)
        while len(self._stacks) > _STACKS:
            self._stacks.popitem(last=False)
        return value


def each_delta(sel: Selection, kind: str, x: Tensor, y: Tensor) -> Tensor:
    """The generic per-sample computation: each delta on the rows that chose it.

    ``kind``: "forward" (rows keep ``y`` where they chose none), "effect" (zero there) or
    "pre" (``x`` unchanged there; ``y`` is ignored).
    """
    out = torch.zeros_like(y) if kind == "effect" else (x if kind == "pre" else y)
    for k, delta in sel.chosen():
        rows = sel.rows(k, x)
        xr = x.index_select(0, rows)
        if kind == "pre":
            new = delta.pre(xr)
        else:
            yr = y.index_select(0, rows)
            new = delta.forward(xr, yr) if kind == "forward" else delta.effect(xr, yr)
        out = out.index_copy(0, rows, new.to(out.dtype))
    return out


def stack_rows(rows: Sequence[Tensor | None], fill: float, like: Tensor) -> Tensor:
    """``(1 + n, C)`` in ``like``'s dtype and device: row 0 and rows for ``None`` are ``fill``,
    row ``k`` is ``rows[k - 1]`` (a helper for per-channel vectors: IA3, DoRA)."""
    size = next(r.shape[-1] for r in rows if r is not None)
    out = like.new_full((1 + len(rows), size), fill)
    for k, row in enumerate(rows, 1):
        if row is not None:
            out[k] = row.to(like.dtype)
    return out


def per_row(table: Tensor, index: Tensor, like: Tensor) -> Tensor:
    """``table[index]`` shaped ``(N, 1, …, C)`` to broadcast against ``like`` ``(N, …, C)``."""
    gathered = table.index_select(0, index)  # (N, C)
    return gathered.view(gathered.shape[0], *(1,) * (like.dim() - 2), gathered.shape[-1])


def batched_impl(cls: type[Delta]) -> type[Delta]:
    """The class whose ``batched_*`` computes deltas of ``cls`` together: the class defining
    its batched implementation, or ``Delta`` (the generic one) if a subclass overrode one of
    the methods that implementation relies on (``Delta.batched_reads``)."""
    impl = _IMPLS.get(cls)
    if impl is None:
        mro = cls.__mro__
        owner = next(k for k in mro if any(name in vars(k) for name in _BATCHED))
        below = mro[:mro.index(owner)]
        changed = any(name in vars(k) for k in below for name in owner.batched_reads)
        impl = _IMPLS[cls] = Delta if changed else owner
    return impl


_IMPLS: dict[type, type] = {}


__all__ = ["Selection", "batched_impl", "each_delta", "per_row", "stack_rows"]
