"""Per-sample deltas: every row of a batch chooses its own adapters (the punica / S-LoRA idea).

    with dt.per_sample(model, ["sst2", "__base__", ["sst2", "rte"], "rte"]):
        logits = model(input_ids).logits                  # 4 rows, 4 choices, one batch
    logits = model(input_ids, adapter_names=names).logits  # the same, for one call
    out = dt.generate(model, input_ids, adapter_names=names, num_beams=2, max_new_tokens=20)

``names`` has one entry per row: an adapter name, a list of names applied together (as
``dt.activate`` would apply them, in that order), or ``"__base__"`` (``BASE``) for the base
model alone. Row ``i``'s output equals running that row alone with its entry active. ``generate``
(HF validates ``model.generate``'s keyword arguments against ``forward``'s signature, so
``adapter_names`` cannot go there) is the context manager around ``model.generate``; any other
code that calls the model repeatedly works inside the context the same way.

How a layer computes it. At entry every wrapped layer filters each row's choice to the deltas it
holds. A layer where all rows end up with the same deltas runs with those active, on the usual
forward (its fast path included: no gathers, no per-row work). A layer where rows differ runs
its forward *slot by slot*: slot ``j`` is the ``j``-th delta of each row's list; the deltas of a
slot are grouped by the class that computes them together, and each group is one call of that
class's ``Delta.batched_forward`` / ``batched_effect`` / ``batched_pre`` with a ``Selection``:
the group's deltas (``deltas[0] = None`` stands for rows with none of them: identity) and a
per-row index. LoRA (and DoRA, IA3) gather per-row weights from stacks built once and compute
with batched matmuls (``(B, T, in) → (B, T, r) → (B, T, out)``); other methods run each delta on
the rows that chose it (``index_select`` / ``index_copy``: correct, slower); a delta that every
row takes (a shared adapter beside per-row ones) runs its own forward. Sequential, scaling,
input-position, tapped and gated deltas, and ``combine="stack"``, follow the layer's own
semantics row by row.

Rows. A layer whose input has ``k·B`` rows for ``B`` names (beam search and
``num_return_sequences`` repeat each row ``k`` times with ``repeat_interleave``; layers that
flatten ``(B, T)`` to ``B·T`` rows) maps row ``r`` to choice ``r // k``; other counts are an
error. So the first axis of every adapted layer's input must be the batch (as in Hugging Face
models; a sequence-first ``(T, B, …)`` layout would be mapped wrongly).

Caching. A model's per-sample plan is built once per set of distinct row choices and kept (a
few per model) until a lifecycle operation changes the deltas (``DeltaLayer.revision``); the
stacked weights a method builds are kept per layer while the tensors it names keep their data
pointer and version (an in-place optimizer step rebuilds them). Under autograd with trainable
deltas nothing is cached and gradients flow through the gathers.

What cannot be mixed, refused with what to do: merged deltas (unmerge first), deltas active with
combination weights (activate without weights), weight-form deltas (BitFit, LN tuning,
intrinsic …), tokens-form deltas (prompt, prefix) or side networks (LST, QST: they read other
modules' inputs for the whole batch) that differ between rows (give every row the same ones),
nesting the context on one model. Changing which deltas are active inside the context is not
supported: leaving it restores the activation from before.

Threads (``core.concurrency``). A per-sample call or open context has the model to itself: other
threads' calls wait for it, and it waits for theirs; plain calls run together.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .concurrency import Access, CallStack
from .delta import Delta
from .errors import AdapterNameError, StateError
from .layers import DeltaLayer
from .row_mix import LayerMix, plan_ops
from .selection import Selection, batched_impl

#: The reserved name of "no delta: the base model" (refused as an adapter name by ``inject``).
BASE = "__base__"
_ATTR = "_deltatune_per_sample"
_STRUCTURES = 8  # per-sample plans kept per model
_INDICES = 512  # per-row index tensors kept per model


# ------------------------------------------------------------------------------- public API
@contextlib.contextmanager
def per_sample(model: nn.Module, names: Sequence[str | Sequence[str]]) -> Iterator[nn.Module]:
    """Context in which row ``i`` of every batch uses the deltas ``names[i]``.

    Args:
        model: a model with deltas.
        names: one entry per batch row: an adapter name, a list of names applied together, or
            ``"__base__"`` for the base model alone.

    Returns:
        ``model`` (as the context value), whose previous activation is restored on exit.

    Raises:
        AdapterNameError: an unknown or malformed entry; (on a forward) a layer input whose
            row count is not a multiple of ``len(names)``.
        StateError: deltas are merged, combined with weights, or rows differ in weight-form
            or tokens-form deltas; or the context is already open on ``model``.
    """
    state = _state(model)
    state.access.exclusive("a per-sample context")  # other threads' calls wait (concurrency)
    try:
        saved = state.enter(names)
        try:
            yield model
        finally:
            state.exit(saved)
    finally:
        state.access.release_exclusive()


def generate(model: nn.Module, *args: Any, adapter_names: Sequence[str | Sequence[str]],
             **kwargs: Any) -> Any:
    """``model.generate(*args, **kwargs)`` with the deltas ``adapter_names[i]`` for row ``i``.

    Greedy, sampling and beam search (``num_beams``, ``num_return_sequences``: each row's
    expansions use its deltas) on decoder-only and encoder-decoder models.

    Args:
        model: a Hugging Face generation model with deltas.
        adapter_names: one entry per input row, as in ``per_sample``.

    Returns:
        What ``model.generate`` returns.

    Raises:
        AdapterNameError, StateError: as ``per_sample``.
    """
    with per_sample(model, adapter_names):
        return model.generate(*args, **kwargs)


def sync(model: nn.Module) -> None:
    """Install (or remove) the ``adapter_names=`` forward hooks to match the model's deltas and
    drop its cached per-sample plans (called by ``inject`` / ``load`` / ``delete`` /
    ``unload``)."""
    from .lifecycle import delta_layers

    state = model.__dict__.get(_ATTR)
    if delta_layers(model):
        if state is None:
            _state(model)
        else:
            state.reset()
    elif state is not None:
        state.uninstall()
        del model.__dict__[_ATTR]


# ------------------------------------------------------------------------- the model state
class _Call:
    """The open context: each row's distinct-choice id; the index tensors built for such rows
    are kept in ``memo`` (shared by the model's calls, so repeated calls copy nothing to the
    device)."""

    def __init__(self, gids: tuple[int, ...], memo: OrderedDict) -> None:
        self.gids = gids
        self.memo = memo

    def _choices(self, table: tuple[int, ...], n: int) -> list[int]:
        b = len(self.gids)
        if n % b:
            raise AdapterNameError(
                f"a layer got {n} rows for {b} per-sample adapter entries; give one entry per "
                "batch row (generate's beams and num_return_sequences, which repeat every row, "
                "are mapped back; other batch changes are not)")
        repeat = n // b
        return [table[g] for g in self.gids for _ in range(repeat)]

    def index(self, table: tuple[int, ...], n: int, device: torch.device) -> Tensor:
        # inference mode in the key: an inference tensor cannot index under autograd later
        key = (self.gids, table, n, device, torch.is_inference_mode_enabled())
        value = self.memo.get(key)
        if value is None:
            value = self._keep(key, torch.tensor(self._choices(table, n), device=device))
        return value

    def rows(self, table: tuple[int, ...], k: int, n: int, device: torch.device) -> Tensor:
        key = (self.gids, table, k, n, device, torch.is_inference_mode_enabled())
        value = self.memo.get(key)
        if value is None:
            rows = [r for r, c in enumerate(self._choices(table, n)) if c == k]
            value = self._keep(key, torch.tensor(rows, dtype=torch.long, device=device))
        return value

    def _keep(self, key: tuple, value: Tensor) -> Tensor:
        self.memo[key] = value
        while len(self.memo) > _INDICES:
            self.memo.popitem(last=False)
        return value


class _State:
    """Per model: the ``adapter_names=`` hooks, cached plans and stacks, the open context."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.call: _Call | None = None
        #: Who runs the model now, and each thread's (pre-hook → post-hook) entries.
        self.access = Access()
        self._tokens = CallStack()
        self._traced: list[Any] = []  # the same while torch.compile traces (one thread)
        #: ``(DeltaLayer.revision, whether every call must run alone)``: see ``_alone``.
        self._serial: tuple[int, bool] = (-1, False)
        self.reset()

    def reset(self) -> None:
        self.layers: dict[str, DeltaLayer] | None = None
        self.known: frozenset[str] = frozenset()
        self.revision = -1
        self.structures: OrderedDict[tuple, list[tuple[DeltaLayer, tuple]]] = OrderedDict()
        self.stacks: dict[int, OrderedDict] = {}
        self.indices: OrderedDict[tuple, Tensor] = OrderedDict()
        self.before: list[tuple[DeltaLayer, tuple]] | None = None

    # -------------------------------------------------------------------------- hooks
    def install(self) -> None:
        self.model.register_forward_pre_hook(self._pre, with_kwargs=True, prepend=True)
        self.model.register_forward_hook(self._post, always_call=True)

    def uninstall(self) -> None:
        # By key, not through stored handles: a deep-copied handle would still point at the
        # original model's hook dicts.
        m = self.model
        for hooks, extras in ((m._forward_pre_hooks, (m._forward_pre_hooks_with_kwargs,)),
                              (m._forward_hooks, (m._forward_hooks_with_kwargs,
                                                  m._forward_hooks_always_called))):
            for key in [k for k, h in hooks.items() if getattr(h, "__self__", None) is self]:
                del hooks[key]
                for extra in extras:
                    extra.pop(key, None)

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        names = None
        if "adapter_names" in kwargs:
            kwargs = dict(kwargs)
            names = kwargs.pop("adapter_names")
        if torch.compiler.is_compiling():  # traced into a graph: no Python-side gate
            self._traced.append(None if names is None else
                                self.enter(names, rows=_batch_rows(args, kwargs)))
            return args, kwargs
        stack = self._tokens.items
        stack.append(("none", None))  # the post-hook runs even when this one raises
        if names is not None:  # this call alone: it rewrites every layer's plan
            self.access.exclusive("a per-sample call")
            try:
                stack[-1] = ("exclusive", self.enter(names, rows=_batch_rows(args, kwargs)))
            except BaseException:
                self.access.release_exclusive()
                raise
        elif self._alone():
            stack[-1] = ("alone", self.access.alone("a call of this model"))
        else:
            stack[-1] = ("shared", self.access.shared())
        return args, kwargs

    def _post(self, module: nn.Module, args: tuple, output: Any) -> None:
        if torch.compiler.is_compiling():
            saved = self._traced.pop() if self._traced else None
            if saved is not None:
                self.exit(saved)
            return
        stack = self._tokens.items
        if not stack:
            return
        kind, value = stack.pop()
        if kind == "exclusive":
            try:
                self.exit(value)
            finally:
                self.access.release_exclusive()
        elif kind == "alone" and value:
            self.access.release_exclusive()
        elif kind == "shared" and value:
            self.access.release_shared()

    def _alone(self) -> bool:
        """Whether every call must run alone: some delta carries state between the hooks of
        one call (side networks, sub-layer taps; ``core.concurrency``)."""
        revision, alone = self._serial
        if revision != DeltaLayer.revision:
            from .lifecycle import delta_layers

            alone = any(d.taps or d.reads_tap for layer in delta_layers(self.model).values()
                        for d in layer.deltas.values())
            self._serial = (DeltaLayer.revision, alone)
        return alone

    # -------------------------------------------------------------------------- context
    def enter(self, names: Sequence[str | Sequence[str]], rows: int | None = None
              ) -> list[tuple[DeltaLayer, tuple]]:
        """Apply the plan for ``names`` (``rows``: the batch size, checked when known)."""
        if self.call is not None:
            raise StateError("a per-sample context is already open on this model; close it "
                             "first (per_sample contexts and adapter_names= do not nest)")
        self._refresh()
        groups = _groups(names, self.known)
        if rows is not None and rows != len(groups):
            raise AdapterNameError(f"adapter_names has {len(groups)} entries for a batch of "
                                   f"{rows} rows; give one entry per row")
        distinct = tuple(sorted(set(groups)))
        plan = self.structures.get(distinct)
        if plan is None:
            plan = self._build(distinct)
            self.structures[distinct] = plan
            while len(self.structures) > _STRUCTURES:
                self.structures.popitem(last=False)
        else:
            self.structures.move_to_end(distinct)
        if self.before is None:  # the plans outside: unchanged until the revision changes
            self.before = [(layer, layer.plan_state()) for layer in self.layers.values()]
        position = {g: i for i, g in enumerate(distinct)}
        for layer, state in plan:
            layer.set_plan_state(state)
        self.call = _Call(tuple(position[g] for g in groups), self.indices)
        return self.before

    def exit(self, saved: list[tuple[DeltaLayer, tuple]]) -> None:
        for layer, state in reversed(saved):
            layer.set_plan_state(state)
        self.call = None

    def _refresh(self) -> None:
        if self.layers is not None and self.revision == DeltaLayer.revision:
            return
        from .lifecycle import delta_layers

        self.reset()
        self.layers = delta_layers(self.model)
        self.known = frozenset(n for layer in self.layers.values() for n in layer.deltas)
        self.revision = DeltaLayer.revision

    # -------------------------------------------------------------------------- plans
    def _build(self, distinct: tuple[tuple[str, ...], ...]) -> list[tuple[DeltaLayer, tuple]]:
        """Every layer's plan state for these distinct row choices (the model is unchanged)."""
        merged = sorted({n for layer in self.layers.values() for n in layer.merged})
        if merged:
            raise StateError(f"{merged} are merged into the base weights, so rows cannot choose "
                             "other deltas; unmerge them first (deltatune.unmerge(model))")
        out = []
        revision = DeltaLayer.revision
        try:
            for path, layer in self.layers.items():
                if not isinstance(layer.combine, str):
                    raise StateError("the active deltas are combined with weights, which "
                                     "per-sample choices do not apply; activate without "
                                     "weights first (deltatune.activate(model, names))")
                kept = [tuple(dict.fromkeys(n for n in g if n in layer.deltas)) for g in distinct]
                before = layer.plan_state()
                try:
                    if all(k == kept[0] for k in kept):
                        layer.set_active(kept[0])  # every row alike: the usual forward
                    else:
                        layer.__dict__["_mix"] = self._mix(path, layer, kept)
                        layer.set_active(dict.fromkeys(n for k in kept for n in k))
                    out.append((layer, layer.plan_state()))
                finally:
                    layer.set_plan_state(before)
        finally:
            DeltaLayer.revision = revision  # every temporary change above was undone
        return out

    def _mix(self, path: str, layer: DeltaLayer, kept: list[tuple[str, ...]]) -> LayerMix:
        deltas = layer.deltas
        for kind, chosen, why in (
                ("weight-form", lambda d: d.form == "weight", "change the layer's own parameters"),
                ("tokens-form", lambda d: d.form == "tokens", "change the sequence length"),
                ("side-network", lambda d: bool(d.taps),
                 "read other modules' inputs for the whole batch as the model runs")):
            per_row = {tuple(n for n in k if chosen(deltas[n])) for k in kept}
            if len(per_row) > 1:
                methods = sorted({deltas[n].method for k in per_row for n in k})
                raise StateError(
                    f"rows choose different {kind} deltas ({methods}) on {path}; those "
                    f"{why}, so every row of a batch must have the same ones. Give every row "
                    "the same of them (others may differ), or run those rows in separate batches")
        plans = [[deltas[n] for n in k if deltas[n].form == "output"] for k in kept]
        weights = any(deltas[n].form == "weight" for n in kept[0])
        ops = [plan_ops(p, weights, layer.combine) for p in plans]
        stacks = self.stacks.setdefault(id(layer), OrderedDict())
        steps, pres = [], []
        for j in range(max(len(p) for p in plans)):
            groups: dict[tuple, tuple[list, list]] = {}
            inputs: dict[type, tuple[list, list]] = {}
            for g, plan in enumerate(plans):
                if j >= len(plan):
                    continue
                delta, (mode, from_base) = plan[j], ops[g][j]
                impl = batched_impl(type(delta))
                tap = delta.info.tap if delta.reads_tap else None
                _choose(groups.setdefault((impl, mode, from_base, tap),
                                          ([None], [0] * len(plans))), g, delta)
                if delta.transforms_input:
                    _choose(inputs.setdefault(impl, ([None], [0] * len(plans))), g, delta)
            steps.append([(_same(impl, t), mode, base, tap, self._selection(c, t, stacks))
                          for (impl, mode, base, tap), (c, t) in groups.items()])
            pres.append([(_same(impl, t), self._selection(c, t, stacks))
                         for impl, (c, t) in inputs.items()])
        return LayerMix(steps, pres if any(pres) else None)

    def _selection(self, choices: list, table: list, stacks: OrderedDict) -> Selection:
        return Selection(self, tuple(choices), tuple(table), stacks)


class _Same:
    """A group in which every row takes the same delta: its own methods, no gathers."""

    @staticmethod
    def batched_forward(sel: Selection, x: Tensor, y: Tensor) -> Tensor:
        return sel.picked[0].forward(x, y)

    @staticmethod
    def batched_effect(sel: Selection, x: Tensor, y: Tensor) -> Tensor:
        return sel.picked[0].effect(x, y)

    @staticmethod
    def batched_pre(sel: Selection, x: Tensor) -> Tensor:
        return sel.picked[0].pre(x)


def _same(impl: type, table: list[int]) -> type:
    """``_Same`` where every distinct row choice takes choice 1, else ``impl``."""
    return _Same if all(k == 1 for k in table) else impl


def _choose(group: tuple[list, list], g: int, delta: Delta) -> None:
    """Record that distinct row choice ``g`` takes ``delta`` in this group."""
    choices, table = group
    k = next((k for k, known in enumerate(choices) if known is delta), len(choices))
    if k == len(choices):
        choices.append(delta)
    table[g] = k


def _state(model: nn.Module) -> _State:
    state = model.__dict__.get(_ATTR)
    if state is None:
        state = _State(model)
        object.__setattr__(model, _ATTR, state)
        state.install()
    return state


def _groups(names: Sequence[str | Sequence[str]], known: frozenset[str]) -> list[tuple[str, ...]]:
    """Each row's entry as a tuple of names (``()`` for the base), validated."""
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence) or not names:
        raise AdapterNameError(f"per-sample names must be a non-empty list with one entry per "
                               f"batch row (e.g. ['a', '{BASE}', ['a', 'b']]), got {names!r}")
    rows = []
    for entry in names:
        items = (entry,) if isinstance(entry, str) else entry
        if not isinstance(items, Sequence) or not all(isinstance(n, str) for n in items):
            raise AdapterNameError(f"a per-sample entry must be an adapter name, a list of "
                                   f"names or '{BASE}', got {entry!r}")
        items = tuple(items)
        if BASE in items:
            if len(items) != 1:
                raise AdapterNameError(f"'{BASE}' (the base model) cannot be combined with "
                                       f"other names in one entry: {entry!r}")
            items = ()
        for name in items:
            if name not in known:
                raise AdapterNameError(f"no adapter named {name!r}; the model has "
                                       f"{sorted(known)} (and '{BASE}' for the base model)")
        if len(set(items)) != len(items):
            raise AdapterNameError(f"duplicate names in the per-sample entry {entry!r}")
        rows.append(items)
    return rows


def _batch_rows(args: tuple, kwargs: dict) -> int | None:
    """The batch size of a model call: its main input's first axis (``None`` if unknown)."""
    for key in ("input_ids", "inputs_embeds", "pixel_values", "input_values", "x"):
        value = kwargs.get(key)
        if isinstance(value, Tensor) and value.dim():
            return value.shape[0]
    candidates = [*args, *kwargs.values()]
    value = next((v for v in candidates if isinstance(v, Tensor)), None)
    return value.shape[0] if value is not None and value.dim() else None
