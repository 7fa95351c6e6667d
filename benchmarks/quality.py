#!/usr/bin/env python
"""Quality on real data: every method against full fine-tuning and against HF peft.

Base model: ``shared/models/deltatune-tiny-llama`` (12.6M parameters). Tasks (``shared/data``):

* ``shakespeare``: domain adaptation of the language model to Tiny Shakespeare (first 90% of
  the characters train, last 10% test): test perplexity;
* ``sst2`` (sentence level, 6,920 / 1,821), ``agnews`` (train on the 10,001-row dev slice,
  test on the 7,600-row test set), ``rte`` (2,490 / 277): accuracy; ``cola`` (8,551 / 516, the
  out-of-domain dev set): Matthews correlation.

Rows: full fine-tuning, a trained head only, training from scratch, every registered deltatune
method (the ones the issue names with chosen settings, the others with their defaults), and
HF peft's version of LoRA (q,v and all-linear), DoRA, AdaLoRA, VeRA, IA3, LN tuning, prefix and
prompt tuning, trained by the same loop on the same data and seeds at their twin's learning rate.
Which rows run where is a budget decision (``TASKS`` below): every row on Shakespeare and AG
News, the peft twins on both, the methods the issue does not name on Shakespeare; SST-2, RTE
and CoLA run the screen rows (full, head, scratch, LoRA all-linear) at longer budgets.

Protocol per (method, task) cell (``_quality/cells.py``): a 3-point learning-rate sweep of
short runs scored on a validation split carved out of train (extended by up to two more points
past an end of the grid that wins), then 3 seeds at the best rate, each scored on the full test
set. A peft row takes its deltatune twin's rate: the same runs, another implementation; RTE and
CoLA take each row's rate from its SST-2 sweep. Training: AdamW, 6% warm-up then linear decay,
clipping at 1, bf16 autocast with fp32 weights (CPU), batches of similar length.
Classification reads the last token (HF ``LlamaForSequenceClassification``); its new head is
trained with every method and counted apart ("params (excl. head)"). Each cell runs in a new
process and first measures its training memory (a few steps on the same batches for every row).

Everything is written as it finishes (``results/quality/runs``, ``cells``); running the
command again resumes and skips finished work. The report: ``quality.md``, ``quality.json``,
``quality.png`` in the output directory.

    python benchmarks/quality.py                      # the full table (2 cores: see README)
    python benchmarks/quality.py --estimate           # the plan and the time estimate only
    python benchmarks/quality.py --quick              # a few-minute smoke run
    python benchmarks/quality.py --tasks agnews --methods full,lora-qv,peft:lora-qv
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _quality import cells as cells_mod
from _quality import methods as methods_mod
from _quality import plan as plan_mod
from _quality import report as report_mod
from _quality.tasks import TaskSpec

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
OUT = Path(__file__).resolve().parent / "results" / "quality"

#: The budget (2 CPU cores, about an hour) decides the split. Every row runs on the two tasks
#: where 60 steps separate the methods: Tiny Shakespeare and AG News. SST-2 needs about an epoch
#: (400 steps: full fine-tuning 77% on validation, 65% after 120) and RTE and CoLA stay at
#: chance even for full fine-tuning after one to two epochs (measured while planning this
#: protocol), so they run the screen rows only, at longer budgets, RTE and CoLA at SST-2's rates.
TASKS = [
    TaskSpec("shakespeare", "causal-lm", "tinyshakespeare/input.txt", "tinyshakespeare/input.txt",
             "perplexity", max_length=128, steps=60, batch_size=4, val_size=32, lr_scale=4.0,
             eval_batch_size=16,
             description="Tiny Shakespeare, test perplexity (blocks of 128 tokens)"),
    TaskSpec("agnews", "classification", "agnews/dev.tsv", "agnews/test.tsv", "accuracy",
             max_length=32, steps=60, val_size=400,
             description="AG News (train: 10,001-row slice, first 32 tokens), test accuracy"),
    TaskSpec("sst2", "classification", "sst2_sentence/train.tsv", "sst2_sentence/test.tsv",
             "accuracy", max_length=64, steps=400, val_size=400, rows="screen",
             description="SST-2 sentences, test accuracy"),
    TaskSpec("rte", "classification", "rte/train.tsv", "rte/dev.tsv", "accuracy",
             max_length=128, steps=140, batch_size=8, val_size=250, pair=True, rows="screen",
             lr_from="sst2", description="RTE, accuracy on the 277 labelled dev pairs"),
    TaskSpec("cola", "classification", "cola/train.tsv", "cola/dev.tsv", "mcc", max_length=48,
             steps=240, val_size=400, rows="screen", lr_from="sst2",
             description="CoLA, Matthews correlation (516 dev)"),
]
#: the rows of a ``screen`` task: the baselines and one representative delta
SCREEN_ROWS = ("full", "head", "scratch", "lora-all")
#: tasks on which the peft twins run, and the registered methods the issue does not name
PEFT_TASKS = ("shakespeare", "agnews")
EXTRA_TASKS = ("shakespeare",)
QUICK_METHODS = ("base", "full", "head", "lora-qv", "ia3", "peft:lora-qv")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(SHARED / "models" / "deltatune-tiny-llama"))
    ap.add_argument("--data-dir", default=str(SHARED / "data"))
    ap.add_argument("--out", default=None, help=f"output directory (default {OUT}, "
                    "or OUT/quick with --quick)")
    ap.add_argument("--tasks", default=None, help="comma-separated task names")
    ap.add_argument("--methods", default=None,
                    help="comma-separated row labels, or groups: baselines, named, extra, peft")
    ap.add_argument("--peft-tasks", default=",".join(PEFT_TASKS),
                    help="tasks that get the peft twins ('all' for every task)")
    ap.add_argument("--extra-tasks", default=",".join(EXTRA_TASKS),
                    help="tasks that get the registered methods the issue does not name "
                    "('all' for every task)")
    ap.add_argument("--all-rows", action="store_true",
                    help="every row on every task, the screen tasks too (about 1.8 hours from "
                    "scratch on 2 cores, 45 min more after the default table: see --estimate)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps-scale", type=float, default=1.0,
                    help="multiply every task's step count (e.g. 2 for longer runs)")
    ap.add_argument("--sweep-fraction", type=float, default=1 / 3,
                    help="length of a sweep run, as a fraction of a final run")
    ap.add_argument("--workers", type=int, default=None,
                    help="parallel worker processes (default: the CPU count, at most 2; 0: run "
                    "in this process)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--max-train", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--max-test", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: few methods, short runs, 300 test examples, 2 seeds")
    ap.add_argument("--estimate", action="store_true", help="print the plan and exit")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite the report from the finished cells")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def select_methods(arg: str | None) -> list[methods_mod.MethodSpec]:
    every = methods_mod.all_methods()
    if not arg:
        return every
    groups = {"baselines": [m for m in every if m.kind in ("base", "full", "head", "scratch")],
              "named": [m for m in every if m.kind == "delta" and not m.extra],
              "extra": [m for m in every if m.extra],
              "peft": [m for m in every if m.kind == "peft"]}
    by_label = {m.label: m for m in every}
    chosen: list[methods_mod.MethodSpec] = []
    for name in (s.strip() for s in arg.split(",") if s.strip()):
        found = groups.get(name) or ([by_label[name]] if name in by_label else None)
        if found is None:
            raise SystemExit(f"unknown method or group {name!r}; rows: {sorted(by_label)}; "
                             f"groups: {sorted(groups)}")
        chosen += [m for m in found if m not in chosen]
    return chosen


def scaled_tasks(args: argparse.Namespace) -> dict[str, TaskSpec]:
    """Every task with the run's step count (``--steps-scale``, ``--quick``) and rows
    (``--all-rows``)."""
    scale = args.steps_scale * (0.4 if args.quick else 1.0)
    rows = {"rows": "all"} if args.all_rows else {}
    return {t.name: dataclasses.replace(t, steps=max(4, round(t.steps * scale)), **rows)
            for t in TASKS}


def select_tasks(args: argparse.Namespace) -> list[TaskSpec]:
    every = scaled_tasks(args)
    if not args.tasks:
        return list(every.values())
    names = [s.strip() for s in args.tasks.split(",") if s.strip()]
    unknown = sorted(set(names) - set(every))
    if unknown:
        raise SystemExit(f"unknown tasks {unknown}; tasks: {list(every)}")
    return [t for t in every.values() if t.name in names]


def on_task(task: TaskSpec, m: methods_mod.MethodSpec, peft_tasks: set[str],
            extra_tasks: set[str]) -> bool:
    """Whether row ``m`` runs on ``task``."""
    if task.rows == "screen":
        return m.label in SCREEN_ROWS
    return ((m.kind != "peft" or task.name in peft_tasks)
            and (m.kind != "base" or task.kind == "causal-lm")
            and (not m.extra or task.name in extra_tasks))


def _names(arg: str) -> set[str]:
    if arg == "all":
        return {t.name for t in TASKS}
    return {s.strip() for s in arg.split(",") if s.strip()}


def _is_done(p: cells_mod.Protocol, spec: TaskSpec, method: methods_mod.MethodSpec,
             source: TaskSpec | None) -> bool:
    path = cells_mod.cell_path(p, spec, method)
    if not path.is_file():
        return False
    record = json.loads(path.read_text())
    by_label = {m.label: m for m in methods_mod.all_methods()}
    mark = cells_mod.cell_fingerprint(spec, method, by_label.get(method.twin or ""), source)
    if record.get("protocol") != dataclasses.asdict(p) or record.get("fingerprint") != mark:
        return False  # redo it (the runs that still apply are read back)
    seeds = 1 if method.kind == "base" else p.seeds
    return record.get("steps") == spec.steps and len(record.get("runs", [])) >= seeds \
        if record.get("status") != "failed" else record.get("steps") == spec.steps


def environment() -> dict[str, Any]:
    import peft
    import torch
    import transformers

    import deltatune

    return {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "deltatune": deltatune.__version__, "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "load_average_at_start": os.getloadavg()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cells_mod.worker_init(args.threads)
    out = Path(args.out) if args.out else (OUT / "quick" if args.quick else OUT)
    out.mkdir(parents=True, exist_ok=True)
    tasks = select_tasks(args)
    every = scaled_tasks(args)
    sources = {t.name: every[t.lr_from] if t.lr_from else None for t in tasks}
    methods = select_methods(args.methods or (",".join(QUICK_METHODS) if args.quick else None))
    seeds = min(args.seeds, 2) if args.quick else args.seeds
    protocol = cells_mod.Protocol(
        model=args.model, data_dir=args.data_dir, out=str(out), seeds=seeds,
        sweep_fraction=args.sweep_fraction, precision=args.precision, threads=args.threads,
        max_train=args.max_train, max_test=args.max_test if args.max_test is not None
        else (300 if args.quick else None))
    peft_tasks, extra_tasks = _names(args.peft_tasks), _names(args.extra_tasks)
    cells = [(t.name, m) for t in tasks for m in methods
             if on_task(t, m, peft_tasks, extra_tasks)]
    workers = max(1, min(2, os.cpu_count() or 1)) if args.workers is None else args.workers
    task_list = [(t.name, t.metric) for t in tasks]
    labels = [m.label for m in methods]
    borrowed = [f"{t.name} from {t.lr_from}" for t in tasks if t.lr_from]
    # a screen task whose every row ran (an --all-rows invocation) is reported as such
    ran = {path.stem.split("__")[0] for path in (out / "cells").glob("*__*.json")
           if path.stem.split("__")[1] not in SCREEN_ROWS}
    screen = [t.name for t in tasks if t.rows == "screen" and t.name not in ran]
    header = (f"model `{Path(args.model).name}`; {seeds} seeds; LR chosen per cell on a "
              f"validation split carved out of train (sweep runs {args.sweep_fraction:.2g}× the "
              "final length" + (f"; rates taken: {', '.join(borrowed)}" if borrowed else "")
              + ")" + (f"; {', '.join(screen)}: screen rows only ({', '.join(SCREEN_ROWS)})"
                       if screen else "")
              + "; steps: " + ", ".join(f"{t.name} {t.steps}×{t.batch_size}" for t in tasks)
              + f"; {args.precision} autocast on CPU; mean ± std over seeds; metric on the full "
              "test set (accuracy in %, CoLA: Matthews corr., Shakespeare: perplexity ↓); params"
              " exclude the new classification head (384 × classes), the same for every row.")
    meta = {"header": header, "labels": labels, "tasks": [dataclasses.asdict(t) for t in tasks],
            "protocol": dataclasses.asdict(protocol), "peft_tasks": sorted(peft_tasks),
            "extra_tasks": sorted(extra_tasks)}
    if args.report_only:  # keep what the run recorded (environment, estimate)
        previous = out / "quality.json"
        if previous.is_file():
            old = json.loads(previous.read_text())
            meta = {**{k: v for k, v in old.items() if k != "summaries"}, **meta}
        return report_mod.write_report(out, task_list, meta, with_plot=not args.no_plot)

    print(f"loading {len(tasks)} tasks and measuring the cost model …", flush=True)
    specs = {t.name: t for t in tasks}
    data, load = {}, {}
    for t in tasks:
        t0 = time.perf_counter()
        data[t.name] = (t, cells_mod.task_data(t, protocol.model, protocol.data_dir,
                                               protocol.max_train, protocol.max_test))
        load[t.name] = time.perf_counter() - t0
    costs = dataclasses.replace(plan_mod.measure(args.model, protocol), load=load,
                                contention=plan_mod.CONTENTION if workers > 1 else 1.0)
    text, estimate = plan_mod.describe(data, cells, protocol, costs, workers)
    print(text, flush=True)
    todo = [(name, m) for name, m in cells
            if not _is_done(protocol, specs[name], m, sources[name])]
    cost_of = {(name, m.label): plan_mod.cell_cost(specs[name], data[name][1], m, protocol,
                                                   costs)["total"] for name, m in todo}
    remaining = sum(cost_of.values())
    print(f"{len(cells) - len(todo)} of {len(cells)} cells already done; "
          f"{len(todo)} to run (≈ {plan_mod.pack(list(cost_of.values()), workers) / 60:.1f} min "
          f"on {workers} workers)", flush=True)
    meta.update(environment=environment(), estimate=estimate,
                cost_model=dataclasses.asdict(costs), workers=workers)
    if args.estimate:
        return meta
    started = time.perf_counter()
    # cells that others take rates from first (a peft row its twin's, a task with lr_from its
    # source's), then the rows before the other methods, longest first
    todo.sort(key=lambda c: (specs[c[0]].lr_from is not None, c[1].kind == "peft", c[1].extra,
                             -cost_of[(c[0], c[1].label)]))
    _run_pool(todo, specs, sources, protocol, workers, cost_of, remaining, not args.no_progress,
              lambda: report_mod.write_report(out, task_list, meta, with_plot=False))
    wall = time.perf_counter() - started
    meta["wall_seconds_this_invocation"] = wall
    meta["load_average_at_end"] = os.getloadavg()
    history = out / "invocations.jsonl"
    with history.open("a") as f:
        f.write(json.dumps({"date": meta["environment"]["date"], "wall_s": wall,
                            "cells_run": len(todo), "estimate_wall_s": estimate["wall_s"],
                            "load_start": meta["environment"]["load_average_at_start"],
                            "load_end": meta["load_average_at_end"],
                            "argv": sys.argv[1:] if argv is None else argv}) + "\n")
    record = report_mod.write_report(out, task_list, meta, with_plot=not args.no_plot)
    print(f"done in {wall / 60:.1f} min; report: {out / 'quality.md'}", flush=True)
    return record


def _run_pool(todo: list[tuple[str, methods_mod.MethodSpec]], specs: dict[str, TaskSpec],
              sources: dict[str, TaskSpec | None], protocol: cells_mod.Protocol, workers: int,
              cost_of: dict[tuple[str, str], float], remaining: float, progress: bool,
              report: Any) -> None:
    """Run the cells, each in a new worker process (its first run measures memory cleanly):
    forked from a server that has imported torch, transformers, peft and deltatune once."""
    import multiprocessing as mp

    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - optional
        tqdm = None
    bar = tqdm(total=round(remaining), unit="est-s", disable=not progress or tqdm is None,
               smoothing=0.05, dynamic_ncols=True) if tqdm else None
    def finished(name: str, label: str, get: Any) -> None:
        try:
            record = get()
            status, extra = record.get("status"), record.get("error") or ""
        except Exception as exc:  # a worker died: say so and go on
            status, extra = "crashed", f"{type(exc).__name__}: {exc}"
        line = f"{name:<12} {label:<16} {status}" + (f" ({extra[:100]})" if extra else "")
        if bar is not None:
            bar.update(round(cost_of[(name, label)]))
            bar.write(line)
        else:
            print(line, flush=True)
        report()

    job = cells_mod.cell_job
    if workers == 0:  # in this process, one cell after the other
        for name, m in todo:
            finished(name, m.label,
                     lambda n=name, m=m: job(specs[n], m.label, protocol, sources[n]))
    else:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "transformers", "peft", "deltatune",
                                    "deltatune.train.loop", "_quality.cells"])
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=cells_mod.worker_init,
                                 initargs=(protocol.threads,), max_tasks_per_child=1) as pool:
            pending = {pool.submit(job, specs[name], m.label, protocol, sources[name]):
                       (name, m.label) for name, m in todo}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    name, label = pending.pop(fut)
                    finished(name, label, fut.result)
    if bar is not None:
        bar.close()


if __name__ == "__main__":
    main()
