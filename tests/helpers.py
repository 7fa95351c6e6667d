"""Shared test helpers: target selection for the contract suite, perturbation, comparisons."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import deltatune as dt
from deltatune.core.delta import Delta
from deltatune.core.layers import DeltaLayer
from deltatune.core.lifecycle import delta_layers
from deltatune.core.targeting import Matcher


def tied_param_ids(model: nn.Module) -> set[int]:
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    return {pid for pid, n in owners.items() if n > 1}


def adaptable(model: nn.Module, kinds: frozenset[str], supports=None) -> list[str]:
    """Every module the method can adapt whose weights are not tied to another module.

    ``supports(module, info)``, if given, is the method's per-module check (``None``: yes).
    """
    matcher = Matcher(model)
    tied = tied_param_ids(model)
    out = []
    for name in matcher.names:
        info = matcher.info(name)
        if matcher.canonical(name) != name or info is None or info.kind not in kinds:
            continue
        if any(id(p) in tied for p in matcher.modules[name].parameters(recurse=False)):
            continue
        if supports is not None and supports(matcher.modules[name], info) is not None:
            continue
        out.append(name)
    return out


def delta_params(model: nn.Module) -> dict[int, Tensor]:
    return {id(p): p for layer in delta_layers(model).values() for p in layer.deltas.parameters()}


@torch.no_grad()
def perturb(model: nn.Module, name: str | None = None, scale: float = 0.2,
            seed: int = 7) -> None:
    """Move every parameter of delta ``name`` (all deltas if None) away from its init: noise
    of ``scale`` times the parameter's own RMS (``scale`` itself for a zero-initialised one),
    so that scale-like parameters (SSF's γ, DoRA's magnitude ‖W‖) keep their sign and size."""
    gen = torch.Generator().manual_seed(seed)
    for layer in delta_layers(model).values():
        for key, delta in layer.deltas.items():
            if name is None or key == name:
                for p in delta.parameters():
                    noise = torch.randn(p.shape, generator=gen).to(p.dtype)
                    rms = p.detach().float().pow(2).mean().sqrt().item()
                    p.add_(noise * scale * (rms if rms > 0 else 1.0))


def rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_rel_close(a: Tensor, b: Tensor, tol: float, what: str = "") -> None:
    err = rel_err(a, b)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def assert_differs(a: Tensor, b: Tensor, what: str = "", at_least: float = 1e-4) -> None:
    err = rel_err(a, b)
    assert err > at_least, f"{what}: outputs should differ (relative change {err:.2e}); " \
                           "the test would be vacuous"


def no_deltatune_modules(model: nn.Module) -> bool:
    return not any(isinstance(m, (DeltaLayer, Delta)) for m in model.modules())


def base_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Clones of every base parameter and buffer (delta tensors excluded), by name."""
    own = {id(t) for layer in delta_layers(model).values()
           for t in [*layer.deltas.parameters(), *layer.deltas.buffers()]}
    out = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if id(t) not in own:
            out[name] = t.detach().clone()
    return out


__all__ = ["dt"]


def greedy_by_hand(model, ids, mask, steps):
    """Full forward passes without a cache, positions from the padding mask as generate's."""
    for _ in range(steps):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos,
                           use_cache=False).logits[:, -1]
        nxt = logits.argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


def train_steps(model: nn.Module, loss_of: Callable[[nn.Module], Tensor], steps: int, lr: float,
                scheduled: bool) -> tuple[list[float], list[float]]:
    """``steps`` steps of AdamW on the trainable parameters, with the model's schedules
    (``dt.Scheduler``, built after the optimizer, its ``loss()`` added) when ``scheduled``:
    the losses, and the schedules' loss terms, per step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    scheduler = dt.Scheduler(model, optimizer) if scheduled else None
    losses, terms = [], []
    for _ in range(steps):
        term = scheduler.loss() if scheduler is not None else torch.zeros(())
        loss = loss_of(model) + term
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        terms.append(float(torch.as_tensor(term).detach()))
    return losses, terms


def checkpoint_and_resume(model: nn.Module, optimizer: torch.optim.Optimizer,
                          scheduler: dt.Scheduler, name: str, rebuild: Callable[[], nn.Module],
                          make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
                          directory) -> tuple[nn.Module, torch.optim.Optimizer, dt.Scheduler]:
    """Checkpoint adapter ``name``, the optimizer and the schedules the way a training run does
    (``dt.save``, ``optimizer.state_dict()``, ``Scheduler.save``), then restore them into a fresh
    base from ``rebuild()``: the resumed ``(model, optimizer, scheduler)``."""
    dt.save(model, directory / "adapter", name=name)
    state = copy.deepcopy(optimizer.state_dict())
    scheduler.save(directory / "schedule")
    fresh = rebuild()
    dt.load(fresh, directory / "adapter", trainable=True)
    resumed = make_optimizer(fresh)
    resumed.load_state_dict(state)
    schedules = dt.Scheduler(fresh, resumed)
    schedules.load(directory / "schedule")
    return fresh, resumed, schedules


def assert_resume_is_bit_identical(build: Callable[[], nn.Module],
                                   rebuild: Callable[[], nn.Module],
                                   make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
                                   name: str, batches: list, train: Callable, directory,
                                   split: int = 4, on_resume: Callable | None = None
                                   ) -> nn.Module:
    """Train ``build()`` straight through ``batches``, and again with a checkpoint after
    ``split`` batches resumed into ``rebuild()`` (``checkpoint_and_resume``); assert equal
    losses at every step and equal parameters at the end. ``train(model, optimizer, scheduler,
    batches)`` returns the losses; ``on_resume(model, optimizer, scheduler)`` checks the state
    right after the resume. Returns the resumed model."""
    straight = build()
    opt = make_optimizer(straight)
    want = train(straight, opt, dt.Scheduler(straight, opt), batches)
    first = build()
    opt = make_optimizer(first)
    sched = dt.Scheduler(first, opt)
    got = train(first, opt, sched, batches[:split])
    fresh, opt, sched = checkpoint_and_resume(first, opt, sched, name, rebuild, make_optimizer,
                                              directory)
    if on_resume is not None:
        on_resume(fresh, opt, sched)
    got += train(fresh, opt, sched, batches[split:])
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    ours = dict(fresh.named_parameters())
    assert all(torch.equal(p, ours[k]) for k, p in straight.named_parameters())
    return fresh

def run_quick_benchmark(script: Path, out: Path, result: str, *extra: str) -> dict[str, Any]:
    """Run a benchmark script's ``--quick`` mode (one torch thread) in a fresh interpreter,
    writing into ``out``; return the JSON record ``result`` it wrote there."""
    proc = subprocess.run(
        [sys.executable, str(script), "--quick", *extra, "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads((out / result).read_text())
