"""The configuration base class every method's config derives from.

A config is a frozen, keyword-only dataclass. It round-trips through plain JSON with a
``"method"`` tag (``to_dict`` / ``config_from_dict``), and rejects unknown keys with the list of
valid ones. Targeting fields (``targets``, ``exclude``, ``layers``, ``overrides``) live here so
that every method is placed the same way.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import ConfigError

#: Fields of the base config that say *where* a delta goes; they cannot be overridden per module.
PLACEMENT_FIELDS = ("targets", "exclude", "layers", "overrides")
_DTYPES = ("float32", "float16", "bfloat16", "float64")


class FrozenDict(Mapping):
    """An immutable, hashable mapping used for dict-valued config fields."""

    __slots__ = ("_data", "_hash")

    def __init__(self, data: Mapping | None = None, **kwargs: Any) -> None:
        self._data = dict(data or {}, **kwargs)
        self._hash: int | None = None

    def __getitem__(self, key: Any) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(json.dumps(_to_json(self), sort_keys=True))
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._data) == dict(other)

    def __repr__(self) -> str:
        return repr(self._data)


def _freeze(value: Any) -> Any:
    """Lists become tuples and dicts become FrozenDicts, recursively."""
    if isinstance(value, Mapping):
        return FrozenDict({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _to_json(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    return value


@dataclass(frozen=True, kw_only=True)
class DeltaConfig:
    """Where a delta goes, shared by every method.

    Args:
        targets: which modules to adapt. A list/tuple of entries, each matching whole
            dotted-name suffixes (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``) or a
            canonical name of a known architecture (``"attn.q"``, ``"ffn.down"``…); a string is a
            full-match regular expression over module names; ``"all-linear"`` means every
            Linear / HF Conv1D layer except the output head. ``None`` uses the method's default.
        exclude: modules to leave out, in the same syntax as ``targets``.
        layers: indices (negative allowed) into the model's repeated block list(s); only
            modules inside those blocks are adapted.
        overrides: per-module field values, e.g. ``{"attn.v": {"rank": 16}}``. Keys use the
            list-entry syntax of ``targets``; the first matching key wins.
        dtype: dtype of the delta's parameters (``"float32"`` keeps fp32 master weights on a
            bf16 base); ``None`` uses the base layer's dtype.
        gate: put each delta behind a learned gate (UniPELT, Mao et al. 2022): its effect is
            multiplied by ``sigmoid(w·z + b)``, one scalar per position computed from the
            delta's input ``z`` (methods that gate differently say so). A gated delta depends
            on the input, so it is never merged.
    """

    method: ClassVar[str] = ""
    #: Method fields that hold a target spec (list or regex, like ``targets``) naming a subset
    #: of the targeted modules; each delta sees them resolved to ``True`` / ``False`` for its
    #: own module (e.g. IA3's ``feedforward``).
    module_sets: ClassVar[tuple[str, ...]] = ()

    targets: Sequence[str] | str | None = None
    exclude: Sequence[str] | str | None = None
    layers: Sequence[int] | None = None
    overrides: Mapping[str, Mapping[str, Any]] | None = None
    dtype: str | None = None
    gate: bool = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _freeze(getattr(self, f.name)))
        self._check_placement()
        self.validate()

    def _check_placement(self) -> None:
        for field in ("targets", "exclude", *self.module_sets):
            value = getattr(self, field)
            if value is None or isinstance(value, (str, bool)):
                continue
            if not all(isinstance(v, str) and v for v in value):
                raise ConfigError(f"{field} must be a regex string or a list of non-empty names, "
                                  f"got {value!r}")
        if self.layers is not None and not all(
            isinstance(i, int) and not isinstance(i, bool) for i in self.layers
        ):
            raise ConfigError(f"layers must be a list of block indices, got {self.layers!r}")
        if not isinstance(self.gate, bool):
            raise ConfigError(f"gate must be True or False, got {self.gate!r}")
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of {_DTYPES} or None, got {self.dtype!r}")
        if self.overrides is not None:
            allowed = sorted(self.field_names() - set(PLACEMENT_FIELDS))
            for key, values in self.overrides.items():
                if not isinstance(values, Mapping):
                    raise ConfigError(f"overrides[{key!r}] must map field names to values, "
                                      f"e.g. {{'rank': 16}}; got {values!r}")
                bad = sorted(set(values) - set(allowed))
                if bad:
                    raise ConfigError(f"overrides[{key!r}] sets unknown or placement fields "
                                      f"{bad}; fields that can be overridden: {allowed}")

    def validate(self) -> None:
        """Check method-specific values; subclasses raise ``ConfigError`` with a clear message."""

    # ----------------------------------------------------------------------------- helpers
    @classmethod
    def field_names(cls) -> set[str]:
        """Names of every config field (placement and method-specific)."""
        return {f.name for f in dataclasses.fields(cls)}

    def replace(self, **changes: Any) -> DeltaConfig:
        """A copy with some fields changed (validated like a new config)."""
        unknown = sorted(set(changes) - self.field_names())
        if unknown:
            raise ConfigError(f"{type(self).__name__} has no fields {unknown}; "
                              f"valid fields: {sorted(self.field_names())}")
        return dataclasses.replace(self, **changes)

    def for_saving(self) -> DeltaConfig:
        """The config to store beside the saved tensors (methods that convert on save override)."""
        return self

    # ------------------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, tagged with ``"method"``."""
        out: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            out[f.name] = _to_json(getattr(self, f.name))
        return out

    def to_json(self, **kwargs: Any) -> str:
        """``to_dict`` as a JSON string."""
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeltaConfig:
        """Build a config of this class from ``to_dict`` output.

        Raises:
            ConfigError: the method tag names another method, or a key is unknown.
        """
        data = dict(data)
        tag = data.pop("method", cls.method)
        if tag != cls.method:
            raise ConfigError(f"config is tagged method={tag!r}, not {cls.method!r}; "
                              "use deltatune.config_from_dict to dispatch on the tag")
        unknown = sorted(set(data) - cls.field_names())
        if unknown:
            raise ConfigError(f"unknown keys {unknown} for {cls.__name__} ({cls.method!r}); "
                              f"valid keys: {sorted(cls.field_names())}")
        try:
            return cls(**data)
        except TypeError as exc:  # e.g. a value of the wrong type reaching validation
            raise ConfigError(f"invalid {cls.__name__}: {exc}") from exc


def config_from_dict(data: Mapping[str, Any] | str) -> DeltaConfig:
    """Read a config back from ``DeltaConfig.to_dict()`` output (or its JSON string).

    Args:
        data: a mapping with a ``"method"`` tag, or a JSON string of one.

    Returns:
        An instance of the registered config class for that method.

    Raises:
        ConfigError: no ``"method"`` tag, an unknown method, or unknown keys.
    """
    from .registry import get_method

    if isinstance(data, str):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config is not valid JSON: {exc}") from exc
    if not isinstance(data, Mapping) or "method" not in data:
        raise ConfigError("config needs a 'method' key naming a registered method, "
                          "e.g. {'method': 'lora', 'rank': 8}")
    return get_method(data["method"]).config_class.from_dict(data)
