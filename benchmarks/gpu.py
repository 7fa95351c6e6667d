#!/usr/bin/env python
"""Issue 8's whole matrix in one command, and a table of its targets: met or not, measured.

Runs the speed suites (each in its own process, as a user runs them; each writes its JSON and
Markdown table) for one device and model preset:

* ``lora_speed``            LoRA r=16 all-linear and q,v vs peft vs the floor, eager;
* ``lora_speed --compile``  the same under ``torch.compile`` (against the compiled floor);
* ``lora_speed --compile --activation-memory-budget 0.85``  the same with the partitioner
  told to recompute down to 85% of the saved activations (floor included): on the CPU this
  took LoRA's compiled peak from 1.23× to 1.18× the same-budget floor (1.12× the
  default-compiled one) at the floor's step time;
* ``methods_speed``         every method family vs its peft version where peft has one;
* ``mixed_batch``           4 adapters mixed in one batch vs one active;

then reads the JSON files back and checks the targets of the issue, each a ratio from one run:

==========================================  =========================================
LoRA r=16 all linear, training step         ≤ 1.10× floor (eager and compiled)
LoRA r=16 all linear, peak training memory  ≤ 1.10× floor (eager and compiled)
unmerged LoRA inference                     ≤ 1.10× the base model's
DoRA training step / memory                 ≤ 1.30× / ≤ 1.25× the floor
every method vs its peft version            time and memory ≤ 1.00× peft's
4 adapters mixed in one batch               ≥ 0.95× single-adapter throughput
==========================================  =========================================

Results go to ``<out>/<preset>/``: the suites' files and ``targets.json`` / ``targets.md``.

On CUDA the cases of a suite share the frozen base's weights while timed (``--share-weights``,
see ``_harness.py``): one copy of an 8B model's 16 GB instead of one per case. The ``8b`` preset
runs the LoRA suites and the mixed batch by default (``RUNS_8B``): every-method's suite would
hold a weight-sized trained delta and its optimizer state per full-rank method (full, LISA,
HFT …) besides the full fine-tuning case; ``--only methods`` runs it anyway.

Usage::

    python benchmarks/gpu.py                          # CUDA, bf16, the ~1B "gpu" preset
    python benchmarks/gpu.py --preset 8b              # Llama-3-8B shapes (LoRA and mixed)
    python benchmarks/gpu.py --device cpu --quick     # tiny smoke run of the whole pipeline
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "gpu"
#: torch.compile's activation memory budget of the ``lora_budget`` run
BUDGET = 0.85

#: (run name, script, extra arguments, JSON file stem)
RUNS = [
    ("lora", "lora_speed.py", [], "lora_speed"),
    ("lora_compiled", "lora_speed.py", ["--compile"], "lora_speed"),
    ("lora_budget", "lora_speed.py", ["--compile", "--activation-memory-budget", str(BUDGET)],
     "lora_speed"),
    ("methods", "methods_speed.py", [], "methods_speed"),
    ("mixed", "mixed_batch.py", [], "mixed_batch"),
]

#: The runs of the ``8b`` preset when ``--only`` does not choose.
RUNS_8B = ("lora", "lora_compiled", "mixed")


def run_suites(device: str, preset: str, out: Path, quick: bool, only: list[str]) -> None:
    """Run each suite in a subprocess, each writing into ``out/<run name>``."""
    for name, script, extra, _ in RUNS:
        if only and name not in only:
            continue
        args = [sys.executable, str(HERE / script), "--device", device,
                "--out", str(out / name), *extra]
        args += ["--quick"] if quick else ["--preset", preset]
        print("+", " ".join(args[1:]), flush=True)
        subprocess.run(args, check=True)


def _case(report: dict | None, name: str) -> dict | None:
    return None if report is None else report["cases"].get(name)


def _ratio(case: dict | None, key: str) -> float | None:
    return None if case is None else case["ratios"].get(key)


def check_targets(out: Path) -> list[dict[str, Any]]:
    """Read the suites' JSON files under ``out`` and judge every target.

    Returns:
        One row per target: ``target``, ``measured`` (a ratio, or ``None`` where the run is
        missing), ``limit``, ``met`` (``None`` where nothing was measured) and ``source``.
    """
    reports = {}
    for name, _, _, stem in RUNS:
        files = sorted((out / name).glob(f"{stem}_*.json"))
        reports[name] = json.loads(files[0].read_text()) if files else None
    rows: list[dict[str, Any]] = []

    def add(target: str, value: float | None, limit: float, source: str, at_least: bool = False):
        met = None if value is None else (value >= limit if at_least else value <= limit)
        rows.append({"target": target, "measured": value, "limit": limit,
                     "at_least": at_least, "met": met, "source": source})

    for run, label in (("lora", "eager"), ("lora_compiled", "compiled"),
                       ("lora_budget", f"compiled, activation memory budget {BUDGET}")):
        lora = _case(reports[run], "dt_lora_all")
        add(f"LoRA r=16 all-linear step × floor ({label})",
            _ratio(lora, "time_vs_reference"), 1.10, run)
        add(f"LoRA r=16 all-linear peak memory × floor ({label})",
            _ratio(lora, "memory_vs_reference"), 1.10, run)
        add(f"unmerged LoRA inference × base ({label})",
            _ratio(_case(reports[run], "infer_dt_unmerged"), "time_vs_reference"), 1.10, run)
    lora = reports["lora"]
    add("LoRA r=16 all-linear step × floor (eager, fused kernels)",
        _ratio(_case(lora, "dt_lora_all_fused"), "time_vs_reference"), 1.10, "lora")
    add("LoRA r=16 all-linear peak memory × floor (eager, fused kernels)",
        _ratio(_case(lora, "dt_lora_all_fused"), "memory_vs_reference"), 1.10, "lora")
    add("unmerged LoRA inference × base (eager, fused kernels)",
        _ratio(_case(lora, "infer_dt_unmerged_fused"), "time_vs_reference"), 1.10, "lora")
    methods = reports["methods"]
    dora = _case(methods, "dt_dora")
    add("DoRA step × floor", _ratio(dora, "time_vs_reference"), 1.30, "methods")
    add("DoRA peak memory × floor", _ratio(dora, "memory_vs_reference"), 1.25, "methods")
    for case in (methods or {"cases": {}})["cases"].values():
        if case.get("peer"):
            for what in ("time", "memory"):
                add(f"{case['label']}: {what} vs peft", _ratio(case, f"{what}_vs_peer"), 1.00,
                    "methods")
    mixed = reports["mixed"]
    add("4 adapters mixed: throughput × single adapter",
        None if mixed is None else mixed.get("throughput_mixed_vs_single", {}).get("deltatune"),
        0.95, "mixed", at_least=True)
    return rows


def markdown(rows: list[dict[str, Any]], title: str) -> str:
    lines = [f"# {title}", "", "| target | measured | limit | met |", "|---|---:|---:|:---:|"]
    for r in rows:
        value = "—" if r["measured"] is None else f"{r['measured']:.2f}×"
        met = "—" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(f"| {r['target']} | {value} | {'≥' if r['at_least'] else '≤'} "
                     f"{r['limit']:.2f}× | {met} |")
    done = [r for r in rows if r["met"] is not None]
    lines += ["", f"{sum(r['met'] for r in done)} of {len(done)} measured targets met "
              f"({len(rows) - len(done)} not measured in this run)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--preset", choices=["gpu", "8b", "cpu"], default=None,
                   help="model shape (default: gpu on cuda, cpu on cpu)")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few steps: a smoke run")
    p.add_argument("--only", default="", help=f"comma-separated subset of {[r[0] for r in RUNS]}")
    p.add_argument("--check-only", action="store_true",
                   help="do not run anything; judge the targets from existing results")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    preset = a.preset or ("gpu" if a.device == "cuda" else "cpu")
    out = a.out / ("quick" if a.quick else preset)
    if not a.check_only:
        only = [s for s in a.only.split(",") if s] or (list(RUNS_8B) if preset == "8b" else [])
        unknown = sorted(set(only) - {r[0] for r in RUNS})
        if unknown:
            p.error(f"--only: unknown runs {unknown}; choose from {[r[0] for r in RUNS]}")
        run_suites(a.device, preset, out, a.quick, only)
    rows = check_targets(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "targets.json").write_text(json.dumps(rows, indent=2) + "\n")
    text = markdown(rows, f"Issue 8 targets — {a.device}, preset {'quick' if a.quick else preset}")
    (out / "targets.md").write_text(text)
    print(text)
    return rows


if __name__ == "__main__":
    main()
