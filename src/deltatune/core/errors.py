"""Exceptions raised by deltatune. Every one carries a message that says what to do next."""

from __future__ import annotations


class DeltaError(Exception):
    """Base class of every deltatune error."""


class ConfigError(DeltaError, ValueError):
    """A configuration is malformed: unknown method, unknown key, out-of-range value."""


class TargetError(DeltaError, ValueError):
    """A target pattern matches nothing, or matches modules the method cannot adapt."""


class AdapterNameError(DeltaError, ValueError):
    """An adapter name is invalid, already taken, or unknown."""


class StateError(DeltaError, RuntimeError):
    """An operation does not fit the model's current state (e.g. disabling merged deltas)."""


class MergeError(DeltaError, RuntimeError):
    """Merging or unmerging failed; the model's weights were left untouched."""


class AdapterFileError(DeltaError, OSError):
    """A saved adapter is missing, truncated, corrupt, or does not fit the model."""


class ShapeMismatchError(AdapterFileError, ValueError):
    """A saved adapter was made for modules of other shapes than the model's."""
