"""Full fine-tuning as a delta (``W + ΔW``) and the schedules that train part of it: LISA (γ
blocks drawn every K steps, embeddings and head always on) and HFT (half of each category per
stage). Checked: the forward against a dense copy, exactly the drawn modules get gradients and
AdamW state (dropped when they leave), frozen deltas stay bit for bit, draws change only at period
boundaries, bit-identical resume, merge / save / load after training, bad inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune as dt
from deltatune.core.lifecycle import delta_layers
from deltatune.methods.layerwise import FullConfig, HftConfig, LisaConfig
from helpers import assert_differs, assert_rel_close, assert_resume_is_bit_identical, perturb


def llama(seed: int = 0, layers: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        tie_word_embeddings=False))


def data(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(1, 64, (2, 7), generator=g) for _ in range(n)]


def deltas(model, name="d"):
    return {p: layer.deltas[name] for p, layer in delta_layers(model).items()
            if name in layer.deltas}


def optimizer(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                             weight_decay=0.1)


def layer_of(path: str) -> int | None:
    parts = path.split(".")
    return int(parts[2]) if parts[:2] == ["model", "layers"] else None


def train(model, opt, sched, batches, record=None) -> list[torch.Tensor]:
    """A training loop; ``record(step, grads, state)`` sees, before ``sched.step()``, the paths
    whose deltas got gradients and those with AdamW state."""
    model.train()
    losses = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        if record is not None:
            ds = deltas(model)
            record({p for p, d in ds.items() if any(q.grad is not None for q in d.parameters())},
                   {p for p, d in ds.items() if any(q in opt.state for q in d.parameters())})
        sched.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return losses


# ------------------------------------------------------------------------------ the delta
def test_full_delta_is_the_dense_weights_plus_delta_w():
    model = llama(layers=2)
    ids = data(1)[0]
    with torch.no_grad():
        y0 = model(input_ids=ids).logits
    dt.inject(model, FullConfig(), "d")
    perturb(model, scale=0.3)
    dense = llama(layers=2)
    with torch.no_grad():
        for path, d in deltas(model).items():
            for key, value in d.delta.items():
                getattr(dense.get_submodule(path), key).add_(value)
        y, ref = model(input_ids=ids).logits, dense(input_ids=ids).logits
    assert_differs(y, y0, "adapted vs base")
    assert_rel_close(y, ref, 1e-5, "W + ΔW")
    total = sum(p.numel() for p in llama(layers=2).parameters())
    assert dt.summary(model).trainable_params == total, "every weight and bias trains"


# ------------------------------------------------------------------------------------ LISA
def test_lisa_trains_exactly_gamma_blocks_per_period_and_the_outside_always():
    model = dt.inject(llama(), LisaConfig(active_layers=2, interval=3), "d")
    opt = optimizer(model)
    sched = dt.Scheduler(model, opt)
    outside = {p for p in deltas(model) if layer_of(p) is None}
    assert outside == {"model.embed_tokens", "model.norm", "lm_head"}
    seen, draws = [], []

    def record(grads, state):
        layers = {layer_of(p) for p in grads} - {None}
        assert len(layers) == 2, "γ = 2 blocks train"
        every = {p for p in deltas(model) if layer_of(p) in layers}
        assert grads == state == every | outside, "gradients and AdamW state: drawn + outside"
        seen.append(layers)

    before = {p: [q.detach().clone() for q in d.parameters()] for p, d in deltas(model).items()}
    train(model, opt, sched, data(9), record)
    for start in (0, 3, 6):
        assert seen[start] == seen[start + 1] == seen[start + 2], "one draw per period"
        draws.append(seen[start])
    assert len({frozenset(d) for d in draws}) > 1, "the draw changes between periods"
    never = {0, 1, 2, 3} - set().union(*draws)
    for path, d in deltas(model).items():
        same = all(torch.equal(a, b) for a, b in zip(before[path], d.parameters(), strict=True))
        assert same == (layer_of(path) in never), f"{path} trained iff drawn"


def test_lisa_draws_are_uniform_and_can_leave_the_outside_frozen():
    model = dt.inject(llama(), LisaConfig(active_layers=1, interval=1,
                                          train_outside_blocks=False), "d")
    sched = dt.Scheduler(model).schedules["d"]
    counts = dict.fromkeys(range(4), 0)
    for step in range(1, 201):
        trained = {p for p, d in deltas(model).items() if d.delta["weight"].requires_grad}
        layers = {layer_of(p) for p in trained}
        assert len(layers) == 1 and None not in layers
        assert sched.sampled_layers == [("model.layers", *layers)]
        counts[layers.pop()] += 1
        sched.step(step, None)
    assert all(35 <= n <= 65 for n in counts.values()), counts


def test_a_frozen_adapter_stays_frozen_under_a_scheduler(tmp_path):
    trained = dt.inject(llama(layers=2), LisaConfig(), "d")
    dt.save(trained, tmp_path / "d")
    model = dt.load(llama(layers=2), tmp_path / "d")
    sched = dt.Scheduler(model)
    for _ in range(44):
        sched.step()
    assert not any(p.requires_grad for p in model.parameters())


def test_lisa_resumes_bit_identically_mid_period(tmp_path):
    config = LisaConfig(active_layers=1, interval=3, seed=5)
    batches = data(8)
    assert_resume_is_bit_identical(lambda: dt.inject(llama(), config, "d"), llama, optimizer,
                                   "d", batches, train, tmp_path)


def test_after_lisa_training_merge_and_reload_give_the_trained_model(tmp_path):
    model = dt.inject(llama(), LisaConfig(active_layers=1, interval=2), "d")
    opt = optimizer(model)
    train(model, opt, dt.Scheduler(model, opt), data(4))
    model.eval()
    ids = data(5)[-1]
    with torch.no_grad():
        y = model(input_ids=ids).logits
        with dt.disabled(model):
            assert_differs(y, model(input_ids=ids).logits, "trained vs base")
    dt.save(model, tmp_path / "d")
    fresh = llama()
    dt.load(fresh, tmp_path / "d")
    dt.merge(model)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, y)
        assert_rel_close(model(input_ids=ids).logits, y, 1e-5, "merged")


# ------------------------------------------------------------------------------------- HFT
def test_hft_trains_half_of_each_category_per_stage():
    model = dt.inject(llama(layers=2), HftConfig(stage_steps=2, seed=1), "d")
    opt = optimizer(model)
    sched = dt.Scheduler(model, opt)
    groups: dict[str, list[str]] = {}
    for path in deltas(model):
        groups.setdefault(path.rpartition(".")[0], []).append(path)
    assert len(groups["model.layers.0.self_attn"]) == 4 and len(groups["model.layers.0.mlp"]) == 3
    stages = []

    def record(grads, state):
        assert grads == state, "only the drawn half has gradients and AdamW state"
        for group, paths in groups.items():
            n = len(set(paths) & grads)
            assert n in (len(paths) // 2, (len(paths) + 1) // 2), f"{group}: {n} of {len(paths)}"
        stages.append(frozenset(grads))

    train(model, opt, sched, data(8), record)
    assert stages[0] == stages[1] and stages[2] == stages[3] and stages[4] == stages[5]
    assert len(set(stages[::2])) > 1, "a new half every stage"
    share = sum(len(s) for s in stages) / len(stages) / len(deltas(model))
    assert 0.3 < share < 0.7, share


def test_hft_resumes_bit_identically(tmp_path):
    config = HftConfig(stage_steps=3, fraction=0.5, seed=2)
    batches = data(7)

    def small():
        return llama(layers=2)

    assert_resume_is_bit_identical(lambda: dt.inject(small(), config, "d"), small, optimizer,
                                   "d", batches, train, tmp_path)


# ------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize("cls, kwargs, match", [
    (LisaConfig, {"active_layers": 0}, "active_layers"), (LisaConfig, {"interval": 0}, "interval"),
    (LisaConfig, {"train_outside_blocks": "yes"}, "train_outside_blocks"),
    (LisaConfig, {"overrides": {"q_proj": {"interval": 2}}}, "whole adapter"),
    (HftConfig, {"fraction": 0.0}, "fraction"), (HftConfig, {"fraction": 1.5}, "fraction"),
    (HftConfig, {"stage_steps": 0}, "stage_steps"), (HftConfig, {"seed": -1}, "seed"),
    (FullConfig, {"bias": 1}, "bias"),
])
def test_bad_configs_are_refused(cls, kwargs, match):
    with pytest.raises(dt.ConfigError, match=match):
        cls(**kwargs)


def test_lisa_needs_blocks_and_a_matching_schedule_state():
    flat = dt.inject(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), LisaConfig(), "d")
    with pytest.raises(dt.ConfigError, match="no module inside the model's repeated blocks"):
        dt.Scheduler(flat)
    model = dt.inject(llama(layers=2), LisaConfig(), "d")
    sched = dt.Scheduler(model)
    state = sched.state_dict()
    state["schedules"]["d"]["trained"] = ["model.layers.9.mlp.up_proj"]
    with pytest.raises(dt.StateError, match="does not adapt"):
        sched.load_state_dict(state)
