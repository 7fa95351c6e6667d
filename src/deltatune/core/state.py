"""Saving and loading deltas (DESIGN §4).

A saved delta is a directory holding ``deltatune_config.json`` (format version, deltatune
version, adapter name, the method's config, and a fingerprint of the base model: architecture,
the targeted modules' types and weight shapes, optionally a hash of their weights) and
``deltatune_model.safetensors`` (only the delta's tensors, named ``<module path>.<tensor>`` with
paths of the unmodified base model). The config records the sha256 of the tensor file, so a
truncated, corrupted or mismatched file is caught before it is parsed.

Writes are atomic: both files are written to a temporary sibling directory and swapped into
place, so a crash mid-save never leaves a half-written adapter where a good one was. Loading uses
JSON and safetensors only, never pickle.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import config_from_dict
from .distributed import architecture, full_tensor, is_main_process
from .errors import AdapterFileError, AdapterNameError, ConfigError, DeltaError, ShapeMismatchError
from .geometry import dense_weight
from .inject import attach, check_name
from .lifecycle import activate, active_adapters, adapters, delete, delta_layers
from .targeting import Matcher

CONFIG_FILE = "deltatune_config.json"
WEIGHTS_FILE = "deltatune_model.safetensors"
FORMAT_VERSION = 1
_OWN_FILES = {CONFIG_FILE, WEIGHTS_FILE}


# ---------------------------------------------------------------------------------- save
def save(model: nn.Module, path: str | os.PathLike, name: str | None = None, *,
         hash_base: bool = False) -> Path:
    """Save deltas (not the base model) to ``path``.

    Args:
        model: a model with deltas.
        path: directory to write. With ``name`` given (or a single delta in the model), the
            delta is saved in ``path`` itself; with several deltas and no ``name``, each goes
            to ``path/<name>``.
        name: the delta to save.
        hash_base: also record a sha256 of the targeted base weights; loading into other
            weights then warns.

    Distributed runs: call it on every rank. FSDP2-sharded deltas are gathered (a collective),
    and only rank 0 writes; wait for it (e.g. ``torch.distributed.barrier()``) before other
    ranks read the files. DDP / ``torch.compile`` wrappers are seen through.

    Returns:
        The directory written.

    Raises:
        AdapterNameError: unknown name, or no delta in the model.
        AdapterFileError: ``path`` is an existing directory holding files other than a saved
            delta (nothing is overwritten).
    """
    names = list(adapters(model))
    if not names:
        raise AdapterNameError("the model has no deltas to save; inject or load one first")
    root = Path(path)
    if name is not None:
        if name not in names:
            raise AdapterNameError(f"no adapter named {name!r}; the model has {names}")
        _save_one(model, root, name, hash_base)
    elif len(names) == 1:
        _save_one(model, root, names[0], hash_base)
    else:
        for each in names:
            _save_one(model, root / each, each, hash_base)
    return root


def adapter_tensors(model: nn.Module, name: str) -> dict[str, Tensor]:
    """The tensors ``save`` writes for delta ``name``, keyed ``<module path>.<tensor>``."""
    out = {}
    # tensors shared between deltas are saved once, at first sight; ``alive`` holds every
    # tensor seen so that an id is never reused by a temporary (state_tensors may return views)
    seen: set[int] = set()
    alive: list[Tensor] = []
    for path, layer in delta_layers(model).items():
        if name in layer.deltas:
            for key, value in layer.deltas[name].saved_tensors().items():
                if id(value) in seen:
                    continue
                seen.add(id(value))
                alive.append(value)
                value = full_tensor(value.detach())  # FSDP2 shards: gathered (collective)
                out[f"{path}.{key}"] = value.to("cpu").contiguous().clone()
    return out


def fingerprint(model: nn.Module, paths: list[str], *, hash_weights: bool = False,
                taps: Mapping[str, str | None] | None = None) -> dict:
    """Architecture, targeted modules' types and weight shapes (and sub-layer taps), and
    optionally a weight hash."""
    matcher = Matcher(model)
    modules = {}
    for p in paths:
        info = matcher.info(p)
        modules[p] = {"type": type(matcher.modules[p]).__name__,
                      "shape": list(info.weight_shape) if info else None}
        if taps and taps.get(p):
            modules[p]["tap"] = taps[p]
    config = getattr(model, "config", None)
    out: dict[str, Any] = {
        "architecture": architecture(model),
        "model_type": getattr(config, "model_type", None),
        "modules": modules,
    }
    if hash_weights:
        out["sha256"] = _hash_weights(matcher, paths)
    return out


def _hash_weights(matcher: Matcher, paths: list[str]) -> str:
    digest = hashlib.sha256()
    for p in paths:
        weight = dense_weight(matcher.modules[p]).detach().to("cpu").contiguous()
        digest.update(p.encode())
        digest.update(weight.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _save_one(model: nn.Module, directory: Path, name: str, hash_base: bool) -> None:
    from safetensors.torch import save_file

    from .. import __version__

    layers = delta_layers(model)
    paths = [p for p, layer in layers.items() if name in layer.deltas]
    if hash_base and any(layers[p].merged for p in paths):
        raise DeltaError("cannot hash the base weights while deltas are merged into them; "
                         "unmerge first or save with hash_base=False")
    config = layers[paths[0]].deltas[name].adapter_config.for_saving()
    tensors = adapter_tensors(model, name)  # every rank: gathering sharded tensors is collective
    if not is_main_process():
        return
    with atomic_directory(directory, own_files=_OWN_FILES) as tmp:
        weights = tmp / WEIGHTS_FILE
        save_file(tensors, str(weights), metadata={"format": "pt"})
        meta = {
            "format": "deltatune",
            "format_version": FORMAT_VERSION,
            "deltatune_version": __version__,
            "name": name,
            "config": config.to_dict(),
            "base": fingerprint(model, paths, hash_weights=hash_base,
                                taps={p: layers[p].deltas[name].info.tap for p in paths}),
            "weights_sha256": _file_sha256(weights),
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")


@contextlib.contextmanager
def atomic_directory(directory: Path, own_files: set[str]) -> Iterator[Path]:
    """Write a directory atomically: yield a temporary sibling, then swap it into place.

    ``directory`` may be absent, empty, or hold only ``own_files`` (a previous save, which is
    replaced); anything else is refused so that no unrelated file is ever lost. Files are
    fsynced before the swap; on an exception the temporary directory is removed and
    ``directory`` is left as it was.

    Raises:
        AdapterFileError: ``directory`` is a file, or holds other files.
    """
    directory = Path(directory)
    _check_target_dir(directory, own_files)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        yield tmp
        for f in tmp.iterdir():
            _fsync(f)
        _swap_into_place(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _check_target_dir(directory: Path, own_files: set[str]) -> None:
    if not directory.exists():
        return
    if not directory.is_dir():
        raise AdapterFileError(f"{directory} exists and is not a directory; choose another path")
    others = sorted(p.name for p in directory.iterdir() if p.name not in own_files)
    if others and any((directory / f).exists() for f in own_files):
        raise AdapterFileError(f"{directory} holds a saved delta plus other files {others[:5]}; "
                               "refusing to replace it. Save into a dedicated directory")
    if others:
        raise AdapterFileError(f"{directory} is not empty ({others[:5]}) and holds no saved "
                               "delta; refusing to replace it. Save into a new directory")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False if unavailable."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _swap_into_place(tmp: Path, final: Path) -> None:
    if not final.exists():
        os.rename(tmp, final)
    elif _exchange(tmp, final):
        shutil.rmtree(tmp)  # now holds the previous version
    else:  # two renames: the previous version survives as a hidden sibling until the second
        backup = final.with_name(f".{final.name}.previous")
        shutil.rmtree(backup, ignore_errors=True)
        os.rename(final, backup)
        os.rename(tmp, final)
        shutil.rmtree(backup)
    try:
        fd = os.open(final.parent, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:  # some file systems cannot fsync a directory
        pass


# ---------------------------------------------------------------------------------- load
def load(model: nn.Module, path: str | os.PathLike, name: str | None = None, *,
         trainable: bool = False, swap: bool = False) -> nn.Module:
    """Load saved deltas into ``model`` (a fresh base or one with other deltas) and activate them.

    Args:
        model: the base model.
        path: a directory written by ``save``: one delta, or subdirectories of several.
        name: name to give the delta (default: the saved name). Only for a single delta.
        trainable: whether the loaded parameters require grad (default: frozen, for inference).
        swap: overwrite the tensors of the loaded delta ``name`` in place instead of adding a
            delta (``core.hotswap.hotswap``, whose errors it raises; ``trainable`` is then
            ignored: the delta keeps its own).

    Returns:
        ``model``.

    Raises:
        AdapterFileError: no saved delta at ``path``, or a corrupt/truncated/mismatched file.
        ShapeMismatchError: a targeted module is missing or has another shape; the message
            names the first such module.
        AdapterNameError: the name is taken.
    On any error the model is left as it was.
    """
    if swap:
        from .hotswap import hotswap

        return hotswap(model, path, name)
    root = Path(path)
    if (root / CONFIG_FILE).is_file():
        _load_one(model, root, name, trainable)
        return model
    subdirs = sorted(d for d in root.iterdir() if (d / CONFIG_FILE).is_file()) \
        if root.is_dir() else []
    if not subdirs:
        hint = (" It holds a Hugging Face peft adapter (adapter_config.json); import it with "
                "deltatune.integrations.peft.load_peft.") \
            if (root / "adapter_config.json").exists() else ""
        raise AdapterFileError(f"no saved delta at {root} (expected {CONFIG_FILE}, or "
                               f"subdirectories holding one).{hint}")
    if name is not None:
        raise AdapterNameError(f"{root} holds several deltas; load one subdirectory to rename it")
    before = set(adapters(model))
    try:
        for sub in subdirs:
            _load_one(model, sub, None, trainable)
    except Exception:
        for loaded in [n for n in adapters(model) if n not in before]:
            delete(model, loaded)
        raise
    return model


def read_meta(directory: Path) -> dict:
    """Parse and check ``deltatune_config.json``."""
    file = directory / CONFIG_FILE
    try:
        meta = json.loads(file.read_text())
    except FileNotFoundError:
        raise AdapterFileError(f"no saved delta at {directory} (missing {CONFIG_FILE})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFileError(f"{file} is corrupt (not valid JSON: {exc}); re-save the "
                               "delta") from exc
    if not isinstance(meta, dict) or meta.get("format") != "deltatune":
        raise AdapterFileError(f"{file} is not a deltatune adapter config")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise AdapterFileError(f"{file} has format version {version!r}; this deltatune reads "
                               f"up to {FORMAT_VERSION}. Upgrade deltatune")
    for key in ("name", "config", "base", "weights_sha256"):
        if key not in meta:
            raise AdapterFileError(f"{file} is incomplete: no {key!r} entry")
    return meta


def read_tensors(directory: Path, expected_sha256: str) -> dict[str, Tensor]:
    """Load the safetensors file after checking it against the recorded hash."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = directory / WEIGHTS_FILE
    if not file.is_file():
        raise AdapterFileError(f"{file} is missing; the saved delta is incomplete")
    if _file_sha256(file) != expected_sha256:
        raise AdapterFileError(f"{file} does not match its config (truncated, corrupted or "
                               "replaced since it was saved); re-save the delta")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFileError(f"{file} cannot be read ({exc}); re-save the delta") from exc


def _load_one(model: nn.Module, directory: Path, name: str | None, trainable: bool) -> None:
    meta = read_meta(directory)
    try:
        config = config_from_dict(meta["config"])
    except ConfigError as exc:
        raise AdapterFileError(f"{directory / CONFIG_FILE}: {exc}") from exc
    name = check_name(name if name is not None else meta["name"])
    if name in adapters(model):
        raise AdapterNameError(f"an adapter named {name!r} already exists; load under another "
                               "name (name=...) or delete it first")
    tensors = read_tensors(directory, meta["weights_sha256"])
    targets = _check_fingerprint(model, meta["base"], directory)
    active = active_adapters(model)
    attach(model, config, name, targets, trainable=trainable, init=False)
    try:
        _copy_in(model, name, tensors, directory)
    except Exception:
        delete(model, name)
        activate(model, active)
        raise


def _check_fingerprint(model: nn.Module, base: dict, directory: Path) -> dict:
    matcher = Matcher(model)
    targets = {}
    for path, saved in base.get("modules", {}).items():
        if path not in matcher.modules:
            raise ShapeMismatchError(f"the delta in {directory} adapts {path!r}, which this "
                                     f"{type(model).__name__} does not have")
        info = matcher.info(path)
        shape = list(info.weight_shape) if info else None
        if info is None or shape != saved.get("shape"):
            raise ShapeMismatchError(
                f"module {path!r} has weight shape {shape} here but {saved.get('shape')} in the "
                f"saved delta ({directory}); it was made for another base model")
        tap = saved.get("tap")
        if tap is not None:
            if tap not in matcher.modules:
                raise ShapeMismatchError(f"the delta in {directory} reads the input of {tap!r}, "
                                         f"which this {type(model).__name__} does not have")
            info = dataclasses.replace(info, tap=tap)
        targets[path] = info
    if not targets:
        raise AdapterFileError(f"{directory / CONFIG_FILE} lists no adapted modules")
    arch = base.get("architecture")
    if arch and arch != architecture(model):
        warnings.warn(f"delta in {directory} was saved from a {arch}, loading into a "
                      f"{architecture(model)} (shapes match)", stacklevel=3)
    if base.get("sha256") and _hash_weights(matcher, list(targets)) != base["sha256"]:
        warnings.warn(f"delta in {directory} was trained on other base weights (fingerprint "
                      "hash differs; shapes match)", stacklevel=3)
    return targets


def _copy_in(model: nn.Module, name: str, tensors: dict[str, Tensor], directory: Path) -> None:
    wanted = {}
    seen: set[int] = set()
    alive: list[Tensor] = []  # keeps ids unique while ``seen`` is in use (see adapter_tensors)
    for path, layer in delta_layers(model).items():
        if name in layer.deltas:
            delta = layer.deltas[name]
            own = delta.saved_tensors()
            part = {}
            for key, value in own.items():
                if id(value) in seen:  # shared with an earlier delta: loaded already
                    continue
                seen.add(id(value))
                alive.append(value)
                full = f"{path}.{key}"
                if full not in tensors:
                    raise AdapterFileError(f"{directory / WEIGHTS_FILE} lacks tensor {full!r}")
                if tuple(tensors[full].shape) != tuple(value.shape):
                    raise ShapeMismatchError(
                        f"tensor {full!r} has shape {tuple(tensors[full].shape)} in "
                        f"{directory} but the delta expects {tuple(value.shape)}")
                part[key] = tensors[full]
                wanted[full] = True
            delta.load_saved(part)
    extra = sorted(set(tensors) - set(wanted))
    if extra:
        raise AdapterFileError(f"{directory / WEIGHTS_FILE} holds tensors the config does not "
                               f"explain, e.g. {extra[:3]}; it does not belong to this config")
