"""The benchmark's rows: a method, its configuration, its learning-rate grid, and how its model
is built — with deltatune (``deltatune.inject``), with HF peft (``peft.get_peft_model``), or
as a baseline (full fine-tuning, a trained head only, training from scratch).

Every registered deltatune method gets a row: the named ones below with a configuration chosen
here, any other registered method (e.g. one added after this file was written) with its
defaults and the LoRA grid.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn

#: LoRA-like learning-rate grid; the others are shifted versions of it. The runs are short
#: (a few dozen steps), which favours rates above the usual long-run ones: a first full run
#: (AG News, 60 steps) chose the top of a grid one step lower for every LoRA-like row. A task
#: may shift every grid (``TaskSpec.lr_scale``: Shakespeare's are 4× higher).
LORA_LRS = (1e-3, 4e-3, 1.6e-2)
SMALL_LRS = (1e-3, 4e-3, 1.6e-2)  # per-channel vectors, tokens, tiny deltas
TINY_LRS = (2e-3, 8e-3, 3.2e-2)  # very few parameters (IA3, VeRA, prompt, r×r cores)
FULL_LRS = (1e-4, 4e-4, 1.6e-3)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

Options = dict[str, Any] | Callable[[int], dict[str, Any]]


@dataclass(frozen=True)
class MethodSpec:
    """One row of the table.

    Args:
        label: the row's name.
        kind: ``delta`` (deltatune), ``peft``, ``full``, ``head``, ``scratch`` or ``base``
            (the pretrained model evaluated as it is, on causal-LM tasks).
        method: the registered deltatune method (``delta`` rows).
        options: config fields, or a function of the run's step count returning them.
        lrs: the learning-rate grid swept on the validation split.
        twin: for ``peft`` rows, the label of the deltatune row computing the same thing.
        peft: for ``peft`` rows, ``(task_type, steps) -> peft config``.
        extra: a registered method not named in the issue (reported in its own group).
    """

    label: str
    kind: str
    method: str | None = None
    options: Options = field(default_factory=dict)
    lrs: tuple[float, ...] = LORA_LRS
    twin: str | None = None
    peft: Callable[[str, int], Any] | None = None
    extra: bool = False

    def config_options(self, steps: int) -> dict[str, Any]:
        return dict(self.options(steps) if callable(self.options) else self.options)


def _adalora(steps: int) -> dict[str, Any]:
    # init_std=0.02: peft's initialisation of P and Q (ours defaults to 1/√width), so that the
    # peft twin makes the same runs
    return {"rank": 12, "target_rank": 8, "alpha": 12, "total_steps": steps,
            "tinit": steps // 10, "tfinal": steps // 5, "delta_t": max(1, steps // 20),
            "init_std": 0.02}


# ------------------------------------------------------------------------------ peft configs
def _peft_lora(targets: Any, **extra: Any) -> Callable[[str, int], Any]:
    def build(task_type: str, steps: int) -> Any:
        import peft

        return peft.LoraConfig(r=8, lora_alpha=8, target_modules=targets, lora_dropout=0.0,
                               task_type=task_type, **extra)
    return build


def _peft_adalora(task_type: str, steps: int) -> Any:
    import peft

    o = _adalora(steps)
    return peft.AdaLoraConfig(init_r=o["rank"], target_r=o["target_rank"], lora_alpha=o["alpha"],
                              total_step=steps, tinit=o["tinit"], tfinal=o["tfinal"],
                              deltaT=o["delta_t"], beta1=0.85, beta2=0.85, orth_reg_weight=0.5,
                              target_modules=ALL_LINEAR, lora_dropout=0.0, task_type=task_type)


def _peft_vera(task_type: str, steps: int) -> Any:
    import peft

    return peft.VeraConfig(r=256, projection_prng_key=0, d_initial=0.1, vera_dropout=0.0,
                           target_modules=ALL_LINEAR, task_type=task_type)


def _peft_simple(name: str, **kwargs: Any) -> Callable[[str, int], Any]:
    def build(task_type: str, steps: int) -> Any:
        import peft

        extra = dict(kwargs)
        if name == "PromptTuningConfig":
            extra["prompt_tuning_init"] = peft.PromptTuningInit.SAMPLE_VOCAB
        return getattr(peft, name)(task_type=task_type, **extra)
    return build


# ------------------------------------------------------------------------------------ rows
BASELINES = [
    MethodSpec("base", "base", lrs=()),  # the pretrained LM untouched (causal-LM tasks only)
    MethodSpec("full", "full", lrs=FULL_LRS),
    MethodSpec("head", "head", lrs=(2e-3, 8e-3, 3.2e-2)),
    MethodSpec("scratch", "scratch", lrs=(1e-4, 3e-4, 1e-3)),
]
NAMED = [
    MethodSpec("lora-qv", "delta", "lora", {"rank": 8, "targets": ["q_proj", "v_proj"]}),
    MethodSpec("lora-all", "delta", "lora", {"rank": 8, "targets": "all-linear"}),
    MethodSpec("dora", "delta", "dora", {"rank": 8, "targets": "all-linear"}),
    MethodSpec("adalora", "delta", "adalora", _adalora),
    MethodSpec("vera", "delta", "vera", {"rank": 256, "targets": "all-linear"}, TINY_LRS),
    MethodSpec("ia3", "delta", "ia3", {}, TINY_LRS),
    MethodSpec("bitfit", "delta", "bitfit", {"add_missing": True}, SMALL_LRS),
    MethodSpec("ln_tuning", "delta", "ln_tuning", {}, SMALL_LRS),
    MethodSpec("ssf", "delta", "ssf", {}, SMALL_LRS),
    MethodSpec("adapter-seq", "delta", "adapter", {"position": "sequential"}),
    MethodSpec("adapter-par", "delta", "adapter", {"position": "parallel"}),
    MethodSpec("compacter", "delta", "compacter", {}, SMALL_LRS),
    MethodSpec("prefix", "delta", "prefix", {"num_tokens": 20}, TINY_LRS),
    MethodSpec("prompt", "delta", "prompt", {"num_tokens": 20}, TINY_LRS),
    MethodSpec("sparse", "delta", "sparse", {}, (2e-4, 8e-4, 3.2e-3)),
]
#: registered methods the issue does not name, with settings that fit a short run
EXTRA_OPTIONS: dict[str, tuple[Options, tuple[float, ...]]] = {
    "dynamic_rank": (lambda s: {"interval": max(1, s // 10)}, LORA_LRS),
    "increlora": (lambda s: {"warmup": s // 5, "interval": max(1, s // 10)}, LORA_LRS),
    "intrinsic": ({}, (4e-3, 1.6e-2, 6.4e-2)),
    "lora_sb": ({}, TINY_LRS),
    "lora_xs": ({}, TINY_LRS),
    "svfit": ({}, (4e-3, 1.6e-2, 6.4e-2)),
}
PEFT = [
    MethodSpec("peft:lora-qv", "peft", twin="lora-qv", peft=_peft_lora(["q_proj", "v_proj"])),
    MethodSpec("peft:lora-all", "peft", twin="lora-all", peft=_peft_lora("all-linear")),
    MethodSpec("peft:dora", "peft", twin="dora", peft=_peft_lora("all-linear", use_dora=True)),
    MethodSpec("peft:adalora", "peft", twin="adalora", peft=_peft_adalora),
    MethodSpec("peft:vera", "peft", twin="vera", peft=_peft_vera, lrs=TINY_LRS),
    MethodSpec("peft:ia3", "peft", twin="ia3", peft=_peft_simple("IA3Config"), lrs=TINY_LRS),
    MethodSpec("peft:ln_tuning", "peft", twin="ln_tuning", peft=_peft_simple("LNTuningConfig"),
               lrs=SMALL_LRS),
    MethodSpec("peft:prefix", "peft", twin="prefix",
               peft=_peft_simple("PrefixTuningConfig", num_virtual_tokens=20), lrs=TINY_LRS),
    MethodSpec("peft:prompt", "peft", twin="prompt",
               peft=_peft_simple("PromptTuningConfig", num_virtual_tokens=20), lrs=TINY_LRS),
]


#: registered methods that another row already is (the ``full`` delta is full fine-tuning)
SKIPPED = {"full"}


def all_methods() -> list[MethodSpec]:
    """Baselines, the named methods that are registered, every other registered method, and
    the peft twins (in that order)."""
    import deltatune as dt

    registered = set(dt.methods())
    named = [m for m in NAMED if m.method in registered]
    covered = {m.method for m in named} | SKIPPED
    extra = []
    for name in sorted(registered - covered):
        options, lrs = EXTRA_OPTIONS.get(name, ({}, LORA_LRS))
        extra.append(MethodSpec(name, "delta", name, options, lrs, extra=True))
    return [*BASELINES, *named, *extra, *PEFT]


# ------------------------------------------------------------------------------- building
@dataclass
class Built:
    """A model ready to train: its trainable head (trained alongside, saved nowhere), the
    head's size, and what to run around each optimizer step."""

    model: nn.Module
    head: dict[str, nn.Parameter]
    head_params: int
    hooks: list[Any] = field(default_factory=list)

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def _load(model_dir: str, kind: str, labels: list[str], pad_id: int) -> Any:
    from deltatune.train.models import load_model

    return load_model(model_dir, kind, label_names=labels, pad_id=pad_id)


def _scratch(model_dir: str, kind: str, labels: list[str], pad_id: int) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(model_dir)
    config.pad_token_id = pad_id
    if kind == "classification":
        config.num_labels = len(labels)
        config.id2label = dict(enumerate(labels))
        config.label2id = {n: i for i, n in enumerate(labels)}
        return AutoModelForSequenceClassification.from_config(config)
    return AutoModelForCausalLM.from_config(config)


def _untied_lm_head(model: nn.Module) -> dict[str, nn.Parameter]:
    """Freeze everything, then give the causal LM its own trainable output layer, a copy of
    the (tied) input embeddings: the 'linear head only' baseline of a language model."""
    for p in model.parameters():
        p.requires_grad_(False)
    head = nn.Parameter(model.get_output_embeddings().weight.detach().clone())
    model.get_output_embeddings().weight = head
    model.config.tie_word_embeddings = False
    return {"lm_head.weight": head}


def build(spec: MethodSpec, model_dir: str, kind: str, labels: list[str], pad_id: int,
          steps: int, calibration: Callable[[nn.Module], list[Any]] | None = None) -> Built:
    """The model of one run (call after seeding torch).

    Raises:
        DeltaError / ConfigError / ValueError: the method cannot be built on this model.
    """
    import deltatune as dt
    from deltatune.train.models import fill_steps, method_config

    if spec.kind == "scratch":
        model = _scratch(model_dir, kind, labels, pad_id)
        head = {k: p for k, p in model.named_parameters() if k.startswith("score.")}
        return Built(model, head, sum(p.numel() for p in head.values()))
    loaded = _load(model_dir, kind, labels, pad_id)
    model, head = loaded.model, dict(loaded.new_params)
    head_params = sum(p.numel() for p in head.values())
    if spec.kind == "base":
        for p in model.parameters():
            p.requires_grad_(False)
        return Built(model, {}, head_params)
    if spec.kind == "full":
        return Built(model, head, head_params)
    if spec.kind == "head":
        if kind == "classification":
            for p in model.parameters():
                p.requires_grad_(False)
        else:
            head = _untied_lm_head(model)
        for p in head.values():
            p.requires_grad_(True)
        return Built(model, head, head_params)
    if spec.kind == "peft":
        return _build_peft(spec, model, kind, steps, head_params)
    config = fill_steps(method_config(spec.method, spec.config_options(steps)), steps)
    from deltatune.core.registry import get_method

    needs_data = bool(get_method(config.method).delta_class.calibration)
    data = calibration(model) if needs_data and calibration is not None else None
    dt.inject(model, config, name="task", data=data)
    for p in head.values():
        p.requires_grad_(True)
    return Built(model, head, head_params)


def _build_peft(spec: MethodSpec, model: nn.Module, kind: str, steps: int,
                head_params: int) -> Built:
    import peft

    task_type = "SEQ_CLS" if kind == "classification" else "CAUSAL_LM"
    with _quiet():
        wrapped = peft.get_peft_model(model, spec.peft(task_type, steps))
    built = Built(wrapped, {}, head_params)
    if isinstance(wrapped.peft_config["default"], peft.AdaLoraConfig):
        counter = iter(range(1 << 30))

        def allocate(optimizer: Any, args: Any, kwargs: Any) -> None:
            # peft's AdaLoRA budget step: after optimizer.step(), before zero_grad()
            wrapped.base_model.update_and_allocate(next(counter))

        from torch.optim.optimizer import register_optimizer_step_post_hook

        built.hooks.append(register_optimizer_step_post_hook(allocate))
    return built


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def count_trainable(model: nn.Module) -> int:
    """Trainable parameters, each tensor once."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


__all__ = ["ALL_LINEAR", "BASELINES", "NAMED", "PEFT", "Built", "MethodSpec", "all_methods",
           "build", "count_trainable"]
