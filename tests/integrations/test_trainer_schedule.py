"""The schedule protocol under a Hugging Face ``Trainer``: ``DeltaCallback`` drives IncreLoRA's
rank growth after every optimizer step, checkpoints the adapter and the schedule with the
Trainer's own checkpoints, and a run resumed from a mid-growth checkpoint (the adapter
``deltatune.load``-ed from it into a fresh base first) ends bit for bit where an uninterrupted
run ends."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import deltatune as dt
import zoo
from deltatune.core.lifecycle import delta_layers
from deltatune.core.state import adapter_tensors
from deltatune.integrations.transformers import CHECKPOINT_DIR, DeltaCallback
from deltatune.methods.increlora import IncreLoraConfig

transformers = pytest.importorskip("transformers")

#: 6 layers from rank 1 to 18 in all: growth at steps 4, 6, …, 14; checkpoints every 6 steps.
CONFIG = IncreLoraConfig(rank=1, alpha=8, target_rank=3, warmup=2, interval=2, top_h=2,
                         targets=["q_proj", "v_proj", "down_proj"])
STEPS, EVERY = 20, 6


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 64) -> None:
        self.ids = torch.randint(1, 96, (n, 9), generator=torch.Generator().manual_seed(3))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def trainer_for(out: Path, resume: Path | None = None, steps: int = STEPS):
    torch.manual_seed(0)
    model = zoo.llama()
    if resume is None:
        torch.manual_seed(1)
        dt.inject(model, CONFIG, name="a")
    else:  # the grown shapes come from the checkpoint's adapter, not from CONFIG
        dt.load(model, resume / CHECKPOINT_DIR / "a", trainable=True)
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=2,
        learning_rate=5e-3, weight_decay=0.01, optim="adamw_torch", save_strategy="steps",
        save_steps=EVERY, logging_strategy="no", report_to=[], use_cpu=True, seed=0,
        disable_tqdm=True)
    callback = DeltaCallback()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(),
                                   callbacks=[callback])
    return trainer, callback


def run(out: Path, resume: Path | None = None):
    trainer, callback = trainer_for(out, resume)
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    return trainer.model, callback


def ranks(model) -> dict[str, int]:
    return {p: layer.deltas["a"].E.shape[0] for p, layer in delta_layers(model).items()}


pytestmark = [pytest.mark.slow,  # transformers' Trainer takes seconds to set up on CPU
              pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")]


def test_trainer_grows_checkpoints_and_resumes_bit_identically(tmp_path):
    model, callback = run(tmp_path / "straight")
    assert callback.scheduler.num_steps == STEPS and callback.scheduler.done()
    assert sum(ranks(model).values()) == 18 and max(ranks(model).values()) > 1
    final = {k: v.clone() for k, v in adapter_tensors(model, "a").items()}

    checkpoint = tmp_path / "straight" / f"checkpoint-{EVERY}"
    saved = checkpoint / CHECKPOINT_DIR
    assert (saved / "a").is_dir() and (saved / "schedule").is_dir()
    torch.manual_seed(0)
    probe = zoo.llama()
    dt.load(probe, saved / "a")
    assert 6 < sum(ranks(probe).values()) < 18, "the checkpoint is in the middle of the growth"

    resumed, callback = run(tmp_path / "straight", resume=checkpoint)
    assert callback.scheduler.num_steps == STEPS
    assert ranks(resumed) == ranks(model)
    again = adapter_tensors(resumed, "a")
    assert again.keys() == final.keys()
    for key, value in final.items():
        assert torch.equal(again[key], value), key


def test_a_second_train_call_drives_the_new_optimizer(tmp_path):
    trainer, callback = trainer_for(tmp_path / "out", steps=5)
    trainer.train()
    first = callback.scheduler
    assert 6 < sum(ranks(trainer.model).values()) < 18
    trainer.train()  # a new run: a new optimizer, whose state must grow with the ranks
    assert callback.scheduler is not first and callback.scheduler.optimizer is trainer.optimizer
    assert sum(ranks(trainer.model).values()) > 8


def test_resuming_without_the_schedule_state_is_an_error(tmp_path):
    trainer, _ = trainer_for(tmp_path / "first", steps=EVERY)
    trainer.train()
    trainer, _ = trainer_for(tmp_path / "elsewhere", resume=tmp_path / "first" / "checkpoint-6")
    with pytest.raises(dt.StateError, match="no schedule state"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "first" / "checkpoint-6"))


def test_under_a_distributed_trainer_a_resize_stops_with_what_to_do(tmp_path, monkeypatch):
    """The Trainer's DDP wrapper cannot follow parameters that change shape: the callback stops
    at the first growth with a clear error (here the process group is simulated)."""
    import deltatune.core.schedule as schedule

    monkeypatch.setattr(schedule, "_distributed", lambda: True)
    trainer, _ = trainer_for(tmp_path / "run")
    with pytest.warns(UserWarning, match="rebuilt"), \
            pytest.raises(dt.StateError, match="step 4: adapter.*Train this method in one"):
        trainer.train()


def test_under_a_distributed_trainer_lisa_stops_before_its_first_step(tmp_path, monkeypatch):
    """LISA freezes layers as its schedule starts, after the Trainer wrapped the model."""
    import deltatune.core.schedule as schedule

    monkeypatch.setattr(schedule, "_distributed", lambda: True)
    torch.manual_seed(0)
    model = zoo.llama()
    dt.inject(model, dt.LisaConfig(active_layers=1, interval=2), name="lisa")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
        logging_strategy="no", save_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(),
                                   callbacks=[DeltaCallback()])
    with pytest.raises(dt.StateError, match="step 0: adapter.*after the deltatune.Scheduler"):
        trainer.train()
