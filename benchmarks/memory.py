#!/usr/bin/env python
"""Training memory of the memory-saving methods: full fine-tuning, LoRA, QLoRA, LST, QST, sparse
and LISA, on the same model and inputs, in one run.

One randomly initialised ``LlamaForCausalLM`` (built from a ``LlamaConfig``, no downloads; the
CPU default has ~55M parameters) is copied into every case, and every case sees the same token
batch. Training cases run forward + backward + AdamW on their trainable parameters:

* ``floor``     the frozen base's own forward + backward into ``inputs_embeds`` (the harness's
                reference: what any method that back-propagates through the base pays);
* ``full_ft``   full fine-tuning;
* ``lora``      deltatune LoRA r=16, alpha=32 on every linear layer but the head;
* ``lst``       ladder side-tuning (``LSTConfig()``: r=8, every block tapped);
* ``qst``       QST's ladder (``QSTConfig()``: r=16, adapter downsamplers of rank 16);
* ``qst_pool``  QST with gradient-free average-pooling downsamplers;
* ``sparse``    a FISH-mask sparse delta, 1% of every linear weight (Fisher scores from one
                calibration batch, before the measured step);
* ``lisa``      LISA: a dense ΔW on every linear layer, 1 block trained at a time (+ the
                layers outside the blocks, as the paper), its schedule stepping after AdamW;
* ``qlora`` / ``qst_nf4``  LoRA / QST on the base quantized to NF4 (``deltatune.quant``; rows
                left out, with the reason, when it is not available);

and ``infer_base``, the frozen base's no-grad forward: the least memory any fine-tuning could
need. Memory is each case's peak during one step in a fresh process, minus the post-import
baseline (weights, optimizer state, activations, gradients; CPU: resident set size, CUDA:
``max_memory_allocated``); time is the median step, all cases interleaved. Both are reported as
ratios to full fine-tuning and to the base forward. The machinery is ``_harness.py``.

Usage::

    python benchmarks/memory.py                    # CPU, float32, ~2-3 minutes
    python benchmarks/memory.py --device cuda      # bfloat16, the harness's ~1B preset
    python benchmarks/memory.py --quick --out /tmp/bench   # tiny smoke run
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared harness, beside this file
import _harness as h
from _harness import Case, Runner

import deltatune as dt
from deltatune.methods.layerwise import LisaConfig
from deltatune.methods.side import LSTConfig, QSTConfig
from deltatune.methods.sparse import SparseConfig

ADAPTER = "a"
#: The CPU default: a ~55M-parameter Llama (6 blocks of width 768), short sequences.
h.PRESETS["side_cpu"] = dict(hidden=768, intermediate=2048, layers=6, heads=12, kv_heads=12,
                             vocab=8192, batch=4, seq=128)


def _quant_unavailable() -> str | None:
    try:
        from deltatune import quant  # noqa: F401  (imports torchao on first use)
    except ImportError as exc:
        return f"deltatune.quant is not available: {exc}"
    return None


QUANT_MISSING = _quant_unavailable()


def _train(adapt: Callable[[nn.Module], nn.Module], *,
           nf4: bool = False) -> Callable[[nn.Module, Tensor], Runner]:
    def build(base: nn.Module, ids: Tensor) -> Runner:
        if nf4:
            from deltatune import quant

            quant.quantize(base, "nf4")
        return h.train_runner(adapt(base), ids)
    return build


def _inject(config: dt.DeltaConfig) -> Callable[[nn.Module], nn.Module]:
    return lambda model: dt.inject(model, config, name=ADAPTER)


def _sparse(base: nn.Module, ids: Tensor) -> Runner:
    """FISH mask: Fisher scores from one calibration batch, then the measured step."""
    model = dt.inject(base, SparseConfig(density=0.01, targets="all-linear"), name=ADAPTER,
                      data=[{"input_ids": ids, "labels": ids}])
    return h.train_runner(model, ids)


def _lisa(base: nn.Module, ids: Tensor) -> Runner:
    """LISA: the optimizer over every ΔW, then the schedule freezes all but one block."""
    model = dt.inject(base, LisaConfig(active_layers=1), name=ADAPTER)
    runner = h.train_runner(model, ids)
    schedules = dt.Scheduler(model, runner.optimizer)
    runner.after_step = schedules.step
    runner.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return runner


LORA = dt.LoraConfig(rank=16, alpha=32)
CASES: list[Case] = [
    Case("floor", "floor: frozen base fwd+bwd", "train", h.floor_runner),
    Case("full_ft", "full fine-tuning", "train", h.full_runner),
    Case("lora", "LoRA r=16 all-linear", "train", _train(_inject(LORA))),
    Case("lst", "LST r=8", "train", _train(_inject(LSTConfig()))),
    Case("qst", "QST r=16, adapter downsamplers", "train", _train(_inject(QSTConfig()))),
    Case("qst_pool", "QST r=16, avg-pool downsamplers", "train",
         _train(_inject(QSTConfig(downsample="avgpool")))),
    Case("sparse", "sparse (FISH mask) 1% of linear weights", "train", _sparse),
    Case("lisa", "LISA: dense ΔW, 1 block at a time", "train", _lisa),
]
#: Rows on an NF4 base (``deltatune.quant``): QLoRA-style tuning vs QST, as in the QST paper.
NF4_CASES = [
    Case("qlora", "QLoRA: LoRA r=16 on NF4", "train", _train(_inject(LORA), nf4=True)),
    Case("qst_nf4", "QST r=16 on NF4", "train", _train(_inject(QSTConfig()), nf4=True)),
]
SKIPPED = {c.name: QUANT_MISSING for c in NF4_CASES} if QUANT_MISSING else {}
CASES += [] if QUANT_MISSING else NF4_CASES
CASES.append(Case("infer_base", "frozen base forward (no_grad)", "infer", h.base_infer_runner))


def check_outputs(runners: dict[str, Runner]) -> dict[str, Any]:
    """Every method starts as its base (LoRA's B = 0, LST's U = 0, QST's β = 1): the first
    losses agree within the full-precision cases, and within the NF4 ones."""
    out = h.first_losses(runners)
    losses = out.get("first_loss", {})
    nf4 = {c.name for c in NF4_CASES}
    for key, names in (("first_loss_max_abs_diff", [n for n in losses if n not in nf4]),
                       ("first_loss_max_abs_diff_nf4", [n for n in losses if n in nf4])):
        values = [losses[n] for n in names]
        out[key] = max(values) - min(values) if values else None
    return out


def annotate(report: dict[str, Any]) -> None:
    """Ratios to full fine-tuning and to the base's no-grad forward, for every case."""
    cases = report["cases"]

    def median(name: str) -> float | None:
        return cases[name]["time"]["median_s"] if name in cases else None

    def peak(name: str) -> float | None:
        return cases.get(name, {}).get("memory", {}).get("peak_bytes")

    for name, case in cases.items():
        case["ratios"].update(
            time_vs_full_ft=h.ratio(median(name), median("full_ft")),
            memory_vs_full_ft=h.ratio(peak(name), peak("full_ft")),
            time_vs_base_forward=h.ratio(median(name), median("infer_base")),
            memory_vs_base_forward=h.ratio(peak(name), peak("infer_base")))
    report["skipped"] = SKIPPED


def _pct_saved(value: float | None) -> str:
    return "—" if value is None else f"{100 * (1 - value):.0f}%"


def markdown(report: dict[str, Any]) -> str:
    lines = h.header_lines(report, "Memory-saving methods: training memory",
                           "LoRA r=16 α=32 all-linear; LST r=8; QST r=16 (adapter downsamplers "
                           "of rank 16, or average pooling); sparse: FISH mask, density 1%; "
                           "LISA: 1 of the blocks (+ embeddings, head); NF4 rows quantize "
                           "every linear layer but the head.")
    lines += ["", "## Training step (fwd + bwd + AdamW) and the base's forward", "",
              "| case | trainable | median ms | time × full FT | time × base fwd | peak MiB "
              "| mem × full FT | saves vs full FT | mem × base fwd | resident MiB "
              "| step increase MiB |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in report["cases"].values():
        t, r, m = c["time"], c["ratios"], c["memory"]
        lines.append(
            f"| {c['label']} | {c.get('trainable_params', 0):,} | {t['median_s'] * 1e3:,.0f} | "
            f"{h.fmt_x(r['time_vs_full_ft'])} | {h.fmt_x(r['time_vs_base_forward'])} | "
            f"{h.fmt_mib(m.get('peak_bytes'))} | {h.fmt_x(r['memory_vs_full_ft'])} | "
            f"{_pct_saved(r['memory_vs_full_ft'])} | {h.fmt_x(r['memory_vs_base_forward'])} | "
            f"{h.fmt_mib(m.get('resident_before_step_bytes'))} | "
            f"{h.fmt_mib(m.get('step_increase_bytes'))} |")
    sanity = report["sanity"]
    spread = sanity.get("first_loss_max_abs_diff")
    spread_nf4 = sanity.get("first_loss_max_abs_diff_nf4")
    lines += ["", f"Sanity: first-loss spread across the full-precision training cases "
              f"{spread:.2e}" + ("" if spread_nf4 is None else
                                 f", across the NF4 cases {spread_nf4:.2e}") + "."]
    for name, why in report.get("skipped", {}).items():
        lines.append(f"Not run: {name} ({why}).")
    lines += h.memory_error_lines(report)
    return "\n".join(lines) + "\n"


SUITE = h.Suite(name="memory", description=__doc__, cases=tuple(CASES),
                check=check_outputs, markdown=markdown, default_steps=3, annotate=annotate,
                skipped=SKIPPED)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not {"--preset", "--quick"} & set(argv) and "cuda" not in argv:
        argv += ["--preset", "side_cpu"]
    if "--warmup" not in argv and "--quick" not in argv:
        argv += ["--warmup", "1"]
    return h.main(SUITE, argv)


if __name__ == "__main__":
    main()
