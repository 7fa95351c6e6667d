"""IncreLoRA: ``h = W x + (α/r₀) B (Λ ⊙ A x)`` against a naive reference, reserved components
(advance learning) with zero effect and unit-Λ gradients, the smoothed layer scores, growth to the
rank budget under AdamW with the optimizer state moved and no output jump, bit-identical resume,
save/load/merge of grown adapters, the orthogonality loss, and bad inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import deltatune as dt
import zoo
from deltatune.core.lifecycle import delta_layers
from deltatune.methods.increlora import IncreLoraConfig
from helpers import assert_differs, assert_rel_close, checkpoint_and_resume, perturb

TOL = 1e-5


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))


def naive(layer, name, x, *, reserve_lambda=0.0):
    """``W x + s · Σ_i λ_i b_i a_iᵀ x`` over the components in use, and the reserves with
    ``λ = reserve_lambda`` (0: their effect in the model)."""
    d = layer.deltas[name]
    r = d.E.shape[0]
    lam = torch.cat([d.E.view(-1), torch.full((d.A.shape[0] - r,), reserve_lambda)])
    w = layer.base_layer.weight + d.scale * d.B @ (lam[:, None] * d.A)  # (out, in)
    return x @ w.T + layer.base_layer.bias


def deltas(model, name="a"):
    return {p: layer.deltas[name] for p, layer in delta_layers(model).items()}


def test_matches_the_naive_reference_and_reserves_add_nothing():
    model = mlp().eval()
    x = torch.randn(5, 8)
    with torch.no_grad():
        y0 = model(x)
    config = IncreLoraConfig(rank=2, alpha=4, step_rank=2, targets=["0", "2"])
    dt.inject(model, config, name="a")
    d = model[0].deltas["a"]
    assert d.A.shape == (4, 8) and d.B.shape == (6, 4) and d.E.shape == (2, 1)
    assert d.scale == 2.0, "α / r₀"
    with torch.no_grad():
        assert torch.equal(model(x), y0), "Λ = 0: identity at init"
    perturb(model, scale=0.3)
    with torch.no_grad():
        d.A[2:].mul_(50)  # large reserves: still no effect
        y = model(x)
        ref = naive(model[2], "a", torch.relu(naive(model[0], "a", x)))
    assert_differs(y, y0, "IncreLoRA changes the output")
    assert_rel_close(y, ref, TOL, "IncreLoRA vs s · B Λ A")
    model.train()
    y_train = model(x)
    assert torch.equal(y_train.detach(), y), "the reserves' straight-through zero is exact"


def test_reserves_get_the_gradient_of_a_unit_lambda_component():
    model = mlp().train()
    dt.inject(model, IncreLoraConfig(rank=1, alpha=3, step_rank=2, targets=["0"]), name="a")
    perturb(model, scale=0.3)
    twin = copy.deepcopy(model)
    x, c = torch.randn(5, 8, requires_grad=True), torch.randn(5, 6)
    x_ref, x_model = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    (model[0](x) * c).sum().backward()  # a linear loss: dL/dy does not depend on y
    (naive(twin[0], "a", x_ref, reserve_lambda=1.0) * c).sum().backward()
    ours, ref = model[0].deltas["a"], twin[0].deltas["a"]
    # ... but the layer's input gets the gradient of the forward as it is: reserves absent
    # (they used to leak theirs into it, hence into every earlier layer)
    (naive(copy.deepcopy(twin[0]), "a", x_model) * c).sum().backward()
    assert_rel_close(x.grad, x_model.grad, TOL, "input gradient without the reserves")
    assert_differs(x.grad, x_ref.grad, "a unit-Λ reserve would change the input gradient")
    assert_rel_close(ours.A.grad[1:], ref.A.grad[1:], TOL, "reserved A rows")
    assert_rel_close(ours.B.grad[:, 1:], ref.B.grad[:, 1:], TOL, "reserved B columns")
    assert_rel_close(ours.E.grad, ref.E.grad, TOL, "Λ")
    assert_rel_close(ours.A.grad[:1], ref.A.grad[:1], TOL, "A in use")


def test_reserves_on_a_convolution_get_unit_lambda_gradients_and_leave_the_input_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1)).train()
    dt.inject(model, IncreLoraConfig(rank=1, alpha=3, step_rank=2, targets=["0"]), name="a")
    perturb(model, scale=0.3)
    layer, d = model[0], model[0].deltas["a"]
    x, c = torch.randn(2, 3, 6, 6, requires_grad=True), torch.randn(2, 5, 6, 6)
    (model(x) * c).sum().backward()

    def naive_conv(a, b, reserve_lambda, x_in):
        lam = torch.cat([d.E.detach().view(-1), torch.full((2,), reserve_lambda)])
        weight = layer.base_layer.weight.view(5, -1) + d.scale * b @ (lam[:, None] * a)
        return torch.nn.functional.conv2d(x_in, weight.view(5, 3, 3, 3), layer.base_layer.bias,
                                          padding=1)

    a, b = (p.detach().clone().requires_grad_() for p in (d.A, d.B))
    (naive_conv(a, b, 1.0, x.detach()) * c).sum().backward()
    assert_rel_close(d.A.grad[1:], a.grad[1:], TOL, "reserved A rows (conv)")
    assert_rel_close(d.B.grad[:, 1:], b.grad[:, 1:], TOL, "reserved B columns (conv)")
    x_ref = x.detach().clone().requires_grad_()
    (naive_conv(d.A.detach(), d.B.detach(), 0.0, x_ref) * c).sum().backward()
    assert_rel_close(x.grad, x_ref.grad, TOL, "input gradient without the reserves (conv)")


def test_layer_scores_are_the_smoothed_mean_sensitivity():
    model = mlp().train()
    dt.inject(model, IncreLoraConfig(rank=2, target_rank=4, warmup=100, beta1=0.7, beta2=0.6,
                                     targets=["0", "2"]), name="a")
    perturb(model, scale=0.3)
    sched = dt.Scheduler(model)
    x = torch.randn(5, 8)
    ipts = []
    for _ in range(2):
        model(x).pow(2).sum().backward()
        ipt = []
        for d in deltas(model).values():  # mean |θ ∇θ| over the entries in use
            parts = [(d.A[:2] * d.A.grad[:2]), (d.E * d.E.grad), (d.B[:, :2] * d.B.grad[:, :2])]
            ipt.append(sum(p.abs().sum() for p in parts).item() / sum(p.numel() for p in parts))
        ipts.append(torch.tensor(ipt, dtype=torch.float64))
        sched.step()
        model.zero_grad()
    s1 = 0.3 * ipts[0]
    u1 = 0.4 * (ipts[0] - s1).abs()
    s2 = 0.7 * s1 + 0.3 * ipts[1]
    u2 = 0.6 * u1 + 0.4 * (ipts[1] - s2).abs()
    schedule = sched.schedules["a"]
    assert torch.allclose(schedule.sensitivity, s2, rtol=1e-6)
    assert torch.allclose(schedule.uncertainty, u2, rtol=1e-6)
    assert (schedule.sensitivity > 0).all()


# ----------------------------------------------------------------------------- training
def batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(1, 96, (2, 9), generator=g) for _ in range(n)]


CONFIG = IncreLoraConfig(rank=1, alpha=8, target_rank=3, warmup=2, interval=2, top_h=2,
                         targets=["q_proj", "v_proj", "down_proj"])


def base(seed: int = 0) -> nn.Module:
    """The tiny Llama every test here adapts (the same weights for the same seed)."""
    torch.manual_seed(seed)
    return zoo.llama()


def llama_with(config: IncreLoraConfig = CONFIG, seed: int = 0) -> nn.Module:
    model = base(seed)
    torch.manual_seed(seed + 1)
    dt.inject(model, config, name="a")
    return model


def optimizer(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3,
                             weight_decay=0.01)


def one_step(model, opt, sched, ids) -> torch.Tensor:
    loss = model(input_ids=ids, labels=ids).loss + sched.loss()
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()
    return loss.detach()


def train(model, opt, sched, data) -> list[torch.Tensor]:
    model.train()
    return [one_step(model, opt, sched, ids) for ids in data]


def test_grows_to_the_budget_moving_optimizer_state_without_output_jumps():
    model = llama_with(CONFIG.replace(restart_warmup=0))  # scheduler.step: growth only
    opt = optimizer(model)
    sched = dt.Scheduler(model, opt)
    schedule = sched.schedules["a"]
    assert schedule.budget == 3 * 6 and schedule.total() == 6
    probe = batches(1)[0]
    growths = 0
    for ids in batches(40):
        model.train()
        loss = model(input_ids=ids, labels=ids).loss + sched.loss()
        loss.backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            before = model(input_ids=probe).logits
        ranks = schedule.ranks()
        states = {p: opt.state[d.A]["exp_avg"].clone() for p, d in deltas(model).items()}
        sched.step()
        opt.zero_grad()
        with torch.no_grad():
            after = model(input_ids=probe).logits
        assert_rel_close(after, before, 1e-6, "growth must not move the output")
        for path, d in deltas(model).items():
            r = d.E.shape[0]
            state = opt.state[d.A]
            assert state["exp_avg"].shape == state["exp_avg_sq"].shape == d.A.shape
            assert opt.state[d.E]["exp_avg"].shape == d.E.shape == (r, 1)
            if r > ranks[path]:  # grown: the reserve joined with its state, new rows start at 0
                growths += 1
                old = states[path]
                assert torch.equal(d.E[ranks[path]:], torch.zeros(r - ranks[path], 1))
                assert torch.equal(state["exp_avg"][:old.shape[0]][:r], old[:r])
                assert old[ranks[path]:r].abs().sum() > 0, "advance learning trained it"
                assert state["exp_avg"][r:].abs().sum() == 0
        if sched.done():
            break
    assert sched.done() and growths >= 6
    final = schedule.ranks()
    assert sum(final.values()) == 18 and max(final.values()) > 1
    overrides = dt.adapters(model)["a"].overrides
    for path, d in deltas(model).items():
        assert d.A.shape[0] == d.B.shape[1] == d.E.shape[0] == final[path], "reserves dropped"
        assert d.config.active_rank == final[path] and d.config.reserved == 0
        assert overrides[path]["reserve"] == 0
    counted = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counted == dt.summary(model).trainable_params
    sched.step()  # finished: nothing changes any more
    assert schedule.ranks() == final


def test_restart_warmup_ramps_the_update_of_joined_entries():
    """Two runs in lockstep, with and without the restart warmup: identical until a growth;
    on the next steps each joined entry moves k/L of the other run's update, the rest alike."""
    length = 3
    runs = []
    for warm in (0, length):
        model = llama_with(CONFIG.replace(restart_warmup=warm))
        opt = optimizer(model)
        runs.append((model, opt, dt.Scheduler(model, opt)))
    data = batches(8)
    step = 0
    for ids in data:  # up to and including the first growth
        step += 1
        for run in runs:
            one_step(*run, ids)
        ranks = [run[2].schedules["a"].ranks() for run in runs]
        if ranks[0] != {p: 1 for p in ranks[0]}:
            break
    assert ranks[0] == ranks[1] and step < len(data)
    (cold, _, _), (warm, _, _) = runs
    for a, b in zip(cold.parameters(), warm.parameters(), strict=True):
        assert torch.equal(a, b), "identical up to the growth"
    before = {k: v.detach().clone() for k, v in warm.named_parameters() if v.requires_grad}
    for run in runs:
        one_step(*run, data[step])
    cold_p, warm_p = dict(cold.named_parameters()), dict(warm.named_parameters())
    joined = 0
    for path, d in deltas(warm).items():
        key = next(k for k in before if k.endswith(f"{path}.deltas.a.E"))
        new = slice(1, d.E.shape[0])  # every layer started at rank 1
        moved_warm = warm_p[key][new] - before[key][new]
        moved_cold = cold_p[key][new] - before[key][new]
        if moved_cold.numel():
            joined += 1
            assert moved_cold.abs().min() > 0
            assert_rel_close(moved_warm, moved_cold / length, 1e-4, "Λ of a joined component")
        assert torch.equal(warm_p[key][:1], cold_p[key][:1]), "Λ in use from the start"
        a_key = key[:-1] + "A"
        assert torch.equal(warm_p[a_key][:d.E.shape[0]], cold_p[a_key][:d.E.shape[0]])
    assert joined > 0


def test_resume_from_a_checkpoint_is_bit_identical(tmp_path):
    config = CONFIG.replace(restart_warmup=3)
    data = batches(16)
    model = llama_with(config)
    opt = optimizer(model)
    sched = dt.Scheduler(model, opt)
    straight = train(model, opt, sched, data)
    assert sched.done()

    first = llama_with(config)
    opt = optimizer(first)
    sched = dt.Scheduler(first, opt)
    losses = train(first, opt, sched, data[:4])
    grown = sched.schedules["a"].total()
    assert 6 < grown < 18, "the checkpoint falls in the middle of the growth"
    assert sched.schedules["a"].warmup, "... and of a restart warmup"
    fresh, opt, sched = checkpoint_and_resume(first, opt, sched, "a", base, optimizer,
                                              tmp_path)
    assert sched.schedules["a"].total() == grown
    losses += train(fresh, opt, sched, data[4:])

    assert all(torch.equal(a, b) for a, b in zip(losses, straight, strict=True))
    ours = dict(fresh.named_parameters())
    for key, p in model.named_parameters():
        assert p.shape == ours[key].shape and torch.equal(p, ours[key]), key


def test_grown_adapter_saves_loads_and_merges(tmp_path):
    model = llama_with()
    opt = optimizer(model)
    sched = dt.Scheduler(model, opt)
    train(model, opt, sched, batches(16))
    assert sched.done()
    model.eval()
    ids = batches(1)[0]
    with torch.no_grad():
        y = model(input_ids=ids).logits
        with dt.disabled(model):
            assert_differs(y, model(input_ids=ids).logits, "the trained adapter acts")
    dt.save(model, tmp_path / "grown", name="a")
    torch.manual_seed(0)
    fresh = zoo.llama().eval()
    dt.load(fresh, tmp_path / "grown")
    assert {p: d.E.shape[0] for p, d in deltas(fresh).items()} == sched.schedules["a"].ranks()
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, y)
    dt.merge(fresh)
    with torch.no_grad():
        assert_rel_close(fresh(input_ids=ids).logits, y, TOL, "merged")
    dt.unmerge(fresh)
    with torch.no_grad():
        assert_rel_close(fresh(input_ids=ids).logits, y, TOL, "unmerged")


def test_without_advance_learning_new_components_are_drawn_at_growth():
    config = IncreLoraConfig(rank=1, target_rank=2, warmup=0, interval=1, top_h=1,
                             advance_learning=False, targets=["0", "2"])
    model = mlp().train()
    dt.inject(model, config, name="a")
    assert all(d.A.shape[0] == 1 for d in deltas(model).values()), "no reserves"
    opt = optimizer(model)
    sched = dt.Scheduler(model, opt)
    x = torch.randn(5, 8)
    model(x).pow(2).sum().backward()
    opt.step()
    sched.step()
    grown = [d for d in deltas(model).values() if d.E.shape[0] == 2]
    assert len(grown) == 1
    d = grown[0]
    assert d.A.shape[0] == 2 and d.E[1].item() == 0 and d.A[1].abs().sum() > 0
    assert opt.state[d.A]["exp_avg"][1].abs().sum() == 0, "a new row has no state"


def test_orthogonality_loss_matches_the_regulariser():
    model = mlp()
    dt.inject(model, IncreLoraConfig(rank=2, orth_reg_weight=0.3, targets=["0", "2"]),
              name="a")
    sched = dt.Scheduler(model)
    terms = []
    for d in deltas(model).values():  # reserves included: they learn orthogonal directions
        terms.append(torch.linalg.norm(d.A @ d.A.T - torch.eye(d.A.shape[0])))
        terms.append(torch.linalg.norm(d.B.T @ d.B - torch.eye(d.B.shape[1])))
    loss = sched.loss()
    assert_rel_close(loss, 0.3 * sum(terms) / 4, 1e-6, "orthogonality")
    assert loss.requires_grad
    model2 = mlp()
    dt.inject(model2, IncreLoraConfig(orth_reg_weight=0, targets=["0"]), name="a")
    assert dt.Scheduler(model2).loss() == 0.0


def test_bad_inputs():
    for kwargs, match in (({"init": "gaussian"}, "own initialisation"),
                          ({"freeze_a": True}, "own initialisation"),
                          ({"target_rank": 0}, "target_rank"), ({"step_rank": 0}, "step_rank"),
                          ({"interval": 0}, "interval"), ({"beta1": 1.0}, "beta1"),
                          ({"reserve": -1}, "reserve"), ({"total_rank": 0}, "total_rank"),
                          ({"orth_reg_weight": -1}, "orth_reg_weight"),
                          ({"restart_warmup": -1}, "restart_warmup")):
        with pytest.raises(dt.ConfigError, match=match):
            IncreLoraConfig(**kwargs)
    model = mlp()
    dt.inject(model, IncreLoraConfig(rank=2, total_rank=3, targets=["0", "2"]), name="a")
    with pytest.raises(dt.ConfigError, match="budget 3"):
        dt.Scheduler(model)
    model = mlp()
    dt.inject(model, IncreLoraConfig(total_rank=11, targets=["0", "2"]), name="a")
    with pytest.raises(dt.ConfigError, match="most they can hold, 10"):
        dt.Scheduler(model)
    model = mlp()
    dt.inject(model, IncreLoraConfig(targets=["0", "2"]), name="a")
    sched = dt.Scheduler(model)
    with pytest.raises(dt.StateError, match="no gradient"):
        sched.step()  # no backward: nothing to score
    state = sched.state_dict()
    state["schedules"]["a"]["paths"] = ["0"]
    with pytest.raises(dt.StateError, match="other layers"):
        sched.load_state_dict(state)
