"""``deltatune train``: one run from a ``RunConfig`` (a YAML / JSON file and / or flags).

The output directory holds::

    run.json             what was run: model, task, columns, labels, delta config, settings
    adapter/             the trained delta(s), deltatune's format (deltatune.save)
    head.safetensors     a new classification head, trained with the delta (when there is one)
    peft/                the delta in HF peft's format (with --export-peft)
    metrics.json         final metrics, the loss / metric history, parameter counts, timing
    curves.png           training loss and evaluation metric against the step
    checkpoints/step-N/  checkpoints (--save-every); --resume continues the newest
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.errors import ConfigError, TargetError
from . import data as data_mod
from .loop import Result, Settings, Trainer
from .metrics import DIRECTION, check_metric
from .models import (
    ADAPTER_DIR,
    HEAD_FILE,
    RUN_FILE,
    fill_steps,
    load_model,
    load_tokenizer,
    method_config,
    pick_device,
    pools_last_token,
)
from .report import fmt_metric, plot_curves, say


@dataclass
class RunConfig:
    """Everything ``deltatune train`` needs; a config file's keys are these field names.

    ``method`` + ``delta`` (field values) or ``delta`` with a ``method`` entry give the delta's
    config; ``set`` holds ``key=value`` strings applied over ``delta``; ``runs`` (compare
    only) lists method configs to compare, each a ``delta``-like mapping (plus ``label``,
    ``lr``).
    """

    model: str | None = None
    data: str | None = None
    eval_data: str | None = None
    dataset_config: str | None = None
    split: str | None = None
    eval_split: str | None = None
    task: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    prompt_column: str | None = None
    completion_column: str | None = None
    quoting: bool = True
    eval_fraction: float = 0.1
    max_train: int | None = None
    max_eval: int | None = None
    max_length: int = 256
    method: str | None = None
    delta: dict[str, Any] = field(default_factory=dict)
    set: list[str] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    name: str | None = None
    output: str | None = None
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 16
    eval_batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: float = 0.06
    max_grad_norm: float = 1.0
    eval_every: int | None = None
    save_every: int | None = None
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    metric: str | None = None
    head: str = "train"
    calibration_batches: int = 8
    dtype: str = "float32"
    device: str = "auto"
    threads: int | None = None
    export_peft: bool = False
    resume: bool | str = False
    overwrite: bool = False
    progress: bool = True
    plot: bool = True
    stop_after: int | None = None

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "config") -> RunConfig:
        """Build from a file's mapping (``-`` in keys is read as ``_``).

        Raises:
            ConfigError: unknown keys (the message lists the valid ones).
        """
        clean = {str(k).replace("-", "_"): v for k, v in values.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(clean) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown keys {unknown}; valid keys: {sorted(known)}")
        if isinstance(clean.get("delta"), str):  # a method config file, beside this one
            clean["delta"] = read_config_file(Path(source).parent / clean["delta"])
        return cls(**clean)

    def merged(self, overrides: Mapping[str, Any]) -> RunConfig:
        """A copy with ``overrides`` (flags given on the command line) applied."""
        return dataclasses.replace(self, **dict(overrides))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON file as a mapping.

    Raises:
        ConfigError: unreadable, not a mapping, or YAML without PyYAML.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    if path.suffix.lower() == ".json":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    else:
        try:
            import yaml
        except ImportError as exc:
            raise ConfigError(f"reading {path} needs PyYAML: pip install 'deltatune[cli]' "
                              "(or write the config as .json)") from exc
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path} must hold a mapping of settings, got {type(value).__name__}")
    return dict(value)


# ------------------------------------------------------------------------------- preparing
@dataclass
class Prepared:
    """Data, tokenizer and model of a run, before training."""

    config: RunConfig
    train: data_mod.Dataset
    eval: data_mod.Dataset | None
    columns: data_mod.Columns
    tokenizer: Any
    model: torch.nn.Module
    delta_name: str
    delta: Any
    head: dict[str, torch.nn.Parameter]
    steps: int
    device: torch.device
    new_params: dict[str, torch.nn.Parameter] = field(default_factory=dict)


@dataclass
class Tables:
    """The data as read, before tokenising."""

    train: data_mod.Table
    eval: data_mod.Table | None
    columns: data_mod.Columns
    label_names: list[str] | None


def read_data(c: RunConfig) -> Tables:
    """Read, split and cap the training and evaluation tables; choose the columns."""
    if c.data is None:
        raise ConfigError("no training data: pass --data (a CSV / TSV / JSONL / text file, a "
                          "folder holding train.* and dev.* files, or a datasets name)")
    train_t, eval_t = data_mod.resolve_sources(
        c.data, c.eval_data, quoting=c.quoting, dataset_config=c.dataset_config,
        split=c.split, eval_split=c.eval_split)
    columns = data_mod.resolve_columns(train_t, c.task, text=c.text_column,
                                       label=c.label_column, prompt=c.prompt_column,
                                       completion=c.completion_column)
    if eval_t is None and c.eval_fraction > 0:
        train_t, eval_t = data_mod.split_off(train_t, c.eval_fraction, c.seed)
    if c.max_train is not None:
        train_t.rows = train_t.rows[:c.max_train]
    if eval_t is not None and c.max_eval is not None:
        eval_t.rows = eval_t.rows[:c.max_eval]
    names = data_mod.label_names_of(train_t, columns.label) if columns.label else None
    if names is not None and len(names) < 2:
        raise ConfigError(f"{train_t.source} has one label ({names}); classification needs two "
                          "or more")
    if eval_t is not None:
        needed = [*columns.text, columns.label, columns.prompt, columns.completion]
        missing = [n for n in needed if n and n not in eval_t.columns]
        if missing:
            raise ConfigError(f"the evaluation data {eval_t.source} lacks columns {missing}; "
                              f"it has {eval_t.columns}")
    return Tables(train_t, eval_t, columns, names)


def prepare_data(c: RunConfig, tokenizer: Any, tables: Tables | None = None
                 ) -> tuple[data_mod.Dataset, data_mod.Dataset | None, data_mod.Columns]:
    """Read (unless given), split, cap and tokenise the training and evaluation data."""
    t = tables or read_data(c)
    train = data_mod.encode(t.train, t.columns, tokenizer, max_length=c.max_length,
                            label_names=t.label_names)
    held = None if t.eval is None else data_mod.encode(
        t.eval, t.columns, tokenizer, max_length=c.max_length, label_names=t.label_names)
    return train, held, t.columns


def total_steps(c: RunConfig, n_train: int) -> int:
    """``steps``, or ``epochs`` (default 1) worth of full batches."""
    if c.steps is not None:
        return int(c.steps)
    per_epoch = max(1, n_train // c.batch_size)
    return max(1, math.ceil((c.epochs if c.epochs is not None else 1.0) * per_epoch))


def prepare(c: RunConfig) -> Prepared:
    """Everything up to the first step: data, tokenizer, model, injected delta, trainable
    head. Seeds torch with ``c.seed`` first, so the delta's initialisation is reproducible."""
    from ..core.inject import inject

    if c.model is None:
        raise ConfigError("no model: pass --model (a local Hugging Face model directory or a "
                          "hub id)")
    if c.head not in ("train", "freeze"):
        raise ConfigError(f"--head is 'train' or 'freeze', got {c.head!r}")
    config = method_config(c.method, _sets(c), _delta_base(c))  # fail fast on a bad config
    tables = read_data(c)
    check_metric(tables.columns.task, c.metric)
    tokenizer = load_tokenizer(c.model)
    train, held, columns = prepare_data(c, tokenizer, tables)
    steps = total_steps(c, len(train))
    config = fill_steps(config, steps)
    name = c.name or config.method
    device = pick_device(c.device)
    torch.manual_seed(c.seed)
    loaded = load_model(c.model, columns.task, label_names=train.label_names,
                        pad_id=tokenizer.pad_token_id, dtype=c.dtype, device=device)
    model = loaded.model
    if columns.task == "classification" and pools_last_token(model):
        for dataset in (train, held):
            if dataset is not None:
                dataset.left_pad = True
    calibration = None
    if get_calibration(config):
        trainer = Trainer(model, train, None, Settings(steps=1, batch_size=c.batch_size,
                                                       seed=c.seed, progress=False),
                          pad_id=tokenizer.pad_token_id)
        calibration = [trainer._batch(trainer.batch_indices(i), train)
                       for i in range(max(1, c.calibration_batches))]
    try:
        inject(model, config, name=name, data=calibration)
    except (ConfigError, TargetError) as exc:  # say how the command line sets a field
        raise type(exc)(f"{exc} (on the command line: --set FIELD=VALUE)") from exc
    head = loaded.new_params if c.head == "train" else {}
    for param in head.values():
        param.requires_grad_(True)
    return Prepared(c, train, held, columns, tokenizer, model, name, config, head, steps,
                    device, loaded.new_params)


def get_calibration(config: Any) -> bool:
    from ..core.registry import get_method

    return bool(get_method(config.method).delta_class.calibration_for(config))


def _sets(c: RunConfig) -> dict[str, Any]:
    from .models import parse_sets

    return parse_sets(c.set)


def _delta_base(c: RunConfig) -> dict[str, Any]:
    base = dict(c.delta or {})
    if c.method is None and "method" not in base:
        raise ConfigError("no method given: pass --method NAME (see `deltatune train --help` "
                          "for the registered methods) or a config with a 'method:' entry")
    return base


# ------------------------------------------------------------------------------------ run
def settings_of(c: RunConfig, steps: int) -> Settings:
    every = max(1, math.ceil(steps / 5))
    return Settings(
        steps=steps, batch_size=c.batch_size, eval_batch_size=c.eval_batch_size, lr=c.lr,
        weight_decay=c.weight_decay, warmup=c.warmup, max_grad_norm=c.max_grad_norm,
        eval_every=every if c.eval_every is None else c.eval_every,
        save_every=every if c.save_every is None else c.save_every,
        keep_checkpoints=c.keep_checkpoints, log_every=max(1, min(c.log_every, steps)),
        seed=c.seed, metric=c.metric, progress=c.progress, stop_after=c.stop_after)


def default_output(c: RunConfig) -> str:
    stem = Path(c.data or "data").stem or "data"
    return str(Path("runs") / f"{stem}-{c.method or (c.delta or {}).get('method', 'delta')}")


def train(c: RunConfig, *, measure_memory: bool = False) -> dict[str, Any]:
    """Run ``deltatune train``; returns the metrics record (also written to metrics.json).

    ``measure_memory`` adds the peak memory of training over the loaded model
    (``peak_memory`` bytes, ``memory_method``).

    Raises:
        ConfigError / StateError: bad settings, data, or an output directory holding another
            run (without ``resume`` or ``overwrite``).
    """
    from ..core.accounting import count_parameters

    out = Path(c.output or default_output(c))
    _check_output(out, c)
    if c.threads:
        torch.set_num_threads(c.threads)
    p = prepare(c)
    s = settings_of(c, p.steps)
    record = _run_record(p, s)
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_FILE).write_text(json.dumps(record, indent=1) + "\n")
    total = count_parameters(p.model)
    trainable = count_parameters(p.model, trainable_only=True)
    say(f"model {c.model} ({p.columns.task}; {p.columns.describe()}), "
        f"{len(p.train)} training / {len(p.eval) if p.eval else 0} evaluation examples")
    say(f"delta {p.delta_name!r} ({p.delta.method}): trainable {trainable:,} of {total:,} "
        f"parameters ({100 * trainable / max(total, 1):.3f}%)"
        + (f", including the new head {sorted(p.head)}" if p.head else ""))
    trainer = Trainer(p.model, p.train, p.eval, s, pad_id=p.tokenizer.pad_token_id,
                      out_dir=out, extra=p.head, identity=_identity(record))
    if measure_memory:
        from .memory import PeakMemory

        with PeakMemory(p.device) as peak:
            result = trainer.fit(resume=c.resume)
    else:
        peak, result = None, trainer.fit(resume=c.resume)
    if result.stopped_early:
        say(f"stopped after the checkpoint of step {result.step} (--stop-after); continue "
            f"with --resume")
        return {"stopped_at": result.step}
    metrics = _metrics_record(p, s, result, trainable, total, out)
    if peak is not None:
        metrics.update(peak_memory=peak.peak_bytes, memory_method=peak.method)
    _save_outputs(p, out, c)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    if c.plot and p.eval is not None:
        png = plot_curves(result.history, metrics["metric"], out / "curves.png",
                          title=f"{_title(p)} on {Path(c.data).name}")
        if png:
            metrics["plot"] = str(png)
    final = metrics["final"]
    shown = ", ".join(f"{k} {fmt_metric(k, v)}" for k, v in final.items())
    say(f"done: {shown}" if final else "done")
    say(f"saved the adapter to {out / ADAPTER_DIR}"
        + (f" (+ {HEAD_FILE})" if p.head else "") + f"; metrics in {out / 'metrics.json'}")
    return metrics


def _check_output(out: Path, c: RunConfig) -> None:
    if not out.exists():
        return
    if c.overwrite:
        shutil.rmtree(out)
        return
    busy = (out / "checkpoints").is_dir() or (out / ADAPTER_DIR).exists()
    if busy and not c.resume:
        raise ConfigError(f"{out} holds an earlier run; pass --resume to continue it, "
                          "--overwrite to replace it, or choose another --output")


def _run_record(p: Prepared, s: Settings) -> dict[str, Any]:
    import deltatune

    c = p.config
    model = str(Path(c.model).resolve()) if Path(c.model).is_dir() else c.model
    return {
        "deltatune_version": deltatune.__version__, "model": model, "task": p.columns.task,
        "data": c.data, "eval_data": c.eval_data, "columns": dataclasses.asdict(p.columns),
        "label_names": p.train.label_names, "max_length": c.max_length, "dtype": c.dtype,
        "name": p.delta_name, "delta": p.delta.to_dict(), "head": sorted(p.new_params),
        "head_trained": bool(p.head),
        "settings": s.identity(), "train_examples": len(p.train),
        "eval_examples": len(p.eval) if p.eval else 0,
    }


def _identity(record: Mapping[str, Any]) -> dict[str, Any]:
    keep = ("model", "task", "columns", "label_names", "max_length", "dtype", "name", "delta",
            "head", "train_examples", "eval_examples")
    return {k: record[k] for k in keep}


def _metrics_record(p: Prepared, s: Settings, result: Result, trainable: int, total: int,
                    out: Path) -> dict[str, Any]:
    metric = check_metric(p.columns.task, s.metric)
    return {
        "task": p.columns.task, "metric": metric,
        "higher_is_better": DIRECTION.get(metric, True), "final": result.final,
        "steps": result.step, "trainable_params": trainable, "total_params": total,
        "trainable_share": trainable / max(total, 1),
        "delta_params": trainable - sum(t.numel() for t in p.head.values()),
        "seconds_per_step": result.seconds_per_step, "resumed_from": result.resumed_from,
        "history": result.history, "adapter": str(out / ADAPTER_DIR),
    }


def _save_outputs(p: Prepared, out: Path, c: RunConfig) -> None:
    from safetensors.torch import save_file

    from ..core.state import save

    save(p.model, out / ADAPTER_DIR)
    if p.new_params:  # trained or not, the delta was trained against it
        save_file({k: v.detach().cpu().contiguous() for k, v in p.new_params.items()},
                  str(out / HEAD_FILE), metadata={"format": "pt"})
    if c.export_peft:
        from .export import save_peft_with_head

        save_peft_with_head(p.model, out / "peft", p.delta_name, sorted(p.new_params))
        say(f"exported the adapter in peft's format to {out / 'peft'}"
            + (" (the classification head as modules_to_save)" if p.new_params else ""))




def _title(p: Prepared) -> str:
    method = p.delta.method
    return method if p.delta_name == method else f"{p.delta_name} ({method})"

__all__ = ["Prepared", "RunConfig", "prepare", "prepare_data", "read_config_file", "train"]
