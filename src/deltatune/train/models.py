"""Models, tokenizers and delta configs for the command line.

* ``method_config``: a registered method's config from a name, ``key=value`` settings and / or
  a file's mapping (``{"method": "lora", "rank": 8}``), through ``deltatune.config_from_dict``:
  every registered method works without changes here.
* ``load_tokenizer`` / ``load_model``: a local Hugging Face directory or a hub id, for sequence
  classification or causal LM, in float32 by default. A classification head that the
  checkpoint lacks (a causal LM loaded for classification) is new: it is trained with the
  delta and saved beside it (``head.safetensors``), like peft's ``modules_to_save``.
* ``run_dir`` / ``load_trained``: read back what ``deltatune train`` wrote.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.config import DeltaConfig, config_from_dict
from ..core.errors import ConfigError
from ..core.registry import get_method, methods

RUN_FILE = "run.json"
ADAPTER_DIR = "adapter"
HEAD_FILE = "head.safetensors"
#: config fields that give a method its size, in the order they are tried
SIZE_FIELDS = ("rank", "bottleneck", "num_tokens", "dim")


# ---------------------------------------------------------------------------- delta configs
def parse_value(text: str) -> Any:
    """A ``--set`` value: JSON (``8``, ``1e-3``, ``true``, ``["q", "v"]``), else YAML
    (``[q_proj, v_proj]``, ``{attn.v: {rank: 16}}``), else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        import yaml

        value = yaml.safe_load(text)
    except Exception:  # no PyYAML, or not YAML: a plain string
        return text
    return text if value is None and text.strip() not in ("null", "~", "") else value


def parse_sets(sets: Iterable[str]) -> dict[str, Any]:
    """``["rank=8", "targets=all-linear"]`` → ``{"rank": 8, "targets": "all-linear"}``.

    Raises:
        ConfigError: an entry without ``=``.
    """
    out = {}
    for entry in sets:
        key, sep, value = entry.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set takes key=value (e.g. --set rank=8), got {entry!r}")
        out[key.strip()] = parse_value(value.strip())
    return out


def method_config(method: str | None = None, settings: Mapping[str, Any] | None = None,
                  base: Mapping[str, Any] | None = None) -> DeltaConfig:
    """Build a registered method's config.

    Args:
        method: the method's registered name (overrides ``base["method"]``).
        settings: field values (from ``--set``), applied over ``base``.
        base: a mapping read from a file, optionally with a ``"method"`` tag.

    Raises:
        ConfigError: no method, an unknown method (the message lists ``deltatune.methods()``)
            or an unknown field (the message lists the method's fields).
    """
    data = {**(base or {}), **(settings or {})}
    if method is not None:
        data["method"] = method
    if "method" not in data:
        raise ConfigError(f"no method given: pass --method NAME (one of {methods()}) or a "
                          "config with a 'method:' entry")
    get_method(data["method"])  # a clear error for unknown names
    return config_from_dict(data)


def fill_steps(config: DeltaConfig, steps: int) -> DeltaConfig:
    """Methods that schedule over the run (``total_steps`` unset) get the run's length."""
    if "total_steps" in config.field_names() and config.total_steps is None:
        return config.replace(total_steps=steps)
    return config


def size_field(config: DeltaConfig) -> str | None:
    """The field that sets how big the method's delta is, if it has one."""
    return next((f for f in SIZE_FIELDS if f in config.field_names()), None)


# -------------------------------------------------------------------------------- loading
def load_tokenizer(model_id: str) -> Any:
    """A model's tokenizer with a padding token (its end-of-text token if it has none).

    Raises:
        ConfigError: no tokenizer, or one without a padding or end-of-text token.
    """
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():
            tok = AutoTokenizer.from_pretrained(model_id)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load a tokenizer from {model_id!r}: {exc}") from exc
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise ConfigError(f"the tokenizer of {model_id} has neither a padding nor an "
                              "end-of-text token; add one to its tokenizer_config.json")
        tok.pad_token = tok.eos_token
    return tok


@dataclass
class Loaded:
    """A model for a task, plus the parameters the checkpoint lacked (a new head)."""

    model: nn.Module
    new_params: dict[str, nn.Parameter] = field(default_factory=dict)


def _task_class(task: str, label_names: Sequence[str], pad_id: int | None
                ) -> tuple[Any, dict[str, Any]]:
    """The transformers auto class for ``task`` and the config keywords it needs."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if task != "classification":
        return AutoModelForCausalLM, {}
    names = list(label_names)
    kwargs: dict[str, Any] = dict(num_labels=len(names), id2label=dict(enumerate(names)),
                                  label2id={n: i for i, n in enumerate(names)})
    if pad_id is not None:
        kwargs["pad_token_id"] = pad_id
    return AutoModelForSequenceClassification, kwargs


def model_skeleton(model_id: str, task: str, *, label_names: Sequence[str] = (),
                   pad_id: int | None = None) -> nn.Module:
    """The model's modules on the ``meta`` device (no weights read, nothing allocated): enough
    to resolve targets and count a delta's parameters (``deltatune.cost``).

    Raises:
        ConfigError: no model config at ``model_id``.
    """
    from transformers import AutoConfig

    cls, kwargs = _task_class(task, label_names, pad_id)
    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(model_id, **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load a {task} model from {model_id!r}: {exc}") from exc
    with torch.device("meta"), quiet_transformers():
        return cls.from_config(config)


def load_model(model_id: str, task: str, *, label_names: Sequence[str] = (),
               pad_id: int | None = None, dtype: str = "float32",
               device: str | torch.device = "cpu") -> Loaded:
    """A model from a local directory or hub id, for ``task``.

    Raises:
        ConfigError: nothing loadable at ``model_id``.
    """
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ConfigError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    cls, extra = _task_class(task, label_names, pad_id)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "output_loading_info": True, **extra}
    try:
        with quiet_transformers():
            model, info = cls.from_pretrained(model_id, **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load a {task} model from {model_id!r}: {exc}") from exc
    if pad_id is not None:
        model.config.pad_token_id = pad_id
    model.to(device).eval()
    missing = [k for k in info.get("missing_keys", []) if _is_param(model, k)]
    return Loaded(model, {k: model.get_parameter(k) for k in sorted(missing)})


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' loading reports and progress bars (the CLI reports what matters,
    e.g. a new head, itself)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _is_param(model: nn.Module, name: str) -> bool:
    try:
        model.get_parameter(name)
    except AttributeError:
        return False
    return True


def pools_last_token(model: nn.Module) -> bool:
    """Whether a sequence classifier reads its decoder's last token (HF names that head
    ``score``: Llama, Mistral, Qwen2, GPT-2, GPT-NeoX …; encoders' ``classifier`` reads the
    first token): such models are padded on the left."""
    return isinstance(getattr(model, "score", None), nn.Linear)


def pick_device(device: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ------------------------------------------------------------------------- reading runs back
def run_dir(path: str | Path) -> tuple[Path, dict[str, Any] | None]:
    """``(adapter directory, run record)`` for a run directory or an adapter directory (the run
    record, ``run.json``, is found beside or above it when there is one)."""
    path = Path(path)
    if (path / RUN_FILE).is_file():
        return path / ADAPTER_DIR, json.loads((path / RUN_FILE).read_text())
    for parent in (path.parent, path.parent.parent):
        if (parent / RUN_FILE).is_file():
            return path, json.loads((parent / RUN_FILE).read_text())
    return path, None


def load_trained(path: str | Path, *, model_id: str | None = None, task: str | None = None,
                 device: str | torch.device = "cpu", trainable: bool = False,
                 dtype: str | None = None) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Rebuild a trained model: base + saved deltas (+ a trained new head).

    Args:
        path: a run directory (``deltatune train --output``) or a saved adapter directory.
        model_id: the base model (default: the one the run recorded).
        task: ``classification`` / ``causal-lm`` (default: the run's; else causal LM).

    Returns:
        ``(model, tokenizer or None, run record or {})``.

    Raises:
        ConfigError: no base model known.
    """
    from safetensors.torch import load_file

    from ..core.state import load

    adapter, record = run_dir(path)
    record = record or {}
    model_id = model_id or record.get("model")
    if model_id is None:
        raise ConfigError(f"{path} has no run record ({RUN_FILE}); pass --model (the base "
                          "model the delta was trained on)")
    task = task or record.get("task") or "causal-lm"
    tokenizer = load_tokenizer(model_id)
    loaded = load_model(model_id, task, label_names=record.get("label_names") or ["0", "1"],
                        pad_id=tokenizer.pad_token_id, device=device,
                        dtype=dtype or record.get("dtype") or "float32")
    head = adapter.parent / HEAD_FILE if record else None
    if head is not None and head.is_file():
        tensors = load_file(str(head))
        with torch.no_grad():
            for name, value in tensors.items():
                loaded.model.get_parameter(name).copy_(value)
    load(loaded.model, adapter, trainable=trainable)
    return loaded.model, tokenizer, record


__all__ = ["ADAPTER_DIR", "HEAD_FILE", "RUN_FILE", "SIZE_FIELDS", "Loaded", "fill_steps",
           "load_model", "load_tokenizer", "load_trained", "method_config", "parse_sets",
           "parse_value", "pick_device", "run_dir", "size_field"]
