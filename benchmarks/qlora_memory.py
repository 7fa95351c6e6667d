#!/usr/bin/env python
"""QLoRA memory: peak training memory of LoRA on an NF4 base vs LoRA on a bf16 base vs full
fine-tuning, side by side in one run.

One randomly initialised ``LlamaForCausalLM`` (built from a ``LlamaConfig``, no downloads, bf16
by default) is copied into every case, and every case sees the same token batch. Training step =
forward + backward + AdamW on the trainable parameters:

* ``floor``       the frozen bf16 base's own forward + backward (the gradient flows back into
                  ``inputs_embeds``; no optimizer) — what any adapter pays at least;
* ``full_ft``     full fine-tuning, every parameter trainable (bf16 weights, gradients and
                  AdamW state);
* ``lora_bf16``   deltatune LoRA r=16, alpha=32 on every linear layer but the head, on the
                  bf16 base;
* ``qlora_nf4``   the same LoRA on a base whose linear layers are NF4 with double-quantized
                  scales (``deltatune.quant.quantize(model, "nf4")``, torchao; the embeddings
                  and the LM head stay bf16) — QLoRA;
* ``qlora_int8``  the same LoRA on an int8 (per-row) base.

The model is shaped so that the linear layers' weights dominate (short sequences, a small
vocabulary): the figure of interest is what the frozen base costs to hold while training.

Memory: each case runs in a fresh child process: baseline after imports and a throw-away step
on a tiny model, build the model (and quantize it), warm up, reset the peak counter, run one
step, report the peak minus the baseline — the resident set size on CPU (``VmHWM`` reset through
``/proc/self/clear_refs``), ``torch.cuda.max_memory_allocated`` on CUDA. ``weights`` is what the
model's parameters occupy (quantized layers: codes and scales). Times are reported too (median
of interleaved steps; dequantizing NF4 in every forward and backward costs time).

The machinery (memory children, timing, environment, report, command line) is ``_harness.py``,
shared with ``lora_speed.py``. Results go to ``<out>/qlora_memory_<device>.json`` and ``.md``.

Usage::

    python benchmarks/qlora_memory.py                  # CPU, bf16, ~69M-parameter Llama
    python benchmarks/qlora_memory.py --device cuda    # bf16, ~1B-parameter Llama
    python benchmarks/qlora_memory.py --quick --out /tmp/bench   # tiny smoke run
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared harness, beside this file
import _harness as h
from _harness import Case, Runner

import deltatune as dt
from deltatune import quant

ADAPTER = "a"
RANK, ALPHA = 16, 32
#: The default CPU shape: ~69M parameters, 82% of them in the linear layers.
h.PRESETS.setdefault("qlora", dict(hidden=768, intermediate=2048, layers=8, heads=12,
                                   kv_heads=12, vocab=8192, batch=1, seq=128))


def _lora(scheme: str | None):
    def build(base: nn.Module, ids: Tensor) -> Runner:
        if scheme is not None:
            quant.quantize(base, scheme)
        config = dt.LoraConfig(rank=RANK, alpha=ALPHA, targets="all-linear")
        return h.train_runner(dt.inject(base, config, name=ADAPTER), ids)
    return build


CASES: tuple[Case, ...] = (
    Case("floor", "floor: frozen bf16 base fwd+bwd", "train", h.floor_runner),
    Case("full_ft", "full fine-tuning", "train", h.full_runner),
    Case("lora_bf16", "LoRA on the bf16 base", "train", _lora(None)),
    Case("qlora_nf4", "QLoRA: LoRA on an NF4 base", "train", _lora("nf4")),
    Case("qlora_int8", "LoRA on an int8 base", "train", _lora("int8")),
)
COMPARED = ("full_ft", "lora_bf16")  # each case's peak is also given relative to these


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters occupy: a quantized layer's codes and scales, not the
    dense size its ``numel`` suggests."""
    layers = quant.quantized_layers(model).values()
    stored = {id(layer.weight) for layer in layers}
    total = sum(layer.quant.storage_bytes(layer.weight) for layer in layers)
    unique = {id(p): p for p in model.parameters()}
    return total + sum(p.numel() * p.element_size() for key, p in unique.items()
                       if key not in stored)


def check(runners: dict[str, Runner]) -> dict[str, Any]:
    """Before timing: what each case holds, and that they train the same thing (every LoRA
    case starts as its base; the quantized bases differ from the bf16 one by their rounding)."""
    out = h.first_losses(runners)
    out["weight_bytes"] = {n: weight_bytes(r.model) for n, r in runners.items()}
    first = out.get("first_loss", {})
    if "lora_bf16" in first:
        out["first_loss_diff_vs_lora_bf16"] = {n: first[n] - first["lora_bf16"]
                                              for n in first if n.startswith("qlora")}
    return out


def annotate(report: dict[str, Any]) -> None:
    """Every case's peak relative to full fine-tuning and to LoRA on the bf16 base."""
    cases = report["cases"]

    def peak(name: str) -> float | None:
        return cases.get(name, {}).get("memory", {}).get("peak_bytes")

    for name, case in cases.items():
        case["weight_bytes"] = report["sanity"]["weight_bytes"].get(name)
        case["ratios"].update({f"memory_vs_{ref}": h.ratio(peak(name), peak(ref))
                               for ref in COMPARED})
    report["headline"] = {
        "qlora_nf4_vs_lora_bf16": h.ratio(peak("qlora_nf4"), peak("lora_bf16")),
        "qlora_nf4_vs_full_ft": h.ratio(peak("qlora_nf4"), peak("full_ft")),
        "lora_bf16_vs_full_ft": h.ratio(peak("lora_bf16"), peak("full_ft")),
    }


def markdown(report: dict[str, Any]) -> str:
    lines = h.header_lines(report, "QLoRA memory",
                           f"LoRA r={RANK}, alpha={ALPHA} on every linear layer but the head; "
                           "NF4: block 64, double-quantized scales (torchao).")
    extra: list[h.Column] = [
        ("weights MiB", "---:", lambda c: h.fmt_mib(c.get("weight_bytes"))),
        ("mem × full FT", "---:", lambda c: h.fmt_x(c["ratios"].get("memory_vs_full_ft"))),
        ("mem × LoRA bf16", "---:", lambda c: h.fmt_x(c["ratios"].get("memory_vs_lora_bf16"))),
    ]
    lines += h.table_lines(report, "train", "Training step (fwd + bwd + AdamW)", "floor", extra)
    head = report["headline"]
    lines += ["", f"Peak training memory: QLoRA (NF4) is {h.fmt_x(head['qlora_nf4_vs_lora_bf16'])}"
              f" LoRA on the bf16 base and {h.fmt_x(head['qlora_nf4_vs_full_ft'])} full "
              f"fine-tuning; LoRA on bf16 is {h.fmt_x(head['lora_bf16_vs_full_ft'])} full "
              "fine-tuning."]
    diffs = report["sanity"].get("first_loss_diff_vs_lora_bf16", {})
    if diffs:
        lines += ["", "First loss minus LoRA-on-bf16's (the quantization error of the base): "
                  + "; ".join(f"{n} {v:+.3e}" for n, v in diffs.items()) + "."]
    lines += h.memory_error_lines(report)
    return "\n".join(lines) + "\n"


SUITE = h.Suite(name="qlora_memory", description=__doc__, cases=CASES, check=check,
                markdown=markdown, default_steps=3, annotate=annotate,
                definitions={"weight_bytes": "bytes of the model's parameters; quantized layers "
                                             "count their codes and scales",
                             "headline": "peak training memory ratios (one run, same model "
                                         "and inputs)"})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """The harness's ``main`` with this benchmark's defaults: bf16, the ``qlora`` shape on CPU,
    one warm-up step."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--dtype" not in argv:
        argv += ["--dtype", "bfloat16"]
    if "--warmup" not in argv and "--quick" not in argv:
        argv += ["--warmup", "1"]  # memory is the figure: one warm-up step settles it
    if not {"--preset", "--quick"} & set(argv) and "cuda" not in argv:
        argv += ["--preset", "qlora"]
    return h.main(SUITE, argv)


if __name__ == "__main__":
    main()
