"""``DeltaLayer``: the wrapper that holds one base layer and its named deltas.

Injection replaces a module of the model with a ``DeltaLayer`` around it; the model's own code
is untouched and calls the wrapper exactly where it called the layer. Attribute reads the wrapper
does not answer itself (``weight``, ``in_features`` …) fall through to the base layer, so model
code that inspects its layers keeps working.

Forward semantics. Merged deltas live in the base weights; active weight-form deltas add their
``Δθ`` to the base parameters for the call (so they too act on the base layer itself). Active
output-form deltas then apply in activation order: input-position deltas rewrite the input
(``x' = d.pre(x)``, outermost first), and each delta turns the output ``y`` into
``d.forward(x', y)``. How several deltas combine (``combine``):

* ``"sum"`` (default): deltas that read the layer output (sequential forms, ``reads_output``)
  all see the same base output and their effects add; every other delta simply applies in
  order — for additive deltas (LoRA …) that is the sum, for scaling deltas (IA3, SSF) the
  product, exactly what merging them gives;
* ``"stack"``: every delta applies to the output of the previous one (sequential adapters
  stacked, as in AdapterHub's ``Stack``);
* weights ``(w_1, …)``: ``y = y_0 + Σ w_i · effect_i`` over additive-composition deltas (a
  weighted average when the weights sum to one).

A gated delta (``config.gate``) adds ``g(z) · effect`` instead of its effect, ``g`` a learned
per-position scalar of the delta's ``gate_input`` (UniPELT's gates).

The unmerged forward equals the merged one for every combination that can be merged.

Taps. A delta whose target was found through a sub-layer name (``ffn``) may read the sub-layer's
input instead of the layer's (``Delta.reads_tap``): a forward pre-hook on the tap module keeps a
reference to that input for the layer's next call. A delta may also listen to other modules
(``Delta.taps``): a forward pre-hook on each hands their inputs to ``Delta.on_tap`` as the model
runs them, while the delta is live — a side network (``methods.side``) builds its ladder from
the blocks' inputs that way and changes only this layer's output.

Per-sample deltas (``core.per_sample``). Inside ``per_sample(model, names)`` a layer whose rows
all chose the same deltas simply runs with those active (the plan above, fast path included);
a layer whose rows differ gets a ``_mix`` (its plan takes the non-simple branch), which computes
every row with its own deltas in one batched pass. ``plan_state`` / ``set_plan_state`` save and
restore the forward plan around such a context; ``revision`` counts plan changes (lifecycle
operations) so that per-sample plans built before one are rebuilt. Outside such a context
``_mix`` is ``None`` and the forward is the one described above.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .delta import Delta
from .distributed import is_sharded, like
from .geometry import LayerInfo, read_param
from .recompute import lean_inputs


class DeltaLayer(nn.Module):
    """A base layer plus a dict of named deltas.

    Args:
        base_layer: the original module (kept as ``base_layer``, weights untouched).
        info: its geometry.
    """

    #: Incremented whenever any layer's forward plan changes (``refresh``), see ``core.per_sample``.
    revision: ClassVar[int] = 0
    #: The attributes that make up the forward plan (``plan_state``).
    _PLAN_FIELDS: ClassVar[tuple[str, ...]] = (
        "active", "combine", "_plan", "_weight_plan", "_weights", "_live_taps", "_simple", "_mix")

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
        self._weight_plan: tuple[Delta, ...] = ()
        self._simple = True
        #: Tap path -> [hook handle, number of deltas using it]; tapped inputs by path.
        self._taps: dict[str, list] = {}
        self._tapped: dict[str, Tensor] = {}
        self._live_taps: frozenset[str] = frozenset()
        #: Module path -> [hook handle, number of deltas listening] (``Delta.taps``).
        self._listened: dict[str, list] = {}
        #: "sum", "stack", or one weight per active name (see the module docstring).
        self.combine: str | tuple[float, ...] = "sum"
        self._weights: tuple[float, ...] | None = None
        #: Rows of the batch choose different deltas (``core.per_sample``); ``None`` outside.
        self._mix: Any = None
        # state dicts name the base layer's tensors as the unwrapped model does (see below)
        self._register_state_dict_hook(DeltaLayer._base_keys_out)
        self._register_load_state_dict_pre_hook(self._base_keys_in)

    # ----------------------------------------------------------------------------- state
    def add(self, name: str, delta: Delta, tap_module: nn.Module | None = None,
            taps: Mapping[str, nn.Module] | None = None) -> None:
        """Attach ``delta`` under ``name`` (inactive until ``set_active``).

        ``tap_module`` is the module at ``delta.info.tap`` when the delta reads a tap; ``taps``
        maps every path of ``delta.taps`` to its module.
        """
        for path in delta.taps:
            if path not in self._listened:
                handle = taps[path].register_forward_pre_hook(self._make_listen_hook(path),
                                                              with_kwargs=True)
                self._listened[path] = [handle, 0]
            self._listened[path][1] += 1
        if delta.reads_tap:
            tap = delta.info.tap
            if tap not in self._taps:
                handle = tap_module.register_forward_pre_hook(self._make_tap_hook(tap),
                                                              with_kwargs=True)
                self._taps[tap] = [handle, 0]
            self._taps[tap][1] += 1
        self.deltas[name] = delta

    def remove(self, name: str) -> None:
        """Detach the delta ``name`` (it must not be merged)."""
        delta = self.deltas[name]
        del self.deltas[name]
        if delta.reads_tap:
            entry = self._taps[delta.info.tap]
            entry[1] -= 1
            if entry[1] == 0:
                entry[0].remove()
                del self._taps[delta.info.tap]
                self._tapped.pop(delta.info.tap, None)
        for path in delta.taps:
            entry = self._listened[path]
            entry[1] -= 1
            if entry[1] == 0:
                entry[0].remove()
                del self._listened[path]
        self.set_active(n for n in self.active if n != name)

    def release(self) -> None:
        """Remove every tap hook (the layer is being unwrapped)."""
        for handle, _ in [*self._taps.values(), *self._listened.values()]:
            handle.remove()
        self._taps.clear()
        self._tapped.clear()
        self._listened.clear()

    # The hooks are partials of bound methods, not closures: a deep copy (or a pickle) of the
    # model then carries hooks that feed the copied layer, not the original.
    def _make_tap_hook(self, tap: str) -> Callable[..., None]:
        return functools.partial(self._tap_hook, tap)

    def _tap_hook(self, tap: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if tap in self._live_taps and not self.disabled:
            self._tapped[tap] = _first_input(args, kwargs)

    def _make_listen_hook(self, path: str) -> Callable[..., None]:
        return functools.partial(self._listen_hook, path)

    def _listen_hook(self, path: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.disabled:
            for delta in self._plan:
                if path in delta.taps:
                    delta.on_tap(path, _first_input(args, kwargs))

    def set_active(self, names: Iterable[str],
                   combine: str | tuple[float, ...] | None = None) -> None:
        """Make ``names`` (those this layer holds) the active ones, in that order.

        ``combine`` is "sum", "stack" or one weight per name in ``names`` (``None``: keep the
        current mode, falling back to "sum" if it was a weight list).
        """
        names = list(names)
        if combine is None:
            combine = self.combine if isinstance(self.combine, str) else "sum"
        if not isinstance(combine, str):
            by_name = dict(zip(names, combine, strict=True))
            combine = tuple(by_name[n] for n in names if n in self.deltas)
        self.active = tuple(n for n in names if n in self.deltas)
        self.combine = combine
        self.refresh()

    def weight_of(self, name: str) -> float:
        """The combination weight of active delta ``name`` (1 unless weights were set)."""
        if isinstance(self.combine, str):
            return 1.0
        return self.combine[self.active.index(name)]

    def refresh(self) -> None:
        """Recompute the forward plan after a change of active or merged deltas."""
        merged = set(self.merged)
        live = [n for n in self.active if n not in merged]
        self._weight_plan = tuple((self.deltas[n], self.weight_of(n)) for n in live
                                  if self.deltas[n].form == "weight")
        out = [n for n in live if self.deltas[n].form == "output"]  # tokens act per model call
        self._plan = tuple(self.deltas[n] for n in out)
        self._weights = (tuple(self.weight_of(n) for n in out)
                         if not isinstance(self.combine, str) else None)
        self._live_taps = frozenset(d.info.tap for d in self._plan if d.reads_tap)
        sum_needed = (self.combine == "sum"
                      and sum(d.reads_output for d in self._plan) > 1)
        self._simple = not (self._weight_plan or self._live_taps or sum_needed
                            or self._weights is not None or any(d.gated for d in self._plan)
                            or any(d.transforms_input for d in self._plan)
                            or self._mix is not None)
        DeltaLayer.revision += 1

    def plan_state(self) -> tuple:
        """The forward plan (active names, combination, derived plan, per-sample mix)."""
        return tuple(self.__dict__[f] for f in self._PLAN_FIELDS)

    def set_plan_state(self, state: tuple) -> None:
        """Restore a ``plan_state`` (plain attributes: no ``Module.__setattr__`` round trip)."""
        self.__dict__.update(zip(self._PLAN_FIELDS, state, strict=True))

    # ----------------------------------------------------------------------------- forward
    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        plan = self._plan
        if self.disabled or not (plan or self._weight_plan):
            return self.base_layer(x, *args, **kwargs)
        if self._simple:
            if plan[0].fuses_base and len(plan) == 1 and not (args or kwargs):
                y = plan[0].with_base(self.base_layer, x)  # one fused step (kernels/), or None
                if y is not None:
                    return y
            y = self.base_layer(x, *args, **kwargs)
            with lean_inputs(x):  # deltas save a recipe for x, not x (core.recompute)
                for delta in plan:
                    y = delta.forward(x, y)
            return y
        try:
            with lean_inputs(x):
                if self._mix is not None:  # rows choose different deltas (core.per_sample)
                    return self._mix.forward(self, x, args, kwargs)
                return self._compose(x, args, kwargs)
        finally:
            self._tapped.clear()  # never keep activations alive past the call

    def _compose(self, x: Tensor, args: tuple, kwargs: dict) -> Any:
        plan = self._plan
        inputs = [x] * len(plan)  # the input each delta sees: after its own and later pre()s
        for i in range(len(plan) - 1, -1, -1):
            if plan[i].transforms_input:
                x = plan[i].pre(x)
            inputs[i] = x
        y0 = y = self._base(x, args, kwargs)
        weights = self._weights
        summed = self.combine == "sum"
        for i, delta in enumerate(plan):
            xi = self._tap_input(delta) if delta.reads_tap else inputs[i]
            if weights is not None or (summed and delta.reads_output):
                source = y0  # summed deltas all read the base output
            elif delta.gated:
                source = y
            else:
                y = delta.forward(xi, y)
                continue
            effect = delta.effect(xi, source)
            if delta.gated:
                effect = effect * delta.gate(delta.gate_input(xi, source))  # (..., 1) per position
            y = y + (effect if weights is None else weights[i] * effect)
        return y

    def _base(self, x: Tensor, args: tuple, kwargs: dict) -> Any:
        """The base layer, run with the active weight-form deltas added to its parameters."""
        if not self._weight_plan:
            return self.base_layer(x, *args, **kwargs)
        base = self.base_layer
        lean = _lean_linear(base, x, args, kwargs)
        new: dict[str, Tensor] = {}
        summed: Tensor | None = None  # lean: Σ weight · Δ, detached (recomputed in backward)
        for delta, weight in self._weight_plan:
            for key, value in delta.delta_params().items():
                if value is None:
                    continue
                if weight != 1.0:
                    value = weight * value
                if lean and key == "weight":
                    value = value.detach().to(base.weight.dtype)
                    summed = value if summed is None else summed + value
                    continue
                current = new[key] if key in new else read_param(base, key)  # dequantized
                if isinstance(current, Tensor):
                    new[key] = current + value.to(current.dtype)
                else:  # created (a bias the layer lacks): in its parameters' dtype
                    new[key] = value.to(_created_dtype(base, x, value))
        if summed is not None:
            plan = self._weight_plan
            leaves = [p for delta, _ in plan for p in delta.parameters() if p.requires_grad]
            return _LinearWithDelta.apply(
                x, base.weight, summed, new.get("bias", base.bias),
                functools.partial(_weight_sum, plan, base.weight.dtype), *leaves)
        return functional_call(base, new, (x, *args), kwargs, strict=False)

    def _tap_input(self, delta: Delta) -> Tensor:
        value = self._tapped.get(delta.info.tap)
        if value is None:
            raise RuntimeError(
                f"{delta.path}: the sub-layer input tapped at {delta.info.tap!r} was not seen "
                f"before this layer ran; the model does not call {delta.info.tap!r} before "
                f"{delta.path!r}, so target the layer itself instead of its sub-layer name")
        return value

    # ------------------------------------------------------------------------- state dicts
    # ``model.state_dict()`` keeps the base model's own keys for the base layer's tensors
    # (``q_proj.weight``, not ``q_proj.base_layer.weight``), the deltas' beside them
    # (``q_proj.deltas.<name>.…``): a checkpoint of an adapted model (``save_pretrained``, the
    # HF Trainer's) loads into the unadapted model as its base (merged deltas included), and
    # back into an adapted one whole. Loading accepts both spellings.
    @staticmethod
    def _base_keys_out(module: nn.Module, state: dict, prefix: str, metadata: Any) -> None:
        inner = prefix + "base_layer."
        for key in [k for k in state if k.startswith(inner)]:
            state[prefix + key[len(inner):]] = state.pop(key)

    def _base_keys_in(self, state: dict, prefix: str, *args: Any) -> None:
        own = (prefix + "base_layer.", prefix + "deltas.")
        tensors = None
        for key in [k for k in state if k.startswith(prefix) and not k.startswith(own)]:
            value = state.pop(key)
            if tensors is None:
                tensors = dict(self.base_layer.state_dict(keep_vars=True))
            target = tensors.get(key[len(prefix):])
            if isinstance(value, Tensor) and target is not None and is_sharded(target) \
                    and not is_sharded(value):  # a whole tensor for an FSDP2 shard
                value = like(value, target)
            state[own[0] + key[len(prefix):]] = value

    # ----------------------------------------------------------------------------- access
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if (name in ("base_layer", "deltas") or "_modules" not in self.__dict__
                    or name.startswith("__")):  # protocols (``__deepcopy__`` …) are the wrapper's
                raise
            return getattr(self._modules["base_layer"], name)

    def extra_repr(self) -> str:
        merged = f", merged={self.merged}" if self.merged else ""
        if self.combine != "sum":
            merged += f", combine={self.combine}"
        return f"active={list(self.active)}{merged}"


def _lean_linear(base: nn.Module, x: Tensor, args: tuple, kwargs: dict) -> bool:
    """Whether a weight-form delta on ``base`` runs through ``_LinearWithDelta``: a plain
    ``nn.Linear`` called with one input while autograd records (outside autocast)."""
    return (type(base) is nn.Linear and not args and not kwargs and torch.is_grad_enabled()
            and x.is_floating_point() and not torch.is_autocast_enabled(x.device.type))


def _created_dtype(base: nn.Module, x: Tensor, value: Tensor) -> torch.dtype:
    """The dtype of a parameter a weight-form delta creates on ``base`` for the forward: its
    floating-point parameters' (a norm under autocast takes fp32 weight and bias together, not
    one of them in the activation dtype), else the input's, else the delta's own."""
    own = next((p.dtype for p in base.parameters() if p.is_floating_point()), None)
    return own or (x.dtype if x.is_floating_point() else value.dtype)


def _weight_sum(plan: Sequence[tuple[Delta, float]], dtype: torch.dtype) -> Tensor:
    """``Σ weight · Δ_W`` of the weight-form deltas in ``plan``, in the base weight's dtype."""
    total: Tensor | None = None
    for delta, weight in plan:
        value = delta.delta_params().get("weight")
        if value is None:
            continue
        value = (value if weight == 1.0 else weight * value).to(dtype)
        total = value if total is None else total + value
    assert total is not None  # the caller saw a weight entry
    return total


class _LinearWithDelta(torch.autograd.Function):
    """``F.linear(x, W + Δ, b)`` whose backward keeps ``x`` and ``W`` only: ``Δ`` is recomputed
    there from the deltas' own parameters (``make``; a leaf ``ΔW`` as it is, a sparse delta's
    scatter of its values) and so is ``W + Δ`` (an elementwise add). A weight-form delta on a
    Linear layer (a full ``ΔW``, a scattered sparse one) then keeps no weight-sized tensor in
    activation memory per layer. Gradients are those of the plain composition; the deltas'
    parameters (``leaves``) get theirs by back-propagating ``∂L/∂Δ`` through the recomputed
    ``Δ``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, delta: Tensor, bias: Tensor | None,
                make: Callable[[], Tensor], *leaves: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.make, ctx.leaves = make, leaves
        return F.linear(x, weight + delta, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        train_leaves = any(needs[5:])
        with torch.enable_grad() if train_leaves else torch.no_grad():
            delta = ctx.make()
        grad_x = grad_w = grad_b = None
        if needs[0]:
            grad_x = grad @ (weight + delta.detach())  # (..., in)
        flat = grad.reshape(-1, grad.shape[-1])  # (N, out)
        if needs[1] or needs[2] or train_leaves:
            grad_w = flat.t() @ x.reshape(-1, x.shape[-1])  # (out, in)
        if needs[3]:
            grad_b = flat.sum(0)
        leaf_grads: tuple[Tensor | None, ...] = (None,) * len(ctx.leaves)
        if train_leaves:
            wanted = [p for p, n in zip(ctx.leaves, needs[5:], strict=True) if n]
            got = iter(torch.autograd.grad(delta, wanted, grad_w.to(delta.dtype),
                                           allow_unused=True))
            leaf_grads = tuple(next(got) if n else None for n in needs[5:])
        ctx.make = ctx.leaves = None
        return (grad_x, grad_w if needs[1] else None, grad_w if needs[2] else None, grad_b,
                None, *leaf_grads)


def _first_input(args: tuple, kwargs: dict) -> Tensor | None:
    """A module call's main input: the first positional argument, else ``hidden_states``,
    else the first tensor among the keyword arguments."""
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    return next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
