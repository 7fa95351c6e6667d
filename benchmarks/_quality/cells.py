"""One cell of the table (a method on a task): the learning-rate sweep, then the seeds.

Protocol of a cell:

1. sweep: for every learning rate of the method's grid, one short run (``sweep_fraction`` of
   the final step count, seed 0), scored on the validation split carved out of train; while
   the best rate is at an end of the rates tried, the grid grows by one more of its own steps
   past that end (at most ``extend`` times), so the chosen rate is never an untested edge
   unless the extension ran out;
2. final: ``seeds`` runs at the best learning rate, each evaluated on the full test set.

A task with ``lr_from`` takes each row's rate from that other task's sweep (run there, or read
back), and a task's ``lr_scale`` shifts every grid on it.

A peft row makes the same runs as its deltatune twin: it takes the twin's learning rate (from
the twin's sweep, read back or run) instead of sweeping itself, so the two differ only in the
implementation.

Every finished run is written to ``<out>/runs/<task>/<label>/<run>.json`` as soon as it ends
(a lock file keeps two workers from making the same run at once: the second waits and reads
it back), and the cell to ``<out>/cells/<task>__<label>.json``: a killed benchmark resumes where
it stopped.

Memory: a cell begins with a probe, ``PROBE_STEPS`` training steps on the task's first batches
of seed 0 (the same batches for every row), measuring the peak resident set over the model as
built (``PeakMemory``). Only the first training in a process measures cleanly (later ones reuse
memory the allocator already holds), so the benchmark starts every cell in a new process, and a
cell that does not (``--workers 0`` after the first cell) records no memory.

Training runs under bf16 autocast (fp32 master weights) on CPU by default; a run that fails
(an error while building or training, a diverging loss) is recorded with its reason.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import time
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .methods import MethodSpec, all_methods, build, count_trainable
from .tasks import LengthTrainer, TaskData, TaskSpec, load_task

HIGHER = {"accuracy": True, "mcc": True, "f1": True, "perplexity": False, "loss": False}


@dataclass(frozen=True)
class Protocol:
    """Settings shared by every cell."""

    model: str
    data_dir: str
    out: str
    seeds: int = 3
    sweep_fraction: float = 1 / 3
    precision: str = "bf16"
    warmup: float = 0.06
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    calibration_batches: int = 4
    extend: int = 2
    max_train: int | None = None
    max_test: int | None = None
    threads: int = 1

    def caps(self) -> dict[str, Any]:
        return {"max_train": self.max_train, "max_test": self.max_test}


# ------------------------------------------------------------------------------ data cache
@functools.lru_cache(maxsize=2)
def _tokenizer(model: str) -> Any:
    from deltatune.train.models import load_tokenizer

    return load_tokenizer(model)


@functools.lru_cache(maxsize=8)
def task_data(spec: TaskSpec, model: str, data_dir: str, max_train: int | None,
              max_test: int | None) -> TaskData:
    """The encoded task, once per process."""
    return load_task(spec, data_dir, _tokenizer(model), max_train=max_train, max_test=max_test)


@contextlib.contextmanager
def precision(name: str, device: torch.device) -> Iterator[None]:
    """bf16 autocast (fp32 weights and optimizer) or plain fp32.

    The cast cache is off: this block spans whole training runs, and a cached bf16 copy of a
    weight would outlive the optimizer steps that change the weight (autocast clears its cache
    only when the outermost block exits).
    """
    if name == "fp32":
        yield
        return
    with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False):
        yield


def evaluate(model: torch.nn.Module, dataset: Any, pad_id: int, p: Protocol,
             batch_size: int) -> dict[str, float]:
    from deltatune.train.loop import evaluate as lib_evaluate

    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad(), precision(p.precision, device):
        return lib_evaluate(model, dataset, pad_id, batch_size, device)


# ------------------------------------------------------------------------------------ runs
#: no run has trained in this process yet: the next one measures memory cleanly
_fresh_process = True
#: training steps of the memory probe (the optimizer state appears at the first)
PROBE_STEPS = 3


def _calibration(data: TaskData, spec: TaskSpec, p: Protocol, seed: int):
    def batches(model: torch.nn.Module) -> list[Any]:
        from deltatune.train.loop import Settings

        t = LengthTrainer(model, data.train, None,
                          Settings(steps=1, batch_size=spec.batch_size, seed=seed,
                                   progress=False, report=False), pad_id=data.pad_id)
        return [t._batch(t.batch_indices(i), data.train) for i in range(p.calibration_batches)]
    return batches


def run_one(spec: TaskSpec, method: MethodSpec, p: Protocol, *, lr: float, seed: int,
            steps: int, split: str) -> dict[str, Any]:
    """Train one model and evaluate it on ``split`` (``val``, ``test``, or ``None``: no
    evaluation)."""
    global _fresh_process
    from deltatune.train.loop import Settings
    from deltatune.train.memory import PeakMemory

    data = task_data(spec, p.model, p.data_dir, p.max_train, p.max_test)
    device = torch.device("cpu")
    torch.manual_seed(seed)
    t_build = time.perf_counter()
    built = build(method, p.model, spec.kind, data.label_names, data.pad_id, steps,
                  _calibration(data, spec, p, seed))
    try:
        model = built.model
        build_s = time.perf_counter() - t_build
        trainable = count_trainable(model)
        if method.kind == "base":  # the pretrained model as it is: nothing trains
            result, peak = None, None
        else:
            _fresh_process = False
            settings = Settings(steps=steps, batch_size=spec.batch_size, lr=lr,
                                weight_decay=p.weight_decay, warmup=p.warmup,
                                max_grad_norm=p.max_grad_norm, eval_every=0, save_every=0,
                                log_every=max(1, steps // 10), seed=seed, progress=False,
                                report=False)
            trainer = LengthTrainer(model, data.train, None, settings, pad_id=data.pad_id,
                                    extra=built.head)
            model.train()
            with PeakMemory(device) as peak, precision(p.precision, device):
                result = trainer.fit()
        t_eval = time.perf_counter()
        metrics = {} if split is None else evaluate(
            model, data.val if split == "val" else data.test, data.pad_id, p, spec.eval_batch_size)
        eval_s = time.perf_counter() - t_eval
    finally:
        built.close()
    losses = [] if result is None else [h["loss"] for h in result.history
                                        if h.get("kind") == "train"]
    return {"lr": lr, "seed": seed, "steps": steps, "split": split, "metrics": metrics,
            "trainable": trainable, "head_params": built.head_params,
            "delta_params": trainable - built.head_params if method.kind != "head"
            else trainable, "seconds_per_step": None if result is None
            else result.seconds_per_step,
            "peak_memory_bytes": None if peak is None else peak.peak_bytes,
            "memory_method": None if peak is None else peak.method,
            "train_loss_last": losses[-1] if losses else None,
            "build_seconds": build_s, "eval_seconds": eval_s}


def _run_path(p: Protocol, spec: TaskSpec, method: MethodSpec, lr: float, seed: int,
              steps: int, split: str) -> Path:
    return (Path(p.out) / "runs" / spec.name / method.label.replace(":", "_")
            / f"{split}-lr{lr:g}-seed{seed}-steps{steps}.json")


def cached_run(spec: TaskSpec, method: MethodSpec, p: Protocol, **kw: Any) -> dict[str, Any]:
    """``run_one``, read back from disk when it already ran with the same method settings
    (``fingerprint``); failures are recorded too."""
    path = _run_path(p, spec, method, kw["lr"], kw["seed"], kw["steps"], kw["split"])
    mark = fingerprint(method, spec, kw["steps"])
    with _locked(path):
        if path.is_file():
            record = json.loads(path.read_text())
            if record.get("fingerprint") == mark:
                return record
        try:
            record = {"status": "ok", **run_one(spec, method, p, **kw)}
        except Exception as exc:  # a failing method is a row that says why, not a crash
            record = {"status": "failed", **kw, "error": f"{type(exc).__name__}: {exc}"[:500],
                      "traceback": traceback.format_exc(limit=6)[-2000:]}
        record["fingerprint"] = mark
        write_json(path, record)
    return record


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold ``<path>.lock`` (``filelock``: an OS lock, dropped if the holder dies; Linux, macOS
    and Windows)."""
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.with_suffix(".lock")):
        yield


def fingerprint(method: MethodSpec, spec: TaskSpec, steps: int) -> str:
    """A short hash of what a run of ``method`` on ``spec`` does: the row's kind, method and
    configuration (a peft row: its peft config) and the task's data and batching, so a changed
    row or task never reads back an old result."""
    if method.kind == "peft" and method.peft is not None:
        config = method.peft("SEQ_CLS" if spec.kind == "classification" else "CAUSAL_LM", steps)
        settings: Any = config.to_dict()
    else:
        settings = method.config_options(steps)
    task = [spec.kind, spec.train, spec.test, spec.max_length, spec.batch_size, spec.val_size,
            spec.pair]
    what = json.dumps([method.kind, method.method, settings, task], sort_keys=True,
                      default=_canonical)
    return hashlib.sha1(what.encode()).hexdigest()[:12]


def _canonical(value: Any) -> Any:
    """JSON for what ``json`` does not know, the same in every process (sets are sorted:
    their order depends on the process's string hashing)."""
    if isinstance(value, (set, frozenset)):
        return sorted(map(repr, value))
    return repr(value)


def write_json(path: Path, value: Any) -> None:
    """Atomic write: a killed process never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=1, default=_jsonable) + "\n")
    tmp.replace(path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return str(value)


def sweep_steps(spec: TaskSpec, p: Protocol) -> int:
    return max(1, round(spec.steps * p.sweep_fraction))


def cell_path(p: Protocol, spec: TaskSpec, method: MethodSpec) -> Path:
    return Path(p.out) / "cells" / f"{spec.name}__{method.label.replace(':', '_')}.json"


def _sweep_lr(lr: float) -> float:
    return float(f"{lr:.3g}")  # grid steps multiply; keep the file names and figures tidy


def sweep(spec: TaskSpec, method: MethodSpec, p: Protocol) -> list[dict[str, Any]]:
    """The validation scores of ``method``'s grid, extended past an end that wins (see the
    module docstring); one entry per rate tried, in the order tried."""
    up = HIGHER[spec.metric]
    tried: dict[float, dict[str, Any]] = {}
    grid = sorted(_sweep_lr(lr * spec.lr_scale) for lr in method.lrs)

    def score(lr: float) -> None:
        r = cached_run(spec, method, p, lr=lr, seed=0, steps=sweep_steps(spec, p), split="val")
        value = r.get("metrics", {}).get(spec.metric) if r["status"] == "ok" else None
        if value is not None and not math.isfinite(value):
            value = None
        tried[lr] = {"lr": lr, "status": r["status"], "val": value, "error": r.get("error")}

    for lr in grid:
        score(lr)
    ratio = grid[1] / grid[0] if len(grid) > 1 else None
    for _ in range(p.extend if ratio else 0):
        scored = [t for t in tried.values() if t["val"] is not None]
        if not scored:
            break
        best = (max if up else min)(scored, key=lambda t: t["val"])["lr"]
        if best == max(tried):
            score(_sweep_lr(best * ratio))
        elif best == min(tried):
            score(_sweep_lr(best / ratio))
        else:
            break
    return list(tried.values())


def best_of(entries: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    scored = [s for s in entries if s["val"] is not None]
    if not scored:
        return None
    return (max if HIGHER[metric] else min)(scored, key=lambda s: s["val"])


def cell_fingerprint(spec: TaskSpec, method: MethodSpec, twin: MethodSpec | None,
                     source: TaskSpec | None = None) -> str:
    """What a cell's figures depend on besides the protocol: the task, the row's settings,
    and the sweep that sets the learning rate (a peft row's twin; ``source``, the task named
    by ``lr_from``)."""
    marks = [fingerprint(m, spec, spec.steps) for m in (method, twin) if m is not None]
    if source is not None:
        marks.append(fingerprint(twin or method, source, source.steps))
    what = json.dumps([asdict(spec), None if source is None else asdict(source)],
                      sort_keys=True)
    return "-".join([*marks, hashlib.sha1(what.encode()).hexdigest()[:8]])


def probe_memory(spec: TaskSpec, method: MethodSpec, p: Protocol) -> dict[str, Any]:
    """Peak memory of ``PROBE_STEPS`` training steps over the model as built, when this
    process has not trained before (``peak_memory_bytes`` is ``None`` otherwise)."""
    if not _fresh_process:
        return {"peak_memory_bytes": None, "why": "not the first training in its process"}
    lr = min(method.lrs) if method.lrs else 1e-4  # the rate does not change what is allocated
    try:
        run = run_one(spec, method, p, lr=lr, seed=0, steps=PROBE_STEPS, split=None)
    except Exception as exc:  # the cell's runs will say what fails
        return {"peak_memory_bytes": None, "why": f"{type(exc).__name__}: {exc}"[:200]}
    return {"peak_memory_bytes": run["peak_memory_bytes"], "method": run["memory_method"],
            "steps": PROBE_STEPS, "seconds_per_step": run["seconds_per_step"]}


def run_cell(spec: TaskSpec, method: MethodSpec, p: Protocol,
             twin: MethodSpec | None = None, source: TaskSpec | None = None) -> dict[str, Any]:
    """Sweep (or take the twin's rate, or the rate chosen on ``source``), choose, run the
    seeds; write and return the record."""
    if (source is None) != (spec.lr_from is None) or (source and source.name != spec.lr_from):
        raise ValueError(f"{spec.name}: lr_from is {spec.lr_from!r}, the source task given is "
                         f"{None if source is None else source.name!r}")
    torch.set_num_threads(p.threads)
    t0 = time.perf_counter()
    metric = spec.metric
    record: dict[str, Any] = {"task": spec.name, "label": method.label, "kind": method.kind,
                              "method": method.method, "twin": method.twin,
                              "extra": method.extra, "metric": metric, "steps": spec.steps,
                              "protocol": asdict(p), "fingerprint": cell_fingerprint(
                                  spec, method, twin, source)}
    if method.kind != "base":
        record["memory"] = probe_memory(spec, method, p)
    if method.kind == "base":  # nothing to train: one evaluation of the model as loaded
        run = cached_run(spec, method, p, lr=0.0, seed=0, steps=0, split="test")
        record.update(sweep=[], best_lr=None, runs=[run], status=run["status"],
                      error=run.get("error"), cell_seconds=time.perf_counter() - t0)
        write_json(cell_path(p, spec, method), record)
        return record
    # a peft row makes its twin's runs; a task with lr_from takes the rate chosen there
    entries = sweep(source or spec, twin or method, p)
    if twin is not None:
        record["lr_from"] = twin.label
    if source is not None:
        record["lr_task"] = source.name
    record["sweep"] = entries
    best = best_of(entries, (source or spec).metric)
    if best is None:
        record.update(status="failed", error=next((s["error"] for s in entries if s["error"]),
                                                  "no learning rate gave a finite score"))
    else:
        record["best_lr"] = best["lr"]
        runs = [cached_run(spec, method, p, lr=best["lr"], seed=s, steps=spec.steps,
                           split="test") for s in range(p.seeds)]
        record["runs"] = runs
        ok = [r for r in runs if r["status"] == "ok"]
        if not ok:
            record.update(status="failed", error=runs[0].get("error"))
        else:
            record["status"] = "ok" if len(ok) == len(runs) else "partial"
            record["failed_seeds"] = [r["seed"] for r in runs if r["status"] != "ok"]
    record["cell_seconds"] = time.perf_counter() - t0
    write_json(cell_path(p, spec, method), record)
    return record


def worker_init(threads: int) -> None:
    """A worker process's settings: its torch threads, and quiet libraries."""
    torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def cell_job(spec: TaskSpec, method_label: str, p: Protocol,
             source: TaskSpec | None) -> dict[str, Any]:
    """``run_cell`` for a row given by its label (what a worker process receives)."""
    by_label = {m.label: m for m in all_methods()}
    method = by_label[method_label]
    return run_cell(spec, method, p, by_label.get(method.twin or ""), source)


__all__ = ["HIGHER", "PROBE_STEPS", "Protocol", "best_of", "cached_run", "cell_job", "cell_path",
           "evaluate", "probe_memory", "run_cell", "run_one", "sweep", "sweep_steps",
           "task_data", "worker_init", "write_json"]
