#!/usr/bin/env python
"""LoRA speed and memory: deltatune vs HF peft vs the floor, side by side in one run.

One randomly initialised ``LlamaForCausalLM`` (built from a ``LlamaConfig``, no downloads) is
copied into every case, and every case sees the same token batch:

training (forward + backward + AdamW step on the trainable parameters)

* ``floor``          the frozen base's own forward + backward: every parameter frozen, the
                     gradient flows back through every layer into ``inputs_embeds`` (no
                     optimizer step) — what any adapter pays at least;
* ``full_ft``        full fine-tuning, every parameter trainable;
* ``dt_lora_all`` / ``peft_lora_all``  LoRA r=16, alpha=32 on every linear layer but the head;
* ``dt_lora_qv``  / ``peft_lora_qv``   the same on ``q_proj`` and ``v_proj`` only;
* ``dt_lora_all_saving``  ours on every linear layer with each layer's input saved for
  backward, as plain autograd does (``recompute.saving_inputs``): what the input recipes of
  ``deltatune.core.recompute`` save, in time and memory;
* ``dt_lora_all_fused``  (CUDA) ours on every linear layer through the fused Triton kernels
  (``deltatune.kernels``: ``x Wᵀ + s (x Aᵀ) Bᵀ`` and ``g W + s (g B) A`` each one GEMM);

inference (``torch.no_grad()`` forward)

* ``infer_base``, ``infer_dt_unmerged``, ``infer_peft_unmerged`` (LoRA on every linear layer,
  identical non-zero adapter weights in both libraries), ``infer_dt_merged`` (``dt.merge``),
  ``infer_dt_unmerged_fused`` (CUDA: the unmerged forward through the fused kernel).

Speed: warm-up steps, then ``--steps`` rounds in each of which every case runs one step, in a
freshly shuffled order (a fixed order would give each case the same predecessor, whose freed
memory and cache state it inherits), so that machine noise hits every case alike; every case
keeps its own model alive throughout. Reported: median, min, IQR spread. On CPU, glibc's
malloc is set to keep freed memory (``--malloc cached``, the default): with its defaults every
step page-faults in fresh memory, by an amount that depends on the case that ran just before,
which adds noise as large as the differences measured (``--malloc default`` to see it; the
JSON records the minor page faults per step).

Memory: each case runs again in a fresh child process (two at a time where the cores allow;
the peaks are per process): record the baseline after imports and a throw-away step on a tiny model,
build the model and optimizer, run the warm-up steps, reset the peak counter, run one step and
report the peak minus the baseline. On CPU the peak is the resident set size (Linux: write
``5`` to ``/proc/self/clear_refs`` to reset ``VmHWM``, then read it after the step; where that
is unavailable, a sampling thread, flagged in the output); on CUDA it is
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. Training cases then run
one more forward under ``TensorMemory``, which counts the tensor storage it leaves alive for
backward exactly ("kept": the activations, free of allocator caching, alike on any device).

Every figure is also reported as a ratio to the floor (training) or the base (inference), and
ours to peft's. Results go to ``<out>/lora_speed_<device>.json`` and ``.md``. The machinery
(timing, memory children, environment, report, command line) is ``_harness.py``, shared with
``methods_speed.py``.

Usage::

    python benchmarks/lora_speed.py                     # CPU, float32, a few minutes
    python benchmarks/lora_speed.py --device cuda       # bfloat16, ~1B-parameter Llama
    python benchmarks/lora_speed.py --quick --out /tmp/bench   # tiny smoke run
"""

from __future__ import annotations

import copy
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared harness, beside this file
import _harness as h
from _harness import Case, Runner, peft

import deltatune as dt
from deltatune import kernels
from deltatune.core.recompute import saving_inputs
from deltatune.kernels import lora as kernels_lora

ADAPTER = "a"
RANK, ALPHA = 16, 32


# --------------------------------------------------------------------------------- cases
def _dt(targets: str | list[str]) -> Callable[[nn.Module], nn.Module]:
    def inject(model: nn.Module) -> nn.Module:
        return dt.inject(model, dt.LoraConfig(rank=RANK, alpha=ALPHA, targets=targets),
                         name=ADAPTER)
    return inject


def _peft(targets: str | list[str]) -> Callable[[nn.Module], nn.Module]:
    def inject(model: nn.Module) -> nn.Module:
        config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                 target_modules=targets)
        return peft.get_peft_model(model, config)
    return inject


def _lora_train(adapt: Callable[[nn.Module], nn.Module], context=None
                ) -> Callable[[nn.Module, Tensor], Runner]:
    def build(base: nn.Module, ids: Tensor) -> Runner:
        runner = h.train_runner(adapt(base), ids)
        runner.context = context
        return runner
    return build


@torch.no_grad()
def copy_lora_into_peft(dt_model: nn.Module, peft_model: nn.Module,
                        adapter: str = ADAPTER) -> int:
    """Copy deltatune's A, B into peft's ``lora_A`` / ``lora_B`` (same function, same weights)."""
    ours = dict(dt_model.named_parameters())
    copied = 0
    for name, module in peft_model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, nn.ModuleDict) or "default" not in lora_a:
            continue
        path = name.removeprefix("base_model.model.")
        lora_a["default"].weight.copy_(ours[f"{path}.deltas.{adapter}.A"])
        module.lora_B["default"].weight.copy_(ours[f"{path}.deltas.{adapter}.B"])
        copied += 1
    if copied != sum(name.endswith(f".deltas.{adapter}.A") for name in ours):
        raise RuntimeError(f"copied {copied} LoRA layers into peft's model; the two libraries "
                           "did not adapt the same layers")
    return copied


def _infer_dt(*, merged: bool, seed: int, fused: bool = False
              ) -> Callable[[nn.Module, Tensor], Runner]:
    def build(base: nn.Module, ids: Tensor) -> Runner:
        model = _dt("all-linear")(base)
        h.perturb(model, seed)
        if merged:
            dt.merge(model)
        runner = Runner(model.eval(), ids, "infer")
        if fused:
            runner.context = functools.partial(kernels.using, True)
        return runner
    return build


def _infer_peft(seed: int) -> Callable[[nn.Module, Tensor], Runner]:
    def build(base: nn.Module, ids: Tensor) -> Runner:
        reference = _dt("all-linear")(copy.deepcopy(base))
        h.perturb(reference, seed)
        model = _peft("all-linear")(base)
        copy_lora_into_peft(reference, model)
        return Runner(model.eval(), ids, "infer")
    return build


QV = ["q_proj", "v_proj"]
ADAPTER_SEED = 4321
CASES: tuple[Case, ...] = (
    Case("floor", "floor: frozen base fwd+bwd", "train", h.floor_runner),
    Case("full_ft", "full fine-tuning", "train", h.full_runner, own_weights=True),
    Case("dt_lora_all", "deltatune LoRA all-linear", "train", _lora_train(_dt("all-linear")),
         peer="peft_lora_all"),
    Case("peft_lora_all", "peft LoRA all-linear", "train", _lora_train(_peft("all-linear")),
         needs_peft=True),
    Case("dt_lora_all_saving", "deltatune LoRA all-linear, inputs saved", "train",
         _lora_train(_dt("all-linear"), saving_inputs), peer="peft_lora_all"),
    Case("dt_lora_qv", "deltatune LoRA q,v", "train", _lora_train(_dt(QV)), peer="peft_lora_qv"),
    Case("peft_lora_qv", "peft LoRA q,v", "train", _lora_train(_peft(QV)), needs_peft=True),
    Case("infer_base", "base", "infer", h.base_infer_runner),
    Case("infer_dt_unmerged", "deltatune LoRA unmerged", "infer",
         _infer_dt(merged=False, seed=ADAPTER_SEED), peer="infer_peft_unmerged"),
    Case("infer_peft_unmerged", "peft LoRA unmerged", "infer", _infer_peft(ADAPTER_SEED),
         needs_peft=True),
    Case("infer_dt_merged", "deltatune LoRA merged", "infer",
         _infer_dt(merged=True, seed=ADAPTER_SEED), own_weights=True),
    Case("dt_lora_all_fused", "deltatune LoRA all-linear, fused kernels", "train",
         _lora_train(_dt("all-linear"), functools.partial(kernels.using, True)),
         peer="peft_lora_all", needs_kernels=True),
    Case("infer_dt_unmerged_fused", "deltatune LoRA unmerged, fused kernels", "infer",
         _infer_dt(merged=False, seed=ADAPTER_SEED, fused=True), peer="infer_peft_unmerged",
         needs_kernels=True),
)


def check_outputs(runners: dict[str, Runner]) -> dict[str, Any]:
    """Before timing: the cases compute the same thing (else the comparison means nothing).

    Training cases are all identical at initialisation (LoRA's B starts at zero), so their
    first losses agree; the inference adapters are non-zero and identical in both libraries.
    """
    out = h.first_losses(runners)
    logits = {n: r.step() for n, r in runners.items() if r.kind == "infer"}
    if any(BY_NAME[n].needs_kernels for n in runners) and not kernels_lora._checked:
        raise RuntimeError("the fused-kernel cases ran the torch path: is Triton installed? "
                           "(deltatune.kernels.runs_on)")
    pairs = {"dt_unmerged_vs_base": ("infer_dt_unmerged", "infer_base"),
             "dt_unmerged_vs_peft_unmerged": ("infer_dt_unmerged", "infer_peft_unmerged"),
             "dt_merged_vs_dt_unmerged": ("infer_dt_merged", "infer_dt_unmerged"),
             "dt_fused_vs_dt_unmerged": ("infer_dt_unmerged_fused", "infer_dt_unmerged")}
    out["logits_rel_diff"] = {key: h.rel(logits[a], logits[b]) for key, (a, b) in pairs.items()
                              if a in logits and b in logits}
    return out


# --------------------------------------------------------------------------------- report
def markdown(report: dict[str, Any]) -> str:
    lines = h.header_lines(report, "LoRA speed", "LoRA r=16, alpha=32.")
    for kind, title, ref in h.TABLES:
        lines += h.table_lines(report, kind, title, ref)
    sanity = report["sanity"]
    checks = [f"first-loss spread across training cases "
              f"{sanity.get('first_loss_max_abs_diff', float('nan')):.2e}"]
    checks += [f"{k} {v:.2e}" for k, v in sanity.get("logits_rel_diff", {}).items()]
    lines += ["", "Sanity (relative differences): " + "; ".join(checks) + "."]
    lines += h.memory_error_lines(report)
    return "\n".join(lines) + "\n"


SUITE = h.Suite(name="lora_speed", description=__doc__, cases=CASES, check=check_outputs,
                markdown=markdown, default_steps=40)
BY_NAME = SUITE.by_name
CASES_ORDER = [c.name for c in CASES]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return h.main(SUITE, argv)


if __name__ == "__main__":
    main()
