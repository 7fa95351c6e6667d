"""Hugging Face transformers glue used by methods that need its objects (imported lazily).

* ``prefilled_cache``: a key/value cache holding prefix keys and values for every layer, the
  extension point transformers' attention layers offer for extra keys (prefix tuning).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from ..core.errors import TargetError


def prefilled_cache(model: nn.Module, keys_values: Sequence[tuple[Tensor, Tensor]],
                    cache: Any = None) -> Any:
    """``cache`` (a new ``DynamicCache`` if ``None``) with layer ``i`` holding
    ``keys_values[i]``, each ``(batch, kv_heads, n, head_dim)``.

    Raises:
        TargetError: transformers is not installed, or ``cache`` is not a transformers cache.
    """
    try:
        from transformers import Cache, DynamicCache
    except ImportError as exc:  # pragma: no cover - transformers is in the hf extra
        raise TargetError("prefix tuning needs transformers: pip install 'deltatune[hf]'") \
            from exc
    if cache is None:
        cache = DynamicCache(config=getattr(model, "config", None))
    if not isinstance(cache, Cache):
        raise TargetError(f"prefix tuning needs a transformers Cache as past_key_values, got "
                          f"{type(cache).__name__}; pass none (a DynamicCache is made)")
    for index, (keys, values) in enumerate(keys_values):
        cache.update(keys, values, index)
    return cache


__all__ = ["prefilled_cache"]
