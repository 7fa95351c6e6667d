"""Gradient (activation) checkpointing for models carrying deltas.

Every delta type works under transformers' checkpointing of its decoder / encoder layers: the
deltas inside a checkpointed layer are recomputed with it (forward hooks included, and with the
random state of their dropout preserved), and prefix tuning hands its keys and values to the
attention itself when the checkpointed layer drops the key/value cache
(``methods.prefix._CheckpointFallback``). One thing must be true for the reentrant variant
(``use_reentrant=True``): something entering each checkpointed layer requires grad, or the
deltas inside get no gradient at all — with a frozen base the hidden states do not, so the input
embeddings' output has to be marked (``enable_input_require_grads``). transformers ≥ 5 does that
itself for models that take ``input_ids``; ``enable_gradient_checkpointing`` does it on every
version, under either name of the switch (``activation_checkpointing_enable`` in transformers
≥ 5, ``gradient_checkpointing_enable`` before).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..core.errors import ConfigError


def enable_gradient_checkpointing(model: nn.Module, *, use_reentrant: bool = False,
                                  **kwargs: Any) -> nn.Module:
    """Turn on the checkpointing of a transformers model's layers, ready to train deltas.

    Args:
        model: a transformers ``PreTrainedModel`` (with or without deltas injected yet).
        use_reentrant: ``torch.utils.checkpoint``'s variant; the non-reentrant one (default)
            is what PyTorch recommends.
        **kwargs: further ``torch.utils.checkpoint.checkpoint`` arguments
            (e.g. ``preserve_rng_state``).

    Returns:
        ``model``, in place.

    Raises:
        ConfigError: ``model`` is not a transformers model that supports checkpointing.
    """
    enable = getattr(model, "activation_checkpointing_enable", None) or getattr(
        model, "gradient_checkpointing_enable", None)
    if enable is None or not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"{type(model).__name__} is not a transformers model that supports gradient "
            "checkpointing; for your own modules, wrap each block's call in "
            "torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)")
    enable({"use_reentrant": use_reentrant, **kwargs})
    marked = getattr(model, "_require_grads_hooks", None) or getattr(
        model, "_require_grads_hook", None)
    if use_reentrant and not marked:
        model.enable_input_require_grads()
    return model


__all__ = ["enable_gradient_checkpointing"]
