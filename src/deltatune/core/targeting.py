"""Which modules a delta goes to.

Syntax (shared by ``targets``, ``exclude`` and ``overrides`` keys):

* a list entry matches whole dotted-name suffixes: ``"q_proj"`` and ``"self_attn.q_proj"`` match
  ``model.layers.0.self_attn.q_proj``; ``"proj"`` does not;
* a list entry that is a canonical name (``"attn.q"``, ``"ffn.down"`` …) goes through the
  model's structure map; a sub-layer name (``"attn"``, ``"ffn"``) selects the sub-layer's
  output projection and records the sub-layer's input as its tap;
* a string (not a list) is a regular expression that must match the whole module name;
* ``"all-linear"`` is every Linear / HF Conv1D layer except the output head;
* ``"input-embeddings"`` is the token embedding that reads the model's ``input_ids`` (the
  encoder's in an encoder-decoder model; ``get_input_embeddings()`` on Hugging Face models,
  else the model's only ``nn.Embedding`` outside the output head).

Module names are *logical*: the names of the unmodified model, whatever wrappers were injected.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from torch import nn

from .config import DeltaConfig
from .distributed import unwrap_model
from .errors import TargetError
from .geometry import LayerInfo, layer_info
from .layers import DeltaLayer
from .structures import BLOCK_NAMES, CANONICAL_NAMES, StructureMap, structure_for

_CANONICAL = frozenset(CANONICAL_NAMES) | frozenset(BLOCK_NAMES)

ALL_LINEAR = "all-linear"
INPUT_EMBEDDINGS = "input-embeddings"
#: Top-level children treated as task heads and left out of "all-linear".
HEAD_NAMES = frozenset({"lm_head", "classifier", "score", "qa_outputs", "cls", "head", "heads"})


def walk(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``(logical_name, module)`` for the model's own modules, seeing through delta wrappers.

    A ``DeltaLayer`` is reported under the wrapped layer's name (as the wrapper); the deltas it
    holds are not part of the model's own structure and are skipped. DDP / ``torch.compile``
    wrappers around the whole model are seen through (``distributed.unwrap_model``).
    """
    if not prefix:
        model = unwrap_model(model)
    yield prefix, model
    children = model.named_children()
    if isinstance(model, DeltaLayer):
        children = model.base_layer.named_children()
    for name, child in children:
        yield from walk(child, f"{prefix}.{name}" if prefix else name)


def _unwrap(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, DeltaLayer) else module


def find_block_lists(model: nn.Module) -> list[str]:
    """Names of the repeated block lists (e.g. ``model.layers``; ``encoder.block`` and
    ``decoder.block`` in T5): outermost ModuleLists/Sequentials of ≥ 2 same-class, non-leaf
    modules."""
    found: list[str] = []
    for name, module in walk(model):
        if any(name == f or name.startswith(f + ".") for f in found):
            continue
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < 2:
            continue
        kids = [_unwrap(m) for m in module]
        if len({type(k) for k in kids}) == 1 and any(True for _ in kids[0].children()):
            found.append(name)
    return found


@dataclass(frozen=True)
class _Position:
    blocks: str
    index: int
    relative: str


class Matcher:
    """Resolves target syntax against one model's logical module names."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules = {name: _unwrap(m) for name, m in walk(model) if name}
        self.names = list(self.modules)
        # A module object reachable under several paths is adapted once, under its first path,
        # and wrapped at every path.
        first: dict[int, str] = {}
        self.aliases: dict[str, list[str]] = {}
        for name, module in self.modules.items():
            self.aliases.setdefault(first.setdefault(id(module), name), []).append(name)
        self._canonical = {alias: canon for canon, group in self.aliases.items()
                           for alias in group}
        self.structure: StructureMap | None = structure_for(model)
        self.block_lists = find_block_lists(model)
        self._positions: dict[str, _Position] = {}
        for blocks in self.block_lists:
            head = blocks + "."
            for name in self.names:
                if name.startswith(head):
                    index, _, rel = name[len(head):].partition(".")
                    if rel and index.isdigit():
                        self._positions[name] = _Position(blocks, int(index), rel)
        self._bypassed: dict[str, str] = {}
        for name, m in self.modules.items():
            for child, owner in _fused_children(m):
                self._bypassed[f"{name}.{child}" if name else child] = owner

    # ----------------------------------------------------------------------- matching
    def entry_matches(self, name: str, entry: str) -> bool:
        """Whether list entry ``entry`` (suffix or canonical name) matches module ``name``."""
        if entry in _CANONICAL:
            if self.structure is None:
                raise TargetError(
                    f"{entry!r} is a canonical name, but {type(self.model).__name__} has no "
                    "known structure map (it is found from config.model_type); use module "
                    "names or register one with deltatune.register_structure")
            pos = self._positions.get(name)
            return pos is not None and pos.relative in self.structure.paths(entry)
        return name == entry or name.endswith("." + entry)

    def select(self, spec: Sequence[str] | str, field: str) -> list[list[str]]:
        """Module names matched by ``spec``, one list per entry (one list for a regex).

        Raises:
            TargetError: an entry matches nothing; the message lists close names.
        """
        if isinstance(spec, str):
            if spec == INPUT_EMBEDDINGS:
                return [[self.input_embeddings()]]
            if spec == ALL_LINEAR:
                heads = self.output_heads()
                return [[n for n in self.names if self.info(n) is not None
                         and self.info(n).kind == "linear"
                         and not any(n == h or n.startswith(h + ".") for h in heads)]]
            try:
                pattern = re.compile(spec)
            except re.error as exc:
                raise TargetError(f"{field}={spec!r} is not a valid regular expression: {exc}. "
                                  "Pass a list of names to match suffixes instead") from exc
            hits = [n for n in self.names if pattern.fullmatch(n)]
            if not hits:
                raise TargetError(f"{field} regex {spec!r} matches no module name of "
                                  f"{type(self.model).__name__} (it must match the whole "
                                  f"name, e.g. {self._examples()}).")
            return [hits]
        out = []
        for entry in spec:
            hits = [n for n in self.names if self.entry_matches(n, entry)]
            if not hits and entry in _CANONICAL:
                raise TargetError(f"{field} entry {entry!r}: this {self.structure.family} model "
                                  f"has no {entry!r} layer (e.g. a non-gated FFN has no "
                                  f"ffn.gate); canonical names present: {self.present()}")
            if not hits:
                raise TargetError(f"{field} entry {entry!r} matches no module of "
                                  f"{type(self.model).__name__}.{self._close(entry)}")
            out.append(hits)
        return out

    def matches(self, name: str, spec: Sequence[str] | str) -> bool:
        """Whether module ``name`` is selected by ``spec`` (a list of entries or a regex)."""
        if isinstance(spec, str):
            if spec == INPUT_EMBEDDINGS:
                return name == self.input_embeddings()
            return re.fullmatch(spec, name) is not None
        return any(self.entry_matches(name, entry) for entry in spec)

    def present(self) -> list[str]:
        """Canonical names that match at least one module of this model."""
        if self.structure is None:
            return []
        relative = {p.relative for p in self._positions.values()}
        names = {**self.structure.names,
                 **{c: tuple(out for _, out in pairs)
                    for c, pairs in self.structure.blocks.items()}}
        return [c for c, paths in names.items() if paths and relative & set(paths)]

    def tap(self, name: str, entry: str) -> str | None:
        """The tap (full path) if ``entry`` is a sub-layer name matching module ``name``."""
        if entry not in BLOCK_NAMES or self.structure is None:
            return None
        pos = self._positions[name]
        tap = self.structure.tap(entry, pos.relative)
        return f"{pos.blocks}.{pos.index}.{tap}" if tap is not None else None

    def canonical(self, name: str) -> str:
        """The first path of the module object at ``name`` (aliases share one delta)."""
        return self._canonical[name]

    def info(self, name: str) -> LayerInfo | None:
        """Geometry of module ``name`` if it is adaptable, else ``None``."""
        if name in self._bypassed:
            return None
        try:
            return layer_info(self.modules[name])
        except TargetError:
            return None

    def input_embeddings(self) -> str:
        """Name of the token embedding that reads ``input_ids`` (see the module docstring).

        Raises:
            TargetError: none, or several candidates on a model without
                ``get_input_embeddings``.
        """
        model = self.model
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False) and callable(
                getattr(model, "get_encoder", None)):
            model = model.get_encoder()
        get_in = getattr(model, "get_input_embeddings", None)
        found = _unwrap(get_in()) if callable(get_in) else None
        if found is not None:
            names = [n for n, m in self.modules.items() if m is found]
            if names:
                return names[0]
        heads = self.output_heads()
        names = [n for n, m in self.modules.items() if isinstance(m, nn.Embedding)
                 and n not in heads and self.canonical(n) == n]
        if len(names) == 1:
            return names[0]
        raise TargetError(
            f"cannot tell which embedding of {type(self.model).__name__} reads the input ids "
            f"({'none found' if not names else f'candidates: {names}'}); give targets=[its "
            "module name]")

    def output_heads(self) -> set[str]:
        """Names of the output embedding and top-level task heads."""
        heads = {n for n in self.names if "." not in n and n in HEAD_NAMES}
        get_out = getattr(self.model, "get_output_embeddings", None)
        out = get_out() if callable(get_out) else None
        if out is not None:
            heads |= {n for n, m in self.modules.items() if m is _unwrap(out)}
        return heads

    def block_position(self, name: str) -> tuple[str, int] | None:
        """``(block list name, index)`` of the block that contains ``name``."""
        pos = self._positions.get(name)
        return (pos.blocks, pos.index) if pos else None

    # ----------------------------------------------------------------------- messages
    def _examples(self) -> list[str]:
        leaves = [n for n in self.names if self.info(n) is not None]
        return leaves[:3] or self.names[:3]

    def _close(self, entry: str) -> str:
        suffixes = set()
        for name in self.names:
            parts = name.split(".")
            suffixes.update({parts[-1], ".".join(parts[-2:])})
        suffixes.update(self.present())
        close = difflib.get_close_matches(entry, sorted(suffixes), n=5, cutoff=0.5)
        hint = (f" Close names: {close}." if close
                else f" Module names look like {self._examples()}.")
        if self.structure is not None:
            hint += f" Canonical names for {self.structure.family}: {self.present()}."
        return hint


def resolve_targets(
    model: nn.Module,
    config: DeltaConfig,
    kinds: frozenset[str],
    default: Sequence[str] | str,
    method: str,
    supports: Callable[[nn.Module, LayerInfo, DeltaConfig], str | None] = lambda *_: None,
) -> dict[str, LayerInfo]:
    """The modules ``config`` selects in ``model`` that the method can adapt, in model order.

    Args:
        model: the model to search (logical names, wrappers seen through).
        config: supplies ``targets`` / ``exclude`` / ``layers`` / ``overrides``.
        kinds: layer kinds the method supports.
        default: targets to use when ``config.targets`` is None.
        method: method name, for messages.
        supports: the method's per-module check (``Delta.supports``): ``None`` if it can adapt
            the module, else the reason it cannot.

    Returns:
        ``{module_name: LayerInfo}``.

    Raises:
        TargetError: an entry matches nothing or only unsupported modules, ``layers`` is out of
            range or the model has no block list, or nothing is left after ``exclude``.
    """
    matcher = Matcher(model)
    spec = config.targets if config.targets is not None else default
    chosen: dict[str, LayerInfo] = {}
    for entry, hits in zip(_entries(spec), matcher.select(spec, "targets"), strict=True):
        ok = {}
        for n in hits:
            info = matcher.info(n)
            if info is None or info.kind not in kinds:
                continue
            tap = matcher.tap(n, entry)
            if tap is not None:
                info = dataclasses.replace(info, tap=matcher.canonical(tap))
            elif (old := chosen.get(matcher.canonical(n))) is not None:
                info = old  # keep a tap found through an earlier entry
            if supports(matcher.modules[n], info, config) is None:  # sees the tap too
                ok[n] = info
        if not ok:
            raise TargetError(_unadaptable(matcher, entry, hits, kinds, method, supports,
                                           config))
        for n, info in ok.items():
            chosen[matcher.canonical(n)] = info

    if config.layers is not None:
        chosen = _filter_layers(matcher, chosen, list(config.layers))
    if config.exclude is not None:
        for hits in matcher.select(config.exclude, "exclude"):
            for name in hits:
                chosen.pop(matcher.canonical(name), None)
    if not chosen:
        raise TargetError(f"no module is left to adapt after exclude={config.exclude!r}")
    order = {n: i for i, n in enumerate(matcher.names)}
    chosen = dict(sorted(chosen.items(), key=lambda kv: order[kv[0]]))
    _check_overrides(matcher, config, chosen)
    return chosen


def module_config(model_or_matcher: nn.Module | Matcher, config: DeltaConfig,
                  name: str) -> DeltaConfig:
    """``config`` as module ``name`` sees it: the first matching ``overrides`` entry applied,
    and every ``module_sets`` field resolved to whether it names this module."""
    sets = {f: getattr(config, f) for f in config.module_sets
            if not isinstance(getattr(config, f), bool)}
    if not config.overrides and not sets:
        return config
    matcher = (model_or_matcher if isinstance(model_or_matcher, Matcher)
               else Matcher(model_or_matcher))
    changes: dict = {f: spec is not None and matcher.matches(name, spec)
                     for f, spec in sets.items()}
    for key, values in (config.overrides or {}).items():
        if matcher.entry_matches(name, key):
            changes.update(values)
            break
    return config.replace(overrides=None, **changes)


def _fused_children(module: nn.Module) -> list[tuple[str, str]]:
    """Children whose weights a fused torch module reads directly instead of calling them.

    Wrapping them would be silently bypassed, so they are not adaptable.
    """
    if isinstance(module, nn.MultiheadAttention):
        return [("out_proj", "nn.MultiheadAttention reads out_proj.weight directly")]
    if isinstance(module, nn.TransformerEncoderLayer):
        why = "nn.TransformerEncoderLayer's fused inference path reads its weights directly"
        return [(child, why) for child in ("linear1", "linear2", "norm1", "norm2")]
    return []


def _entries(spec: Sequence[str] | str) -> list[str]:
    return [spec] if isinstance(spec, str) else list(spec)


def _unadaptable(matcher: Matcher, entry: str, hits: list[str], kinds: frozenset[str],
                 method: str, supports: Callable, config: DeltaConfig) -> str:
    if not hits:
        return (f"targets={entry!r} found no Linear / HF Conv1D layer outside the output head "
                f"in {type(matcher.model).__name__}; name the modules to adapt instead")
    for name in hits:
        if name in matcher._bypassed:
            return (f"targets entry {entry!r} matches {name!r}, which cannot be adapted: "
                    f"{matcher._bypassed[name]} instead of calling it, so a wrapped layer "
                    "would be silently bypassed. Target other layers")
        try:
            layer_info(matcher.modules[name])
        except TargetError as exc:
            return f"targets entry {entry!r} matches {name!r}, which cannot be adapted: {exc}"
    for name in hits:
        info = matcher.info(name)
        if info is not None and info.kind in kinds:
            why = supports(matcher.modules[name], info, config)
            if why:
                return (f"targets entry {entry!r} matches {name!r}, which {method} cannot "
                        f"adapt: {why}")
    types = sorted({type(matcher.modules[n]).__name__ for n in hits})
    return (f"targets entry {entry!r} matches only modules {method!r} cannot adapt "
            f"({', '.join(types)}; e.g. {hits[0]!r}); {method} adapts layer kinds "
            f"{sorted(kinds)} (linear: Linear / HF Conv1D; conv: Conv1d/2d/3d; embedding: "
            "Embedding; norm: LayerNorm / RMSNorm / GroupNorm / BatchNorm with affine weights)")


def _filter_layers(matcher: Matcher, chosen: dict[str, LayerInfo],
                   layers: list[int]) -> dict[str, LayerInfo]:
    if not matcher.block_lists:
        raise TargetError(f"layers={layers} needs a repeated block list, but none was found in "
                          f"{type(matcher.model).__name__}; select modules with a regex in "
                          "targets instead")
    wanted: dict[str, set[int]] = {}
    for blocks in matcher.block_lists:
        size = len(matcher.modules[blocks])
        bad = [i for i in layers if not -size <= i < size]
        if bad:
            raise TargetError(f"layers {bad} out of range for {blocks!r}, which has {size} "
                              f"blocks (valid: 0..{size - 1} or negative from the end)")
        wanted[blocks] = {i % size for i in layers}
    kept = {}
    for name, info in chosen.items():
        pos = matcher.block_position(name)
        if pos is not None and pos[1] in wanted[pos[0]]:
            kept[name] = info
    if not kept:
        raise TargetError(f"none of the targeted modules lies in blocks {layers} of "
                          f"{matcher.block_lists}")
    return kept


def _check_overrides(matcher: Matcher, config: DeltaConfig, chosen: dict[str, LayerInfo]) -> None:
    for key in config.overrides or {}:
        if not any(matcher.entry_matches(n, key) for n in chosen):
            raise TargetError(f"overrides key {key!r} matches none of the targeted modules "
                              f"(e.g. {list(chosen)[:3]}); check the spelling")
    for field in config.module_sets:
        spec = getattr(config, field)
        if spec is None or isinstance(spec, bool):
            continue
        for entry in _entries(spec):
            if not any(matcher.matches(n, entry if isinstance(spec, str) else [entry])
                       for n in chosen):
                raise TargetError(f"{field} entry {entry!r} matches none of the targeted "
                                  f"modules (e.g. {list(chosen)[:3]}); it must name a subset "
                                  "of targets")
