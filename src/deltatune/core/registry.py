"""The method registry: ``@register("lora", config=LoraConfig)`` on a Delta class."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import DeltaConfig
from .errors import ConfigError

if TYPE_CHECKING:
    from .delta import Delta


@dataclass(frozen=True)
class MethodSpec:
    """One registered method: its name, config class and delta class."""

    name: str
    config_class: type[DeltaConfig]
    delta_class: type[Delta]


_REGISTRY: dict[str, MethodSpec] = {}


def register(name: str, *, config: type[DeltaConfig]) -> Callable[[type[Delta]], type[Delta]]:
    """Class decorator registering a Delta class and its config under ``name``.

    Args:
        name: lowercase method name used in configs' ``"method"`` tag.
        config: the method's ``DeltaConfig`` subclass.

    Returns:
        The decorator; it returns the class unchanged apart from the ``method`` and
        ``config_class`` attributes it sets.

    Raises:
        ConfigError: the name is taken by another class or is not lowercase.
    """
    if not name or name != name.lower():
        raise ConfigError(f"method names are non-empty and lowercase, got {name!r}")

    def decorator(delta_class: type[Delta]) -> type[Delta]:
        existing = _REGISTRY.get(name)
        if existing is not None and existing.delta_class.__qualname__ != delta_class.__qualname__:
            raise ConfigError(f"method {name!r} is already registered by "
                              f"{existing.delta_class.__qualname__}")
        config.method = name
        delta_class.method = name
        delta_class.config_class = config
        _REGISTRY[name] = MethodSpec(name, config, delta_class)
        return delta_class

    return decorator


def get_method(name: str) -> MethodSpec:
    """The registered method called ``name``.

    Raises:
        ConfigError: no such method; the message lists close and all registered names.
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name), _REGISTRY, n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise ConfigError(
            f"unknown method {name!r}.{hint} Registered methods: {methods()}") from None


def methods() -> list[str]:
    """Sorted names of every registered method."""
    return sorted(_REGISTRY)
