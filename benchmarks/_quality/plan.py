"""The cost model: how long the benchmark will take, measured before it starts.

A few seconds of measurement on the real model (one worker's thread count, the run's
precision): seconds per training token of full fine-tuning, seconds per evaluation token, and
the fixed cost of building a model. Every cell's cost is then

    Σ_runs  steps · tokens_per_step · c_train · m(method) · lm  +  eval_tokens · c_eval · lm
            + build  (+ the task's loading: every cell starts in a new process)

with ``m`` a coarse per-kind factor (a trained head only skips most of the backward pass;
adapters skip the weight gradients) and ``lm`` the causal-LM factor (the 8,192-word output layer).
The wall time is the cells packed onto the workers, longest first.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .cells import Protocol, precision, sweep_steps
from .methods import MethodSpec
from .tasks import TaskData, TaskSpec, eval_tokens, tokens_per_step

KIND_FACTOR = {"full": 1.0, "scratch": 1.0, "head": 0.35, "delta": 0.85, "peft": 0.9}
TOKEN_METHODS = {"prefix": 1.15, "prompt": 1.25}  # extra positions
LM_FACTOR = 1.35
#: Cells run this much longer than the single-process measurement when two workers share the
#: two cores (memory bandwidth): measured on the committed full run (7,959 s of cells against
#: 6,588 s estimated without it).
CONTENTION = 1.21


@dataclass
class Costs:
    """Measured unit costs (seconds)."""

    train_token: float
    eval_token: float
    build: float
    load: dict[str, float] = field(default_factory=dict)  # seconds to load each task
    contention: float = 1.0  # slowdown of concurrent workers (``CONTENTION`` with two or more)


def measure(model_dir: str, p: Protocol) -> Costs:
    """Time a few full fine-tuning steps and evaluation batches of the real model."""
    from deltatune.train.models import load_model

    torch.set_num_threads(p.threads)
    t0 = time.perf_counter()
    model = load_model(model_dir, "classification", label_names=["0", "1"], pad_id=1).model
    build = time.perf_counter() - t0
    device = torch.device("cpu")
    vocab = min(1000, model.config.vocab_size)
    ids = torch.randint(2, vocab, (16, 48))
    labels = torch.randint(0, 2, (16,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()
    times = []
    for i in range(4):
        t = time.perf_counter()
        with precision(p.precision, device):
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
        opt.step()
        opt.zero_grad()
        if i:
            times.append(time.perf_counter() - t)
    model.eval()
    big = torch.randint(2, vocab, (32, 48))
    evals = []
    with torch.no_grad(), precision(p.precision, device):
        for i in range(3):
            t = time.perf_counter()
            model(input_ids=big)
            if i:
                evals.append(time.perf_counter() - t)
    return Costs(min(times) / ids.numel(), min(evals) / big.numel(), build)


def method_factor(method: MethodSpec) -> float:
    key = method.method or (method.twin or "")
    return KIND_FACTOR[method.kind] * TOKEN_METHODS.get(key.split(":")[-1], 1.0)


def cell_cost(spec: TaskSpec, data: TaskData, method: MethodSpec, p: Protocol,
              costs: Costs) -> dict[str, float]:
    """Estimated seconds of one cell (sweep and final runs)."""
    lm = LM_FACTOR if spec.kind == "causal-lm" else 1.0
    start = costs.load.get(spec.name, 0.0) + costs.build
    test = eval_tokens(data.test, spec.eval_batch_size) * costs.eval_token * lm
    if method.kind == "base":  # one evaluation of the untouched model
        return {"sweep": 0.0, "final": test, "total": test + start, "step": 0.0,
                "test_eval": test}
    per_step = tokens_per_step(data, spec.batch_size) * costs.train_token * method_factor(method)
    per_step *= lm
    val = eval_tokens(data.val, spec.eval_batch_size) * costs.eval_token * lm
    # peft rows reuse their twin's sweep, lr_from tasks another task's (counted there); a grid
    # grows past a winning end about once every other cell
    n = 0 if method.kind == "peft" or spec.lr_from else len(method.lrs) + (0.5 if p.extend else 0)
    sweep = n * (sweep_steps(spec, p) * per_step + val + costs.build)
    final = p.seeds * (spec.steps * per_step + test + costs.build)
    c = costs.contention
    return {"sweep": c * sweep, "final": c * final, "total": c * (sweep + final + start),
            "step": c * per_step, "test_eval": c * test}


def pack(costs: list[float], workers: int) -> float:
    """Wall time of jobs given longest first to the least loaded worker."""
    loads = [0.0] * max(1, workers)
    heapq.heapify(loads)
    for c in sorted(costs, reverse=True):
        heapq.heapreplace(loads, loads[0] + c)
    return max(loads)


def describe(tasks: dict[str, tuple[TaskSpec, TaskData]], cells: list[tuple[str, MethodSpec]],
             p: Protocol, costs: Costs, workers: int) -> tuple[str, dict[str, Any]]:
    """A printable plan and the estimate (seconds)."""
    lines = [f"cost model: {1e6 * costs.train_token:.0f} µs per training token (full FT), "
             f"{1e6 * costs.eval_token:.0f} µs per evaluation token, {costs.build:.2f} s per "
             f"model build ({p.precision}, {p.threads} thread(s) per worker)",
             f"{'task':<12}{'steps':>6}{'sweep':>6}{'batch':>6}{'tok/step':>9}{'s/step':>8}"
             f"{'test ex':>8}{'test s':>7}{'cells':>6}{'est. s':>8}"]
    per_cell, total_by_task = [], {}
    for name, (spec, data) in tasks.items():
        mine = [m for t, m in cells if t == name]
        if not mine:
            continue
        est = [cell_cost(spec, data, m, p, costs) for m in mine]
        per_cell += [e["total"] for e in est]
        total_by_task[name] = sum(e["total"] for e in est)
        trained = next((m for m in mine if m.kind != "base"), mine[0])
        full = cell_cost(spec, data, trained, p, costs)
        lines.append(f"{name:<12}{spec.steps:>6}{sweep_steps(spec, p):>6}{spec.batch_size:>6}"
                     f"{tokens_per_step(data, spec.batch_size):>9.0f}{full['step']:>8.2f}"
                     f"{len(data.test):>8}{full['test_eval']:>7.1f}{len(mine):>6}"
                     f"{total_by_task[name]:>8.0f}")
    serial = sum(per_cell)
    wall = pack(per_cell, workers)
    lines.append(f"estimate: {serial / 60:.1f} min of compute, about {wall / 60:.1f} min of wall "
                 f"time on {workers} worker(s) on an otherwise idle machine")
    return "\n".join(lines), {"serial_s": serial, "wall_s": wall, "by_task": total_by_task}


__all__ = ["CONTENTION", "Costs", "cell_cost", "describe", "measure", "pack"]
