"""Tokens-form deltas: keep a model call consistent with a longer sequence.

Prompt tuning prepends ``n`` soft tokens to the input embeddings; prefix tuning prepends ``n``
keys and values to every attention. Neither can act inside one layer: the model's other inputs
must grow with the sequence. While a tokens-form delta is attached, a forward pre-hook on the
model (and, for encoder-decoder models, on the encoder, which ``generate`` calls directly) runs
each active method's ``Delta.prepare_call`` once per call, then extends the inputs that index
the sequence:

* ``attention_mask`` (2-D): ``n`` ones before it, at every call — the cache of a generation
  holds the extra positions too;
* when the call embeds the input (no cache yet, or the encoder runs), for prompts: ``labels``
  aligned with the input get ``-100`` (no loss on soft tokens), ``token_type_ids`` zeros;
* ``position_ids`` / ``cache_position`` (when given; decoder-only models): soft tokens take the
  first positions and the real ones follow; prefixes sit before position 0, so given positions
  shift by ``n`` exactly as the positions the model derives from the cache length do.

Outputs keep the extra positions (logits for the soft tokens come first), as in HF peft.
The model's own code is never edited; plain ``nn.Module`` models work when they take
``input_ids`` / ``inputs_embeds`` / ``attention_mask`` keyword arguments like Hugging Face's.
"""

from __future__ import annotations

import inspect
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .concurrency import CallStack
from .errors import TargetError

if TYPE_CHECKING:
    from .delta import Delta
    from .layers import DeltaLayer

_HOOK_ATTR = "_deltatune_sequence"
#: Set while a hooked call runs, so that nested hooked modules (the encoder inside an
#: encoder-decoder model) do not act twice.
_INSIDE: ContextVar[bool] = ContextVar("deltatune_sequence_inside", default=False)


@dataclass
class TokenCall:
    """One model call as tokens-form deltas see it.

    Attributes:
        model: the hooked module (the model, or its encoder).
        kwargs: the call's arguments, all by name; methods rewrite them.
        embeds_input: whether this call embeds the input sequence (prompts are prepended now)
            — false for decoding steps over a cache and for decoder calls that reuse
            ``encoder_outputs``.
        decoder_only: positions and labels follow the input (causal LMs, encoders); false
            for encoder-decoder models, whose labels and positions belong to the decoder.
        inputs: soft tokens prepended to the input sequence (methods add to it).
        keys: key/value tokens prepended to every attention (methods add to it).
    """

    model: nn.Module
    kwargs: dict[str, Any]
    embeds_input: bool
    decoder_only: bool
    inputs: int = 0
    keys: int = 0
    _layers: dict[int, DeltaLayer] = field(default_factory=dict, repr=False)

    def layer_of(self, delta: Delta) -> DeltaLayer:
        """The wrapper holding ``delta`` (e.g. the input embedding a prompt lives on)."""
        return self._layers[id(delta)]

    @property
    def batch_size(self) -> int:
        ids, embeds = self.kwargs.get("input_ids"), self.kwargs.get("inputs_embeds")
        source = ids if ids is not None else embeds
        if source is None:
            raise TargetError(f"{type(self.model).__name__} was called without input_ids or "
                              "inputs_embeds; tokens-form deltas (prompt, prefix) need one")
        return source.shape[0]

    def input_embeddings(self, embedding: nn.Module) -> Tensor:
        """The input as embeddings ``(B, T, d)``: ``inputs_embeds``, or ``embedding(input_ids)``
        (which then replaces ``input_ids`` in the call)."""
        embeds = self.kwargs.get("inputs_embeds")
        if embeds is None:
            ids = self.kwargs.get("input_ids")
            if ids is None:
                raise TargetError(f"{type(self.model).__name__} was called without input_ids or "
                                  "inputs_embeds; prompt tuning needs one")
            embeds = embedding(ids)
            self.kwargs["input_ids"] = None
        return embeds

    def cache(self) -> Any:
        """The key/value cache passed to the call (``past_key_values``), or ``None``."""
        return self.kwargs.get("past_key_values")

    def finish(self) -> None:
        """Extend the inputs that index the sequence (see the module docstring)."""
        kw, n_in, n_kv = self.kwargs, self.inputs, self.keys
        added = n_in + n_kv
        mask = kw.get("attention_mask")
        if mask is not None and added:
            if not isinstance(mask, Tensor) or mask.dim() != 2:
                raise TargetError("tokens-form deltas (prompt, prefix) need a 2-D attention_mask "
                                  "(batch, length); pass the padding mask, not a 4-D one")
            kw["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], added), mask], 1)
        if not self.decoder_only:
            return
        if self.embeds_input and n_in:
            labels = kw.get("labels")
            if isinstance(labels, Tensor) and labels.dim() >= 2:
                pad = labels.new_full((labels.shape[0], n_in, *labels.shape[2:]), -100)
                kw["labels"] = torch.cat([pad, labels], 1)
            types = kw.get("token_type_ids")
            if isinstance(types, Tensor):
                kw["token_type_ids"] = torch.cat([types.new_zeros(types.shape[0], n_in), types], 1)
        for key in ("position_ids", "cache_position"):
            value = kw.get(key)
            if isinstance(value, Tensor) and added:
                shifted = value + added
                if self.embeds_input and n_in:
                    first = torch.arange(n_kv, added, device=value.device, dtype=value.dtype)
                    first = first.expand(*value.shape[:-1], n_in)
                    shifted = torch.cat([first, shifted], -1)
                kw[key] = shifted


class _Hook:
    """The pre/post hook pair on one module; ``layers`` hold the tokens-form deltas."""

    def __init__(self, root: nn.Module, module: nn.Module, encoder: bool) -> None:
        self.root, self.module, self.encoder = root, module, encoder
        self.layers: list[DeltaLayer] = []
        self._tokens = CallStack()  # per thread: concurrent calls pair their own hooks
        self._params = _parameters(module)
        self.handles = [
            module.register_forward_pre_hook(self._pre, with_kwargs=True),
            module.register_forward_hook(self._post, always_call=True),
        ]

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if _INSIDE.get():
            self._tokens.items.append(None)
            return None
        groups: dict[type[Delta], list[Delta]] = {}
        owners: dict[int, DeltaLayer] = {}
        for layer in self.layers:
            if layer.disabled:
                continue
            for name in layer.active:
                delta = layer.deltas[name]
                if delta.form == "tokens" and name not in layer.merged:
                    groups.setdefault(type(delta), []).append(delta)
                    owners[id(delta)] = layer
        if not groups:
            self._tokens.items.append(None)
            return None
        kwargs = self._bind(args, kwargs)
        call = TokenCall(module, kwargs, *self._mode(kwargs), _layers=owners)
        for cls, deltas in groups.items():
            cls.prepare_call(call, deltas)
        call.finish()
        self._tokens.items.append(_INSIDE.set(True))
        return (), call.kwargs

    def _post(self, module: nn.Module, args: tuple, output: Any) -> None:
        stack = self._tokens.items
        token = stack.pop() if stack else None
        if token is not None:
            _INSIDE.reset(token)

    def _bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        if not args:
            return dict(kwargs)
        if len(args) > len(self._params):
            raise TargetError(f"{type(self.module).__name__} was called with {len(args)} "
                              "positional arguments; pass them by name")
        return {**dict(zip(self._params, args, strict=False)), **kwargs}

    def _mode(self, kwargs: dict) -> tuple[bool, bool]:
        """``(embeds_input, decoder_only)`` for this call."""
        if self.encoder:  # the encoder of an encoder-decoder model, called alone (generate)
            return True, False
        if _is_encoder_decoder(self.root):
            return kwargs.get("encoder_outputs") is None, False
        return not _cache_length(kwargs.get("past_key_values")), True

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _parameters(module: nn.Module) -> list[str]:
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def _cache_length(cache: Any) -> int:
    """Positions already in a key/value cache (0 for none or an empty one)."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
        return int(cache[0][0].shape[-2])
    return 0


def sync(model: nn.Module) -> None:
    """Install, update or remove the hooks so they match the tokens-form deltas attached."""
    from .lifecycle import delta_layers

    layers = [layer for layer in delta_layers(model).values()
              if any(d.form == "tokens" for d in layer.deltas.values())]
    hooks: list[_Hook] = getattr(model, _HOOK_ATTR, None) or []
    if not layers:
        for hook in hooks:
            hook.remove()
        if hooks:
            delattr(model, _HOOK_ATTR)
        return
    if not hooks:
        hooks = [_Hook(model, model, encoder=False)]
        get_encoder = getattr(model, "get_encoder", None)
        if _is_encoder_decoder(model) and callable(get_encoder):
            hooks.append(_Hook(model, get_encoder(), encoder=True))
        object.__setattr__(model, _HOOK_ATTR, hooks)
    for hook in hooks:
        hook.layers = layers
