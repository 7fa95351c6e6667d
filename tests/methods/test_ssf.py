"""SSF against a naive reference of its equation, y ← γ ⊙ y + β per output channel, on every
layer type it adapts; the exact re-parameterisation on merge (W' = diag(γ) W, b' = γ ⊙ b + β,
created biases, norms), unmerge and its refusal at γ ≈ 0, the refusal of norms without a bias,
composition of two deltas, the N(1, σ) / N(0, σ) init, counts, save / load and training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.pytorch_utils import Conv1D

import deltatune as dt
import zoo
from deltatune.core.lifecycle import delta_layers
from deltatune.methods.ssf import SSFConfig
from helpers import assert_differs, assert_rel_close, base_tensors, perturb


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def ssf(y: Tensor, gamma: Tensor, beta: Tensor, channel_dim: int = -1) -> Tensor:
    """γ ⊙ y + β with γ, β broadcast along ``channel_dim``."""
    shape = [1] * y.dim()
    shape[channel_dim] = -1
    return y * gamma.view(shape) + beta.view(shape)


LAYERS = [
    # (make, input shape, base forward by hand, channel dim of the output)
    (lambda: nn.Linear(6, 4), (2, 3, 6), lambda m, x: x @ m.weight.T + m.bias, -1),
    (lambda: nn.Linear(6, 4, bias=False), (3, 6), lambda m, x: x @ m.weight.T, -1),
    (lambda: Conv1D(4, 6), (3, 6), lambda m, x: x @ m.weight + m.bias, -1),
    (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (2, 3, 7, 7),
     lambda m, x: F.conv2d(x, m.weight, m.bias, stride=2, padding=1), 1),
    (lambda: nn.Conv1d(3, 4, 3, bias=False), (2, 3, 8), lambda m, x: F.conv1d(x, m.weight), 1),
    (lambda: nn.Conv3d(2, 3, 2), (1, 2, 3, 3, 3), lambda m, x: F.conv3d(x, m.weight, m.bias), 1),
    (lambda: nn.LayerNorm(4), (3, 4),
     lambda m, x: F.layer_norm(x, (4,), m.weight, m.bias, m.eps), -1),
    (lambda: nn.LayerNorm(4, bias=False), (3, 4),
     lambda m, x: F.layer_norm(x, (4,), m.weight, None, m.eps), -1),
    (lambda: nn.GroupNorm(2, 4), (2, 4, 5),
     lambda m, x: F.group_norm(x, 2, m.weight, m.bias, m.eps), 1),
    (lambda: nn.BatchNorm2d(4, track_running_stats=False), (3, 4, 2, 2),
     lambda m, x: F.batch_norm(x, None, None, m.weight, m.bias, True, 0.0, m.eps), 1),
]
IDS = ["linear", "linear-no-bias", "hf-conv1d", "conv2d", "conv1d-no-bias", "conv3d",
       "layernorm", "layernorm-no-bias", "groupnorm", "batchnorm"]


def adapted(make, **config) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = nn.Sequential(make())
    dt.inject(model, SSFConfig(targets=["0"], **config), name="a")
    perturb(model, scale=0.3)
    return model, model[0].deltas["a"]


@pytest.mark.parametrize("make, shape, base_fn, dim", LAYERS, ids=IDS)
def test_scale_and_shift_every_layer_type(make, shape, base_fn, dim):
    model, delta = adapted(make)
    x = torch.randn(*shape)
    base = model[0].base_layer
    with torch.no_grad():
        y = base_fn(base, x)
        expected = ssf(y, delta.gamma, delta.beta, dim)
        assert_differs(expected, y)
        assert_rel_close(model(x), expected, 1e-6, "γ ⊙ y + β")


@pytest.mark.parametrize("make, shape, base_fn, dim", LAYERS, ids=IDS)
def test_merge_reparameterises_the_layer_exactly(make, shape, base_fn, dim):
    model, delta = adapted(make)
    x = torch.randn(*shape)
    base = model[0].base_layer
    gamma, beta = delta.gamma.detach(), delta.beta.detach()
    w0 = base.weight.detach().clone()
    b0 = None if base.bias is None else base.bias.detach().clone()
    keys = set(model.state_dict())
    with torch.no_grad():
        expected = model(x)
        dt.merge(model)
        # W' = diag(γ) W per output channel: dim 0 of Linear / Conv / norm weights, the last
        # dim of HF Conv1D's (in, out) weight.
        out_dim = -1 if isinstance(base, Conv1D) else 0
        assert_rel_close(base.weight, ssf(w0, gamma, torch.zeros_like(beta), out_dim), 1e-7,
                         "W' = diag(γ) W")
        assert_rel_close(base.bias, beta if b0 is None else gamma * b0 + beta, 1e-7,
                         "b' = γ ⊙ b + β")
        assert_rel_close(model(x), expected, 1e-5, "merged")
        dt.unmerge(model)
        assert_rel_close(base.weight, w0, 1e-6, "restored weight")
        if b0 is None:
            assert base.bias is None and set(model.state_dict()) == keys
        else:
            assert_rel_close(base.bias, b0, 1e-6, "restored bias")
        assert_rel_close(model(x), expected, 1e-5, "unmerged")
        plain = dt.unload(model, merge=True)
        assert_rel_close(plain(x), expected, 1e-5, "unloaded")


def test_two_deltas_compose_as_affine_maps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4))
    x = torch.randn(3, 5)
    y = model(x)
    dt.inject(model, SSFConfig(targets=["0"]), name="a")
    dt.inject(model, SSFConfig(targets=["0"]), name="b")
    perturb(model, "a", seed=1, scale=0.3)
    perturb(model, "b", seed=2, scale=0.3)
    a, b = model[0].deltas["a"], model[0].deltas["b"]
    with torch.no_grad():
        expected = ssf(ssf(y, a.gamma, a.beta), b.gamma, b.beta)  # b after a
        assert_rel_close(model(x), expected, 1e-6, "γb ⊙ (γa ⊙ y + βa) + βb")
        dt.merge(model)
        assert_rel_close(model(x), expected, 1e-6, "both merged")
        with pytest.raises(dt.MergeError, match="do not commute"):
            dt.unmerge(model, "a")  # b was folded in after a
        dt.unmerge(model, "b")
        assert_rel_close(model(x), expected, 1e-6, "a merged, b not")
        dt.unmerge(model)
        assert_rel_close(model(x), expected, 1e-6, "unmerged")


def test_unmerge_refuses_a_zero_scale():
    model, delta = adapted(lambda: nn.Linear(4, 3))
    x = torch.randn(2, 4)
    with torch.no_grad():
        delta.gamma[1] = 0.0
        expected = model(x)
        dt.merge(model)
        merged = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(dt.MergeError, match=r"\|γ\| < 0.0001 in 1 channel\(s\) "
                                                r"\(e.g. channel 1"):
            dt.unmerge(model)
    assert dt.merged_adapters(model) == ["a"], "nothing was changed"
    assert all(torch.equal(v, merged[k]) for k, v in model.state_dict().items())
    assert_rel_close(model(x), expected, 1e-6, "still merged")


def test_norms_without_a_bias_are_refused():
    model = nn.Sequential(LlamaRMSNorm(4), nn.Linear(4, 4))
    with pytest.raises(dt.TargetError, match="LlamaRMSNorm has no bias, so SSF's shift β could "
                                             "not be folded .* target the Linear layers"):
        dt.inject(model, SSFConfig(targets=["0"]), name="a")
    dt.inject(model, SSFConfig(targets=".*"), name="a")  # a broad selection skips it
    assert list(delta_layers(model)) == ["1"]

    llama = zoo.CASES_BY_NAME["llama"].build()
    dt.inject(llama, SSFConfig(targets=".*"), name="a")
    assert len(delta_layers(llama)) == 7 * 2 + 1, "every Linear (lm_head too), no RMSNorm"


def test_default_targets_are_all_linear_and_regex_adds_norms():
    case = zoo.CASES_BY_NAME["bert"]
    model = dt.inject(case.build(), SSFConfig(), name="a")
    lora = dt.inject(case.build(), dt.LoraConfig(), name="a")
    assert set(delta_layers(model)) == set(delta_layers(lora))
    everything = dt.inject(case.build(), SSFConfig(targets=".*"), name="a")
    extra = set(delta_layers(everything)) - set(delta_layers(model))
    assert extra == {"bert.embeddings.LayerNorm", "classifier",
                     *(f"bert.encoder.layer.{i}.{p}.LayerNorm"
                       for i in range(2) for p in ("attention.output", "output"))}


@pytest.mark.parametrize("case", ["llama", "gpt2", "vit", "conv"])
def test_trainable_count_is_two_per_channel(case):
    model = zoo.CASES_BY_NAME[case].build()
    config = SSFConfig(targets=".*")
    planned = dt.cost(model, config)
    dt.inject(model, config, name="a")
    channels = sum(layer.info.out_dim for layer in delta_layers(model).values())
    assert trainable(model) == planned.params == 2 * channels == dt.summary(model).trainable_params


def test_init_std_draws_scale_and_shift_around_identity():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4000))
    x = torch.randn(2, 8)
    y0 = model(x)
    dt.inject(model, SSFConfig(targets=["0"], init_std=0.02), name="a")
    delta = model[0].deltas["a"]
    assert abs(delta.gamma.mean().item() - 1) < 2e-3 and abs(delta.gamma.std().item() - .02) < 2e-3
    assert abs(delta.beta.mean().item()) < 2e-3 and abs(delta.beta.std().item() - .02) < 2e-3
    assert_differs(model(x), y0, "not the identity at init")
    dt.inject(model, SSFConfig(targets=["0"]), name="b")
    assert torch.equal(model[0].deltas["b"].gamma, torch.ones(4000))
    assert torch.equal(model[0].deltas["b"].beta, torch.zeros(4000))


@pytest.mark.parametrize("std", [-0.1, float("nan"), float("inf"), True, "0.02"])
def test_config_is_validated(std):
    with pytest.raises(dt.ConfigError, match="init_std must be a finite number >= 0"):
        SSFConfig(init_std=std)


def test_bf16_base_merges_within_tolerance():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8)).to(torch.bfloat16)
    dt.inject(model, SSFConfig(targets=["0"]), name="a")
    perturb(model, scale=0.1)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        y = model(x)
        dt.merge(model)
        assert model[0].base_layer.weight.dtype == torch.bfloat16
        assert_rel_close(model(x), y, 2e-2, "bf16 merged")


def test_training_moves_only_gamma_and_beta_and_saves(tmp_path):
    case = zoo.CASES_BY_NAME["gpt2"]
    model = case.build()
    model.train()
    dt.inject(model, SSFConfig(targets=".*"), name="a")
    before = base_tensors(model)
    inputs = case.inputs()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    for name, value in base_tensors(model).items():
        assert torch.equal(value, before[name]), f"base {name} moved"
    for layer in delta_layers(model).values():
        delta = layer.deltas["a"]
        assert not torch.equal(delta.gamma, torch.ones_like(delta.gamma))
        assert not torch.equal(delta.beta, torch.zeros_like(delta.beta))
    model.eval()
    with torch.no_grad():
        y = zoo.run(model, inputs)
        dt.save(model, tmp_path / "a")
        fresh = dt.load(case.build(), tmp_path / "a")
        assert_rel_close(zoo.run(fresh, inputs), y, 1e-6, "reloaded")
