"""Hot swaps: replace a loaded delta's weights in place, and keep a compiled model compiled.

    dt.load(model, "out/sst2", name="a")
    dt.prepare_hotswap(model, max_rank=16)     # once, before torch.compile and any optimizer
    compiled = torch.compile(model)
    dt.hotswap(model, "out/rte", name="a")     # "a" now computes the delta saved in out/rte

A hot swap copies the tensors of another saved delta (same method, same modules) into the
delta ``name`` with ``copy_``: no module is re-wrapped and no tensor re-allocated, so optimizers,
compiled graphs and CUDA graphs keep their pointers, and a model compiled with
``torch.compile`` runs the new delta without recompiling. Afterwards the model computes what a
fresh model with the saved delta loaded computes (the delta's name, activation and
``requires_grad`` stay as they were).

What may differ between the two is what the method declares (``Delta.swappable``): for LoRA and
DoRA the rank, alpha, rsLoRA, dropout and init; for the other methods nothing but the
placement fields (their tensors then have the same shapes). A lower rank is padded with zeros.
``prepare_hotswap`` makes the room the others need: it pads every rank-sized tensor to
``max_rank`` with zeros (the outputs do not change; the config becomes the equivalent rank-
``max_rank`` one, alpha adjusted) and moves the scalings the forward reads from Python floats,
which a compiled graph bakes in and guards on, into tensors. Without it, a swap to another
alpha is still exact but recompiles a compiled model, and a swap to a higher rank is refused.

Everything is checked before anything is written: another method, other modules, another value
of a field that may not change, a rank above the prepared one, a merged delta, a corrupt file;
each is an error that leaves the model as it was.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import PLACEMENT_FIELDS, DeltaConfig, config_from_dict
from .delta import Delta
from .errors import AdapterFileError, AdapterNameError, ConfigError, ShapeMismatchError, StateError
from .geometry import LayerInfo
from .inject import build_delta, build_shared
from .layers import DeltaLayer
from .lifecycle import adapters, delta_layers
from .state import _check_fingerprint, _copy_in, read_meta, read_tensors
from .targeting import Matcher, module_config, unwrap_model


def swap_impl(cls: type[Delta]) -> type[Delta]:
    """The class whose hot-swap support (``Delta.swappable`` and its hooks) applies to deltas of
    ``cls``: the class declaring ``swappable``, or ``Delta`` (equal configs only) if a subclass
    overrode one of the methods that support relies on (``Delta.swap_reads``)."""
    mro = cls.__mro__
    owner = next(k for k in mro if "swappable" in vars(k))
    below = mro[:mro.index(owner)]
    changed = any(name in vars(k) for k in below for name in owner.swap_reads)
    return Delta if changed else owner


# ------------------------------------------------------------------------------ prepare
def prepare_hotswap(model: nn.Module, max_rank: int | None = None,
                    names: str | Iterable[str] | None = None) -> nn.Module:
    """Make room for hot swaps: pad ranks to ``max_rank`` with zeros, move scalings into tensors.

    Call it once after loading and after moving / casting the model, before ``torch.compile``
    and before creating an optimizer: it allocates the padded tensors (the outputs do not
    change). Afterwards ``hotswap`` accepts deltas of any rank up to ``max_rank`` and any alpha
    without recompiling a compiled model. Saved afterwards, a delta is its padded equivalent
    (rank ``max_rank``, alpha adjusted: the same outputs, loadable anywhere).

    Args:
        model: a model with deltas (not the ``torch.compile`` wrapper).
        max_rank: the largest rank to swap in (methods with a rank: LoRA, DoRA); ``None``: the
            largest rank the delta has now (every module of it padded to that one).
        names: the deltas to prepare (default: all).

    Returns:
        ``model``.

    Raises:
        StateError: ``model`` is already compiled, or a delta is merged (unmerge it first).
        AdapterNameError: an unknown name.
        ConfigError: ``max_rank`` below a rank the delta has, or a delta that cannot be
            padded (the message says why). Nothing is changed then.
    """
    if getattr(model, "_orig_mod", None) is not None:
        raise StateError("prepare_hotswap re-allocates the padded tensors, which a compiled "
                         "graph would not see; call it on the model before torch.compile")
    if max_rank is not None and (not isinstance(max_rank, int) or isinstance(max_rank, bool)
                                 or max_rank < 1):
        raise ConfigError(f"max_rank must be a positive integer or None, got {max_rank!r}")
    known = adapters(model)
    chosen = list(known) if names is None else [names] if isinstance(names, str) else list(names)
    for name in chosen:
        if name not in known:
            raise AdapterNameError(f"no adapter named {name!r}; the model has {list(known)}")
    plans = [_prepare_plan(model, name, max_rank) for name in chosen]
    for plan in plans:
        plan.apply()
    for layer in delta_layers(model).values():
        layer.refresh()  # new tensors: per-sample plans holding the old ones are rebuilt
    return model


def _prepare_plan(model: nn.Module, name: str, max_rank: int | None) -> _Plan:
    group = _group(model, name)
    first = next(iter(group.values())).deltas[name]
    impl = swap_impl(type(first))
    config = first.adapter_config
    if "rank" in impl.swappable:
        ranks = {p: layer.deltas[name].config.rank for p, layer in group.items()}
        rank = max(ranks.values()) if max_rank is None else max_rank
        above = {p: r for p, r in ranks.items() if r > rank}
        if above:
            path, r = next(iter(above.items()))
            raise ConfigError(f"delta {name!r} has rank {r} on {path}, above max_rank={rank}; "
                              f"pass max_rank >= {max(ranks.values())}")
        try:
            config = impl.pad_config(config, rank)
        except ConfigError as exc:
            raise ConfigError(f"cannot prepare delta {name!r} for hot swaps: {exc}") from None
    plan = _Plan(model, impl, name, config, group, _module_configs(model, config, group))
    for path, delta, template in plan.templates():
        live = _shapes(delta)
        for key, shape in _shapes(template).items():
            if key not in live or len(live[key]) != len(shape) or any(
                    a > b for a, b in zip(live[key], shape, strict=True)):
                raise ConfigError(f"cannot pad {name!r} on {path}: its tensor {key!r} "
                                  f"{live.get(key)} does not fit {shape}")
    plan.pad = True
    return plan


# ------------------------------------------------------------------------------ hot swap
def hotswap(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> nn.Module:
    """Replace the weights of the loaded delta ``name`` in place with those saved at ``path``.

    Args:
        model: a model holding delta ``name`` (or its ``torch.compile`` wrapper).
        path: a directory written by ``save`` holding one delta of the same method on the same
            modules; rank and scaling may differ where the method allows (see
            ``prepare_hotswap``).
        name: the delta to overwrite (default: the model's only delta).

    Returns:
        ``model``.

    Raises:
        AdapterNameError: no delta ``name`` (or several deltas and no name).
        AdapterFileError: no saved delta at ``path``, or a corrupt/truncated file.
        ShapeMismatchError: the saved delta adapts other modules, or has a rank above the
            prepared one (call ``prepare_hotswap(model, max_rank=...)`` before compiling).
        ConfigError: another method, or a config field that a swap may not change differs.
        StateError: the delta is merged (unmerge it first).
    On any error the model is left as it was.
    """
    root = Path(path)
    meta = read_meta(root)
    try:
        new = config_from_dict(meta["config"])
    except ConfigError as exc:
        raise AdapterFileError(f"{root}: {exc}") from exc
    tensors = read_tensors(root, meta["weights_sha256"])
    targets = _check_fingerprint(unwrap_model(model), meta["base"], root)
    return hotswap_tensors(model, new, tensors, name, source=str(root), targets=targets)


def hotswap_tensors(model: nn.Module, config: DeltaConfig, tensors: Mapping[str, Tensor],
                    name: str | None = None, *, source: str = "the swapped-in delta",
                    targets: Mapping[str, LayerInfo] | None = None) -> nn.Module:
    """``hotswap`` from memory: a delta's ``config`` and ``tensors`` as ``save`` writes them
    (``adapter_config`` and ``state.adapter_tensors(model, name)``: ``<module path>.<tensor>``),
    e.g. adapters kept in host memory by a server that swaps them often.

    Args:
        model: a model holding delta ``name`` (or its ``torch.compile`` wrapper).
        config: the swapped-in delta's adapter config.
        tensors: its tensors (any device and dtype; copied, never kept).
        name: the delta to overwrite (default: the model's only delta).
        source: what the tensors are, for error messages.
        targets: the modules they adapt, with their taps (``None``: read from ``tensors``).

    Returns:
        ``model``.

    Raises:
        The errors of ``hotswap``; the model is left as it was.
    """
    name = _pick(model, name)
    plan = _swap_plan(model, name, config, targets, source)
    plan.tensors, plan.source = _fitted(plan, dict(tensors), source), source
    plan.apply()
    return model


def _pick(model: nn.Module, name: str | None) -> str:
    known = list(adapters(model))
    if name is None:
        if len(known) != 1:
            raise AdapterNameError(f"the model has {len(known)} deltas {known}; say which one "
                                   "to overwrite with name=")
        return known[0]
    if name not in known:
        raise AdapterNameError(f"no adapter named {name!r} to swap into; the model has {known} "
                               "(load it first with deltatune.load)")
    return name


def _swap_plan(model: nn.Module, name: str, new: DeltaConfig,
               targets: Mapping[str, LayerInfo] | None, root: str) -> _Plan:
    group = _group(model, name)
    if targets is None:  # the tensors name their modules; _fitted checks they are these
        targets = {p: layer.deltas[name].info for p, layer in group.items()}
    first = next(iter(group.values())).deltas[name]
    if new.method != first.method:
        raise ConfigError(f"{root} holds a {new.method!r} delta but {name!r} is a "
                          f"{first.method!r} one; a hot swap keeps the method. Load it as "
                          "another delta instead (deltatune.load(model, path, name=...))")
    missing, extra = sorted(set(group) - set(targets)), sorted(set(targets) - set(group))
    if missing or extra:
        raise ShapeMismatchError(
            f"{root} adapts other modules than {name!r}: "
            + "; ".join(f"{what} {paths[:3]}" for what, paths in
                        (("only in the model", missing), ("only in the file", extra)) if paths)
            + ". A hot swap needs the same targets; load it as another delta instead")
    for path, layer in group.items():
        if targets[path].tap != layer.deltas[name].info.tap:
            raise ShapeMismatchError(f"{root} reads {path!r}'s input at {targets[path].tap!r}, "
                                     f"{name!r} at {layer.deltas[name].info.tap!r}")
    impl = swap_impl(type(first))
    config = _padded(model, impl, name, new, group, root)
    plan = _Plan(model, impl, name, config, group, _module_configs(model, config, group))
    allowed = impl.swappable | set(PLACEMENT_FIELDS)
    for path, layer in group.items():
        ours, theirs = layer.deltas[name].config, plan.configs[path]
        for f in fields(ours):
            if f.name not in allowed and getattr(ours, f.name) != getattr(theirs, f.name):
                may = sorted(impl.swappable) or "none"
                raise ConfigError(
                    f"{root}: {f.name}={getattr(theirs, f.name)!r} in the saved delta but "
                    f"{getattr(ours, f.name)!r} in {name!r} (on {path}); a hot swap of "
                    f"{first.method!r} deltas may change these fields only: {may}. Load it "
                    "as another delta instead")
    for path, delta, template in plan.templates():
        ours, theirs = _shapes(delta, buffers=False), _shapes(template, buffers=False)
        if ours != theirs:
            key = next(k for k in sorted({*ours, *theirs}) if ours.get(k) != theirs.get(k))
            raise ShapeMismatchError(
                f"{root}: on {path}, tensor {key!r} would be {theirs.get(key)} but {name!r} "
                f"holds {ours.get(key)}; the deltas differ in structure, so the saved one "
                "cannot be copied in place. Load it as another delta instead")
    return plan


def _padded(model: nn.Module, impl: type[Delta], name: str, new: DeltaConfig,
            group: dict[str, DeltaLayer], root: str) -> DeltaConfig:
    """``new``, padded to the loaded delta's rank where the method pads ranks."""
    if "rank" not in impl.swappable:
        return new
    matcher = Matcher(unwrap_model(model))
    ranks = {p: layer.deltas[name].config.rank for p, layer in group.items()}
    wanted = {p: module_config(matcher, new, p).rank for p in group}
    if wanted == ranks:
        return new
    above = [p for p in group if wanted[p] > ranks[p]]
    if above:
        p = above[0]
        raise ShapeMismatchError(
            f"{root} has rank {wanted[p]} on {p}, above the {ranks[p]} that {name!r} holds "
            f"there; prepare the model for the largest rank you will swap in, once, before "
            f"compiling: deltatune.prepare_hotswap(model, max_rank={max(wanted.values())})")
    if len(set(ranks.values())) > 1:
        raise ShapeMismatchError(
            f"{name!r} has ranks {sorted(set(ranks.values()))} on different modules and {root} "
            "others; deltatune.prepare_hotswap(model, max_rank=...) gives every module one "
            "rank, into which any lower one fits")
    try:
        return impl.pad_config(new, next(iter(ranks.values())))
    except ConfigError as exc:
        raise ConfigError(f"{root} cannot be swapped into {name!r}: {exc}") from None


def _fitted(plan: _Plan, tensors: dict[str, Tensor], root: str) -> dict[str, Tensor]:
    """The file's tensors at the loaded delta's shapes (lower ranks zero-padded), checked
    like ``load`` checks them: every one present and used, shapes that fit."""
    pads = "rank" in plan.impl.swappable
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    alive: list[Tensor] = []  # keeps ids unique while ``seen`` is in use
    for path, layer in plan.group.items():
        for key, value in layer.deltas[plan.name].saved_tensors().items():
            if id(value) in seen:  # shared with an earlier delta
                continue
            seen.add(id(value))
            alive.append(value)
            full = f"{path}.{key}"
            if full not in tensors:
                raise AdapterFileError(f"{root} lacks tensor {full!r}, which its config "
                                       "needs; it is incomplete")
            t = tensors[full]
            if t.shape != value.shape:
                fits = pads and t.dim() == value.dim() and all(
                    a <= b for a, b in zip(t.shape, value.shape, strict=True))
                if not fits:
                    raise ShapeMismatchError(f"tensor {full!r} has shape {tuple(t.shape)} in "
                                             f"{root} but {plan.name!r} holds "
                                             f"{tuple(value.shape)}")
                t = _zero_pad(t, value.shape)
            out[full] = t
    extra = sorted(set(tensors) - set(out))
    if extra:
        raise AdapterFileError(f"{root} holds tensors its config does not explain, e.g. "
                               f"{extra[:3]}; it does not belong to this config")
    return out


# --------------------------------------------------------------------------------- plans
@dataclass
class _Plan:
    """What a swap or a preparation writes, built and checked before anything is written."""

    model: nn.Module
    impl: type[Delta]
    name: str
    config: DeltaConfig  # the adapter config the deltas will carry
    group: dict[str, DeltaLayer]
    configs: dict[str, DeltaConfig]  # per module
    tensors: dict[str, Tensor] | None = None  # swap: the fitted file tensors
    source: str = ""  # swap: where they come from
    pad: bool = False  # prepare: grow tensors to the configs' shapes

    def templates(self) -> Iterable[tuple[str, Delta, Delta]]:
        """``(path, loaded delta, a delta built on meta with the new config)`` per module."""
        first = next(iter(self.group.values())).deltas[self.name]
        cls = type(first)
        targets = {p: layer.deltas[self.name].info for p, layer in self.group.items()}
        shared = None
        if getattr(first, "shared", None) is not None:
            shared = build_shared(cls, self.config, targets, Matcher(unwrap_model(self.model)),
                                  init=False, device="meta")
        for path, layer in self.group.items():
            delta = layer.deltas[self.name]
            template = build_delta(cls, layer.base_layer, delta.info, self.configs[path], path,
                                   init=False, device="meta", shared=shared)
            yield path, delta, template

    def apply(self) -> None:
        deltas = [layer.deltas[self.name] for layer in self.group.values()]
        if self.pad:
            for _, delta, template in list(self.templates()):
                _grow(delta, template)
        if self.tensors is not None:
            with torch.no_grad():
                _copy_in(self.model, self.name, self.tensors, Path(self.source))
        for path, delta in zip(self.group, deltas, strict=True):
            self.impl.apply_config(delta, self.configs[path])
            delta.adapter_config = self.config
            if self.pad:
                self.impl.prepare_swap(delta)


def _group(model: nn.Module, name: str) -> dict[str, DeltaLayer]:
    """The layers holding delta ``name``; refuses a merged one."""
    group = {p: layer for p, layer in delta_layers(model).items() if name in layer.deltas}
    merged = [p for p, layer in group.items() if name in layer.merged]
    if merged:
        raise StateError(f"delta {name!r} is merged into the weights of {merged[:3]}; unmerge "
                         "it first (deltatune.unmerge(model, name))")
    return group


def _module_configs(model: nn.Module, config: DeltaConfig,
                    group: dict[str, DeltaLayer]) -> dict[str, DeltaConfig]:
    matcher = Matcher(unwrap_model(model))
    return {p: module_config(matcher, config, p) for p in group}


def _shapes(delta: Delta, *, buffers: bool = True) -> dict[str, tuple[int, ...]]:
    """Shapes of a delta's parameters (and buffers) by name."""
    items = [*delta.named_parameters(), *(delta.named_buffers() if buffers else ())]
    return {k: tuple(v.shape) for k, v in items}


def _grow(delta: Delta, template: Delta) -> None:
    """Give ``delta`` ``template``'s tensor shapes: each larger tensor zero-padded at the end."""
    live = dict([*delta.named_parameters(), *delta.named_buffers()])
    for key, shape in _shapes(template).items():
        value = live[key]
        if tuple(value.shape) == shape:
            continue
        owner_path, _, leaf = key.rpartition(".")
        owner = delta.get_submodule(owner_path) if owner_path else delta
        grown = _zero_pad(value.detach(), shape)
        if isinstance(value, nn.Parameter):
            setattr(owner, leaf, nn.Parameter(grown, requires_grad=value.requires_grad))
        else:
            owner.register_buffer(leaf, grown, persistent=leaf not in
                                  owner._non_persistent_buffers_set)


def _zero_pad(t: Tensor, shape: tuple[int, ...] | torch.Size) -> Tensor:
    out = t.new_zeros(shape)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out
