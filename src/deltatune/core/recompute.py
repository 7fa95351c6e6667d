"""Deltas keep no copy of their layer's input: it is recomputed in backward from what the
base model's autograd graph keeps anyway.

A frozen linear layer keeps only its weight for backward (``∂L/∂x = g W``); a delta beside it
needs its input too (LoRA's ``∂L/∂A = (s Bᵀ g)ᵀ x``), and on a Llama block the inputs of the
adapted layers are activations nobody else keeps: the two RMSNorm outputs and the SwiGLU
product ``silu(gate) · up`` (the attention output is a view of what attention keeps); on BERT,
ViT or GPT-2, the GELU output. LoRA on every linear layer of Llama then keeps 1.3× the frozen
model's activations. Each of those inputs is one cheap elementwise step from tensors the graph
does keep (the norm's ``h · rsqrt(…)`` operands, the product's two factors, GELU's input), so
deltas save a *recipe* instead of the tensor.

``lean_inputs(x)`` returns a context in which every tensor autograd saves that is ``x`` (or a
reshape of it) is packed as that recipe; any other tensor is saved as usual (its in-place
modification check kept). A recipe re-runs the very operators ``x.grad_fn`` recorded —
elementwise products, activations that keep their input (GELU, SiLU), dtype casts to the dtype
the node recorded — on the very tensors those nodes saved, so it reproduces ``x`` bit for bit
at any shape; it is also checked against ``x`` once per graph shape (node kinds and dtypes)
and never used if it differs. In backward ``x`` is recomputed once for all the deltas reading
it and dropped after the last. Gradients are bit-identical to saving ``x``.

It stands aside (``x`` is saved as usual) when autograd does not record, inside
``torch.compile`` (its partitioner makes this choice there), under other saved-tensor hooks
(activation checkpointing, offloading), where ``x`` has no recipe, and inside
``saving_inputs()``.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.graph import saved_tensors_hooks

__all__ = ["lean_inputs", "saving_inputs"]

_state = threading.local()
_NULL = contextlib.nullcontext()
_MAX_DEPTH = 4
#: graph shape → whether its recipe reproduced ``x`` bit for bit (checked once per shape)
_VERIFIED: dict[tuple, bool] = {}
_top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
_hooks_enabled = getattr(torch._C._autograd, "_saved_tensors_hooks_is_enabled", None)


@contextlib.contextmanager
def saving_inputs() -> Iterator[None]:
    """Within, deltas save their input as plain autograd does (for comparisons)."""
    previous = getattr(_state, "off", False)
    _state.off = True
    try:
        yield
    finally:
        _state.off = previous


class _Recipe:
    """Recomputes one activation from tensors its graph keeps; shared by every delta reading
    it, the value is computed once in backward and dropped after its last reader."""

    __slots__ = ("__weakref__", "fn", "read", "readers", "value")

    def __init__(self, fn: Callable[[], Tensor]) -> None:
        self.fn, self.readers, self.read, self.value = fn, 0, 0, None

    def get(self) -> Tensor:
        value = self.value
        if value is None:
            with torch.no_grad():
                value = self.fn()
        self.read += 1
        self.value = value if self.read < self.readers else None
        return value


def _saved(node: Any, attr: str) -> Callable[[], Tensor]:
    return lambda: getattr(node, attr)  # unpacked when called: autograd checks its version


def _mul(node: Any, depth: int, sig: list) -> Callable[[], Tensor] | None:
    parts = []
    for i, attr in enumerate(("_saved_self", "_saved_other")):
        saved = getattr(node, attr)
        if isinstance(saved, Tensor):
            parts.append(_saved(node, attr))
            sig.append(saved.dtype)
            continue
        child = node.next_functions[i][0]
        part = None if child is None else _build(child, depth + 1, sig)
        if part is None:
            return None
        parts.append(part)
    a, b = parts
    return lambda: a() * b()


def _to_copy(node: Any, depth: int, sig: list) -> Callable[[], Tensor] | None:
    dtype = node._input_metadata[0].dtype  # the cast's output: the node's gradient's metadata
    child = node.next_functions[0][0]
    part = None if child is None else _build(child, depth + 1, sig)
    return None if part is None else (lambda: part().to(dtype))


def _activation(fn: Callable[..., Tensor], *options: str):
    """An activation whose node keeps its input (``_saved_self``): applied to it again."""
    def rule(node: Any, depth: int, sig: list) -> Callable[[], Tensor] | None:
        saved = node._saved_self
        if not isinstance(saved, Tensor):
            return None
        kwargs = {k: getattr(node, f"_saved_{k}") for k in options}
        sig += (saved.dtype, *kwargs.values())
        return lambda: fn(node._saved_self, **kwargs)
    return rule


_RULES = {"MulBackward0": _mul, "ToCopyBackward0": _to_copy,
          "GeluBackward0": _activation(F.gelu, "approximate"),
          "SiluBackward0": _activation(F.silu)}


def _build(node: Any, depth: int, sig: list) -> Callable[[], Tensor] | None:
    """A function recomputing ``node``'s output from tensors saved in the graph below it (on
    its way, ``sig`` gets the graph's shape: node names, output and saved dtypes), or
    ``None``."""
    rule = _RULES.get(type(node).__name__)
    if rule is None or depth > _MAX_DEPTH:
        return None
    sig += (type(node).__name__, node._input_metadata[0].dtype)
    return rule(node, depth, sig)


def _recipe_for(x: Tensor) -> _Recipe | None:
    sig: list = [x.device.type]
    try:
        fn = _build(x.grad_fn, 0, sig)
    except (RuntimeError, AttributeError, IndexError):  # freed, not unpackable, no metadata
        return None
    if fn is None:
        return None
    key = tuple(sig)
    ok = _VERIFIED.get(key)
    if ok is None:  # once per graph shape: the recipe reproduces x bit for bit, or is not used
        with torch.no_grad():
            value = fn()
        ok = _VERIFIED[key] = (value.dtype == x.dtype and value.shape == x.shape and bool(
            torch.allclose(value, x, rtol=0.0, atol=0.0, equal_nan=True)))  # bit for bit
    return _Recipe(fn) if ok else None


class _Lean:
    """The saved-tensor hooks of one input ``x``."""

    __slots__ = ("ptr", "recipe", "version", "x")

    def __init__(self, x: Tensor, recipe: _Recipe) -> None:
        self.x = weakref.ref(x)
        self.ptr = x.data_ptr()
        self.version = x._version  # x changed in place since: not what the recipe gives
        self.recipe = recipe

    def pack(self, t: Tensor) -> Any:
        x = self.x()
        if (x is not None and t.data_ptr() == self.ptr and t.dtype == x.dtype
                and t.numel() == x.numel() and t.is_contiguous()
                and t._version == self.version):
            self.recipe.readers += 1
            return (self.recipe, t.shape)
        return (t.detach(), t._version)

    @staticmethod
    def unpack(packed: tuple) -> Tensor:
        first, second = packed
        if isinstance(first, _Recipe):
            return first.get().view(second)
        if first._version != second:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an "
                f"inplace operation: a tensor of shape {tuple(first.shape)} saved by a delta is "
                f"at version {first._version}; expected version {second} instead")
        return first


#: the last input seen and its recipe (q, k, v share one input: one recipe), both weakly held
_last: tuple[weakref.ref, weakref.ref | None] | None = None


def lean_inputs(x: Any) -> contextlib.AbstractContextManager:
    """A context in which autograd saves ``x`` as a recipe to recompute it (see the module
    docstring); a no-op context where that does not apply."""
    global _last
    if (torch.compiler.is_compiling() or not isinstance(x, Tensor) or x.grad_fn is None
            or not torch.is_grad_enabled() or not x.is_contiguous()
            or getattr(_state, "off", False)
            or _top_hooks is None or _top_hooks(True) is not None
            or (_hooks_enabled is not None and not _hooks_enabled())):
        return _NULL
    last = _last
    seen = last is not None and last[0]() is x
    recipe = last[1]() if seen and last[1] is not None else None
    if not seen or (last[1] is not None and recipe is None):
        recipe = _recipe_for(x)
        _last = (weakref.ref(x), None if recipe is None else weakref.ref(recipe))
    if recipe is None:
        return _NULL
    lean = _Lean(x, recipe)
    return saved_tensors_hooks(lean.pack, lean.unpack)
