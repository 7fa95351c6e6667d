"""The training loop: AdamW, linear warm-up then linear decay, gradient clipping, evaluation,
checkpoints and an exact resume.

One optimizer step per batch::

    loss = model(**batch).loss + scheduler.loss()    # a schedule's regulariser, if any
    loss.backward()
    clip_grad_norm_(trainable, max_grad_norm)
    optimizer.step()
    scheduler.step()          # deltatune.Scheduler: AdaLoRA, DyLoRA … (no-op for others)
    lr_schedule.step()
    optimizer.zero_grad()

The data order is a function of the seed and the step (epoch ``e`` is a permutation drawn from
a generator seeded with ``(seed, e)``), so a resumed run reads the same batches as an
uninterrupted one; with the optimizer, schedules, random generators and adapters restored
from the checkpoint, it continues bit for bit to the same result.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.errors import ConfigError, StateError
from . import checkpoint as ckpt
from .data import Dataset, collate
from .metrics import check_metric, classification_metrics, perplexity
from .report import bar, fmt_metric, say


@dataclass
class Settings:
    """Optimisation and bookkeeping settings of one training run.

    Args:
        steps: optimizer steps.
        batch_size: examples per step.
        eval_batch_size: examples per evaluation forward.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW's decoupled weight decay.
        warmup: warm-up length: a fraction of ``steps`` when below 1, else a step count; the
            rate then decays linearly to zero at ``steps``.
        max_grad_norm: gradient clipping threshold (``0``: no clipping).
        eval_every: evaluate every that many steps (``0``: only at the end).
        save_every: write a checkpoint every that many steps (``0``: none).
        keep_checkpoints: how many of the newest checkpoints to keep (``0``: all).
        log_every: record the mean training loss every that many steps.
        seed: seeds the data order (and, before this, the delta's initialisation).
        metric: the evaluation metric reported first (default: the task's).
        progress: show progress bars.
        report: print evaluation results as they come.
        stop_after: stop right after the checkpoint of this step, as if killed (for tests).
    """

    steps: int
    batch_size: int = 16
    eval_batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: float = 0.06
    max_grad_norm: float = 1.0
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    metric: str | None = None
    progress: bool = True
    report: bool = True
    stop_after: int | None = None

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"steps must be at least 1, got {self.steps}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ConfigError("batch sizes must be at least 1")
        if self.lr <= 0:
            raise ConfigError(f"the learning rate must be positive, got {self.lr}")
        if self.warmup < 0:
            raise ConfigError(f"warmup must be ≥ 0, got {self.warmup}")

    @property
    def warmup_steps(self) -> int:
        return int(self.warmup * self.steps) if self.warmup < 1 else int(self.warmup)

    def identity(self) -> dict[str, Any]:
        """The settings that decide the result (a resumed run must match them)."""
        out = asdict(self)
        for key in ("progress", "report", "stop_after", "keep_checkpoints", "eval_batch_size"):
            out.pop(key)
        return out


@dataclass
class Result:
    """What a run produced."""

    step: int
    final: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    steps_timed: int = 0
    stopped_early: bool = False
    resumed_from: str | None = None

    @property
    def seconds_per_step(self) -> float | None:
        return self.train_seconds / self.steps_timed if self.steps_timed else None


def linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up to 1 over ``warmup`` steps, then linear to 0."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


class Trainer:
    """Trains a model's trainable parameters (its deltas, plus ``extra`` tensors such as a new
    classification head) on a ``Dataset``.

    Args:
        model: a model whose trainable parameters are the ones to train.
        train: the training examples.
        eval: held-out examples (``None``: no evaluation).
        settings: the run's ``Settings``.
        pad_id: the padding token id.
        out_dir: where checkpoints go (``out_dir/checkpoints``); ``None``: no checkpoints.
        extra: ``{name: parameter}`` trained alongside the deltas and saved in checkpoints.
        identity: JSON values that define the run; resuming checks they are unchanged.
    """

    def __init__(self, model: nn.Module, train: Dataset, eval: Dataset | None,
                 settings: Settings, *, pad_id: int, out_dir: Path | None = None,
                 extra: Mapping[str, nn.Parameter] | None = None,
                 identity: Mapping[str, Any] | None = None) -> None:
        if len(train) == 0:
            raise ConfigError("the training set is empty")
        self.model = model
        self.train_set, self.eval_set = train, eval
        self.settings = settings
        self.metric = check_metric(train.task, settings.metric)
        self.pad_id = pad_id
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.extra = dict(extra or {})
        self.identity = {"settings": settings.identity(), **(identity or {})}
        self.device = next(model.parameters()).device
        n, bs = len(train), settings.batch_size
        self.per_epoch = max(1, n // bs)

    # ------------------------------------------------------------------------ data order
    def batch_indices(self, step: int) -> list[int]:
        """Example indices of 0-based ``step`` (a function of the seed and the step only)."""
        epoch, position = divmod(step, self.per_epoch)
        gen = torch.Generator().manual_seed(self.settings.seed * 100_003 + epoch)
        order = torch.randperm(len(self.train_set), generator=gen)
        bs = self.settings.batch_size
        return order[position * bs:(position + 1) * bs].tolist()

    def _batch(self, indices: list[int], dataset: Dataset) -> dict[str, Tensor]:
        batch = collate([dataset.examples[i] for i in indices], self.pad_id,
                        left=dataset.left_pad)
        return {k: v.to(self.device) for k, v in batch.items()}

    # ------------------------------------------------------------------------- training
    def trainable(self) -> list[nn.Parameter]:
        """The parameters to optimise, in model order (the order checkpoints rely on)."""
        return [p for _, p in self.model.named_parameters() if p.requires_grad]

    def fit(self, resume: bool | str | Path = False) -> Result:
        """Train for ``settings.steps`` steps (continuing the latest checkpoint when
        ``resume``), evaluating and checkpointing on the way; returns the ``Result``.

        Raises:
            StateError: the checkpoint belongs to a run with other settings.
        """
        from ..core.schedule import Scheduler

        s = self.settings
        saved = self._find_checkpoint(resume) if resume else None
        plain = None
        if saved is not None:
            plain = self._restore_model(saved)
        params = self.trainable()
        if not params:
            raise ConfigError("nothing to train: the model has no trainable parameters")
        optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
        lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, linear_schedule(s.warmup_steps, s.steps))
        scheduler = Scheduler(self.model, optimizer)
        history: list[dict[str, Any]] = []
        start, running, counted = 0, 0.0, 0
        if plain is not None:
            ckpt.restore_optimizer(optimizer, plain["optimizer"], params)
            lr_schedule.load_state_dict({**plain["lr_scheduler"], "lr_lambdas": [None]})
            if len(scheduler):
                scheduler.load(saved / ckpt.SCHEDULE_DIR)
            ckpt.set_rng_state(plain["rng"])
            start, history = plain["state"]["step"], plain["state"]["history"]
            running, counted = plain["state"]["running"]
            say(f"resuming from {saved} (step {start} of {s.steps})")
        result = Result(step=start, final={}, history=history,
                        resumed_from=str(saved) if saved else None)
        if start == 0 and self.eval_set is not None and s.eval_every:
            self._log_eval(0, history)  # where training starts from
        self.model.train()
        progress = bar(s.steps, "train", enabled=s.progress, initial=start)
        try:
            for step in range(start, s.steps):
                t0 = time.perf_counter()
                batch = self._batch(self.batch_indices(step), self.train_set)
                loss = self.model(**batch).loss
                total = loss + scheduler.loss()
                total.backward()
                if s.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
                optimizer.step()
                scheduler.step()
                lr_schedule.step()
                optimizer.zero_grad(set_to_none=True)
                value = loss.item()
                if not math.isfinite(value):
                    raise StateError(f"the training loss became {value} at step {step + 1}; "
                                     "lower --lr or raise --warmup")
                result.train_seconds += time.perf_counter() - t0
                result.steps_timed += 1
                running, counted = running + value, counted + 1
                done = step + 1
                progress.update()
                if done % s.log_every == 0 or done == s.steps:
                    history.append({"kind": "train", "step": done, "loss": running / counted,
                                    "lr": lr_schedule.get_last_lr()[0]})
                    progress.set_postfix_str(f"loss {running / counted:.4f}")
                    running, counted = 0.0, 0
                if self.eval_set is not None and s.eval_every and done % s.eval_every == 0 \
                        and done != s.steps:
                    self._log_eval(done, history)
                if self.out_dir is not None and s.save_every and done % s.save_every == 0 \
                        and done != s.steps:
                    self._save(done, history, optimizer, lr_schedule, scheduler,
                               running=(running, counted))
                    if s.stop_after is not None and done >= s.stop_after:
                        result.step, result.stopped_early = done, True
                        return result
        finally:
            progress.close()
        result.step = s.steps
        if self.eval_set is not None:
            result.final = self._log_eval(s.steps, history)
        return result

    # ------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, dataset: Dataset | None = None) -> dict[str, float]:
        """Metrics on ``dataset`` (default: the evaluation set), in eval mode."""
        dataset = dataset if dataset is not None else self.eval_set
        if dataset is None:
            raise ConfigError("no evaluation data")
        was_training = self.model.training
        self.model.eval()
        try:
            return evaluate(self.model, dataset, self.pad_id, self.settings.eval_batch_size,
                            self.device, progress=self.settings.progress)
        finally:
            self.model.train(was_training)

    def _log_eval(self, step: int, history: list[dict[str, Any]]) -> dict[str, float]:
        metrics = self.evaluate()
        history.append({"kind": "eval", "step": step, **metrics})
        if self.settings.report:
            shown = ", ".join(f"{k} {fmt_metric(k, v)}" for k, v in metrics.items())
            say(f"step {step}/{self.settings.steps}: {shown}")
        return metrics

    # ----------------------------------------------------------------------- checkpoints
    @property
    def checkpoint_root(self) -> Path:
        if self.out_dir is None:
            raise ConfigError("checkpoints need an output directory")
        return self.out_dir / "checkpoints"

    def _save(self, step: int, history: list[dict[str, Any]], optimizer: Any, lr_schedule: Any,
              scheduler: Any, running: tuple[float, int]) -> None:
        state = {"step": step, "epoch": step // self.per_epoch,
                 "batch_in_epoch": step % self.per_epoch, "history": history,
                 "running": list(running), "identity": self.identity}
        path = self.checkpoint_root / f"{ckpt.PREFIX}{step:07d}"
        ckpt.write(path, model=self.model, optimizer=optimizer, lr_scheduler=lr_schedule,
                   scheduler=scheduler, extra={k: p for k, p in self.extra.items()},
                   state=state)
        ckpt.prune(self.checkpoint_root, self.settings.keep_checkpoints)

    def _find_checkpoint(self, resume: bool | str | Path) -> Path | None:
        if resume is True:
            found = ckpt.checkpoints(self.checkpoint_root)
            if not found:
                say(f"no checkpoint in {self.checkpoint_root}: starting from step 0")
                return None
            return found[-1]
        path = Path(resume)
        if not (path / ckpt.STATE_JSON).is_file():
            raise StateError(f"{path} is not a checkpoint (no {ckpt.STATE_JSON})")
        return path

    def _restore_model(self, path: Path) -> dict[str, Any]:
        from ..core.lifecycle import adapters, delete
        from ..core.state import load

        plain, _ = ckpt.read(path)
        saved_identity = plain["state"].get("identity")
        if saved_identity != _jsonable(self.identity):
            changed = sorted(k for k in set(saved_identity or {}) | set(self.identity)
                             if (saved_identity or {}).get(k) != _jsonable(self.identity).get(k))
            raise StateError(f"{path} belongs to a run with other settings ({changed} differ); "
                             "resume with the same settings or use a new --output")
        for name in list(adapters(self.model)):
            delete(self.model, name)
        if (path / ckpt.ADAPTER_DIR).is_dir():
            load(self.model, path / ckpt.ADAPTER_DIR, trainable=True)
        with torch.no_grad():
            for name, param in self.extra.items():
                param.copy_(plain["extra"][name])
                param.requires_grad_(True)  # loading froze the base, this included
        return plain


def _jsonable(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value))


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, pad_id: int, batch_size: int,
             device: torch.device, *, progress: bool = False) -> dict[str, float]:
    """Task metrics of ``model`` on ``dataset`` (the caller sets eval mode).

    Classification: ``accuracy``, ``f1``, ``mcc``, ``loss``. Causal LM: ``perplexity`` (from
    the mean token loss), ``token_accuracy`` (next-token argmax), ``loss``.

    The loss is the cross-entropy of the logits, computed here: the model is called without
    labels, so terms a model adds to its own loss (HF peft's AdaLoRA adds its orthogonality
    regulariser in eval mode too; auxiliary losses) never enter the metrics.
    """
    n = len(dataset)
    loss_sum, weight = 0.0, 0
    preds, labels = [], []
    correct = 0
    steps = range(0, n, batch_size)
    with bar(len(steps), "eval", enabled=progress and len(steps) > 5, leave=False) as b:
        for start in steps:
            batch = collate(dataset.examples[start:start + batch_size], pad_id,
                            left=dataset.left_pad)
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(**{k: v for k, v in batch.items() if k != "labels"})
            if dataset.task == "classification":
                logits, target = out.logits, batch["labels"]
                count = target.numel()
                preds.append(logits.argmax(-1).cpu())
                labels.append(target.cpu())
            else:
                target = batch["labels"][:, 1:]
                valid = target != -100
                count = int(valid.sum())
                logits = out.logits[:, -batch["labels"].shape[1]:][:, :-1]  # past any prompt
                correct += int(((logits.argmax(-1) == target) & valid).sum())
            flat = logits.float().reshape(-1, logits.shape[-1])
            loss_sum += nn.functional.cross_entropy(flat, target.reshape(-1), ignore_index=-100,
                                                    reduction="sum").item()
            weight += count
            b.update()
    mean = loss_sum / max(weight, 1)
    if dataset.task == "classification":
        metrics = classification_metrics(torch.cat(preds), torch.cat(labels),
                                         max(len(dataset.label_names), 2))
        return {**metrics, "loss": mean}
    return {"perplexity": perplexity(mean), "token_accuracy": correct / max(weight, 1),
            "loss": mean}


__all__ = ["Result", "Settings", "Trainer", "evaluate", "linear_schedule"]
