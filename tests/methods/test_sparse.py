"""Sparse deltas (FISH Mask, SPT, SaRA, random): ``W + scatter(indices, values)``.

The calibration statistics against hand-written per-sample / per-batch gradient loops; each
scorer's selection against a naive model-wide top-k; the forward against a dense copy of the
weights with the values scattered in; k-sized gradients and AdamW state; merge / unmerge, files
that hold only indices + values; two tasks' deltas adding up (activated together, merged, and as
task vectors); SaRA's nuclear norm and re-selection, bit-identical resume; bad inputs.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
import zoo
from deltatune import merging
from deltatune.core.calibration import _keys, calibrate, split_top_k
from deltatune.core.geometry import layer_info
from deltatune.core.lifecycle import delta_layers
from deltatune.core.targeting import Matcher
from deltatune.methods.sparse import SparseConfig
from helpers import assert_differs, assert_rel_close, assert_resume_is_bit_identical, perturb

TOL = 1e-6


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 10), nn.GELU(), nn.Linear(10, 6))


def batches(n: int = 3, rows: int = 4, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, 12, generator=gen) for _ in range(n)]


def square(out, batch):
    return out.pow(2).mean()


def deltas(model, name="s"):
    return {p: layer.deltas[name] for p, layer in delta_layers(model).items()
            if name in layer.deltas}


def naive_stat(scorer: str, data) -> dict[str, torch.Tensor]:
    """Squared gradients of a fresh copy, by hand: per sample (Fisher) or per batch (SPT)."""
    ref = mlp()
    sums = {"0": torch.zeros(10, 12), "2": torch.zeros(6, 10)}
    units = [x[i:i + 1] for x in data for i in range(len(x))] if scorer == "fisher" else data
    for x in units:
        ref.zero_grad()
        square(ref(x), x).backward()
        for path in sums:
            sums[path] += ref.get_submodule(path).weight.grad ** 2
    return {p: s / len(units) for p, s in sums.items()}


def naive_selection(scores: dict[str, torch.Tensor], k: int) -> dict[str, set[int]]:
    """Each layer's best entry, then the best ``k − layers`` of all the others (plain Python)."""
    chosen = {p: {int(s.reshape(-1).argmax())} for p, s in scores.items()}
    rest = sorted(((float(v), p, i) for p, s in scores.items()
                   for i, v in enumerate(s.reshape(-1).tolist()) if i not in chosen[p]),
                  reverse=True)
    for _, p, i in rest[:k - len(scores)]:
        chosen[p].add(i)
    return chosen


def selected(model, name="s") -> dict[str, set[int]]:
    return {p: set(d.indices.tolist()) for p, d in deltas(model, name).items()}


# ------------------------------------------------------------------------------ statistics
def test_fisher_and_sensitivity_statistics_equal_naive_gradient_loops():
    model, data = mlp(), batches()
    targets = {p: layer_info(Matcher(model).modules[p]) for p in ("0", "2")}
    stats = calibrate(model, targets, {"fisher", "weight_grad_sq", "weight_grad"}, data,
                      loss_fn=square)
    for scorer, key in (("fisher", "fisher"), ("sensitivity", "weight_grad_sq")):
        ref = naive_stat(scorer, data)
        for path in ("0", "2"):
            assert_rel_close(stats[path][key], ref[path], 1e-5, f"{key} of {path}")
    assert_differs(stats["0"]["fisher"], stats["0"]["weight_grad_sq"], "per sample vs per batch")
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def test_fisher_splits_dict_batches_per_sample_on_a_hf_model():
    torch.manual_seed(0)
    model = zoo.llama()
    ids = torch.randint(1, 96, (3, 7), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids, "labels": ids}
    path = "model.layers.0.self_attn.q_proj"
    stats = calibrate(model, {path: layer_info(model.get_submodule(path))}, {"fisher"}, [batch])
    ref = torch.zeros(32, 32)
    weight = model.get_submodule(path).weight
    for i in range(3):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        (g,) = torch.autograd.grad(model(**one).loss, [weight])
        ref += g ** 2 / 3
    assert_rel_close(stats[path]["fisher"], ref, 1e-5, "per-sample Fisher of a HF model")


# ------------------------------------------------------------------------------- selection
@pytest.mark.parametrize("scorer", ["fisher", "sensitivity"])
def test_data_scorers_select_the_naive_model_wide_top_k(scorer):
    data = batches()
    model = dt.inject(mlp(), SparseConfig(scorer=scorer, density=0.15), "s", data=data,
                      loss_fn=square)
    budget = round(0.15 * 120) + round(0.15 * 60)
    want = naive_selection(naive_stat(scorer, data), budget)
    assert selected(model) == want
    sizes = {p: len(s) for p, s in want.items()}
    assert sizes != {"0": 18, "2": 9}, "the model-wide split differs from the per-layer one"
    assert dt.summary(model).trainable_params == budget == dt.cost(mlp(), SparseConfig(
        scorer=scorer, density=0.15)).params


def test_magnitude_selects_the_smallest_weights_model_wide_without_data():
    model = mlp()
    scores = {p: -model.get_submodule(p).weight.detach().abs() for p in ("0", "2")}
    dt.inject(model, SparseConfig(scorer="magnitude", density=0.2), "s")
    assert selected(model) == naive_selection(scores, 24 + 12)


def test_tensor_scope_keeps_each_layers_own_top_share():
    data = batches()
    model = dt.inject(mlp(), SparseConfig(density=0.1, scope="tensor"), "s", data=data,
                      loss_fn=square)
    ref = naive_stat("fisher", data)
    for path, idx in selected(model).items():
        k = max(1, round(0.1 * ref[path].numel()))
        assert idx == set(ref[path].reshape(-1).topk(k).indices.tolist())


def test_random_masks_are_seeded_per_module():
    def pick(seed):
        return selected(dt.inject(mlp(), SparseConfig(scorer="random", density=0.3, seed=seed),
                                  "s"))
    assert pick(1) == pick(1) != pick(2)
    assert {p: len(s) for p, s in pick(1).items()} == {"0": 36, "2": 18}


def test_the_bisection_split_equals_a_sort():
    gen = torch.Generator().manual_seed(0)
    scores = {"a": torch.randn(50, generator=gen), "b": torch.randn(7, 3, generator=gen) * 1e-3,
              "c": -torch.rand(20, generator=gen)}
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    assert torch.equal(_keys(flat).argsort(stable=True), flat.argsort(stable=True))
    for k in (3, 4, 30, 91):
        counts = split_top_k(scores, k)
        assert counts == {p: len(v) for p, v in naive_selection(scores, k).items()}
    assert split_top_k(iter(scores.items()), 30) == split_top_k(scores, 30)
    assert split_top_k({"a": torch.zeros(4), "b": torch.zeros(4)}, 5) == {"a": 4, "b": 1}
    for k in (2, 92):
        with pytest.raises(ValueError, match="budget"):
            split_top_k(scores, k)


# --------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("case", ["mlp", "conv", "embedding", "gpt2"])
def test_forward_equals_the_dense_weights_plus_the_scattered_values(case):
    case = next(c for c in zoo.CASES if c.name == case)
    model, inputs = case.build(), case.inputs()
    with torch.no_grad():
        y0 = zoo.run(model, inputs)
    dt.inject(model, SparseConfig(scorer="random", density=0.2), "s")
    perturb(model, scale=0.5)
    dense = case.build()
    with torch.no_grad():
        for path, d in deltas(model).items():
            w = dense.get_submodule(path).weight.view(-1)
            for i, v in zip(d.indices.tolist(), d.values.tolist(), strict=True):
                w[i] += v
        y, ref = zoo.run(model, inputs), zoo.run(dense, inputs)
    assert_differs(y, y0, "adapted vs base")
    assert_rel_close(y, ref, 1e-5, "W + scatter(values)")


def test_gradients_and_adamw_state_are_k_sized():
    model = dt.inject(mlp(), SparseConfig(density=0.05), "s", data=batches(), loss_fn=square)
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1e-2)
    square(model(batches(1)[0]), None).backward()
    opt.step()
    sizes = {p: d.values.numel() for p, d in deltas(model).items()}
    assert sum(sizes.values()) == 6 + 3 and all(p.grad.numel() == p.numel() for p in trained)
    assert len(opt.state) == len(trained) == 2
    for p, state in opt.state.items():
        assert state["exp_avg"].numel() == state["exp_avg_sq"].numel() == p.numel()
    assert sorted(p.numel() for p in trained) == sorted(sizes.values())


# ------------------------------------------------------------------- merge, files, tasks
def test_merge_adds_exactly_the_values_and_unmerge_restores():
    model = dt.inject(mlp(), SparseConfig(scorer="magnitude", density=0.1), "s")
    perturb(model, scale=0.5)
    before = {p: model.get_submodule(p).weight.detach().clone() for p in ("0", "2")}
    dt.merge(model)
    for path, d in deltas(model).items():
        change = model.get_submodule(path).weight.detach().reshape(-1) - before[path].reshape(-1)
        assert torch.equal(change.nonzero().reshape(-1), d.indices.long())
        assert_rel_close(change[d.indices.long()], d.values, TOL, "merged values")
    dt.unmerge(model)
    for path, w in before.items():
        assert_rel_close(model.get_submodule(path).weight, w, TOL, "unmerged")


def test_saved_file_holds_indices_and_values_only_and_loads_without_data(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 48))
    x = torch.randn(6, 64)
    dt.inject(model, SparseConfig(density=0.01), "s", data=[x], loss_fn=square)
    perturb(model, scale=0.5)
    with torch.no_grad():
        y = model(x)
    dt.save(model, tmp_path / "s")
    tensors = load_file(str(tmp_path / "s" / "deltatune_model.safetensors"))
    assert set(tensors) == {f"{p}.{k}" for p in ("0", "2") for k in ("indices", "values")}
    assert tensors["0.indices"].dtype == torch.int32
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    dense = (64 * 64 + 64 * 48) * 4
    assert stored == 8 * (41 + 31) and stored < 0.03 * dense
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 48))
    dt.load(fresh, tmp_path / "s")
    with torch.no_grad():
        assert torch.equal(fresh(x), y)


def test_two_tasks_add_up_activated_merged_and_as_task_vectors():
    model = mlp()
    x = batches(1, rows=5, seed=9)[0]
    with torch.no_grad():
        y0 = model(x)
    dt.inject(model, SparseConfig(density=0.1), "a", data=batches(seed=3), loss_fn=square)
    dt.inject(model, SparseConfig(scorer="sensitivity", density=0.1), "b",
              data=batches(seed=4), loss_fn=lambda o, b: (o - 1).pow(2).mean())
    for name, seed in (("a", 1), ("b", 2)):
        perturb(model, name, scale=0.5, seed=seed)
    assert selected(model, "a") != selected(model, "b"), "two tasks choose other entries"
    dense = mlp()
    with torch.no_grad():
        for name in "ab":
            for path, d in deltas(model, name).items():
                dense.get_submodule(path).weight.view(-1).index_add_(
                    0, d.indices.long(), d.values)
    dt.activate(model, ["a", "b"])
    with torch.no_grad():
        both, ref = model(x), dense(x)
        assert_differs(both, y0, "a + b vs base")
        assert_rel_close(both, ref, 1e-5, "a and b active")
        summed = merging.combine(merging.task_vectors(model, ["a", "b"]), "linear")
        assert_rel_close(merging.apply_delta(mlp(), summed)(x), ref, 1e-5, "task arithmetic")
        dt.merge(model)
        assert_rel_close(model(x), ref, 1e-5, "both merged")


# ----------------------------------------------------------------------------------- SaRA
def test_nuclear_norm_regulariser_reads_one_drawn_layer():
    model = dt.inject(mlp(), SparseConfig(scorer="magnitude", density=0.3, nuclear_weight=0.5),
                      "s")
    perturb(model, scale=0.5)
    sched = dt.Scheduler(model)
    seen = set()
    for _ in range(8):
        layer = sched.schedules["s"].layer
        seen.add(layer)
        d = deltas(model)[layer]
        dense = torch.zeros(d.info.weight_shape).view(-1)
        dense[d.indices.long()] = d.values.detach()
        ref = 0.5 * torch.linalg.svdvals(dense.view(d.info.weight_shape)).sum()
        loss = sched.loss()
        assert_rel_close(loss, ref, 1e-5, "λ ‖Δ‖_*")
        loss.backward()
        assert all((d.values.grad is not None) == (p == layer)
                   for p, d in deltas(model).items())
        model.zero_grad()
        sched.step()
    assert seen == {"0", "2"}
    plain = dt.inject(mlp(), SparseConfig(scorer="magnitude"), "s")
    assert dt.Scheduler(plain).loss() == 0.0


def test_reselection_keeps_delta_moves_state_and_picks_smallest_current_weights(tmp_path):
    model = dt.inject(mlp(), SparseConfig(scorer="magnitude", density=0.2, reselect_every=2),
                      "s")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    sched = dt.Scheduler(model, opt)
    x = batches(1)[0]
    for step in range(1, 3):
        square(model(x), None).backward()
        opt.step()
        if step == 2:
            with torch.no_grad():
                y_before = model(x)
            old = {p: (d.indices.clone(), d.values.detach().clone(),
                       opt.state[d.values]["exp_avg"].clone()) for p, d in deltas(model).items()}
        sched.step()
        opt.zero_grad()
    with torch.no_grad():
        assert torch.equal(model(x), y_before), "re-selection leaves W + Δ unchanged"
    for path, d in deltas(model).items():
        idx, values, avg = old[path]
        w = model.get_submodule(path).weight.detach().reshape(-1).clone()
        w[idx.long()] += values
        k = values.numel()
        assert set(d.indices.tolist()) == set((-w.abs()).topk(k).indices.tolist())
        assert d.indices.numel() == k and d.num_frozen > 0, "some trained entries left"
        was = dict(zip(idx.tolist(), zip(values.tolist(), avg.tolist(), strict=True),
                       strict=True))
        state = opt.state[d.values]["exp_avg"]
        for j, i in enumerate(d.indices.tolist()):
            value, moment = was.get(i, (0.0, 0.0))
            assert d.values[j].item() == value and state[j].item() == moment
        assert set(d.frozen_indices.tolist()) == set(idx.tolist()) - set(d.indices.tolist())
        assert d.config.frozen == d.num_frozen
    dt.save(model, tmp_path / "s")
    fresh = mlp()
    dt.load(fresh, tmp_path / "s")
    with torch.no_grad():
        assert torch.equal(fresh(x), y_before)


def test_a_frozen_adapter_is_left_alone_by_its_schedule(tmp_path):
    config = SparseConfig(scorer="magnitude", density=0.2, reselect_every=1, nuclear_weight=1.0)
    model = dt.inject(mlp(), config, "s")
    perturb(model, scale=0.5)
    dt.save(model, tmp_path / "s")
    frozen = dt.load(mlp(), tmp_path / "s")
    before = {p: d.indices.clone() for p, d in deltas(frozen).items()}
    sched = dt.Scheduler(frozen)
    for _ in range(3):
        assert sched.loss() == 0.0
        sched.step()
    assert all(torch.equal(d.indices, before[p]) for p, d in deltas(frozen).items())


def test_sara_training_resumes_bit_identically(tmp_path):
    config = SparseConfig(scorer="magnitude", density=0.05, reselect_every=3,
                          nuclear_weight=0.01, targets=["q_proj", "v_proj", "down_proj"])
    data = [torch.randint(1, 96, (2, 9), generator=torch.Generator().manual_seed(i))
            for i in range(8)]

    def base():
        torch.manual_seed(0)
        return zoo.llama()

    def build():
        return dt.inject(base(), config, "s")

    def make_opt(model):
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def train(model, opt, sched, part):
        out = []
        for ids in part:
            loss = model(input_ids=ids, labels=ids).loss + sched.loss()
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            out.append(loss.detach())
        return out

    fresh = assert_resume_is_bit_identical(build, base, make_opt, "s", data, train, tmp_path)
    assert any(d.num_frozen for d in deltas(fresh).values())


# ---------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("kwargs, match", [
    ({"density": 0.0}, "density"), ({"density": 1.5}, "density"), ({"density": True}, "density"),
    ({"scorer": "hessian"}, "scorer must be one of"), ({"scope": "layer"}, "scope"),
    ({"entries": 0}, "entries"), ({"reselect_every": 5}, "scorer='magnitude'"),
    ({"scorer": "magnitude", "reselect_every": 0}, "reselect_every"),
    ({"nuclear_weight": -1.0}, "nuclear_weight"), ({"nuclear_weight": math.inf}, "nuclear"),
    ({"overrides": {"0": {"scorer": "random"}}}, "whole adapter"),
])
def test_bad_configs_are_refused(kwargs, match):
    with pytest.raises(dt.ConfigError, match=match):
        SparseConfig(**kwargs)


def test_data_errors_are_clear_and_leave_the_model_unchanged():
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(dt.ConfigError, match="pass data="):
        dt.inject(model, SparseConfig(scorer="fisher"), "s")
    with pytest.raises(dt.ConfigError, match="does not initialise from data with this config"):
        dt.inject(model, SparseConfig(scorer="magnitude"), "s", data=batches())
    with pytest.raises(dt.ConfigError, match="no tensor with one"):
        dt.inject(model, SparseConfig(), "s", data=[{"x": 1.0}], loss_fn=square)
    with pytest.raises(dt.ConfigError, match="exceeds"):
        dt.inject(model, SparseConfig(scorer="random", overrides={"2": {"entries": 61}}), "s")
    with pytest.raises(dt.ConfigError, match="not finite"):
        dt.inject(model, SparseConfig(), "s", data=batches(),
                  loss_fn=lambda o, b: o.pow(2).mean() * math.inf)
    assert dt.adapters(model) == {}
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
