"""Method combinations from the literature, as plain named configs.

A recipe is a ``{name: config}`` mapping; each entry is injected as its own named delta, so
the parts train together, save and load together, and can be switched off one by one::

    for name, config in dt.recipes.unipelt().items():
        dt.inject(model, config, name=name)

* ``mam``: "mix-and-match" (He et al. 2022, arXiv:2110.04366): prefix tuning at every attention
  plus a scaled parallel adapter beside every FFN.
* ``unipelt``: UniPELT (Mao et al. 2022, arXiv:2110.07577): prefix tuning, a sequential adapter
  after every FFN and LoRA on the query and value projections, each behind a learned gate
  (``gate=True``; see ``DeltaConfig.gate`` and ``PrefixConfig``).
"""

from __future__ import annotations

from typing import Any

from .core.config import DeltaConfig
from .methods.adapter import AdapterConfig, parallel_adapter
from .methods.lora import LoraConfig
from .methods.prefix import PrefixConfig


def mam(num_tokens: int = 30, scale: float = 4.0, **adapter: Any) -> dict[str, DeltaConfig]:
    """He et al.'s MAM adapter: ``{"prefix": …, "adapter": …}``.

    Args:
        num_tokens: prefix length (the paper uses 30).
        scale: the parallel adapter's fixed scale ``s`` (the paper uses 4).
        **adapter: other ``AdapterConfig`` fields (``bottleneck``, ``reduction_factor`` …).
    """
    return {"prefix": PrefixConfig(num_tokens=num_tokens),
            "adapter": parallel_adapter(scale=scale, **adapter)}


def unipelt(num_tokens: int = 10, rank: int = 8, alpha: float = 16.0,
            reduction_factor: float = 16.0) -> dict[str, DeltaConfig]:
    """UniPELT: ``{"prefix": …, "adapter": …, "lora": …}``, every part gated.

    Args:
        num_tokens: prefix length (the paper uses 10).
        rank, alpha: LoRA on ``attn.q`` and ``attn.v`` (the paper uses r = 8, α = 16).
        reduction_factor: the sequential FFN adapter's ``d / r`` (the paper uses 16).
    """
    return {"prefix": PrefixConfig(num_tokens=num_tokens, gate=True),
            "adapter": AdapterConfig(targets=["ffn"], reduction_factor=reduction_factor,
                                     activation="relu", gate=True),
            "lora": LoraConfig(targets=["attn.q", "attn.v"], rank=rank, alpha=alpha, gate=True)}


__all__ = ["mam", "unipelt"]
