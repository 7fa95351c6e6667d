"""Prompt tuning (Lester et al. 2021, arXiv:2104.08691): soft tokens before the input.

    h₀ = [P ; E(x)]          P ∈ ℝ^{n×d} trained, the model and its embedding E frozen

The delta lives on the model's input embedding (target ``"input-embeddings"``: the encoder's in
an encoder-decoder model). Per model call it embeds ``input_ids`` with that embedding (so other
deltas on it, e.g. LoRA, still apply) and passes ``inputs_embeds = [P ; E(x)]`` instead;
``core.sequence`` prepends ``n`` ones to the attention mask, ``-100`` to labels aligned with the
input and shifts given positions. In ``generate()`` the prompt enters once, at prefill; the
decoding steps find it in the key/value cache. Several active prompt deltas concatenate, in
activation order. Outputs keep the soft positions first (logits included), as HF peft's do.

Initialisation (``init``):

* ``"vocab"`` (default, the paper's best): embeddings of token ids drawn uniformly from the
  vocabulary;
* ``"text"``: embeddings of ``init_ids`` (e.g. the tokenised task description, see
  ``PromptConfig.from_text``), repeated and cut to ``num_tokens`` as HF peft does;
* ``"random"``: ``N(0, σ²)`` with ``σ`` the standard deviation of the embedding table, so the
  soft tokens have the scale of real ones.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.errors import ConfigError, TargetError
from ..core.geometry import LayerInfo
from ..core.registry import register
from ..core.sequence import TokenCall
from ..core.targeting import INPUT_EMBEDDINGS, Matcher

_INITS = ("vocab", "text", "random")


@dataclass(frozen=True, kw_only=True)
class PromptConfig(DeltaConfig):
    """Prompt-tuning hyper-parameters (targeting fields: see ``DeltaConfig``).

    Args:
        num_tokens: soft tokens ``n`` prepended to the input.
        init: ``"vocab"``, ``"text"`` or ``"random"`` (see the module docstring).
        init_ids: token ids whose embeddings start the prompt (``init="text"``); use
            ``PromptConfig.from_text`` to tokenise a text.
    """

    num_tokens: int = 20
    init: str = "vocab"
    init_ids: Sequence[int] | None = None

    def validate(self) -> None:
        n = self.num_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"num_tokens must be a positive integer, got {n!r}")
        if self.init not in _INITS:
            raise ConfigError(f"init must be one of {list(_INITS)}, got {self.init!r}")
        ids = self.init_ids
        if self.init == "text":
            if not ids or isinstance(ids, str) or not all(
                    isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise ConfigError("init='text' needs init_ids, a non-empty list of token ids "
                                  "(PromptConfig.from_text(text, tokenizer) makes them)")
        elif ids is not None:
            raise ConfigError(f"init_ids is only used with init='text' (init={self.init!r})")

    @classmethod
    def from_text(cls, text: str, tokenizer: Any, **kwargs: Any) -> PromptConfig:
        """A ``"text"``-initialised config: ``text`` tokenised without special tokens.

        Args:
            text: e.g. the task description ("Classify the sentiment of this review:").
            tokenizer: a Hugging Face tokenizer, or any callable returning token ids.
            **kwargs: other fields (``num_tokens`` …).
        """
        encoded = tokenizer(text, add_special_tokens=False) if hasattr(
            tokenizer, "convert_tokens_to_ids") else tokenizer(text)
        ids = encoded["input_ids"] if isinstance(encoded, dict) or hasattr(
            encoded, "keys") else encoded
        return cls(init="text", init_ids=tuple(int(i) for i in ids), **kwargs)


@register("prompt", config=PromptConfig)
class PromptDelta(Delta):
    """``[P ; E(x)]``: ``n`` trained embeddings before the input's."""

    form = "tokens"
    tokens_at = "inputs"
    layer_kinds = frozenset({"embedding"})
    default_targets = INPUT_EMBEDDINGS
    identity_at_init = False
    composition = "concat"
    examples = ({}, {"num_tokens": 3, "init": "random"},
                {"num_tokens": 5, "init": "text", "init_ids": (1, 2, 3)})

    def __init__(self, info: LayerInfo, config: PromptConfig, path: str) -> None:
        super().__init__(info, config, path)
        self.prompt = nn.Parameter(torch.empty(config.num_tokens, info.out_dim))  # (n, d)
        self.num_tokens = config.num_tokens

    @classmethod
    def complete(cls, model: nn.Module, config: PromptConfig) -> PromptConfig:
        if not _takes_embeds(model):
            raise TargetError(f"prompt tuning passes inputs_embeds to the model, and "
                              f"{type(model).__name__}.forward takes no inputs_embeds argument")
        if config.targets is not None and config.targets != INPUT_EMBEDDINGS:
            matcher = Matcher(model)
            hits = sorted({n for names in matcher.select(config.targets, "targets")
                           for n in names})
            try:
                wanted = [matcher.input_embeddings()]
            except TargetError:  # not determinable: any single embedding the user names
                wanted = hits[:1]
            if hits != wanted:
                raise TargetError(
                    f"prompt tuning prepends soft tokens to the one embedding that reads "
                    f"input_ids, but targets={config.targets!r} selects {hits}; leave targets "
                    f"unset ({INPUT_EMBEDDINGS!r}) or name that embedding alone")
        return config

    @classmethod
    def supports(cls, module: nn.Module, info: LayerInfo, config: PromptConfig) -> str | None:
        if config.init == "text" and max(config.init_ids) >= info.in_dim:
            return (f"init_ids reach {max(config.init_ids)} but {type(module).__name__} has "
                    f"{info.in_dim} tokens; tokenise with the model's own tokenizer")
        return None

    @classmethod
    def num_trainable(cls, info: LayerInfo, config: PromptConfig) -> int:
        return config.num_tokens * info.out_dim

    @torch.no_grad()
    def reset_parameters(self, base: nn.Module) -> None:
        table = base.weight.detach().float()  # (vocab, d)
        n, init = self.num_tokens, self.config.init
        if init == "random":
            self.prompt.normal_(0.0, table.std().item())
            return
        if init == "vocab":
            ids = torch.randint(0, table.shape[0], (n,), device=table.device)
        else:
            given = list(self.config.init_ids)
            ids = torch.tensor((given * math.ceil(n / len(given)))[:n], device=table.device)
        self.prompt.copy_(table[ids])

    @classmethod
    def prepare_call(cls, call: TokenCall, deltas: Sequence[PromptDelta]) -> None:
        call.inputs += sum(d.num_tokens for d in deltas)
        if not call.embeds_input:  # a decoding step: the prompt is in the cache already
            return
        embeds = call.input_embeddings(call.layer_of(deltas[0]))  # (B, T, d)
        prompts = torch.cat([cls.cast(d.prompt, embeds) for d in deltas])  # (n, d)
        prompts = prompts.unsqueeze(0).expand(embeds.shape[0], -1, -1)  # (B, n, d)
        call.kwargs["inputs_embeds"] = torch.cat([prompts, embeds], 1)  # (B, n + T, d)


def _takes_embeds(model: nn.Module) -> bool:
    try:
        return "inputs_embeds" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


__all__ = ["PromptConfig", "PromptDelta"]
