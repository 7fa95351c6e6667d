"""AdaLoRA: ``h = W x + s · P (Λ ⊙ Q x)`` against a naive reference, the importance scores and
the budget curve against the paper's formulas, allocation and physical pruning (optimizer state
moved, ranks saved and restored, rank-0 layers), a training loop that ends at the target budget,
bit-identical resumption from a checkpoint, the orthogonality regulariser, the Trainer callback
and bad inputs. Parity with HF peft: ``tests/integrations/test_peft_parity_adalora.py``."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core.lifecycle import delta_layers
from deltatune.methods.adalora import AdaLoraConfig, AdaLoraSchedule, orthogonal_regularization
from helpers import (
    assert_differs,
    assert_rel_close,
    assert_resume_is_bit_identical,
    perturb,
    rel_err,
)
from zoo import CASES_BY_NAME, run

TOL = 1e-5
LLAMA = CASES_BY_NAME["llama"]
TARGETS = ["q_proj", "v_proj", "down_proj"]  # 6 layers in the 2-block tiny Llama
# 12 steps: warm-up to 2, budget 24 → 12 decreasing over steps 3..9 (allocations at 4, 6, 8),
# pruned at step 9, then 3 steps of fine-tuning.
SCHEDULE = {"rank": 4, "target_rank": 2, "alpha": 8, "total_steps": 12, "tinit": 2,
            "tfinal": 3, "delta_t": 2}


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))


def mlp_adalora() -> nn.Module:
    model = mlp()
    dt.inject(model, AdaLoraConfig(rank=3, target_rank=1, total_steps=10, targets=["0", "2"]),
              name="a")
    return model


def naive(layer, name, x):
    """The paper's equation: W x + b + (α / r) · P (Λ ⊙ Q x)."""
    d = layer.deltas[name]
    s = d.config.alpha / d.config.rank
    lam = d.E.view(-1)  # Λ: (k,)
    return layer.base_layer(x) + s * ((x @ d.A.T) * lam) @ d.B.T  # (N, out)


def seeded_scores(schedule: AdaLoraSchedule, seed: int = 0) -> None:
    """Give every entry a positive smoothed sensitivity and uncertainty (distinct scores)."""
    gen = torch.Generator().manual_seed(seed)
    for path, delta in schedule.deltas().items():
        for key in "ABE":
            shape = getattr(delta, key).shape
            schedule.sensitivity.setdefault(path, {})[key] = torch.rand(shape, generator=gen)
            schedule.uncertainty.setdefault(path, {})[key] = torch.rand(shape, generator=gen)


def llama_adalora(**overrides) -> nn.Module:
    model = LLAMA.build(seed=0)
    dt.inject(model, AdaLoraConfig(targets=TARGETS, **{**SCHEDULE, **overrides}), name="ada")
    return model


def data(steps: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(1, 96, (4, 10), generator=gen) for _ in range(steps)]


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def train(model, optimizer, scheduler, batches, on_step=None) -> list[torch.Tensor]:
    """The plain PyTorch loop: loss + regulariser, step, schedule, zero the gradients."""
    model.train()
    losses = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss + orthogonal_regularization(model)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if on_step is not None:
            on_step(scheduler.num_steps)
        optimizer.zero_grad()
        losses.append(loss.detach())
    return losses


def ranks(model, name="ada") -> dict[str, int]:
    return {p: layer.deltas[name].E.shape[0] for p, layer in delta_layers(model).items()}


# ---------------------------------------------------------------------------------- forward
def test_matches_the_naive_reference_and_starts_as_the_base():
    model = mlp()
    x = torch.randn(5, 8)
    with torch.no_grad():
        y0 = model(x)
    dt.inject(model, AdaLoraConfig(rank=3, alpha=6, targets=["0", "2"]), name="a")
    d = model[0].deltas["a"]
    assert d.A.shape == (3, 8) and d.E.shape == (3, 1) and d.B.shape == (6, 3)
    assert not d.E.any(), "Λ starts at zero"
    assert d.A.norm(dim=1).mean().item() == pytest.approx(1, abs=0.5)  # unit-norm rows
    with torch.no_grad():
        assert torch.equal(model(x), y0)
    perturb(model, scale=0.5)
    with torch.no_grad():
        y = model(x)
        ref = naive(model[2], "a", torch.relu(naive(model[0], "a", x)))
    assert_differs(y, y0, "AdaLoRA changes the output")
    assert_rel_close(y, ref, TOL, "AdaLoRA vs W x + s P (Λ ⊙ Q x)")
    dt.merge(model)
    with torch.no_grad():
        assert_rel_close(model(x), ref, TOL, "merged")
    dt.unmerge(model)
    with torch.no_grad():
        assert_rel_close(model(x), ref, TOL, "unmerged")


def test_peft_init_std_and_the_scale_of_the_initial_rank():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4000, 8))
    dt.inject(model, AdaLoraConfig(rank=6, alpha=3, init_std=0.02, targets=["0"]), name="a")
    d = model[0].deltas["a"]
    assert d.A.std().item() == pytest.approx(0.02, rel=0.05)
    assert d.scale == 0.5  # α / r, and stays so when pruned (kept_rank)
    pruned = AdaLoraConfig(rank=6, alpha=3, kept_rank=2)
    assert pruned.scale == 0.5 and pruned.active_rank == 2


# ------------------------------------------------------------------------ scores and budget
def test_importance_scores_follow_the_paper():
    model = mlp_adalora()
    perturb(model, scale=0.5)
    schedule = dt.Scheduler(model).schedules["a"]
    b1, b2 = 0.85, 0.85
    avg, unc = {}, {}
    for seed in (1, 2):  # two updates: the EMAs start at zero
        model.zero_grad()
        model(torch.randn(5, 8, generator=torch.Generator().manual_seed(seed))).pow(2).sum() \
            .backward()
        schedule.update_scores()
        for path, d in schedule.deltas().items():
            for key in "ABE":
                p = getattr(d, key)
                ipt = (p * p.grad).abs().detach()  # I = |θ ∇θ|
                a = b1 * avg.get((path, key), 0) + (1 - b1) * ipt
                unc[path, key] = b2 * unc.get((path, key), 0) + (1 - b2) * (ipt - a).abs()
                avg[path, key] = a
    for path in schedule.deltas():
        for key in "ABE":
            assert_rel_close(schedule.sensitivity[path][key], avg[path, key], 1e-6, "Ī")
            assert_rel_close(schedule.uncertainty[path][key], unc[path, key], 1e-6, "U")
        s = {k: avg[path, k] * unc[path, k] for k in "ABE"}
        r = s["E"].shape[0]
        ref = torch.stack([s["E"][i, 0] + s["A"][i].mean() + s["B"][:, i].mean()
                           for i in range(r)])
        assert_rel_close(schedule.triplet_scores()[path], ref, 1e-6, "triplet score")


def test_budget_curve_warm_up_cubic_decrease_final():
    model = LLAMA.build()
    dt.inject(model, AdaLoraConfig(rank=4, target_rank=2, total_steps=20, tinit=3, tfinal=4,
                                   delta_t=3, targets=["q_proj", "v_proj"]), name="a")
    schedule = dt.Scheduler(model).schedules["a"]
    b0, bt = 16, 8
    assert (schedule.initial_budget, schedule.target_budget) == (b0, bt)
    for t in range(1, 21):
        budget, allocates = schedule.budget(t)
        if t <= 3:
            assert (budget, allocates) == (b0, False)
        elif t <= 16:
            assert budget == math.floor(bt + (b0 - bt) * (1 - (t - 3) / 13) ** 3)
            assert allocates == (t % 3 == 0 or t == 16)
        else:
            assert (budget, allocates) == (bt, False)
    assert schedule.budget(16)[0] == bt


def test_allocation_keeps_the_best_triplets_and_zeroes_the_rest_with_their_state():
    model = mlp_adalora()
    perturb(model, scale=0.5)
    opt = adamw(model)
    model(torch.randn(5, 8)).sum().backward()
    opt.step()
    scheduler = dt.Scheduler(model, opt)
    schedule = scheduler.schedules["a"]
    seeded_scores(schedule)
    scores = schedule.triplet_scores()
    flat = torch.cat(list(scores.values()))
    threshold = flat.sort(descending=True).values[4]  # keep the best 4 of 6
    keep = schedule.allocate(4, opt)
    for path, d in schedule.deltas().items():
        assert torch.equal(keep[path], scores[path] > threshold)
        dropped = ~keep[path]
        assert not d.E[dropped].any() and d.E[keep[path]].all()
        assert not opt.state[d.E]["exp_avg"][dropped].any()
        assert opt.state[d.E]["exp_avg"][keep[path]].all()
    assert sum(schedule.ranks().values()) == 4
    assert ranks(model, "a") == {"0": 3, "2": 3}  # masked, not pruned


def test_pruning_equals_masking_and_moves_the_optimizer_state(tmp_path):
    model = mlp_adalora()
    perturb(model, scale=0.5)
    opt = adamw(model)
    x = torch.randn(5, 8)
    model(x).sum().backward()
    opt.step()
    schedule = dt.Scheduler(model, opt).schedules["a"]
    seeded_scores(schedule)
    keep = schedule.allocate(4)
    with torch.no_grad():
        masked = model(x)
    before = {(path, key): (p.detach().clone(), opt.state[p]["exp_avg"].clone())
              for path, d in schedule.deltas().items()
              for key, p in (("A", d.A), ("B", d.B), ("E", d.E))}
    assert schedule.prune(4, opt) == {p: int(k.sum()) for p, k in keep.items()}
    assert schedule.pruned and dt.Scheduler(model).schedules["a"].pruned
    with torch.no_grad():
        assert_rel_close(model(x), masked, 1e-6, "pruned vs masked")
    for (path, key), (value, moment) in before.items():
        p = getattr(schedule.deltas()[path], key)
        index = keep[path].nonzero().view(-1)
        dim = 1 if key == "B" else 0
        assert torch.equal(p.detach(), value.index_select(dim, index))
        assert torch.equal(opt.state[p]["exp_avg"], moment.index_select(dim, index))
        assert p.grad.shape == p.shape
    config = dt.adapters(model)["a"]
    assert {p: v["kept_rank"] for p, v in config.overrides.items()} == ranks(model, "a")
    opt.zero_grad()
    model(x).sum().backward()
    opt.step()  # the same optimizer trains the smaller parameters
    dt.save(model, tmp_path / "a")
    fresh = mlp()
    dt.load(fresh, tmp_path / "a")
    assert ranks(fresh, "a") == ranks(model, "a")
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_a_layer_pruned_to_rank_zero_adds_nothing_saves_loads_and_merges(tmp_path):
    model = CASES_BY_NAME["mlp"].build()
    inputs = CASES_BY_NAME["mlp"].inputs()
    dt.inject(model, AdaLoraConfig(rank=3, target_rank=1, total_steps=10, bias=True), name="a")
    perturb(model, scale=0.5)
    opt = adamw(model)
    schedule = dt.Scheduler(model, opt).schedules["a"]
    seeded_scores(schedule)
    for key in "ABE":  # blocks.0.2 scores lowest: it loses every triplet
        schedule.sensitivity["blocks.0.2"][key].zero_()
    schedule.prune(schedule.initial_budget - 3, opt)
    assert ranks(model, "a")["blocks.0.2"] == 0
    layer = delta_layers(model)["blocks.0.2"]
    d = layer.deltas["a"]
    assert d.A.shape == (0, 24) and d.B.shape == (12, 0) and d.E.shape == (0, 1)
    h = torch.randn(4, 24)
    with torch.no_grad():
        assert torch.equal(layer(h), layer.base_layer(h) + d.bias)  # only the bias delta left
    counted = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counted == dt.summary(model).trainable_params == dt.cost(
        CASES_BY_NAME["mlp"].build(), dt.adapters(model)["a"]).params
    loss = run(model, inputs).pow(2).mean() + orthogonal_regularization(model)
    loss.backward()
    opt.step()  # trains on, empty factors included
    with torch.no_grad():
        y = run(model, inputs)
    dt.save(model, tmp_path / "a")
    fresh = CASES_BY_NAME["mlp"].build()
    dt.load(fresh, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(run(fresh, inputs), y)
    dt.merge(fresh)
    with torch.no_grad():
        assert_rel_close(run(fresh, inputs), y, TOL, "merged")
    dt.unmerge(fresh)
    with torch.no_grad():
        assert_rel_close(run(fresh, inputs), y, TOL, "unmerged")


# --------------------------------------------------------------------------- training
def test_training_reaches_the_target_budget_then_fine_tunes_the_pruned_adapter(tmp_path):
    model = llama_adalora()
    opt = adamw(model)
    scheduler = dt.Scheduler(model, opt)
    schedule = scheduler.schedules["ada"]
    assert (schedule.initial_budget, schedule.target_budget) == (24, 12)
    seen = {}

    def check(step):
        budget, allocates = schedule.budget(step)
        if allocates:
            seen[step] = sum(schedule.ranks().values())
            assert seen[step] == budget, f"step {step}: {seen[step]} triplets, budget {budget}"

    losses = train(model, opt, scheduler, data(9), check)
    assert sorted(seen) == [4, 6, 8, 9] and seen[9] == 12
    assert schedule.pruned and scheduler.done()
    kept = ranks(model)
    assert sum(kept.values()) == 12, kept
    assert len(set(kept.values())) > 1, "the budget is shared unevenly"
    for path, layer in delta_layers(model).items():
        d = layer.deltas["ada"]
        assert d.config.kept_rank == kept[path]
        for p in (d.A, d.B, d.E):
            assert opt.state[p]["exp_avg"].shape == p.shape
    snapshot = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    losses += train(model, opt, scheduler, data(12)[9:])
    assert ranks(model) == kept, "the final phase keeps the pruned ranks"
    assert all(torch.isfinite(loss) for loss in losses)
    assert any(not torch.equal(p, dict(model.named_parameters())[k])
               for k, p in snapshot.items()), "the pruned adapter trains on"
    # Saved small, restored with the same per-module ranks and outputs.
    dt.save(model, tmp_path / "ada", name="ada")
    fresh = LLAMA.build(seed=0)
    dt.load(fresh, tmp_path / "ada")
    assert ranks(fresh) == kept
    ids = data(1)[0]
    model.eval()
    with torch.no_grad():
        y = model(input_ids=ids).logits
        assert torch.equal(fresh(input_ids=ids).logits, y)
        assert_differs(y, LLAMA.build(seed=0)(input_ids=ids).logits, "trained adapter")
    dt.merge(fresh)
    with torch.no_grad():
        assert_rel_close(fresh(input_ids=ids).logits, y, TOL, "merged after pruning")


@pytest.mark.parametrize("stop", [5, 10], ids=["while-decreasing", "after-pruning"])
def test_resuming_from_a_checkpoint_is_bit_identical(tmp_path, stop):
    def resumed_at_stop(model, optimizer, scheduler):
        assert scheduler.num_steps == stop

    assert_resume_is_bit_identical(llama_adalora, lambda: LLAMA.build(seed=0), adamw, "ada",
                                   data(12), train, tmp_path, split=stop,
                                   on_resume=resumed_at_stop)


@pytest.mark.slow  # transformers' Trainer takes seconds to set up on CPU
def test_trainer_callback_reaches_the_target_and_adds_the_regulariser(tmp_path):
    """``DeltaCallback`` drives the schedule and puts the regulariser's gradients in once per
    step: the same training as adding it to the loss in ``compute_loss``."""
    from transformers import Trainer, TrainingArguments

    from deltatune.integrations.transformers import DeltaCallback

    class InLoss(Trainer):  # the regulariser added to the loss by hand, for comparison
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
            loss = loss + orthogonal_regularization(model)
            return (loss, outputs) if return_outputs else loss

    class NoRegulariser(DeltaCallback):
        def on_step_begin(self, *args, **kwargs):
            pass

    def train(trainer_class, callback_class, **config):
        model = llama_adalora(**config)
        rows = [{"input_ids": ids, "labels": ids} for batch in data(12) for ids in batch]
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=12, learning_rate=1e-2,
                                 per_device_train_batch_size=4, lr_scheduler_type="constant",
                                 save_strategy="no", report_to=[], use_cpu=True,
                                 logging_strategy="no", disable_tqdm=True, seed=0)
        callback = callback_class()
        trainer_class(model=model, args=args, train_dataset=rows, callbacks=[callback]).train()
        assert callback.scheduler.num_steps == 12 and callback.scheduler.done()
        assert sum(ranks(model).values()) == 12
        return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}

    by_callback = train(Trainer, DeltaCallback)
    by_hand = train(InLoss, NoRegulariser)
    without = train(Trainer, DeltaCallback, orth_reg_weight=0.0)
    assert by_callback.keys() == by_hand.keys()
    for key, value in by_callback.items():
        assert_rel_close(value, by_hand[key], 1e-4, key)
    assert any(v.shape != without[k].shape or rel_err(v, without[k]) > 1e-3
               for k, v in by_callback.items()), "the regulariser must change the training"


# ---------------------------------------------------------------------------- regulariser
def test_orthogonal_regularization_is_the_mean_frobenius_distance():
    model = mlp()
    dt.inject(model, AdaLoraConfig(rank=3, orth_reg_weight=0.3, targets=["0", "2"]), name="a")
    terms = []
    for layer in (model[0], model[2]):
        d = layer.deltas["a"]
        terms += [torch.linalg.norm(d.A @ d.A.T - torch.eye(3)),
                  torch.linalg.norm(d.B.T @ d.B - torch.eye(3))]
    reg = orthogonal_regularization(model, "a")
    assert reg.item() > 0.1
    assert_rel_close(reg, 0.3 * sum(terms) / 4, 1e-6, "regulariser")
    reg.backward()
    assert model[0].deltas["a"].A.grad.abs().sum() > 0
    with torch.no_grad():  # orthonormal factors: nothing to regularise
        for layer in (model[0], model[2]):
            d = layer.deltas["a"]
            d.A.copy_(torch.linalg.qr(d.A.T).Q.T)
            d.B.copy_(torch.linalg.qr(d.B).Q)
    assert orthogonal_regularization(model).item() < 1e-5


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs, match", [
    ({"total_steps": 0}, "total_steps must be a positive"),
    ({"total_steps": 10, "tinit": 5, "tfinal": 5}, "leave no steps"),
    ({"beta1": 1.0}, r"beta1 must be in \(0, 1\)"),
    ({"beta2": 0}, r"beta2 must be in \(0, 1\)"),
    ({"kept_rank": 13}, "kept_rank must be None or an integer in"),
    ({"target_rank": -1}, "target_rank must be an integer >= 0"),
    ({"delta_t": 0}, "delta_t must be an integer >= 1"),
    ({"orth_reg_weight": -0.1}, "orth_reg_weight must be a finite number"),
    ({"init_std": float("nan")}, "init_std must be a finite number"),
    ({"init": "pissa"}, "AdaLoRA has its own initialisation"),
    ({"freeze_a": True}, "AdaLoRA has its own initialisation"),
])
def test_bad_configs_are_clear_errors(kwargs, match):
    with pytest.raises(dt.ConfigError, match=match):
        AdaLoraConfig(**kwargs)


def test_schedule_misuse_is_a_clear_error(tmp_path):
    model = mlp()
    dt.inject(model, AdaLoraConfig(rank=3, targets=["0", "2"]), name="a")
    with pytest.raises(dt.ConfigError, match="has no total_steps"):
        dt.Scheduler(model)
    assert len(dt.Scheduler(model, names=[])) == 0
    dt.delete(model, "a")
    dt.inject(model, AdaLoraConfig(rank=3, target_rank=4, total_steps=9, targets=["0", "2"]),
              name="a")
    with pytest.raises(dt.ConfigError, match="exceeds the initial ranks"):
        dt.Scheduler(model)
    dt.delete(model, "a")
    dt.inject(model, AdaLoraConfig(rank=3, target_rank=1, total_steps=9, targets=["0", "2"]),
              name="a")
    opt = adamw(model)
    scheduler = dt.Scheduler(model, opt)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    opt.zero_grad()
    with pytest.raises(dt.StateError, match="before zero_grad"):
        scheduler.step()
    schedule = scheduler.schedules["a"]
    with pytest.raises(ValueError, match="budget must be in"):
        schedule.allocate(7)
    scheduler.save(tmp_path / "unpruned")
    dt.merge(model)
    with pytest.raises(dt.StateError, match="unmerge it"):
        schedule.prune()
    dt.unmerge(model)
    schedule.prune(optimizer=opt)
    with pytest.raises(dt.StateError, match="already pruned"):
        schedule.allocate(1)
    with pytest.raises(dt.StateError, match="saved before pruning"):
        scheduler.load(tmp_path / "unpruned")
    with pytest.raises(dt.AdapterNameError, match="not an AdaLoRA adapter"):
        orthogonal_regularization(model, "b")
    dt.inject(model, dt.LoraConfig(rank=2, targets=["0"]), name="b")
    with pytest.raises(dt.AdapterNameError, match="not an AdaLoRA adapter"):
        orthogonal_regularization(model, "b")
