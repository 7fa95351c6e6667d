"""Prefix tuning (Li & Liang 2021, arXiv:2101.00190; deep prompts of P-tuning v2, Liu et al.
2022, arXiv:2110.07602): trained keys and values before every attention's own.

    attn_l(x) = softmax(q [P_k,l ; K_l]ᵀ / √d) [P_v,l ; V_l]        P_k,l, P_v,l ∈ ℝ^{n×d_kv}

One delta per attention layer, placed on the sub-layer ``attn`` (its output projection marks
the layer; default targets). Per model call the prefixes enter the model through its key/value
cache — the extension point transformers' attention layers have for extra keys — pre-filled
before the first token; ``core.sequence`` prepends ``n`` ones to the attention mask. As in HF
peft (and the original implementation), the real tokens' positions then start at ``n``. In
``generate()`` the prefixes are filled once, at prefill, and stay in the cache. Works for the
decoder-only and encoder models whose forward takes ``past_key_values`` (Llama family, GPT-2,
GPT-NeoX, BERT, RoBERTa …); every attention layer must carry a prefix. Under gradient
checkpointing transformers' layers drop the cache (it would be written twice); a forward pre-hook
on each attention then hands it the prefixes itself (``_CheckpointFallback``).

``gate=True`` (UniPELT-style) scales each layer's prefix values by a learned ``sigmoid(g_l)``
(one scalar per layer, starting at 1/2): the prefixes enter the cache before the layer's input
exists, so the gate cannot read that input as UniPELT's BERT code does.

``projection=h`` trains the paper's re-parameterisation instead: ``P_l = W_l tanh(W E + b) +
b_l``, with the embedding ``E ∈ ℝ^{n×d_kv}`` and ``W`` shared by all layers; ``save`` writes the
folded plain prefixes (and a config without the projection), so a loaded prefix costs nothing
extra.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.distributed import gathered
from ..core.errors import ConfigError, TargetError
from ..core.geometry import LayerInfo
from ..core.layers import DeltaLayer
from ..core.registry import register
from ..core.sequence import TokenCall


def _positive(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True, kw_only=True)
class PrefixConfig(DeltaConfig):
    """Prefix-tuning hyper-parameters (targeting fields: see ``DeltaConfig``).

    Args:
        num_tokens: prefix length ``n``.
        projection: hidden size of the training-time MLP re-parameterisation (``None``: train
            the prefixes directly).
        init_std: ``σ`` of the ``N(0, σ²)`` initial prefixes (or embedding ``E``); 1.0 as in
            HF peft.
        kv_heads, head_dim, num_layers: the attention geometry, read from the model's config
            by ``inject`` (leave them unset).
    """

    num_tokens: int = 20
    projection: int | None = None
    init_std: float = 1.0
    kv_heads: int | None = None
    head_dim: int | None = None
    num_layers: int | None = None

    def validate(self) -> None:
        if not _positive(self.num_tokens):
            raise ConfigError(f"num_tokens must be a positive integer, got {self.num_tokens!r}")
        for key in ("projection", "kv_heads", "head_dim", "num_layers"):
            value = getattr(self, key)
            if value is not None and not _positive(value):
                raise ConfigError(f"{key} must be a positive integer or None, got {value!r}")
        std = self.init_std
        if isinstance(std, bool) or not isinstance(std, (int, float)) or not (
                math.isfinite(std) and std > 0):
            raise ConfigError(f"init_std must be a positive number, got {std!r}")

    @property
    def kv_dim(self) -> int:
        if self.kv_heads is None or self.head_dim is None:
            raise ConfigError("the attention geometry is unset; inject the config into a model")
        return self.kv_heads * self.head_dim

    def for_saving(self) -> PrefixConfig:
        return dataclasses.replace(self, projection=None)  # saved folded


class _Projection(nn.Module):
    """The shared half of the MLP re-parameterisation: ``tanh(W E + b)``."""

    def __init__(self, config: PrefixConfig) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(config.num_tokens, config.kv_dim))  # (n, kv)
        self.down = nn.Linear(config.kv_dim, config.projection)
        self.init_std = config.init_std

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.embedding.normal_(0.0, self.init_std)
        self.down.reset_parameters()

    def forward(self) -> Tensor:
        return torch.tanh(self.down(self.embedding))  # (n, h)


@register("prefix", config=PrefixConfig)
class PrefixDelta(Delta):
    """Keys and values ``P_k, P_v`` (``n`` each) before one attention layer's own."""

    form = "tokens"
    tokens_at = "keys"
    layer_kinds = frozenset({"linear"})
    default_targets = ("attn",)
    gating = "own"
    identity_at_init = False
    composition = "concat"
    examples = ({}, {"num_tokens": 3, "projection": 8, "gate": True})

    def __init__(self, info: LayerInfo, config: PrefixConfig, path: str) -> None:
        super().__init__(info, config, path)
        n, kv = config.num_tokens, config.kv_dim
        self.num_tokens = n
        if config.projection is None:
            self.prefix = nn.Parameter(torch.empty(2, n, kv))  # (keys | values, n, kv)
        else:
            self.up = nn.Linear(config.projection, 2 * kv)
        self.gate_logit = nn.Parameter(torch.zeros(())) if config.gate else None

    @classmethod
    def complete(cls, model: nn.Module, config: PrefixConfig) -> PrefixConfig:
        hf = getattr(model, "config", None)
        if hf is None or not any(_takes_cache(m) for m in model.modules()):
            raise TargetError(f"prefix tuning needs a model whose forward takes past_key_values "
                              f"(Hugging Face decoder-only or encoder models); "
                              f"{type(model).__name__} does not: use prompt tuning instead")
        if getattr(hf, "is_encoder_decoder", False):
            raise TargetError("prefix tuning of encoder-decoder models is not supported yet; "
                              "use prompt tuning (PromptConfig) on them")
        heads = getattr(hf, "num_attention_heads", None)
        hidden = getattr(hf, "hidden_size", None)
        layers = getattr(hf, "num_hidden_layers", None)
        if not (heads and hidden and layers):
            raise TargetError(f"{type(model).__name__}'s config lacks num_attention_heads / "
                              "hidden_size / num_hidden_layers; set kv_heads, head_dim and "
                              "num_layers in PrefixConfig")
        found = {"kv_heads": getattr(hf, "num_key_value_heads", None) or heads,
                 "head_dim": getattr(hf, "head_dim", None) or hidden // heads,
                 "num_layers": layers}
        return dataclasses.replace(config, **{k: getattr(config, k) or v
                                              for k, v in found.items()})

    @classmethod
    def supports(cls, module: nn.Module, info: LayerInfo, config: PrefixConfig) -> str | None:
        if info.tap is None:
            return ("a prefix belongs to a whole attention layer: target the sub-layer name "
                    "'attn' (the default), not a single projection")
        return None

    @classmethod
    def build_shared(cls, config: PrefixConfig,
                     targets: Mapping[str, LayerInfo]) -> nn.Module | None:
        return None if config.projection is None else _Projection(config)

    @classmethod
    def num_shared(cls, config: PrefixConfig, targets: Mapping[str, LayerInfo]) -> int:
        if config.projection is None:
            return 0
        return config.num_tokens * config.kv_dim + (config.kv_dim + 1) * config.projection

    @classmethod
    def num_trainable(cls, info: LayerInfo, config: PrefixConfig) -> int:
        gate = 1 if config.gate else 0
        if config.projection is None:
            return 2 * config.num_tokens * config.kv_dim + gate
        return (config.projection + 1) * 2 * config.kv_dim + gate

    @torch.no_grad()
    def reset_parameters(self, base: nn.Module) -> None:
        if self.config.projection is None:
            self.prefix.normal_(0.0, self.config.init_std)
        else:
            self.up.reset_parameters()
        if self.gate_logit is not None:
            self.gate_logit.zero_()

    # --------------------------------------------------------------------------- compute
    def prefixes(self) -> Tensor:
        """``(2, n, kv)``: keys then values."""
        if self.config.projection is None:
            return gathered(self.prefix)  # read before the layers run (FSDP2: gathered)
        return self.up(self.shared()).view(self.num_tokens, 2, -1).transpose(0, 1)

    def keys_values(self, batch: int) -> tuple[Tensor, Tensor]:
        """``(batch, kv_heads, n, head_dim)`` keys and values, as a cache holds them."""
        c = self.config
        kv = self.prefixes().view(2, self.num_tokens, c.kv_heads, c.head_dim).transpose(1, 2)
        kv = kv.unsqueeze(1).expand(2, batch, *kv.shape[1:])  # (2, B, heads, n, hd)
        if self.gate_logit is None:
            return kv[0], kv[1]
        return kv[0], kv[1] * torch.sigmoid(gathered(self.gate_logit))

    @classmethod
    def prepare_call(cls, call: TokenCall, deltas: Sequence[PrefixDelta]) -> None:
        by_layer: dict[str, list[PrefixDelta]] = {}
        for delta in deltas:
            by_layer.setdefault(delta.path, []).append(delta)
        counts: dict[int, int] = {}
        for delta in deltas:
            counts[id(delta.adapter_config)] = counts.get(id(delta.adapter_config), 0) + 1
        for delta in deltas:
            expected = delta.config.num_layers
            if counts[id(delta.adapter_config)] != expected:
                raise TargetError(
                    f"prefix tuning needs a prefix on every attention layer: an active prefix "
                    f"covers {counts[id(delta.adapter_config)]} of {expected}; drop layers= / "
                    "exclude= (a prefix on the input alone is prompt tuning)")
        first = next(iter(by_layer.values()))
        call.keys += sum(d.num_tokens for d in first)
        for index, group in enumerate(by_layer.values()):
            _CheckpointFallback.ensure(call, group[0], index)
        if not call.embeds_input:  # decoding over a cache that holds the prefixes already
            return
        from ..integrations.transformers import prefilled_cache

        batch = call.batch_size
        layers = []
        for group in by_layer.values():
            keys, values = zip(*(d.keys_values(batch) for d in group), strict=True)
            layers.append((torch.cat(keys, 2), torch.cat(values, 2)))  # (B, heads, n, hd)
        dtype = _activation_dtype(call)
        if dtype is not None:
            layers = [(k.to(dtype), v.to(dtype)) for k, v in layers]
        call.kwargs["past_key_values"] = prefilled_cache(call.model, layers, call.cache())

    # --------------------------------------------------------------------------- state
    def state_tensors(self) -> dict[str, Tensor]:
        out = {"prefix": self.prefixes()}  # the projection is saved folded
        if self.gate_logit is not None:
            out["gate_logit"] = self.gate_logit
        return out

    def load_state_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        if self.config.projection is not None:
            raise ConfigError("prefixes are saved folded; load them into a config without "
                              "projection (as saved)")
        super().load_state_tensors(tensors)


class _CheckpointFallback:
    """The prefixes of one attention layer whose key/value cache was dropped on the way.

    transformers' checkpointed decoder layers drop ``past_key_values`` (the recomputation in
    the backward pass would write the cache a second time), so the prefixes filled into it never
    reach the attention while the mask and positions still count them. This forward pre-hook on
    the attention module (with its output layer) gives such a call (no cache; prefixes active) a
    fresh cache holding that layer's prefixes, computed from the parameters inside the
    checkpointed region: the recomputation rebuilds them identically and gradients reach them
    with either ``use_reentrant``. It holds no references (the model still deep-copies and
    pickles) and finds the prefixes through the attention module itself, so it is inert once
    they are deleted or unloaded.
    """

    def __init__(self, relative: str, index: int, params: tuple[str, ...]) -> None:
        self.relative, self.index = relative, index  # output layer below the attention; cache slot
        self.slot = params.index("past_key_values") if "past_key_values" in params else None

    @classmethod
    def ensure(cls, call: TokenCall, delta: PrefixDelta, index: int) -> None:
        """Register the hook (once) on the innermost module holding both ``delta``'s attention
        and its output layer, if that module takes the cache."""
        parts = []
        for a, b in zip(delta.info.tap.split("."), delta.path.split("."), strict=False):
            if a != b:
                break
            parts.append(a)
        attention = call.model.get_submodule(".".join(parts))
        params = tuple(inspect.signature(attention.forward).parameters)
        if "past_key_values" in params and not any(
                isinstance(h, cls) for h in attention._forward_pre_hooks.values()):
            relative = delta.path[len(".".join(parts)) + 1:]
            attention.register_forward_pre_hook(cls(relative, index, params), with_kwargs=True)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        positional = self.slot is not None and len(args) > self.slot
        if (args[self.slot] if positional else kwargs.get("past_key_values")) is not None:
            return None  # the usual path: the cache holds the prefixes
        layer = module.get_submodule(self.relative)
        if not isinstance(layer, DeltaLayer) or layer.disabled:  # unloaded, or disabled
            return None
        deltas = [layer.deltas[n] for n in layer.active
                  if n not in layer.merged and isinstance(layer.deltas[n], PrefixDelta)]
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not deltas or not isinstance(hidden, Tensor):
            return None
        from ..integrations.transformers import prefilled_cache

        keys, values = zip(*(d.keys_values(hidden.shape[0]) for d in deltas), strict=True)
        dtype = next(p.dtype for p in module.parameters() if p.is_floating_point())
        cache = prefilled_cache(module, [])  # (the attention's config, when it has one)
        cache.update(torch.cat(keys, 2).to(dtype), torch.cat(values, 2).to(dtype), self.index)
        if positional:
            return (*args[:self.slot], cache, *args[self.slot + 1:]), kwargs
        return args, {**kwargs, "past_key_values": cache}


def _takes_cache(module: nn.Module) -> bool:
    """Whether ``module``'s forward takes a key/value cache (transformers attention layers)."""
    try:
        return "past_key_values" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _activation_dtype(call: TokenCall) -> torch.dtype | None:
    """The dtype of the model's floating-point parameters (the cache holds activations)."""
    for p in call.model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


__all__ = ["PrefixConfig", "PrefixDelta"]
