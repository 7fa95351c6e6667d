"""The report: per cell mean and spread over seeds, the tables (Markdown), the peft comparison,
the JSON record and the plot (metric against trainable parameters, log scale)."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .cells import HIGHER, PROBE_STEPS, write_json

BASE_PARAMS = 12_588_672  # the tiny Llama, tied embeddings counted once


def summarize(cell: dict[str, Any]) -> dict[str, Any]:
    """One cell's figures: mean / std / min / max of the test metric over the seeds, and the
    medians of trainable parameters, peak memory and time per step."""
    out = {k: cell.get(k) for k in ("task", "label", "kind", "method", "twin", "extra",
                                    "metric", "status", "error", "best_lr", "steps")}
    ok = [r for r in cell.get("runs", []) if r.get("status") == "ok"]
    values = [r["metrics"][cell["metric"]] for r in ok]
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    out["values"] = values
    out["peak_memory_bytes"] = (cell.get("memory") or {}).get("peak_memory_bytes")
    if values:
        out["mean"] = statistics.fmean(values)
        out["std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out["min"], out["max"] = min(values), max(values)
    if ok:
        out["trainable"] = ok[0]["trainable"]
        out["delta_params"] = ok[0]["delta_params"]
        out["head_params"] = ok[0]["head_params"]
        sps = [r["seconds_per_step"] for r in ok if r.get("seconds_per_step")]
        out["seconds_per_step"] = statistics.median(sps) if sps else None
    return out


def load_cells(out: Path) -> list[dict[str, Any]]:
    cells = []
    for path in sorted((out / "cells").glob("*.json")):
        try:
            cells.append(json.loads(path.read_text()))
        except json.JSONDecodeError:
            continue
    return cells


def _fmt(metric: str, s: dict[str, Any] | None) -> str:
    if s is None:
        return "—"
    if "mean" not in s:
        return "failed"
    if metric == "perplexity":
        return f"{s['mean']:.1f} ± {s['std']:.1f}"
    if metric == "mcc":
        return f"{s['mean']:.3f} ± {s['std']:.3f}"
    return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"


def _count(n: int | None) -> str:
    if n is None:
        return "—"
    if n >= 1_000_000:
        return f"{n / 1e6:.2f}M"
    if n >= 10_000:
        return f"{n / 1e3:.0f}k"
    return f"{n:,}"


def _versus(cell: dict[str, Any] | None, full: dict[str, Any] | None) -> tuple[str, str]:
    """``(memory, time per step)`` of a cell, each with its ratio to full fine-tuning's."""
    shown = []
    for key, unit in (("peak_memory_bytes", 2**20), ("seconds_per_step", 1e-3)):  # MiB, ms
        value, ref = (cell or {}).get(key), (full or {}).get(key)
        if not value:
            shown.append("—")
        else:
            shown.append(f"{value / unit:.0f}" + (f" ({value / ref:.2f}×)" if ref else ""))
    return shown[0], shown[1]


def relative(metric: str, value: float, full: float) -> float:
    """Share of full fine-tuning's score (perplexity: full's perplexity over this one)."""
    if metric == "perplexity":
        return full / value if value > 0 else 0.0
    return value / full if full else float("nan")


def tables(summaries: Sequence[dict[str, Any]], tasks: Sequence[tuple[str, str]]
           ) -> dict[str, str]:
    """Markdown: the main table (with memory and time per step on the first task, where every
    row runs), the details (LR, memory, time per step) and the peft one."""
    by = {(s["task"], s["label"]): s for s in summaries}
    labels = list(dict.fromkeys(s["label"] for s in summaries))
    first = tasks[0][0] if tasks else None
    head = "| method | params (excl. head) | % of base | " + " | ".join(
        f"{t} {m}{' ↓' if not HIGHER[m] else ''}" for t, m in tasks) + (
        f" | ≥95% of full | {first} memory, MiB (× full) | {first} ms/step (× full) |")
    lines = [head, "|" + "---|" * (len(tasks) + 6)]
    for label in labels:
        cells = [by.get((t, label)) for t, _ in tasks]
        any_ok = next((c for c in cells if c and "delta_params" in c), None)
        params = any_ok["delta_params"] if any_ok else None
        if any_ok and any_ok["kind"] == "head":
            params = None
        reach = []
        for (t, m), c in zip(tasks, cells, strict=True):
            full = by.get((t, "full"))
            if c and "mean" in c and full and "mean" in full:
                reach.append(relative(m, c["mean"], full["mean"]) >= 0.95)
        kind = any_ok["kind"] if any_ok else None
        share = "" if params is None or kind == "base" else f"{100 * params / BASE_PARAMS:.3f}%"
        shown = {"head": "head only", "base": "none (untrained)"}.get(kind, _count(params))
        memory, step = _versus(by.get((first, label)), by.get((first, "full")))
        lines.append(f"| {label} | {shown} | {share} | "
                     + " | ".join(_fmt(m, c) for (_, m), c in zip(tasks, cells, strict=True))
                     + f" | {sum(reach)}/{len(reach)} | {memory} | {step} |")
    detail = ["Peak memory: the resident set's peak over the model as built, during "
              f"{PROBE_STEPS} training steps on the same batches for every row of a task, each "
              "cell in a new process (gradients, optimizer state, activations; CPU, bf16 "
              "autocast). Time per step: median over the seeds, two workers sharing the 2 "
              "cores.", "",
              "| task | method | best LR | trainable (incl. head) | peak memory | time/step | "
              "status |", "|---|---|---|---|---|---|---|"]
    for s in summaries:
        mem = s.get("peak_memory_bytes")
        sps = s.get("seconds_per_step")
        err = s.get("error") or ""
        detail.append(f"| {s['task']} | {s['label']} | {s.get('best_lr') or '—'} | "
                      f"{_count(s.get('trainable'))} | "
                      f"{'—' if mem is None else f'{mem / 2**20:.0f} MiB'} | "
                      f"{'—' if not sps else f'{1000 * sps:.0f} ms'} | "
                      f"{s['status']}{': ' + err.replace('|', '/')[:160] if err else ''} |")
    peft_lines = ["| task | method | deltatune | peft | Δ | larger seed std | within spread | "
                  "ranges overlap |", "|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        if s["kind"] != "peft":
            continue
        ours = by.get((s["task"], s["twin"]))
        m = s["metric"]
        if not ours or "mean" not in ours or "mean" not in s:
            peft_lines.append(f"| {s['task']} | {s['twin']} | {_fmt(m, ours)} | {_fmt(m, s)} "
                              "| — | — | — | — |")
            continue
        diff = ours["mean"] - s["mean"]
        spread = max(ours["std"], s["std"])
        overlap = ours["min"] <= s["max"] and s["min"] <= ours["max"]
        scale = 1 if m in ("perplexity", "mcc") else 100
        peft_lines.append(f"| {s['task']} | {s['twin']} | {_fmt(m, ours)} | {_fmt(m, s)} | "
                          f"{scale * diff:+.3g} | {scale * spread:.3g} | "
                          f"{'yes' if abs(diff) <= spread else 'no'} | "
                          f"{'yes' if overlap else 'no'} |")
    return {"main": "\n".join(lines), "detail": "\n".join(detail),
            "peft": "\n".join(peft_lines)}


def plot(summaries: Sequence[dict[str, Any]], tasks: Sequence[tuple[str, str]],
         path: Path) -> Path | None:
    """Metric against trainable parameters (incl. the task head), log x, one panel per task."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cols = min(3, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.6 * rows), squeeze=False)
    for ax, (task, metric) in zip(axes.flat, tasks, strict=False):
        mine = [s for s in summaries if s["task"] == task and "mean" in s and s.get("trainable")]
        for s in mine:
            scale = 100 if metric == "accuracy" else 1
            style = {"full": ("s", "black"), "scratch": ("D", "grey"), "head": ("v", "grey"),
                     "peft": ("x", "tab:red")}.get(s["kind"],
                                                   ("o", "tab:green" if s.get("extra")
                                                    else "tab:blue"))
            ax.errorbar(s["trainable"], scale * s["mean"], yerr=scale * s["std"], fmt=style[0],
                        color=style[1], ms=5, capsize=2)
            if s["kind"] != "peft":
                ax.annotate(s["label"], (s["trainable"], scale * s["mean"]), fontsize=6,
                            xytext=(3, 2), textcoords="offset points")
        base = next((s for s in summaries if s["task"] == task and s["kind"] == "base"
                     and "mean" in s), None)
        if base:
            ax.axhline(base["mean"], color="grey", lw=0.6, ls=":")
            ax.annotate("base (untrained)", (0, base["mean"]), xycoords=("axes fraction", "data"),
                        fontsize=6, color="grey", xytext=(2, 2), textcoords="offset points")
        full = next((s for s in mine if s["label"] == "full"), None)
        if full:
            scale = 100 if metric == "accuracy" else 1
            ax.axhline(scale * full["mean"], color="black", lw=0.6, ls="--")
        ax.set_xscale("log")
        if metric == "perplexity":
            ax.set_yscale("log")
        ax.set_title(f"{task} ({metric}{', lower is better' if not HIGHER[metric] else ''})",
                     fontsize=9)
        ax.set_xlabel("trainable parameters (incl. task head)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    fig.text(0.5, 0.005, "blue: deltatune (issue's methods) · green: other registered methods · "
             "red x: HF peft · black square: full FT · grey: scratch / head only; "
             "bars: std over seeds", ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _invocations(out: Path) -> list[dict[str, Any]]:
    path = out / "invocations.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_report(out: Path, tasks: Sequence[tuple[str, str]], meta: dict[str, Any], *,
                 with_plot: bool = True) -> dict[str, Any]:
    """Write ``quality.json``, ``quality.md`` (and ``quality.png``) from the finished cells."""
    order = {name: i for i, (name, _) in enumerate(tasks)}
    cells = [c for c in load_cells(out) if c.get("task") in order]
    summaries = [summarize(c) for c in cells]
    labels = meta.get("labels") or []
    rank = {lab: i for i, lab in enumerate(labels)}
    summaries.sort(key=lambda s: (rank.get(s["label"], len(rank)), order[s["task"]]))
    md = tables(summaries, tasks)
    runs = _invocations(out)
    if runs:
        meta = {**meta, "invocations": runs,
                "wall_seconds_total": sum(r.get("wall_s", 0.0) for r in runs)}
    loads = ", ".join(f"{r['load_start'][0]:.1f}" for r in runs)
    timing = "" if not runs else (
        f"Wall time: {meta['wall_seconds_total'] / 60:.0f} min over {len(runs)} invocation(s) "
        f"(1-minute load average at the start of each: {loads}).")
    text = ["# Quality on real data", "", meta.get("header", ""), "", timing, "", md["main"], "",
            "## deltatune against HF peft", "", md["peft"], "", "## Details", "", md["detail"],
            ""]
    (out / "quality.md").write_text("\n".join(text))
    record = {**meta, "summaries": summaries}
    write_json(out / "quality.json", record)
    if with_plot:
        plot(summaries, tasks, out / "quality.png")
    return record


__all__ = ["BASE_PARAMS", "load_cells", "plot", "relative", "summarize", "tables",
           "write_report"]
