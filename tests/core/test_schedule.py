"""The schedule protocol's core: parameters remapped or masked with their optimizer state, per-
module shapes recorded for save/load, and the Scheduler's driving and checkpointing. Methods'
own schedules (AdaLoRA, DyLoRA, …) are tested in their files."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core.lifecycle import delta_layers
from deltatune.core.schedule import (
    EntryWarmup,
    Schedule,
    mask_parameter,
    remap_parameter,
    set_module_fields,
)
from deltatune.methods.lora import LoraDelta
from helpers import assert_differs, perturb
from zoo import CASES_BY_NAME, run

MLP = CASES_BY_NAME["mlp"]


def adam_trained(shape=(4, 3), steps=3, **adam):
    """A parameter and an AdamW that took ``steps`` steps on it (non-zero moments)."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(*shape))
    opt = torch.optim.AdamW([p], lr=0.1, **adam)
    for _ in range(steps):
        opt.zero_grad()
        (p.sin() * torch.arange(p.numel()).view(shape)).sum().backward()
        opt.step()
    return p, opt


@pytest.mark.parametrize("amsgrad", [False, True])
def test_remap_moves_rows_and_their_adam_state(amsgrad):
    p, opt = adam_trained(amsgrad=amsgrad)
    ident = id(p)
    old = {k: v.clone() for k, v in opt.state[p].items()}
    grad = p.grad.clone()
    src, dst = torch.tensor([2, 0]), torch.tensor([0, 3])
    new = torch.full((5, 3), 7.0)
    new[dst] = p.detach()[src]
    remap_parameter(p, new, dim=0, src=src, dst=dst, optimizer=opt)
    assert id(p) == ident and p.shape == (5, 3) and torch.equal(p.detach(), new)
    keys = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
    fresh = torch.tensor([1, 2, 4])
    for key in keys:
        moved = opt.state[p][key]
        assert moved.shape == (5, 3)
        assert torch.equal(moved[dst], old[key][src]), key
        assert not moved[fresh].any(), f"{key}: new rows start with zero state"
        assert old[key][src].abs().sum() > 0  # the check is not vacuous
    assert torch.equal(opt.state[p]["step"], old["step"])  # scalar state kept
    assert torch.equal(p.grad[dst], grad[src]) and not p.grad[fresh].any()
    # The optimizer keeps working on the same object at its new size.
    (p * 2).sum().backward()
    opt.step()
    assert p.shape == (5, 3) and torch.isfinite(p).all()


def test_remap_continues_like_an_optimizer_built_on_the_kept_slices():
    """Pruning columns then training equals training a fresh parameter holding the kept
    columns with the kept optimizer state: the remap loses nothing it keeps."""
    p, opt = adam_trained(shape=(3, 5))
    keep = torch.tensor([4, 1, 3])
    ref = nn.Parameter(p.detach()[:, keep].clone())
    ref_opt = torch.optim.AdamW([ref], lr=0.1)
    ref_opt.load_state_dict({
        "state": {0: {k: (v[:, keep].clone() if v.dim() else v.clone())
                      for k, v in opt.state[p].items()}},
        "param_groups": opt.state_dict()["param_groups"]})
    remap_parameter(p, p.detach()[:, keep].clone(), dim=1, src=keep,
                    dst=torch.arange(3), optimizer=opt)
    for _ in range(3):
        for q, o in ((p, opt), (ref, ref_opt)):
            o.zero_grad()
            (q.cos() * torch.arange(q.numel()).view(q.shape)).sum().backward()
            o.step()
    assert torch.equal(p.detach(), ref.detach())


def test_remap_grows_and_rejects_changes_on_other_axes():
    p, opt = adam_trained()
    before = opt.state[p]["exp_avg"].clone()
    keep = torch.arange(4)
    grown = torch.cat([p.detach(), torch.zeros(2, 3)])
    remap_parameter(p, grown, dim=0, src=keep, dst=keep, optimizer=opt)
    assert torch.equal(opt.state[p]["exp_avg"][:4], before)
    assert not opt.state[p]["exp_avg"][4:].any()
    with pytest.raises(ValueError, match="changes one axis"):
        remap_parameter(p, torch.zeros(6, 4), dim=0, src=keep, dst=keep, optimizer=opt)
    with pytest.raises(ValueError, match="src and dst"):
        remap_parameter(p, torch.zeros(7, 3), dim=0, src=keep, dst=keep[:2], optimizer=opt)
    assert p.shape == (6, 3)  # refused calls change nothing


@pytest.mark.parametrize("optim", ["adamw", "sgd"])
def test_entry_warmup_is_a_per_entry_learning_rate_ramp(optim):
    """Rows 3..5 of a (5, 3) parameter join at step 2 with a 3-step warmup: the result equals
    training the joined rows as their own parameter group whose learning rate ramps k/3."""
    make = {"adamw": lambda ps, lr: torch.optim.AdamW(ps, lr=lr, weight_decay=0.1),
            "sgd": lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9)}[optim]
    torch.manual_seed(0)
    start = torch.randn(5, 3)
    target = torch.randn(5, 3)
    lr, length, born = 0.1, 3, 2

    def loss(w):
        return ((w - target) ** 2 * torch.arange(1.0, 16.0).view(5, 3)).sum()

    one = nn.Parameter(start.clone())
    opt = make([one], lr)
    warm = EntryWarmup(length)
    old, new = nn.Parameter(start[:3].clone()), nn.Parameter(start[3:].clone())
    groups = make([{"params": [old]}, {"params": [new]}], lr)
    for step in range(1, 9):
        for o, w in ((opt, one), (groups, torch.cat([old, new]))):
            o.zero_grad()
            loss(w).backward()
        groups.param_groups[1]["lr"] = lr * min(1.0, max(0, step - born) / length) \
            if step > born else lr
        opt.step()
        groups.step()
        warm.apply(step, lambda key: one)
        if step == born:
            warm.add("w", 0, 3, 5, step)
        warm.snapshot(step, lambda key: one)
        assert torch.allclose(one, torch.cat([old, new]), rtol=1e-6, atol=1e-7), step
    assert not warm, "the ramp is over"
    assert_differs(one[3:], start[3:], "the joined rows trained")


def test_entry_warmup_clips_truncated_ranges_and_round_trips_its_state():
    params = {"p": nn.Parameter(torch.zeros(6, 2)), "q": nn.Parameter(torch.zeros(2, 3))}
    warm = EntryWarmup(4)
    warm.add("p", 0, 2, 6, step=1)
    warm.add("q", 1, 1, 3, step=1)
    warm.add("q", 1, 0, 0, step=1)  # empty: nothing recorded
    nothing = EntryWarmup(0)
    nothing.add("p", 0, 0, 6, step=1)  # length 0: no warmup
    assert not nothing and len(warm.records) == 2
    warm.snapshot(1, params.get)
    again = EntryWarmup(4)
    again.load_state_dict(warm.state_dict())
    assert again.records == warm.records
    assert all(torch.equal(a, b) for a, b in zip(again.snapshots, warm.snapshots, strict=True))
    with torch.no_grad():
        for p in params.values():
            p.add_(1.0)  # "an optimizer step"
    again.apply(2, params.get)  # the first update after joining: weight 1/4
    p, q = params["p"], params["q"]
    assert torch.equal(p[:2], torch.ones(2, 2)) and torch.equal(p[2:], torch.full((4, 2), 0.25))
    assert torch.equal(q[:, :1], torch.ones(2, 1))
    assert torch.equal(q[:, 1:], torch.full((2, 2), 0.25))
    p.data = p.data[:4]  # truncated at its end
    again.snapshot(2, params.get)
    assert again.records == [["p", 0, 2, 4, 1], ["q", 1, 1, 3, 1]]
    again.snapshot(4, params.get)
    assert not again, "ends once the next update gets the full rate"


def test_mask_zeroes_entries_and_moments_so_momentum_does_not_move_them():
    p, opt = adam_trained()
    keep = torch.tensor([True, False, True, False])[:, None]  # rows, broadcast
    mask_parameter(p, keep, optimizer=opt)
    for key in ("exp_avg", "exp_avg_sq"):
        assert not opt.state[p][key][~keep[:, 0]].any()
        assert opt.state[p][key][keep[:, 0]].abs().sum() > 0
    assert not p[1].any() and not p[3].any() and p[0].abs().sum() > 0
    # With zero gradient on the masked rows, a step leaves them at zero (no momentum left).
    opt.zero_grad()
    (p * keep).sum().backward()
    opt.step()
    assert not p[1].any() and not p[3].any()


# ------------------------------------------------------------------ per-module shapes
def lora_mlp(**config):
    model = MLP.build()
    dt.inject(model, dt.LoraConfig(rank=4, **config), name="a")
    perturb(model, "a", seed=1)
    return model


def shrink(model, path, rank):
    """Keep the first ``rank`` components of the LoRA on ``path`` (a pruning schedule's act)."""
    delta = delta_layers(model)[path].deltas["a"]
    keep = torch.arange(rank)
    remap_parameter(delta.A, delta.A.detach()[:rank].clone(), dim=0, src=keep, dst=keep)
    remap_parameter(delta.B, delta.B.detach()[:, :rank].clone(), dim=1, src=keep, dst=keep)
    set_module_fields(model, "a", {path: {"rank": rank}})


def test_set_module_fields_makes_save_and_load_rebuild_changed_shapes(tmp_path):
    model = lora_mlp(overrides={"blocks.0.2": {"dropout": 0.25}})
    x = MLP.inputs()
    base = run(MLP.build(), x)
    shrink(model, "blocks.0.2", 2)
    shrink(model, "blocks.1.0", 1)
    model.eval()
    with torch.no_grad():
        expected = run(model, x)
    assert_differs(expected, base)
    config = dt.adapters(model)["a"]
    delta = delta_layers(model)["blocks.0.2"].deltas["a"]
    assert delta.config.rank == 2 and delta.config.dropout == 0.25  # the user's override kept
    assert config.overrides["blocks.0.2"] == {"dropout": 0.25, "rank": 2}
    assert config.overrides["blocks.1.0"] == {"rank": 1}
    dt.save(model, tmp_path / "a", name="a")
    fresh = MLP.build()
    dt.load(fresh, tmp_path / "a", trainable=True)
    fresh.eval()
    shapes = {p: layer.deltas["a"].A.shape[0] for p, layer in delta_layers(fresh).items()}
    assert shapes == {"blocks.0.0": 4, "blocks.0.2": 2, "blocks.1.0": 1, "blocks.1.2": 4}
    with torch.no_grad():
        assert torch.equal(run(fresh, x), expected)
    assert dt.cost(MLP.build(), dt.adapters(fresh)["a"]).params == sum(
        p.numel() for p in fresh.parameters() if p.requires_grad)


def test_set_module_fields_errors():
    model = lora_mlp()
    with pytest.raises(dt.AdapterNameError, match="no adapter named 'b'"):
        set_module_fields(model, "b", {"blocks.0.0": {"rank": 2}})
    with pytest.raises(dt.ConfigError, match="rank"):
        set_module_fields(model, "a", {"blocks.0.0": {"rank": 0}})
    assert dt.adapters(model)["a"].overrides is None  # refused: nothing recorded


# ---------------------------------------------------------------------------- Scheduler
class CountingSchedule(Schedule):
    """A toy schedule: masks component ``step % rank`` of every delta's ``A`` with a seeded
    random choice kept in its state (a generator and a counter), to test the driving."""

    def __init__(self, model, name):
        super().__init__(model, name)
        self.gen = torch.Generator().manual_seed(0)
        self.calls: list[int] = []
        self.total = torch.zeros(())

    def step(self, step, optimizer):
        self.calls.append(step)
        for delta in self.deltas().values():
            keep = torch.rand(delta.A.shape[0], 1, generator=self.gen) > 0.3
            mask_parameter(delta.A, keep, optimizer)
            self.total += keep.sum()

    def state_dict(self):
        return {"gen": self.gen.get_state(), "total": self.total.clone(), "calls": self.calls}

    def load_state_dict(self, state):
        self.gen.set_state(state["gen"])
        self.total = state["total"].clone()
        self.calls = list(state["calls"])


@pytest.fixture
def scheduled_lora(monkeypatch):
    monkeypatch.setattr(LoraDelta, "schedule_class", CountingSchedule)


def train(model, opt, scheduler, steps, seed):
    x = MLP.inputs()["x"]
    losses = []
    for i in range(steps):
        torch.manual_seed(seed + i)
        loss = (run(model, {"x": x + 0.1 * torch.randn_like(x)}) ** 2).mean()
        loss.backward()
        opt.step()
        scheduler.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return losses


def test_scheduler_drives_each_scheduled_adapter_and_skips_the_others(scheduled_lora):
    model = lora_mlp()
    dt.inject(model, dt.SSFConfig(targets=["head"]), name="ia3")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = dt.Scheduler(model, opt)
    assert len(scheduler) == 1 and list(scheduler.schedules) == ["a"]
    train(model, opt, scheduler, 3, seed=0)
    assert scheduler.num_steps == 3 and scheduler.schedules["a"].calls == [1, 2, 3]
    with pytest.raises(dt.StateError, match="'ia3' .* has no schedule"):
        dt.Scheduler(model, opt, names=["a", "ia3"])
    with pytest.raises(dt.AdapterNameError, match="no adapter named 'x'"):
        dt.Scheduler(model, opt, names="x")
    plain = dt.inject(MLP.build(), dt.SSFConfig(targets=["head"]))
    empty = dt.Scheduler(plain)
    empty.step()  # a loop may always make the call
    assert len(empty) == 0 and empty.done()


def test_scheduler_checkpoint_resumes_bit_identically(scheduled_lora, tmp_path):
    def fresh():
        model = lora_mlp()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        return model, opt, dt.Scheduler(model, opt)

    model, opt, scheduler = fresh()
    straight = train(model, opt, scheduler, 6, seed=0)

    model, opt, scheduler = fresh()
    first = train(model, opt, scheduler, 3, seed=0)
    dt.save(model, tmp_path / "adapter", name="a")
    scheduler.save(tmp_path / "schedule")
    opt_state = opt.state_dict()
    model, opt, scheduler = fresh()
    dt.delete(model, "a")
    dt.load(model, tmp_path / "adapter", trainable=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt.load_state_dict(opt_state)
    scheduler = dt.Scheduler(model, opt)
    scheduler.load(tmp_path / "schedule")
    assert scheduler.num_steps == 3
    rest = train(model, opt, scheduler, 3, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first + rest, straight, strict=True))
    assert scheduler.schedules["a"].calls == [1, 2, 3, 4, 5, 6]
    model_straight, opt_s, sched_s = fresh()
    train(model_straight, opt_s, sched_s, 6, seed=0)
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), model_straight.named_parameters(),
                                  strict=True):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_scheduler_state_errors(scheduled_lora, tmp_path):
    model = lora_mlp()
    scheduler = dt.Scheduler(model)
    with pytest.raises(dt.AdapterFileError, match="no readable schedule state"):
        scheduler.load(tmp_path / "missing")
    scheduler.save(tmp_path / "s")
    other = lora_mlp()
    dt.inject(other, dt.LoraConfig(rank=2), name="b")
    with pytest.raises(dt.StateError, match=r"for adapters \['a'\].*drives \['a', 'b'\]"):
        dt.Scheduler(other).load(tmp_path / "s")
    (tmp_path / "s" / "deltatune_schedule.safetensors").write_bytes(b"junk")
    with pytest.raises(dt.AdapterFileError):
        scheduler.load(tmp_path / "s")


def test_remap_while_the_last_steps_graph_is_alive():
    """A training loop keeps the last ``loss`` (and its graph) alive across the schedule's
    step; the next backward must see the parameter's new shape."""
    p, opt = adam_trained()
    loss = (p * 3).sum()
    loss.backward()
    opt.step()
    remap_parameter(p, p.detach()[:2].clone(), dim=0, src=torch.arange(2),
                    dst=torch.arange(2), optimizer=opt)
    opt.zero_grad()
    (p * 3).sum().backward()
    assert p.grad.shape == (2, 3) and torch.equal(p.grad, torch.full((2, 3), 3.0))
    assert loss.grad_fn is not None  # the old graph was alive throughout


def test_scheduler_loss_is_zero_without_terms(scheduled_lora):
    scheduler = dt.Scheduler(lora_mlp())
    assert scheduler.loss() == 0.0


def test_set_module_fields_keeps_nested_paths_apart():
    """Override keys match as suffixes: the path "fc" would also match "inner.fc"."""
    class Nested(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Sequential()
            self.inner.add_module("fc", nn.Linear(6, 6))
            self.fc = nn.Linear(6, 6)

        def forward(self, x):
            return self.fc(self.inner.fc(x))

    torch.manual_seed(0)
    model = dt.inject(Nested(), dt.LoraConfig(rank=4, targets=["fc"]), name="a")
    def ranks(m):
        return {p: layer.deltas["a"].config.rank for p, layer in delta_layers(m).items()}

    set_module_fields(model, "a", {"fc": {"rank": 2}})
    assert ranks(model) == {"inner.fc": 4, "fc": 2}  # "fc" must not catch inner.fc
    set_module_fields(model, "a", {"inner.fc": {"rank": 3}})
    assert ranks(model) == {"inner.fc": 3, "fc": 2}
    fresh = dt.inject(Nested(), dt.adapters(model)["a"], name="a")  # the saved config rebuilds
    assert ranks(fresh) == {"inner.fc": 3, "fc": 2}


def test_scheduler_step_reports_changed_trainable_parameters(monkeypatch):
    """``step()`` is True when a schedule resized a parameter (AdaLoRA's pruning) and only
    then; under a process group it also warns, once, that a DDP wrapper must be rebuilt."""
    import deltatune.core.schedule as schedule

    model = MLP.build()
    dt.inject(model, dt.AdaLoraConfig(rank=4, target_rank=2, total_steps=6, tinit=1, tfinal=1,
                                      targets=["blocks.0.0", "blocks.1.0"]), name="a")
    perturb(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = dt.Scheduler(model, opt)
    monkeypatch.setattr(schedule, "_distributed", lambda: True)
    x = MLP.inputs()["x"]
    reported, shapes = [], []
    with pytest.warns(UserWarning, match="must be rebuilt") as caught:
        for _ in range(6):
            before = [tuple(p.shape) for p in model.parameters() if p.requires_grad]
            (run(model, {"x": x}).square().mean() + sched.loss()).backward()
            opt.step()
            reported.append(sched.step())
            opt.zero_grad()
            shapes.append(before != [tuple(p.shape) for p in model.parameters()
                                     if p.requires_grad])
    assert reported == shapes and any(reported) and not all(reported)
    assert len([w for w in caught if "must be rebuilt" in str(w.message)]) == 1
