"""GaLore (``deltatune.optim``) against a plain reference of the paper's Algorithm 2.

The reference below is GaLore-Adam written out by hand — SVD projector refreshed every ``T``
steps, Adam's moments on the projected gradient, the normalised step projected back and scaled —
and the wrapper (around ``torch.optim.Adam`` / ``AdamW`` / ``SGD``) must follow it step by step.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.methods.adapter import AdapterConfig
from deltatune.optim import GaLore
from helpers import rel_err

LR, BETAS, EPS = 1e-2, (0.9, 0.99), 1e-8


def problem(m: int, n: int, seed: int = 0):
    """A least-squares loss on one ``(m, n)`` matrix: ``‖X Wᵀ − Y‖² / k``."""
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(32, n, generator=gen), torch.randn(32, m, generator=gen)
    w0 = torch.randn(m, n, generator=gen) / math.sqrt(n)
    return w0, lambda w: (x @ w.T - y).pow(2).sum(-1).mean()


def gradient(loss, w: torch.Tensor) -> torch.Tensor:
    w = w.detach().requires_grad_(True)
    loss(w).backward()
    return w.grad


def reference(w0, loss, steps, *, rank, gap, scale, side, lrs, weight_decay=0.0,
              momentum=None):
    """GaLore, Algorithm 2 of Zhao et al. (2024), plainly: Adam (or, with ``momentum``, SGD
    with momentum) on ``R_t = P_tᵀ G_t`` (or ``G_t Q_tᵀ`` on the right), ``W -= η α P_t N_t``,
    decoupled weight decay on the full matrix first."""
    w, m, v = w0.clone(), None, None
    for t in range(steps):
        g = gradient(loss, w)
        if t % gap == 0:
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            p = u[:, :rank] if side == "left" else vh[:rank]
        r = p.T @ g if side == "left" else g @ p.T
        if momentum is not None:  # SGD with momentum: N_t = buffer
            m = r.clone() if m is None else momentum * m + r
            n = m
        else:
            if m is None:
                m, v = torch.zeros_like(r), torch.zeros_like(r)
            m = BETAS[0] * m + (1 - BETAS[0]) * r
            v = BETAS[1] * v + (1 - BETAS[1]) * r * r
            m_hat, v_hat = m / (1 - BETAS[0] ** (t + 1)), v / (1 - BETAS[1] ** (t + 1))
            n = m_hat / (v_hat.sqrt() + EPS)
        w = w * (1 - lrs[t] * weight_decay)
        w = w - lrs[t] * scale * (p @ n if side == "left" else n @ p)
    return w


def train(optimizer, param, loss, steps, scheduler=None):
    for _ in range(steps):
        loss(param).backward()
        optimizer.step()
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()
    return param.detach()


# ------------------------------------------------------------------------- the algorithm
@pytest.mark.parametrize(("shape", "proj_type", "side"), [
    ((6, 10), "std", "left"), ((10, 6), "std", "right"),
    ((8, 8), "left", "left"), ((8, 8), "right", "right")])
def test_matches_algorithm_2_over_a_projector_refresh(shape, proj_type, side):
    w0, loss = problem(*shape)
    steps, kw = 7, {"rank": 3, "gap": 3, "scale": 0.25}  # refreshes at t = 0, 3, 6
    want = reference(w0, loss, steps, side=side, lrs=[LR] * steps, **kw)
    param = nn.Parameter(w0.clone())
    opt = GaLore([param], torch.optim.Adam, rank=3, update_proj_gap=3, scale=0.25,
                 proj_type=proj_type, lr=LR, betas=BETAS, eps=EPS)
    got = train(opt, param, loss, steps)
    dense = nn.Parameter(w0.clone())
    plain = train(torch.optim.Adam([dense], lr=LR * 0.25, betas=BETAS, eps=EPS), dense, loss,
                  steps)
    assert rel_err(got, w0) > 1e-3 and rel_err(got, plain) > 1e-3, "the test would be vacuous"
    assert rel_err(got, want) < 1e-5
    assert opt.state[param]["step"] == steps


def test_weight_decay_is_decoupled_on_the_full_matrix():
    w0, loss = problem(6, 10, seed=1)
    want = reference(w0, loss, 5, rank=2, gap=2, scale=0.5, side="left", lrs=[LR] * 5,
                     weight_decay=0.3)
    param = nn.Parameter(w0.clone())
    opt = GaLore([param], torch.optim.AdamW, rank=2, update_proj_gap=2, scale=0.5, lr=LR,
                 betas=BETAS, eps=EPS, weight_decay=0.3)
    assert rel_err(train(opt, param, loss, 5), want) < 1e-5


def test_wraps_any_optimizer_sgd_momentum():
    w0, loss = problem(10, 6, seed=2)
    want = reference(w0, loss, 6, rank=2, gap=4, scale=1.0, side="right", lrs=[LR] * 6,
                     momentum=0.9)
    param = nn.Parameter(w0.clone())
    opt = GaLore([param], torch.optim.SGD, rank=2, update_proj_gap=4, scale=1.0, lr=LR,
                 momentum=0.9)
    assert rel_err(train(opt, param, loss, 6), want) < 1e-5
    buffer = opt.inner.state[opt.inner.param_groups[0]["params"][0]]["momentum_buffer"]
    assert buffer.shape == (10, 2)


def test_lr_scheduler_drives_the_learning_rate():
    w0, loss = problem(6, 10, seed=3)
    lrs = [LR * 0.5 ** t for t in range(6)]
    want = reference(w0, loss, 6, rank=3, gap=2, scale=0.25, side="left", lrs=lrs)
    param = nn.Parameter(w0.clone())
    opt = GaLore([param], torch.optim.Adam, rank=3, update_proj_gap=2, lr=LR, betas=BETAS,
                 eps=EPS)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 ** t)
    got = train(opt, param, loss, 6, sched)
    assert rel_err(got, want) < 1e-5
    assert opt.inner.param_groups[0]["lr"] == pytest.approx(lrs[-1])


# ------------------------------------------------------------------------- memory, groups
def test_optimizer_state_is_rank_sized():
    weight = nn.Parameter(torch.randn(64, 48))
    bias = nn.Parameter(torch.randn(64))
    opt = GaLore([weight, bias], rank=4, lr=1e-3)
    (weight.sum() ** 2 + bias.pow(2).sum()).backward()
    opt.step()
    assert opt.is_projected(weight) and not opt.is_projected(bias)
    shadow = opt.inner.param_groups[0]["params"][0]
    moments = [t for t in opt.inner.state[shadow].values() if t.numel() > 1]
    assert len(moments) == 2 and all(t.numel() == 64 * 4 for t in moments)
    assert opt.state[weight]["projector"].numel() == 4 * 48
    galore = sum(t.numel() for s in (opt.state, opt.inner.state) for st in s.values()
                 for t in st.values() if torch.is_tensor(t) and t.numel() > 1)
    assert galore < 2 * 64 * 48 / 4, "GaLore's state should be a fraction of Adam's 2·m·n"
    assert opt.inner.state[bias]["exp_avg"].shape == (64,), "biases are optimised as they are"


def test_param_groups_and_unprojected_matrices():
    """A group with rank=None and a matrix whose reduced side is ≤ rank are optimised as they
    are: bit for bit what the inner optimizer alone does with them."""
    w0, loss = problem(10, 12, seed=4)
    small = torch.randn(3, 20)
    a, b, c = nn.Parameter(w0.clone()), nn.Parameter(small.clone()), nn.Parameter(w0.clone())
    opt = GaLore([{"params": [a, b]}, {"params": [c], "rank": None, "lr": 0.5 * LR}],
                 torch.optim.AdamW, rank=4, lr=LR)
    assert opt.is_projected(a) and not opt.is_projected(b) and not opt.is_projected(c)
    b_ref, c_ref = nn.Parameter(small.clone()), nn.Parameter(w0.clone())
    ref = torch.optim.AdamW([{"params": [b_ref]}, {"params": [c_ref], "lr": 0.5 * LR}], lr=LR)
    for _ in range(3):
        (loss(a) + b.pow(3).sum() + loss(c)).backward()
        (b_ref.pow(3).sum() + loss(c_ref)).backward()
        for opt_ in (opt, ref):
            opt_.step()
            opt_.zero_grad()
    assert torch.equal(b, b_ref) and torch.equal(c, c_ref)
    assert not torch.equal(a, w0)


def test_resume_is_bit_identical():
    model = tiny_mlp()
    x, y = data()

    def make(m):
        return GaLore(m.parameters(), rank=2, update_proj_gap=3, lr=1e-2, weight_decay=0.1)

    def steps(m, opt, n):
        for _ in range(n):
            nn.functional.mse_loss(m(x), y).backward()
            opt.step()
            opt.zero_grad()

    opt = make(model)
    steps(model, opt, 4)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    steps(model, opt, 5)  # crosses refreshes at steps 6 and 9

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # plain tensors and numbers, no pickle
    resumed = tiny_mlp(seed=99)
    resumed.load_state_dict(saved["model"])
    opt2 = make(resumed)
    opt2.load_state_dict(saved["opt"])
    steps(resumed, opt2, 5)
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)

    copied = copy.deepcopy({"model": resumed, "opt": opt2})  # a deep copy continues alike
    steps(resumed, opt2, 2)
    steps(copied["model"], copied["opt"], 2)
    for p, q in zip(copied["model"].parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


# ------------------------------------------------------------------------- real training
def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                         nn.Linear(32, 4))


def data():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(64, 16, generator=gen)
    return x, torch.sin(x[:, :4] * 2) + x[:, 4:8] ** 2


def fit(model, opt, steps=40):
    x, y = data()
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_trains_full_weights_of_a_tiny_mlp():
    model = tiny_mlp()
    opt = GaLore(model.parameters(), rank=4, update_proj_gap=10, scale=1.0, lr=1e-2)
    assert opt.is_projected(model[0].weight) and not opt.is_projected(model[4].weight)
    losses = fit(model, opt)
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("config", [
    dt.LoraConfig(rank=8, targets=["0", "2", "4"]),
    AdapterConfig(bottleneck=8, targets=["0", "2"])], ids=["lora", "adapter"])
def test_trains_deltas(config):
    model = tiny_mlp()
    dt.inject(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = GaLore(model.parameters(), rank=2, update_proj_gap=10, scale=1.0, lr=2e-2)
    projected = [p for p in model.parameters() if opt.is_projected(p)]
    assert projected and all(p.dim() == 2 and any(p is q for q in params) for p in projected), \
        "trained matrices are projected; the frozen base gets no shadow"
    frozen = {k: p.detach().clone() for k, p in model.named_parameters() if not p.requires_grad}
    losses = fit(model, opt)
    assert losses[-1] < 0.8 * losses[0]
    now = dict(model.named_parameters())
    assert frozen and all(torch.equal(now[k], v) for k, v in frozen.items()), "only deltas train"


# ------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"rank": 0}, "rank must be a positive integer"),
    ({"rank": -2}, "rank must be a positive integer"),
    ({"rank": 2.5}, "rank must be a positive integer"),
    ({"rank": True}, "rank must be a positive integer"),
    ({"proj_type": "full"}, "proj_type must be one of"),
    ({"update_proj_gap": 0}, "update_proj_gap must be a positive integer"),
    ({"scale": float("nan")}, "scale must be a finite number"),
    ({"rank": 8}, "projects nothing.*largest reduced side: 8"),
])
def test_bad_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GaLore([nn.Parameter(torch.randn(8, 20)), nn.Parameter(torch.randn(8))], **kwargs)


def test_bad_inner_and_groups_raise():
    weight = nn.Parameter(torch.randn(8, 20))
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        GaLore([weight], inner=lambda params, **kw: object(), rank=2)
    opt = GaLore([weight], rank=2)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(8, 20))], "rank": 0})
    assert len(opt.param_groups) == len(opt.inner.param_groups) == 1, "nothing half-added"
    extra = nn.Parameter(torch.randn(20, 8))
    opt.add_param_group({"params": [extra], "lr": 1e-4})
    assert opt.is_projected(extra) and opt.inner.param_groups[1]["lr"] == 1e-4


def test_loading_a_mismatched_state_raises():
    weight = nn.Parameter(torch.randn(8, 20))
    weight.grad = torch.randn(8, 20)
    opt = GaLore([weight], rank=2)
    opt.step()
    with pytest.raises(ValueError, match="other param groups or GaLore settings"):
        GaLore([weight], rank=3).load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="not a GaLore state dict"):
        GaLore([weight], rank=2).load_state_dict(torch.optim.AdamW([weight]).state_dict())


@pytest.mark.slow
def test_eight_bit_inner_optimizer_from_torchao():
    """The paper's 8-bit GaLore: torchao's 8-bit AdamW in the low-rank space (it keeps its
    ``lr`` as a tensor, which the scheduler-facing float is copied into)."""
    optim = pytest.importorskip("torchao.optim")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 64))
    opt = GaLore(model.parameters(), optim.AdamW8bit, rank=16, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.9 ** t)
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(64, 256, generator=gen), torch.randn(64, 64, generator=gen)
    losses = []
    for _ in range(20):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    shadow = opt.inner.param_groups[0]["params"][0]
    assert shadow.shape == (256, 16)
    assert any(type(t).__name__ == "OptimState8bit" for t in opt.inner.state[shadow].values())
    assert float(opt.inner.param_groups[0]["lr"]) == pytest.approx(1e-2 * 0.9 ** 19, rel=1e-6)
