"""Compacter against a naive reference of its equation: W = Σ_i A_i ⊗ (s_i t_iᵀ), with the rules
A_i shared by every layer (tied, counted once, saved once)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from deltatune.core.errors import ConfigError, TargetError
from deltatune.core.lifecycle import delta_layers
from deltatune.methods.compacter import CompacterConfig, phm_weight
from helpers import assert_differs, assert_rel_close, perturb
from zoo import CASES_BY_NAME, run

LLAMA = CASES_BY_NAME["llama"]


def naive_phm(rules, s, t):
    return sum(torch.kron(rules[i], s[i] @ t[i]) for i in range(rules.shape[0]))


@pytest.mark.parametrize("n, p, q, k", [(2, 3, 5, 1), (4, 2, 8, 2), (3, 1, 1, 3)])
def test_phm_weight_is_a_sum_of_kronecker_products(n, p, q, k):
    gen = torch.Generator().manual_seed(n * 10 + k)
    rules = torch.randn(n, n, n, generator=gen)
    s, t = torch.randn(n, p, k, generator=gen), torch.randn(n, k, q, generator=gen)
    assert_rel_close(phm_weight(rules, s, t), naive_phm(rules, s, t), 1e-6, "PHM weight")


def test_forward_matches_the_naive_adapter_with_phm_projections():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    dt.inject(model, CompacterConfig(targets=["0"], phm_dim=2, bottleneck=4, phm_rank=2,
                                     activation="gelu", scale=0.5), name="c")
    x = torch.randn(3, 8)
    with torch.no_grad():
        y0 = model(x)
    assert_rel_close(y0, model[0].base_layer(x), 0.0, "identity at init")
    perturb(model, scale=0.5)
    d = model[0].deltas["c"]
    rules = d.shared.rules
    down = naive_phm(rules, d.down_s, d.down_t)  # (4, 8)
    up = naive_phm(rules, d.up_s, d.up_t)  # (8, 4)
    y = model[0].base_layer(x)
    expected = y + 0.5 * (F.gelu(y @ down.t() + d.down_bias) @ up.t() + d.up_bias)
    with torch.no_grad():
        got = model(x)
    assert_differs(got, y, "perturbed compacter")
    assert_rel_close(got, expected, 1e-6, "h + s·f(h) with PHM projections")


def test_rules_are_shared_counted_once_saved_once_and_trained(tmp_path):
    model = LLAMA.build()
    config = CompacterConfig(targets=["attn", "ffn"], phm_dim=4)
    predicted = dt.cost(model, config)
    dt.inject(model, config, name="c")
    deltas = [layer.deltas["c"] for layer in delta_layers(model).values()]
    assert len(deltas) == 4 and len({id(d.shared.rules) for d in deltas}) == 1
    hidden, r = 32, 4  # reduction 16 → 2, rounded up to phm_dim
    per_layer = (2 * r + 2 * hidden) + r + hidden  # fast factors (k=1) + biases
    assert predicted.params == 4 * per_layer + 4**3
    assert dt.summary(model).trainable_params == predicted.params
    perturb(model, scale=0.1)
    ids = LLAMA.inputs()["input_ids"]
    model(input_ids=ids, labels=ids).loss.backward()
    assert deltas[0].shared.rules.grad is not None and deltas[0].shared.rules.grad.abs().sum() > 0
    y1 = run(model, LLAMA.inputs())
    dt.save(model, tmp_path / "c")
    keys = load_file(str(tmp_path / "c" / "deltatune_model.safetensors"))
    assert sum(k.endswith("shared.rules") for k in keys) == 1
    fresh = LLAMA.build()
    dt.load(fresh, tmp_path / "c")
    again = [layer.deltas["c"] for layer in delta_layers(fresh).values()]
    assert len({id(d.shared.rules) for d in again}) == 1
    with torch.no_grad():
        assert_rel_close(run(fresh, LLAMA.inputs()), y1, 1e-6, "reloaded compacter")


def test_per_layer_rules_without_sharing():
    model = LLAMA.build()
    config = CompacterConfig(targets=["ffn"], phm_dim=2, shared_rules=False)
    dt.inject(model, config, name="c")
    deltas = [layer.deltas["c"] for layer in delta_layers(model).values()]
    assert all(not hasattr(d, "shared") or d.rules is not None for d in deltas)
    assert len({id(d.rules) for d in deltas}) == len(deltas)
    assert dt.cost(LLAMA.build(), config).params == dt.summary(model).trainable_params


def test_compacter_is_far_smaller_than_the_adapter_it_replaces():
    model = LLAMA.build()
    adapter = dt.cost(model, dt.get_method("adapter").config_class(targets=["ffn"],
                                                                    bottleneck=8))
    compacter = dt.cost(model, CompacterConfig(targets=["ffn"], bottleneck=8, phm_dim=4))
    assert compacter.params < adapter.params / 2


def test_bottleneck_is_a_multiple_of_phm_dim():
    assert CompacterConfig(phm_dim=4).bottleneck_for(32) == 4  # 32 // 16 = 2 → 4
    assert CompacterConfig(phm_dim=4, reduction_factor=2).bottleneck_for(40) == 20
    assert CompacterConfig(phm_dim=8, reduction_factor=2).bottleneck_for(40) == 16


@pytest.mark.parametrize("kwargs, match", [
    ({"phm_dim": 0}, "phm_dim"), ({"phm_rank": 1.5}, "phm_rank"),
    ({"shared_rules": "yes"}, "shared_rules"), ({"phm_dim": 4, "bottleneck": 6}, "multiple"),
    ({"activation": "swish"}, "activation"),
])
def test_bad_configs_are_clear_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        CompacterConfig(**kwargs)


def test_width_not_divisible_by_phm_dim_is_a_target_error():
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 5))
    with pytest.raises(TargetError, match="not a multiple of phm_dim=2"):
        dt.inject(model, CompacterConfig(targets=["1"], phm_dim=2))
    dt.inject(model, CompacterConfig(targets=".*", phm_dim=2, bottleneck=2))
    assert list(delta_layers(model)) == ["0"], "a broad selection skips what it cannot adapt"


def test_config_round_trip_keeps_the_method():
    config = CompacterConfig(targets=["ffn"], phm_dim=2, shared_rules=False)
    again = dt.config_from_dict(config.to_dict())
    assert again == config and type(again) is CompacterConfig
