"""Hugging Face transformers glue used by methods that need its objects (imported lazily).

* ``prefilled_cache``: a key/value cache holding prefix keys and values for every layer, the
  extension point transformers' attention layers offer for extra keys (prefix tuning).
* ``DeltaCallback``: a ``Trainer`` callback that drives the schedule protocol
  (``core.schedule``) after every optimizer step and saves the adapters and the schedule state
  into each checkpoint, so ``trainer.train(resume_from_checkpoint=…)`` continues identically.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.errors import TargetError


def prefilled_cache(model: nn.Module, keys_values: Sequence[tuple[Tensor, Tensor]],
                    cache: Any = None) -> Any:
    """``cache`` (a new ``DynamicCache`` if ``None``) with layer ``i`` holding
    ``keys_values[i]``, each ``(batch, kv_heads, n, head_dim)``.

    Raises:
        TargetError: transformers is not installed, or ``cache`` is not a transformers cache.
    """
    try:
        from transformers import Cache, DynamicCache
    except ImportError as exc:  # pragma: no cover - transformers is in the hf extra
        raise TargetError("prefix tuning needs transformers: pip install 'deltatune[hf]'") \
            from exc
    if cache is None:
        cache = DynamicCache(config=getattr(model, "config", None))
    if not isinstance(cache, Cache):
        raise TargetError(f"prefix tuning needs a transformers Cache as past_key_values, got "
                          f"{type(cache).__name__}; pass none (a DynamicCache is made)")
    for index, (keys, values) in enumerate(keys_values):
        cache.update(keys, values, index)
    return cache


def _callback_base() -> type:
    try:
        from transformers import TrainerCallback
    except ImportError:  # pragma: no cover - transformers is in the hf extra
        return object
    return TrainerCallback


#: The folder ``DeltaCallback`` writes inside each Trainer checkpoint.
CHECKPOINT_DIR = "deltatune"


class DeltaCallback(_callback_base()):
    """Drives deltatune's schedules from a Hugging Face ``Trainer`` and checkpoints them.

    ``Trainer(..., callbacks=[DeltaCallback()])``: after every optimizer step (before the
    gradients are zeroed) it calls ``Scheduler.step()`` on the model's scheduled adapters
    (AdaLoRA, DyLoRA, …), and at the start of each step it adds the gradients of their
    regularisers (``Scheduler.loss()``, e.g. AdaLoRA's orthogonality term); at each
    checkpoint it saves every adapter (``deltatune.save``) and
    the schedule state under ``checkpoint-N/deltatune/``. On ``resume_from_checkpoint`` the
    schedule state is read back from there. Adapters whose shapes change during training
    (rank growth or pruning) must be loaded from that folder into the fresh base before the
    ``Trainer`` is built (``deltatune.load(model, "…/checkpoint-N/deltatune/<name>")``), since
    the Trainer restores the model's weights into the model as it is.

    Args:
        scheduler: a ``Scheduler`` to drive (default: one built at the start of each
            ``train()`` over every scheduled adapter). It always drives the optimizer the
            Trainer steps, whose state it resizes with the parameters.
        save_adapters: also save every adapter at each checkpoint.

    Raises:
        StateError: at the start of a resumed run, when the checkpoint (looked up in
            ``args.output_dir``) holds no schedule state for the scheduled adapters.
    """

    def __init__(self, scheduler: Any = None, save_adapters: bool = True) -> None:
        self.scheduler = scheduler
        self.save_adapters = save_adapters
        self._own = scheduler is None  # built here: rebuilt for every train()

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        from ..core.errors import StateError
        from ..core.schedule import Scheduler

        if self._own:  # a new run (or a resumed one): a new optimizer, the schedules' start
            trains = [p.requires_grad for p in model.parameters()]
            self.scheduler = Scheduler(_unwrap(model), optimizer)
            if trains != [p.requires_grad for p in model.parameters()]:
                self._stop_if_distributed()  # LISA, HFT freeze layers as they start
        elif optimizer is not None:
            self.scheduler.optimizer = optimizer
        saved = Path(args.output_dir) / f"checkpoint-{state.global_step}" / CHECKPOINT_DIR
        if state.global_step > 0 and len(self.scheduler):
            if not (saved / "schedule").is_dir():
                raise StateError(
                    f"resuming at step {state.global_step}, but {saved / 'schedule'} holds no "
                    "schedule state; resume from a checkpoint of this output_dir written with "
                    "DeltaCallback, or the schedules would restart from step 0")
            self.scheduler.load(saved / "schedule")

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The schedules' regularisers (``Scheduler.loss()``): their gradients go in once per
        optimizer step, before the step's micro-batches add theirs — the same gradients as the
        term added to the loss, without a ``compute_loss`` override."""
        if self.scheduler is None:
            return
        term = self.scheduler.loss()
        if isinstance(term, torch.Tensor) and term.requires_grad:
            term.backward()

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.scheduler is not None and self.scheduler.step():
            self._stop_if_distributed()

    def _stop_if_distributed(self) -> None:
        """The trainable parameters just changed: a distributed Trainer's wrapper (built with
        the old ones) cannot follow, so stop with what to do instead of failing inside it."""
        from ..core.errors import StateError
        from ..core.schedule import _distributed

        if _distributed():
            raise StateError(
                f"step {self.scheduler.num_steps}: adapter(s) {sorted(self.scheduler.schedules)} "
                "changed which delta parameters train or their shapes, which the Trainer's "
                "distributed wrapper cannot follow (its gradient buckets keep the old ones). "
                "Train this method in one process, or in your own loop that builds "
                "DistributedDataParallel after the deltatune.Scheduler and again whenever "
                "Scheduler.step() returns True")

    def on_save(self, args: Any, state: Any, control: Any, model: nn.Module = None,
                **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        from ..core.lifecycle import adapters
        from ..core.state import save

        root = Path(args.output_dir) / f"checkpoint-{state.global_step}" / CHECKPOINT_DIR
        model = _unwrap(model)
        if self.save_adapters:
            for name in adapters(model):
                save(model, root / name, name=name)
        if self.scheduler is not None and len(self.scheduler):
            self.scheduler.save(os.fspath(root / "schedule"))


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / accelerate wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


__all__ = ["CHECKPOINT_DIR", "DeltaCallback", "prefilled_cache"]
