"""``deltatune compare``: several method configs on the same model, data and settings.

Each entry is trained by ``run.train`` into ``<output>/<label>/`` (adapter, metrics, curves);
the comparison reports, per entry, the task metric, trainable parameters (the delta's, plus a
new classification head where there is one), peak memory during training and time per step:
a table (printed, and saved as ``compare.md``), ``compare.json``, and ``compare.png`` (the
metric against trainable parameters).

``--equal-budget N`` sizes each method before training: its size field (``rank``,
``bottleneck``, ``num_tokens``, ``dim``) is set to the value whose ``deltatune.cost`` (computed
on the meta device, nothing trained) comes closest to ``N`` parameters. Methods without a size
field (BitFit, IA3, LN tuning, SSF) keep their fixed size, and the table says so.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.config import DeltaConfig
from ..core.errors import ConfigError, DeltaError
from .metrics import DIRECTION
from .models import method_config, parse_sets, size_field
from .report import count, fmt_metric, mib, plot_points, say, table
from .run import RunConfig

DEFAULT_METHODS = ("lora", "ia3", "bitfit")
_TRAIN_KEYS = ("lr", "label")


@dataclass
class Entry:
    """One configuration to compare."""

    label: str
    config: DeltaConfig
    lr: float | None = None
    sized: str = ""


def _scoped(sets: Mapping[str, Any], method: str, label: str, fields: set[str]) -> dict:
    """``--set`` values for one entry: ``key`` when the method has the field, ``method.key`` or
    ``label.key`` for this entry only."""
    out = {}
    for key, value in sets.items():
        scope, _, field = key.rpartition(".")
        if scope and scope in (method, label):
            out[field] = value
        elif not scope and key in fields:
            out[key] = value
    return out


def entries_from(methods: str | None, files: Sequence[Mapping[str, Any]],
                 sets: Sequence[str], config: RunConfig) -> list[Entry]:
    """The entries of a comparison: ``--methods`` names, ``--delta`` files, a config file's
    ``runs:`` list, else the single method of ``config``, else ``lora, ia3, bitfit``.

    Raises:
        ConfigError: an unknown method or field, a ``--set`` key no entry has, or two entries
            with one label.
    """
    from ..core.registry import get_method

    values = parse_sets(sets)
    specs: list[dict[str, Any]] = []
    if methods:
        specs += [{"method": m.strip()} for m in methods.split(",") if m.strip()]
    specs += [dict(f) for f in files]
    specs += [dict(r) for r in config.runs]
    if not specs:
        if config.method or (config.delta or {}).get("method"):
            specs = [{**(config.delta or {}), **({"method": config.method}
                                                 if config.method else {})}]
        else:
            specs = [{"method": m} for m in DEFAULT_METHODS]
    entries, used = [], set()
    for spec in specs:
        source = spec.pop("_file", None)
        if "method" not in spec:
            raise ConfigError(f"{source or 'a comparison entry'} has no 'method:' entry")
        method = str(spec["method"])
        cls = get_method(method).config_class
        label = str(spec.pop("label", None) or _label(spec, entries))
        lr = spec.pop("lr", None)
        chosen = _scoped(values, method, label, cls.field_names())
        used.update(k for k in values if k in chosen or k.rpartition(".")[2] in chosen)
        entries.append(Entry(label, method_config(None, chosen, spec), lr))
    unused = sorted(set(values) - used)
    if unused:
        raise ConfigError(f"--set {unused}: no compared method has such a field (a key applies "
                          "to every method that has it; METHOD.KEY to one)")
    labels = [e.label for e in entries]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"two entries share a label in {labels}; give them label: values")
    return entries


def _label(spec: Mapping[str, Any], entries: Sequence[Entry]) -> str:
    base = str(spec["method"])
    taken = {e.label for e in entries}
    if base not in taken:
        return base
    extra = "-".join(f"{k}{v}" for k, v in spec.items() if k != "method" and
                     isinstance(v, (int, float, str)))
    name = f"{base}-{extra}" if extra else base
    i = 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    return re.sub(r"[^\w.\-]", "_", name)


# ------------------------------------------------------------------------------- budgets
def fit_budget(model: Any, config: DeltaConfig, budget: int) -> tuple[DeltaConfig, str]:
    """``config`` with its size field set to come closest to ``budget`` delta parameters.

    Returns:
        ``(config, note)``; the note says what was chosen (or why nothing was).
    """
    from ..core.accounting import cost

    field = size_field(config)
    if field is None:
        return config, "fixed size"

    def sized(value: int) -> DeltaConfig:
        changes: dict[str, Any] = {field: value}
        if field == "bottleneck" and "reduction_factor" in config.field_names():
            changes["reduction_factor"] = None
        return config.replace(**changes)

    def params(value: int) -> int | None:
        try:
            return cost(model, sized(value)).params
        except (DeltaError, ValueError):
            return None

    lo, hi = 1, 1
    first = params(1)
    if first is None:
        return config, f"cannot size {field}"
    if first >= budget:
        return sized(1), f"{field}=1"
    while True:  # grow until over budget (or invalid)
        value = params(hi * 2)
        if value is None or hi * 2 > 1 << 16:
            break
        hi *= 2
        if value >= budget:
            break
        lo = hi
    while hi - lo > 1:  # largest value within budget lies in [lo, hi]
        mid = (lo + hi) // 2
        value = params(mid)
        if value is not None and value <= budget:
            lo = mid
        else:
            hi = mid
    below, above = params(lo), params(hi)
    best = hi if above is not None and abs(above - budget) < abs(below - budget) else lo
    return sized(best), f"{field}={best}"


# ---------------------------------------------------------------------------------- run
def compare(config: RunConfig, entries: Sequence[Entry], *, budget: int | None = None,
            output: str | Path | None = None) -> dict[str, Any]:
    """Train every entry and report; returns the comparison record (also ``compare.json``).

    Raises:
        ConfigError: no entries, or bad shared settings.
    """
    from .models import load_tokenizer, model_skeleton
    from .run import read_data, train

    if not entries:
        raise ConfigError("nothing to compare")
    if budget is not None and budget < 1:
        raise ConfigError(f"--equal-budget must be a positive parameter count, got {budget}")
    if config.model is not None:  # every entry checked on the model before any trains
        tokenizer = load_tokenizer(config.model)
        tables = read_data(config)
        skeleton = model_skeleton(config.model, tables.columns.task,
                                  label_names=tables.label_names or (),
                                  pad_id=tokenizer.pad_token_id)
        for e in entries:
            if budget is not None:
                e.config, e.sized = fit_budget(skeleton, e.config, budget)
            _check(skeleton, e)
        del skeleton
    elif budget is not None:
        raise ConfigError("no model: pass --model")
    out = Path(output or "runs/compare")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, e in enumerate(entries, 1):
        say(f"\n[{i}/{len(entries)}] {e.label}: {e.config.method}"
            + (f" ({e.sized})" if e.sized else ""))
        run = dataclasses.replace(config, method=None, delta=e.config.to_dict(), set=[],
                                  output=str(out / e.label), overwrite=True, resume=False,
                                  save_every=0, lr=e.lr if e.lr is not None else config.lr,
                                  export_peft=False)
        record = train(run, measure_memory=True)
        rows.append(_row(e, record))
    return _report(config, rows, out, budget)


def _check(model: Any, e: Entry) -> None:
    """``e``'s delta resolves on ``model`` (its targets, its sizes: ``cost``), or a
    ``ConfigError`` naming the entry, before anything trains."""
    from ..core.accounting import cost
    from ..core.errors import DeltaError

    try:
        cost(model, e.config)
    except DeltaError as exc:
        raise ConfigError(f"{e.label}: {exc} (nothing was trained; set a field of this "
                          f"method's alone with --set {e.config.method}.FIELD=VALUE)") from exc


def _row(e: Entry, record: Mapping[str, Any]) -> dict[str, Any]:
    metric = record["metric"]
    return {"label": e.label, "method": e.config.method, "sized": e.sized,
            "config": e.config.to_dict(), "metric": metric,
            metric: record["final"].get(metric), "final": record["final"],
            "trainable": record["trainable_params"], "delta_params": record["delta_params"],
            "share": record["trainable_share"], "peak_memory_bytes": record.get("peak_memory"),
            "memory_method": record.get("memory_method"),
            "seconds_per_step": record["seconds_per_step"], "output": record["adapter"]}


def _report(config: RunConfig, rows: list[dict[str, Any]], out: Path,
            budget: int | None) -> dict[str, Any]:
    metric = rows[0]["metric"]
    headers = ["config", "method", "size", metric, "trainable", "share", "peak memory",
               "time/step"]
    body = [[r["label"], r["method"], r["sized"] or "—", fmt_metric(metric, r[metric]),
             count(r["trainable"]), f"{100 * r['share']:.3f}%", mib(r["peak_memory_bytes"]),
             f"{1000 * r['seconds_per_step']:.1f} ms" if r["seconds_per_step"] else "n/a"]
            for r in rows]
    text = table(headers, body, right=[False, False, False, True, True, True, True, True])
    up = DIRECTION.get(metric, True)
    best = (max if up else min)(rows, key=lambda r: (r[metric] if r[metric] is not None
                                                    else (-1e30 if up else 1e30)))
    notes = [f"model {config.model}, data {config.data}; {metric} on the held-out split "
             f"({'higher' if up else 'lower'} is better); best: {best['label']}",
             "trainable = delta parameters (+ a new classification head, the same for every "
             "config); peak memory = training's peak over the loaded model "
             f"({rows[0]['memory_method'] or 'n/a'})"]
    if budget is not None:
        notes.append(f"sized to an equal budget of {budget:,} delta parameters where the "
                     "method has a size field")
    say("\n" + text + "\n" + "\n".join(notes))
    (out / "compare.md").write_text("\n".join(["```", text, "```", "", *notes]) + "\n")
    record = {"metric": metric, "higher_is_better": up, "budget": budget, "rows": rows,
              "model": config.model, "data": config.data}
    (out / "compare.json").write_text(json.dumps(record, indent=1) + "\n")
    if config.plot:
        png = plot_points(rows, metric, out / "compare.png", higher_is_better=up,
                          title=f"{metric} against trainable parameters")
        if png:
            record["plot"] = str(png)
            say(f"plot: {png}")
    say(f"table: {out / 'compare.md'}, data: {out / 'compare.json'}")
    return record


__all__ = ["DEFAULT_METHODS", "Entry", "compare", "entries_from", "fit_budget"]
