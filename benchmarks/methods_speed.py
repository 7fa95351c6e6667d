#!/usr/bin/env python
"""Speed and memory of every method family: deltatune vs HF peft vs the floor, in one run.

One randomly initialised ``LlamaForCausalLM`` (built from a ``LlamaConfig``, no downloads) is
copied into every case, and every case sees the same token batch:

training (forward + backward + AdamW step on the trainable parameters)

* ``floor``    the frozen base's own forward + backward (gradient into ``inputs_embeds``, no
               optimizer step) — what an adapter with a trainable parameter in the first layer's
               attention pays at least; a method whose lowest trainable parameter sits higher
               (Pfeiffer, Compacter++, the parallel adapter: layer 0's FFN) skips the backward
               below it and can come in under the floor;
* ``full_ft``  full fine-tuning, every parameter trainable;
* ``dt_<method>``, one per method family (deltatune's defaults unless stated):

  - ``lora``       LoRA r=16, alpha=32 on every linear layer but the head;
  - ``dora``       DoRA, the same placement and rank;
  - ``adalora``    AdaLoRA r=12 → 8 (peft's defaults) on every linear layer but the head, its
                   schedule in the budget phase for the whole run (scores every step, a
                   reallocation every 10) and its orthogonality regulariser in the loss;
  - ``dylora``     DyLoRA r ≤ 16 (a rank sampled every step, only that component trained);
  - ``increlora``  IncreLoRA with its defaults (rank 1 + a reserve, scored every step);
  - ``dynamic_rank``  dynamic rank distribution r=16, importance tracked every step;
  - ``lora_ga``, ``corda``, ``lora_sb``  the data-initialised LoRAs, r=16, one calibration
                   batch (LoRA-GA and CorDA run rank 2r: the frozen copy is subtracted);
  - ``intrinsic``  intrinsic-dimension fine-tuning, d=1000, Fastfood, every linear weight;
  - ``vera``       VeRA r=256 (the paper's and peft's default) on every linear layer but the
                   head;
  - ``lora_xs``, ``svfit``  LoRA-XS (r×r core) and SVFit (top-r singular values), r=16, on the
                   same layers (frozen bases from a 2-iteration randomised SVD);
  - ``hut``        HUT's multiplicative ``W ⊙ (1 + sBA)``, r=16, the same layers;
  - ``ia3``        (IA)³ on ``attn.k``, ``attn.v``, ``ffn.down`` (input scaling on ``ffn.down``);
  - ``bitfit``     BitFit with ``add_missing=True`` (Llama has no biases: a bias is learned on
                   every linear layer, the head included);
  - ``ln_tuning``  LayerNorm tuning (the RMSNorm gains);
  - ``ssf``        SSF on every linear layer but the head;
  - ``houlsby``    sequential adapters after attention and FFN (``houlsby()``, r = d/16);
  - ``pfeiffer``   a sequential adapter after the FFN (``pfeiffer()``, r = d/16);
  - ``parallel``   He et al.'s scaled parallel adapter beside the FFN (``parallel_adapter()``,
                   s = 4, r = d/2);
  - ``compacter``  Compacter with its defaults (Compacter++: one sequential adapter after the
                   FFN, r = d/16, PHM n=4, rank 1, shared rules), when the method is registered;
  - ``prompt``     prompt tuning, 20 soft tokens (the sequence grows by 20);
  - ``prefix``     prefix tuning, 20 key/value tokens at every attention layer;

* ``peft_<method>``, HF peft's implementation where it has one: LoRA and DoRA (``use_dora``,
  same settings), AdaLoRA (same ranks and schedule; peft's ``update_and_allocate`` after
  every step, its regulariser inside the forward), VeRA (same rank, seed and layers), IA3
  (``k_proj``, ``v_proj``, ``down_proj``; feedforward ``down_proj``), LN tuning (its default
  targets for Llama: both RMSNorms of every layer and the final one), prompt tuning and prefix
  tuning (20 virtual tokens).

inference (``torch.no_grad()`` forward; every adapter given the same non-zero weights in both
libraries)

* ``infer_base``; ``infer_dt_<method>`` (unmerged), ``infer_peft_<method>`` where peft has it,
  ``infer_dt_<method>_merged`` (``dt.merge``) for the mergeable methods.

A method that is not registered (or whose config cannot be built) is skipped, with a note in the
report. Before timing, the cases are checked to compute the same thing: every training case of
a method that is the identity at initialisation starts from the same loss (prompt and prefix
tuning are not), ours and peft's outputs agree for the same weights (copied across), merged and
unmerged outputs agree.

Timing and memory as in ``lora_speed.py`` (the shared ``_harness.py``): interleaved rounds in a
shuffled order, every case in a fresh child process for its peak memory. Every figure is also
a ratio to the floor (training) or the base (inference), and ours to peft's. 25 measured steps
per case by default, fewer than ``lora_speed.py``'s 40 (32 cases: about 6 minutes on 2 CPU
cores, a fifth of it the memory children). Results go to
``<out>/methods_speed_<device>.json`` and ``.md``.

Usage::

    python benchmarks/methods_speed.py                     # CPU, float32
    python benchmarks/methods_speed.py --device cuda       # bfloat16, ~1B-parameter Llama
    python benchmarks/methods_speed.py --quick --out /tmp/bench   # tiny smoke run
    python benchmarks/methods_speed.py --cases dt_ia3,peft_ia3,infer_dt_ia3
"""

from __future__ import annotations

import copy
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared harness, beside this file
import _harness as h
from _harness import Case, Runner, peft

import deltatune as dt

# peft's LN tuning warns about every norm type it does not list (Llama's RMSNorm among them);
# it adapts them all the same.
warnings.filterwarnings("ignore", message="Unsupported layer type", category=UserWarning)

ADAPTER = "a"
RANK, ALPHA = 16, 32
ADAPTER_SEED = 4321
#: Inference adapters: this much N(0, 1) noise is added to every trainable parameter's initial
#: value (LoRA's B, the adapters' W_up start at zero; scaling vectors at one).
NOISE = 0.02


# ------------------------------------------------------------------------ peft weight copies
def _peft_path(name: str) -> str:
    return name.removeprefix("base_model.model.")


def _check_count(method: str, copied: int, ours: dict[str, Tensor], suffix: str) -> int:
    expected = sum(name.endswith(suffix) for name in ours)
    if copied != expected or not copied:
        raise RuntimeError(f"{method}: copied {copied} modules into peft's model, deltatune "
                           f"adapted {expected}; the two libraries did not adapt the same layers")
    return copied


@torch.no_grad()
def copy_lora(dt_model: nn.Module, peft_model: nn.Module) -> int:
    """deltatune's A, B into peft's ``lora_A`` / ``lora_B``."""
    ours = dict(dt_model.named_parameters())
    copied = 0
    for name, module in peft_model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, nn.ModuleDict) or "default" not in lora_a:
            continue
        path = _peft_path(name)
        lora_a["default"].weight.copy_(ours[f"{path}.deltas.{ADAPTER}.A"])
        module.lora_B["default"].weight.copy_(ours[f"{path}.deltas.{ADAPTER}.B"])
        copied += 1
    return _check_count("LoRA", copied, ours, f".deltas.{ADAPTER}.A")


@torch.no_grad()
def copy_dora(dt_model: nn.Module, peft_model: nn.Module) -> int:
    """LoRA's factors plus the magnitude vector into peft's ``lora_magnitude_vector``."""
    copied = copy_lora(dt_model, peft_model)
    ours = dict(dt_model.named_parameters())
    for name, module in peft_model.named_modules():
        vector = getattr(module, "lora_magnitude_vector", None)
        if isinstance(vector, nn.ModuleDict) and "default" in vector:
            vector["default"].weight.copy_(ours[f"{_peft_path(name)}.deltas.{ADAPTER}.magnitude"])
    return copied


@torch.no_grad()
def copy_ia3(dt_model: nn.Module, peft_model: nn.Module) -> int:
    """deltatune's vectors ``l`` into peft's ``ia3_l`` ((out, 1), or (1, in) on feedforward)."""
    ours = dict(dt_model.named_parameters())
    copied = 0
    for name, module in peft_model.named_modules():
        ia3 = getattr(module, "ia3_l", None)
        if not isinstance(ia3, nn.ParameterDict) or "default" not in ia3:
            continue
        ia3["default"].copy_(ours[f"{_peft_path(name)}.deltas.{ADAPTER}.l"].view_as(
            ia3["default"]))
        copied += 1
    return _check_count("IA3", copied, ours, f".deltas.{ADAPTER}.l")


@torch.no_grad()
def copy_vera(dt_model: nn.Module, peft_model: nn.Module) -> int:
    """deltatune's ``lambda_d`` / ``lambda_b`` into peft's ``vera_lambda_d`` / ``vera_lambda_b``
    (the frozen shared projections are the same: both regenerate them from the seed)."""
    ours = dict(dt_model.named_parameters())
    copied = 0
    for name, module in peft_model.named_modules():
        lambda_d = getattr(module, "vera_lambda_d", None)
        if not isinstance(lambda_d, nn.ParameterDict) or "default" not in lambda_d:
            continue
        path = _peft_path(name)
        lambda_d["default"].copy_(ours[f"{path}.deltas.{ADAPTER}.lambda_d"])
        module.vera_lambda_b["default"].copy_(ours[f"{path}.deltas.{ADAPTER}.lambda_b"])
        copied += 1
    return _check_count("VeRA", copied, ours, f".deltas.{ADAPTER}.lambda_d")


@torch.no_grad()
def copy_adalora(dt_model: nn.Module, peft_model: nn.Module) -> int:
    """deltatune's ``A`` (Q), ``E`` (Λ), ``B`` (P) into peft's ``lora_A`` / ``lora_E`` /
    ``lora_B`` (the same names and shapes)."""
    ours = dict(dt_model.named_parameters())
    copied = 0
    for name, module in peft_model.named_modules():
        lora_e = getattr(module, "lora_E", None)
        if not isinstance(lora_e, nn.ParameterDict) or "default" not in lora_e:
            continue
        path = _peft_path(name)
        for key in ("A", "E", "B"):
            getattr(module, f"lora_{key}")["default"].copy_(
                ours[f"{path}.deltas.{ADAPTER}.{key}"])
        copied += 1
    return _check_count("AdaLoRA", copied, ours, f".deltas.{ADAPTER}.E")


@torch.no_grad()
def copy_ln_tuning(dt_model: nn.Module, peft_model: nn.Module) -> int:
    """peft trains a copy of each norm layer: give the copy the base's parameters + our Δθ."""
    ours = dict(dt_model.named_parameters())
    copied = 0
    for name, module in peft_model.named_modules():
        layers = getattr(module, "ln_tuning_layers", None)
        if not isinstance(layers, nn.ModuleDict) or "default" not in layers:
            continue
        prefix = f"{_peft_path(name)}.deltas.{ADAPTER}.delta."
        for key, delta in ((k.removeprefix(prefix), v) for k, v in ours.items()
                           if k.startswith(prefix)):
            getattr(layers["default"], key).copy_(getattr(module.base_layer, key) + delta)
        copied += 1
    return _check_count("LN tuning", copied, ours, f".deltas.{ADAPTER}.delta.weight")


@torch.no_grad()
def copy_prompt(dt_model: nn.Module, peft_model: nn.Module) -> int:
    """deltatune's soft tokens (n, d) into peft's prompt encoder embedding (n, d)."""
    ours = [p for n, p in dt_model.named_parameters() if n.endswith(f".deltas.{ADAPTER}.prompt")]
    peft_model.prompt_encoder["default"].embedding.weight.copy_(ours[0])
    return len(ours)


@torch.no_grad()
def copy_prefix(dt_model: nn.Module, peft_model: nn.Module) -> int:
    """Our per-layer (2, n, kv) prefixes into peft's (n, L · 2 · kv) table."""
    ours = [p for n, p in dt_model.named_parameters() if n.endswith(f".deltas.{ADAPTER}.prefix")]
    table = torch.stack([p.transpose(0, 1) for p in ours], 1)  # (n, L, 2, kv)
    peft_model.prompt_encoder["default"].embedding.weight.copy_(table.flatten(1))
    return len(ours)


# ------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    """One method family: deltatune's config and, where peft has the method, peft's."""

    key: str  # case-name stem
    method: str  # deltatune's registered name
    label: str
    config: Callable[[], dt.DeltaConfig]
    peft_config: Callable[[], Any] | None = None
    peft_label: str = ""
    copy_to_peft: Callable[[nn.Module, nn.Module], int] | None = None
    #: peft's per-step call after ``optimizer.step()`` (AdaLoRA's ``update_and_allocate``).
    peft_after_step: Callable[[nn.Module, int], None] | None = None


def _ia3() -> dt.DeltaConfig:
    from deltatune.methods.ia3 import IA3Config

    return IA3Config()


def _bitfit() -> dt.DeltaConfig:
    from deltatune.methods.selective import BitFitConfig

    return BitFitConfig(add_missing=True)


def _ln_tuning() -> dt.DeltaConfig:
    from deltatune.methods.selective import LNTuningConfig

    return LNTuningConfig()


def _ssf() -> dt.DeltaConfig:
    from deltatune.methods.ssf import SSFConfig

    return SSFConfig(targets="all-linear")


def _adapter(preset: str, **kwargs: Any) -> Callable[[], dt.DeltaConfig]:
    def config() -> dt.DeltaConfig:
        from deltatune.methods import adapter

        return getattr(adapter, preset)(**kwargs)
    return config


def _compacter() -> dt.DeltaConfig:
    return dt.get_method("compacter").config_class()


VIRTUAL_TOKENS = 20


IA3_TARGETS = ["k_proj", "v_proj", "down_proj"]
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VERA_RANK = 256
ADA_INIT, ADA_TARGET = 12, 8  # peft's defaults
#: AdaLoRA's schedule in its budget phase for the whole run: scores every step, a reallocation
#: every 10 (the costly phase; peft the same).
ADA_SCHEDULE = {"total_steps": 10_000, "tinit": 0, "tfinal": 1_000, "delta_t": 10}
METHODS: tuple[Method, ...] = (
    Method("lora", "lora", "LoRA all-linear",
           lambda: dt.LoraConfig(rank=RANK, alpha=ALPHA, targets="all-linear"),
           lambda: peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                   target_modules="all-linear"),
           "peft LoRA all-linear", copy_lora),
    Method("dora", "dora", "DoRA all-linear",
           lambda: dt.DoraConfig(rank=RANK, alpha=ALPHA, targets="all-linear"),
           lambda: peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                   target_modules="all-linear", use_dora=True),
           "peft DoRA all-linear", copy_dora),
    Method("adalora", "adalora", f"AdaLoRA all-linear r={ADA_INIT}→{ADA_TARGET}",
           lambda: dt.AdaLoraConfig(rank=ADA_INIT, target_rank=ADA_TARGET, alpha=ALPHA,
                                    targets=LINEAR, **ADA_SCHEDULE),
           lambda: peft.AdaLoraConfig(init_r=ADA_INIT, target_r=ADA_TARGET, lora_alpha=ALPHA,
                                      target_modules=LINEAR, lora_dropout=0.0,
                                      total_step=ADA_SCHEDULE["total_steps"],
                                      tinit=ADA_SCHEDULE["tinit"], tfinal=ADA_SCHEDULE["tfinal"],
                                      deltaT=ADA_SCHEDULE["delta_t"]),
           f"peft AdaLoRA all-linear r={ADA_INIT}→{ADA_TARGET}", copy_adalora,
           lambda model, step: model.base_model.update_and_allocate(step)),
    Method("dylora", "dylora", f"DyLoRA all-linear r≤{RANK}",
           lambda: dt.DyLoraConfig(rank=RANK, alpha=ALPHA, targets="all-linear")),
    Method("increlora", "increlora", "IncreLoRA all-linear (defaults)",
           lambda: dt.IncreLoraConfig(targets="all-linear")),
    Method("dynamic_rank", "dynamic_rank", f"dynamic rank distribution all-linear r={RANK}",
           lambda: dt.DynamicRankConfig(rank=RANK, alpha=ALPHA, targets="all-linear",
                                        total_steps=10_000)),
    Method("lora_ga", "lora_ga", f"LoRA-GA all-linear r={RANK}",
           lambda: dt.LoraGAConfig(rank=RANK, alpha=ALPHA, targets="all-linear", svd_iters=2)),
    Method("corda", "corda", f"CorDA (IPM) all-linear r={RANK}",
           lambda: dt.CordaConfig(rank=RANK, alpha=ALPHA, targets="all-linear")),
    Method("lora_sb", "lora_sb", f"LoRA-SB all-linear r={RANK}",
           lambda: dt.LoraSBConfig(rank=RANK, targets="all-linear")),
    Method("intrinsic", "intrinsic", "intrinsic dimension d=1000 (Fastfood) all-linear",
           lambda: dt.IntrinsicConfig(dim=1000, targets="all-linear")),
    Method("vera", "vera", f"VeRA all-linear r={VERA_RANK}",
           lambda: dt.VeraConfig(rank=VERA_RANK, targets=LINEAR),
           lambda: peft.VeraConfig(r=VERA_RANK, target_modules=LINEAR, vera_dropout=0.0),
           f"peft VeRA all-linear r={VERA_RANK}", copy_vera),
    Method("lora_xs", "lora_xs", f"LoRA-XS all-linear r={RANK}",
           lambda: dt.LoraXSConfig(rank=RANK, targets="all-linear", svd_iters=2)),
    Method("svfit", "svfit", f"SVFit all-linear r={RANK}",
           lambda: dt.SVFitConfig(rank=RANK, targets="all-linear", svd_iters=2)),
    Method("hut", "hut", f"HUT all-linear r={RANK}",
           lambda: dt.HUTConfig(rank=RANK, alpha=ALPHA, targets="all-linear")),
    Method("ia3", "ia3", "IA3 k,v,down", _ia3,
           lambda: peft.IA3Config(target_modules=IA3_TARGETS, feedforward_modules=["down_proj"]),
           "peft IA3 k,v,down", copy_ia3),
    Method("bitfit", "bitfit", "BitFit (add_missing)", _bitfit),
    Method("ln_tuning", "ln_tuning", "LN tuning", _ln_tuning,
           lambda: peft.LNTuningConfig(), "peft LN tuning", copy_ln_tuning),
    Method("ssf", "ssf", "SSF all-linear", _ssf),
    Method("houlsby", "adapter", "Houlsby adapter", _adapter("houlsby")),
    Method("pfeiffer", "adapter", "Pfeiffer adapter", _adapter("pfeiffer")),
    Method("parallel", "adapter", "scaled parallel adapter FFN s=4",
           _adapter("parallel_adapter", scale=4.0)),
    Method("compacter", "compacter", "Compacter++ (FFN, n=4)", _compacter),
    Method("prompt", "prompt", f"prompt tuning n={VIRTUAL_TOKENS}",
           lambda: dt.PromptConfig(num_tokens=VIRTUAL_TOKENS),
           lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                           num_virtual_tokens=VIRTUAL_TOKENS),
           f"peft prompt tuning n={VIRTUAL_TOKENS}", copy_prompt),
    Method("prefix", "prefix", f"prefix tuning n={VIRTUAL_TOKENS}",
           lambda: dt.PrefixConfig(num_tokens=VIRTUAL_TOKENS),
           lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                           num_virtual_tokens=VIRTUAL_TOKENS),
           f"peft prefix tuning n={VIRTUAL_TOKENS}", copy_prefix),
)


def _availability(m: Method) -> str | None:
    """Why the method cannot run in this process (``None``: it can)."""
    try:
        dt.get_method(m.method)
        config = m.config()
    except Exception as exc:  # not registered, or its API moved: skip it, say why
        return f"{type(exc).__name__}: {exc}".split("\n")[0]
    if config.method != m.method:
        return f"the config builds a {config.method!r} delta, not {m.method!r}"
    return None


def _mergeable(m: Method) -> bool:
    return bool(dt.get_method(m.method).delta_class.mergeable)


# --------------------------------------------------------------------------------- cases
def _dt_model(m: Method) -> Callable[[nn.Module, Tensor], nn.Module]:
    """Inject the method; one calibration batch (the timed batch's first row) for methods that
    initialise from data (LoRA-GA, CorDA, LoRA-SB)."""
    def build(base: nn.Module, ids: Tensor) -> nn.Module:
        if not dt.get_method(m.method).delta_class.calibration:
            return dt.inject(base, m.config(), name=ADAPTER)
        batch = {"input_ids": ids[:1], "labels": ids[:1]}
        return dt.inject(base, m.config(), name=ADAPTER, data=[batch])
    return build


def _peft_model(m: Method) -> Callable[[nn.Module, Tensor], nn.Module]:
    return lambda base, ids: peft.get_peft_model(base, m.peft_config())


def _train_dt(m: Method) -> Callable[[nn.Module, Tensor], Runner]:
    """Our training step; a scheduled method's schedule runs after every optimizer step and its
    regulariser joins the loss, as in a real training loop."""
    def build(base: nn.Module, ids: Tensor) -> Runner:
        runner = h.train_runner(_dt_model(m)(base, ids), ids)
        scheduler = dt.Scheduler(runner.model, runner.optimizer)
        if len(scheduler):
            runner.after_step, runner.extra_loss = scheduler.step, scheduler.loss
        return runner
    return build


def _train_peft(m: Method) -> Callable[[nn.Module, Tensor], Runner]:
    def build(base: nn.Module, ids: Tensor) -> Runner:
        runner = h.train_runner(_peft_model(m)(base, ids), ids)
        if m.peft_after_step is not None:
            steps = iter(range(1, 1 << 30))
            runner.after_step = lambda: m.peft_after_step(runner.model, next(steps))
        return runner
    return build


#: Modules copied into each peft inference model (filled when the case is built).
COPIED: dict[str, int] = {}


def _infer_dt(m: Method, *, merged: bool) -> Callable[[nn.Module, Tensor], Runner]:
    def build(base: nn.Module, ids: Tensor) -> Runner:
        model = _dt_model(m)(base, ids)
        h.perturb(model, ADAPTER_SEED, NOISE, add=True)
        if merged:
            dt.merge(model)
        return Runner(model.eval(), ids, "infer")
    return build


def _infer_peft(m: Method) -> Callable[[nn.Module, Tensor], Runner]:
    def build(base: nn.Module, ids: Tensor) -> Runner:
        reference = _dt_model(m)(copy.deepcopy(base), ids)  # the init stream of _infer_dt
        h.perturb(reference, ADAPTER_SEED, NOISE, add=True)
        model = _peft_model(m)(base, ids)
        COPIED[m.key] = m.copy_to_peft(reference, model)
        return Runner(model.eval(), ids, "infer")
    return build


def build_cases() -> tuple[tuple[Case, ...], dict[str, str], dict[str, str]]:
    """Every case of the available methods; the skipped cases and methods, with the reason."""
    train = [Case("floor", "floor: frozen base fwd+bwd", "train", h.floor_runner),
             Case("full_ft", "full fine-tuning", "train", h.full_runner, own_weights=True)]
    infer = [Case("infer_base", "base", "infer", h.base_infer_runner)]
    skipped_cases: dict[str, str] = {}
    skipped_methods: dict[str, str] = {}
    for m in METHODS:
        peer = m.peft_config is not None
        names = [f"dt_{m.key}", f"infer_dt_{m.key}"]
        reason = _availability(m)
        if reason is not None:
            skipped_methods[m.key] = reason
            names += [f"peft_{m.key}", f"infer_peft_{m.key}"] if peer else []
            names += [f"infer_dt_{m.key}_merged"]
            skipped_cases.update(dict.fromkeys(names, f"{m.key} skipped ({reason})"))
            continue
        train.append(Case(f"dt_{m.key}", f"deltatune {m.label}", "train", _train_dt(m),
                          peer=f"peft_{m.key}" if peer else None))
        infer.append(Case(f"infer_dt_{m.key}", f"deltatune {m.label} unmerged", "infer",
                          _infer_dt(m, merged=False),
                          peer=f"infer_peft_{m.key}" if peer else None))
        if peer:
            train.append(Case(f"peft_{m.key}", m.peft_label, "train", _train_peft(m),
                              needs_peft=True))
            infer.append(Case(f"infer_peft_{m.key}", f"{m.peft_label} unmerged", "infer",
                              _infer_peft(m), needs_peft=True))
        if _mergeable(m):
            infer.append(Case(f"infer_dt_{m.key}_merged", f"deltatune {m.label} merged",
                              "infer", _infer_dt(m, merged=True), own_weights=True))
    return tuple(train + infer), skipped_cases, skipped_methods


CASES, SKIPPED_CASES, SKIPPED_METHODS = build_cases()


# --------------------------------------------------------------------------------- sanity
def check_outputs(runners: dict[str, Runner]) -> dict[str, Any]:
    """Before timing: the cases compute the same thing (else the comparison means nothing).

    Every method is the identity at initialisation, so every training case starts from the
    same loss; the inference adapters are non-zero, and identical in both libraries.
    """
    out = h.first_losses(runners)
    losses = out.get("first_loss", {})
    same = [v for n, v in losses.items() if _identity_at_init(n)]
    if same:  # prompt / prefix tuning change the output from the start: left out
        out["first_loss_max_abs_diff"] = max(abs(v - same[0]) for v in same)
        out["first_loss_not_identity"] = sorted(n for n in losses if not _identity_at_init(n))
    reference = runners.get("floor") or runners.get("infer_base")
    out["base_params"] = sum(p.numel() for p in reference.model.parameters())
    logits = {n: r.step() for n, r in runners.items() if r.kind == "infer"}
    diffs: dict[str, dict[str, float]] = {}
    for m in METHODS:
        ours = f"infer_dt_{m.key}"
        pairs = {"dt_unmerged_vs_base": (ours, "infer_base"),
                 "dt_unmerged_vs_peft_unmerged": (ours, f"infer_peft_{m.key}"),
                 "dt_merged_vs_dt_unmerged": (f"{ours}_merged", ours)}
        found = {key: h.rel(_same_positions(logits[a], logits[b]), logits[b])
                 for key, (a, b) in pairs.items() if a in logits and b in logits}
        if found:
            diffs[m.key] = found
    out["logits_rel_diff"] = diffs
    out["peft_copied_modules"] = {k: v for k, v in COPIED.items()
                                  if f"infer_peft_{k}" in runners}
    return out


def _identity_at_init(case: str) -> bool:
    key = case.removeprefix("dt_").removeprefix("peft_")
    method = next((m for m in METHODS if m.key == key), None)
    return method is None or dt.get_method(method.method).delta_class.identity_at_init


def _same_positions(a: Tensor, b: Tensor) -> Tensor:
    """``a``'s last positions when soft tokens made it longer than ``b`` (prompt tuning)."""
    return a[:, a.shape[1] - b.shape[1]:] if a.dim() == 3 and a.shape[1] > b.shape[1] else a


# --------------------------------------------------------------------------------- report
def annotate(report: dict[str, Any]) -> None:
    """Trainable parameters as a share of the base's; the methods skipped in this run."""
    base = report["sanity"]["base_params"]
    for case in report["cases"].values():
        if case["kind"] == "train":
            case["trainable_pct_of_base"] = 100 * case["trainable_params"] / base
    report["skipped_methods"] = dict(SKIPPED_METHODS)


DEFINITIONS = {
    "cases.trainable_pct_of_base": "trainable parameters / parameters of the base model, in %",
    "sanity.logits_rel_diff": "per method: relative difference ||a - b|| / ||b|| of the "
                              "inference logits (adapters with identical non-zero weights)",
    "sanity.peft_copied_modules": "adapted modules whose weights were copied into peft's model",
    "skipped_methods": "methods not registered (or whose config could not be built) in this run",
}

_NOTE = ("Methods: deltatune's defaults unless stated; LoRA and DoRA r=16, alpha=32; IA3 on "
         "k, v, down (input scaling on down); BitFit add_missing=True (every linear layer, head "
         "included); adapters: Houlsby (attn + FFN) and Pfeiffer (FFN) r = d/16, parallel "
         "(FFN, s=4) r = d/2, Compacter++ (FFN, r = d/16, n=4); prompt and prefix tuning 20 "
         "virtual tokens; peft peers: LoRA, DoRA, IA3, LN tuning, prompt, prefix.")


def _pct(value: float) -> str:
    return f"{value:.3f}%" if value < 1 else f"{value:.1f}%"


def _sci(value: float | None) -> str:
    return "—" if value is None else f"{value:.1e}"


def markdown(report: dict[str, Any]) -> str:
    lines = h.header_lines(report, "Method families: speed and memory", _NOTE)
    trainable: list[h.Column] = [
        ("trainable", "---:", lambda c: f"{c['trainable_params']:,}"),
        ("% of base", "---:", lambda c: _pct(c["trainable_pct_of_base"]))]
    for kind, title, ref in h.TABLES:
        table = h.table_lines(report, kind, title, ref, trainable if kind == "train" else ())
        lines += table
        if kind == "train" and table:
            lines += ["", "The floor backpropagates through every layer into the input "
                      "embeddings; methods with nothing trainable below layer 0's FFN (Pfeiffer, "
                      "Compacter++, parallel adapter) skip layer 0's attention backward and can "
                      "run under it."]
    sanity = report["sanity"]
    diffs = sanity.get("logits_rel_diff", {})
    lines += ["", "## Sanity", "",
              f"First-loss spread across the training cases of methods that are the identity "
              f"at initialisation: {sanity.get('first_loss_max_abs_diff', float('nan')):.2e}."]
    if diffs:
        lines[-1] += (" Relative differences of the inference logits (non-zero adapters, the "
                      "same weights in both libraries):")
        lines += ["", "| method | ours vs base | ours vs peft | merged vs unmerged |",
                  "|---|---:|---:|---:|"]
    for key, d in diffs.items():
        lines.append(f"| {key} | {_sci(d.get('dt_unmerged_vs_base'))} | "
                     f"{_sci(d.get('dt_unmerged_vs_peft_unmerged'))} | "
                     f"{_sci(d.get('dt_merged_vs_dt_unmerged'))} |")
    for key, reason in report.get("skipped_methods", {}).items():
        lines += ["", f"Skipped: {key} — {reason}."]
    lines += h.memory_error_lines(report)
    return "\n".join(lines) + "\n"


SUITE = h.Suite(name="methods_speed", description=__doc__, cases=CASES, check=check_outputs,
                markdown=markdown, default_steps=25, definitions=DEFINITIONS,
                annotate=annotate, skipped=SKIPPED_CASES)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return h.main(SUITE, argv)


if __name__ == "__main__":
    main()
