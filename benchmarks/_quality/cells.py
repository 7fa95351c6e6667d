"""One cell of the table (a method on a task): the learning-rate sweep, then the seeds.

Protocol of a cell:

1. sweep: for every learning rate of the method's grid, one short run (``sweep_fraction`` of
   the final step count, seed 0), scored on the validation split carved out of train; while
   the best rate is at an end of the rates tried, the grid grows by one more of its own steps
   past that end (at most ``extend`` times), so the chosen rate is never an untested edge
   unless the extension ran out;
2. final: ``seeds`` runs at the best learning rate, each evaluated on the full test set.

A peft row makes the same runs as its deltatune twin: it takes the twin's learning rate (from
the twin's sweep, read back or run) instead of sweeping itself, so the two differ only in the
implementation.

Every finished run is written to ``<out>/runs/<task>/<label>/<run>.json`` as soon as it ends,
and the cell to ``<out>/cells/<task>__<label>.json``: a killed benchmark resumes where it
stopped. Training runs under bf16 autocast (fp32 master weights) on CPU by default; a run that
fails (an error while building or training, a diverging loss) is recorded with its reason.
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
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .methods import MethodSpec, build, count_trainable
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
    eval_batch_size: int = 128
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


def evaluate(model: torch.nn.Module, dataset: Any, pad_id: int, p: Protocol) -> dict[str, float]:
    from deltatune.train.loop import evaluate as lib_evaluate

    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad(), precision(p.precision, device):
        return lib_evaluate(model, dataset, pad_id, p.eval_batch_size, device)


# ------------------------------------------------------------------------------------ runs
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
    """Train one model and evaluate it on ``split`` (``val`` or ``test``)."""
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
        metrics = evaluate(model, data.val if split == "val" else data.test, data.pad_id, p)
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


def fingerprint(method: MethodSpec, spec: TaskSpec, steps: int) -> str:
    """A short hash of what a run of ``method`` builds: its kind, method and configuration
    (a peft row: its peft config), so a changed row never reads back an old result."""
    if method.kind == "peft" and method.peft is not None:
        config = method.peft("SEQ_CLS" if spec.kind == "classification" else "CAUSAL_LM", steps)
        settings: Any = config.to_dict()
    else:
        settings = method.config_options(steps)
    what = json.dumps([method.kind, method.method, settings], sort_keys=True, default=_canonical)
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

    def score(lr: float) -> None:
        r = cached_run(spec, method, p, lr=lr, seed=0, steps=sweep_steps(spec, p), split="val")
        value = r.get("metrics", {}).get(spec.metric) if r["status"] == "ok" else None
        if value is not None and not math.isfinite(value):
            value = None
        tried[lr] = {"lr": lr, "status": r["status"], "val": value, "error": r.get("error")}

    for lr in method.lrs:
        score(lr)
    grid = sorted(method.lrs)
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


def cell_fingerprint(spec: TaskSpec, method: MethodSpec, twin: MethodSpec | None) -> str:
    """What a cell's figures depend on besides the protocol: the row's settings, and for a
    peft row its twin's (whose sweep sets the learning rate)."""
    return "-".join(fingerprint(m, spec, spec.steps) for m in (method, twin) if m is not None)


def run_cell(spec: TaskSpec, method: MethodSpec, p: Protocol,
             twin: MethodSpec | None = None) -> dict[str, Any]:
    """Sweep (or take the twin's rate), choose, run the seeds; write and return the record."""
    torch.set_num_threads(p.threads)
    t0 = time.perf_counter()
    metric = spec.metric
    record: dict[str, Any] = {"task": spec.name, "label": method.label, "kind": method.kind,
                              "method": method.method, "twin": method.twin,
                              "extra": method.extra, "metric": metric, "steps": spec.steps,
                              "protocol": asdict(p), "fingerprint": cell_fingerprint(
                                  spec, method, twin)}
    if method.kind == "base":  # nothing to train: one evaluation of the model as loaded
        run = cached_run(spec, method, p, lr=0.0, seed=0, steps=0, split="test")
        record.update(sweep=[], best_lr=None, runs=[run], status=run["status"],
                      error=run.get("error"), cell_seconds=time.perf_counter() - t0)
        write_json(cell_path(p, spec, method), record)
        return record
    if twin is not None:  # the same runs as the twin: its learning rate
        entries = sweep(spec, twin, p)
        record["lr_from"] = twin.label
    else:
        entries = sweep(spec, method, p)
    record["sweep"] = entries
    best = best_of(entries, metric)
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


__all__ = ["HIGHER", "Protocol", "best_of", "cached_run", "cell_path", "evaluate", "run_cell",
           "run_one", "sweep", "sweep_steps", "task_data", "write_json"]
