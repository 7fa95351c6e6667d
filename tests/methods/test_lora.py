"""LoRA against a naive reference of its equation, h = W x + b + (α/r) B A x, on every layer
type; scaling, dropout, bias, per-module overrides; the inits (default, Gaussian, PiSSA) and the
asymmetric frozen-A variant."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.core.lifecycle import delta_layers
from helpers import assert_differs, assert_rel_close, perturb


def one_layer(layer: nn.Module, **config) -> tuple[nn.Module, dt.Delta]:
    model = nn.Sequential(layer)
    dt.inject(model, dt.LoraConfig(targets=["0"], **config), name="a")
    perturb(model, scale=0.5)
    return model, model[0].deltas["a"]


def reference_delta_weight(delta) -> torch.Tensor:
    """ΔW = (α/r) B A, written out with the scale computed from the config."""
    c = delta.config
    alpha = c.rank if c.alpha is None else c.alpha
    scale = alpha / (math.sqrt(c.rank) if c.rslora else c.rank)
    return scale * delta.B @ delta.A  # (out, in_dim)


@pytest.mark.parametrize("config", [{"rank": 3}, {"rank": 4, "alpha": 12},
                                    {"rank": 4, "alpha": 6, "rslora": True}],
                         ids=["alpha=r", "alpha=12", "rslora"])
def test_linear(config):
    torch.manual_seed(0)
    model, delta = one_layer(nn.Linear(7, 5), **config)
    x = torch.randn(2, 3, 7)
    base = model[0].base_layer
    expected = x @ base.weight.T + base.bias + x @ reference_delta_weight(delta).T
    assert_differs(expected, base(x))
    assert_rel_close(model(x), expected, 1e-6, "linear")


def test_hf_conv1d_weight_is_stored_transposed():
    torch.manual_seed(0)
    model, delta = one_layer(Conv1D(5, 7), rank=2, alpha=4)  # nf=5 outputs, nx=7 inputs
    x = torch.randn(4, 7)
    base = model[0].base_layer
    expected = x @ base.weight + base.bias + x @ reference_delta_weight(delta).T
    assert_rel_close(model(x), expected, 1e-6, "Conv1D")
    dt.merge(model)
    assert_rel_close(base.weight, model[0].deltas["a"].info.weight_from_matrix(
        reference_delta_weight(delta)) + (base.weight - reference_delta_weight(delta).T),
        1e-6, "merged weight layout")


@pytest.mark.parametrize("conv, shape", [
    (nn.Conv1d(3, 4, 3, padding=1), (2, 3, 9)),
    (nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=2), (2, 3, 9, 9)),
    (nn.Conv2d(3, 4, (2, 3), padding_mode="circular", padding=1), (2, 3, 6, 7)),
    (nn.Conv2d(3, 4, 1), (2, 3, 5, 5)),
    (nn.Conv3d(2, 3, 2, bias=False), (1, 2, 4, 4, 4)),
], ids=["conv1d", "conv2d-strided-dilated", "conv2d-circular", "conv2d-1x1", "conv3d"])
def test_convolutions(conv, shape):
    torch.manual_seed(0)
    model, delta = one_layer(conv, rank=2, alpha=3)
    x = torch.randn(*shape)
    base = model[0].base_layer
    kernel = base.weight + reference_delta_weight(delta).reshape(base.weight.shape)
    expected = base._conv_forward(x, kernel, base.bias)  # the layer with W + ΔW
    assert_differs(expected, base(x))
    assert_rel_close(model(x), expected, 1e-5, "conv")


def test_embedding():
    torch.manual_seed(0)
    model, delta = one_layer(nn.Embedding(11, 6, padding_idx=0), rank=3)
    ids = torch.tensor([[1, 2, 0, 10], [3, 3, 4, 5]])
    table = model[0].base_layer.weight + reference_delta_weight(delta).T  # (num, dim)
    assert_rel_close(model(ids), table[ids], 1e-6, "embedding")


def test_embedding_init_and_padding_row_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(11, 6, padding_idx=0))
    dt.inject(model, dt.LoraConfig(targets=["0"], rank=3), name="a")
    delta = model[0].deltas["a"]
    assert torch.count_nonzero(delta.A) == 0 and delta.B.std() > 0.5  # A = 0, B ~ N(0, 1)
    model(torch.tensor([[0, 1]])).sum().backward()
    assert torch.count_nonzero(delta.A.grad[:, 0]) == 0, "padding row gets no gradient"
    assert torch.count_nonzero(delta.A.grad[:, 1]) > 0


def test_default_and_gaussian_init():
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    model = nn.Sequential(layer)
    dt.inject(model, dt.LoraConfig(targets=["0"], rank=8), name="kaiming")
    dt.inject(model, dt.LoraConfig(targets=["0"], rank=8, init="gaussian"), name="gauss")
    a = model[0].deltas["kaiming"].A
    assert a.abs().max() <= 1 / math.sqrt(64) and a.std() > 0.5 / math.sqrt(3 * 64)
    assert torch.count_nonzero(model[0].deltas["kaiming"].B) == 0
    g = model[0].deltas["gauss"].A
    assert abs(g.std().item() - 1 / 8) < 0.02 and abs(g.mean().item()) < 0.02
    assert torch.count_nonzero(model[0].deltas["gauss"].B) == 0


def test_bias_delta():
    torch.manual_seed(0)
    model, delta = one_layer(nn.Linear(4, 3), rank=2, bias=True)
    x = torch.randn(5, 4)
    base = model[0].base_layer
    expected = x @ (base.weight + reference_delta_weight(delta)).T + base.bias + delta.bias
    assert torch.count_nonzero(delta.bias) > 0
    assert_rel_close(model(x), expected, 1e-6, "bias")
    model, delta = one_layer(nn.Embedding(4, 3), bias=True)
    ids = torch.tensor([0, 3])
    table = model[0].base_layer.weight + reference_delta_weight(delta).T + delta.bias
    assert_rel_close(model(ids), table[ids], 1e-6, "embedding bias shifts every row")


def test_dropout_applies_to_the_low_rank_path_only_in_training():
    torch.manual_seed(0)
    model, delta = one_layer(nn.Linear(8, 8), rank=4, dropout=0.5)
    x = torch.randn(16, 8)
    base = model[0].base_layer
    model.eval()
    assert_rel_close(model(x), x @ (base.weight + reference_delta_weight(delta)).T + base.bias,
                     1e-6, "eval: no dropout")
    model.train()
    torch.manual_seed(5)
    y = model(x)
    torch.manual_seed(5)
    dropped = F.dropout(x, 0.5, training=True)
    expected = base(x) + dropped @ reference_delta_weight(delta).T
    assert_rel_close(y, expected, 1e-6, "train: dropout on the LoRA input")


def test_overrides_are_rank_and_alpha_patterns():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    dt.inject(model, dt.LoraConfig(rank=2, alpha=2, targets=["0", "1"],
                                   overrides={"1": {"rank": 4, "alpha": 16}}), name="a")
    assert model[0].deltas["a"].A.shape == (2, 4) and model[0].deltas["a"].scale == 1
    assert model[1].deltas["a"].A.shape == (4, 4) and model[1].deltas["a"].scale == 4
    assert model[1].deltas["a"].adapter_config.overrides["1"]["rank"] == 4


# -------------------------------------------------------------------------------- PiSSA
@pytest.mark.parametrize("iters", [None, 4], ids=["svd", "fast-svd"])
def test_pissa_starts_from_the_principal_components(iters):
    torch.manual_seed(0)
    layer = nn.Linear(24, 16)
    model = nn.Sequential(layer)
    x = torch.randn(3, 24)
    y0 = model(x)
    dt.inject(model, dt.LoraConfig(targets=["0"], rank=4, alpha=8, init="pissa",
                                   pissa_iters=iters), name="p")
    delta = model[0].deltas["p"]
    u, s, vh = torch.linalg.svd(layer.weight.detach())
    principal = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
    tol = 1e-5 if iters is None else 5e-2
    assert_rel_close(delta.scale * delta.B @ delta.A, principal, tol, "B A = top-r part of W")
    assert_rel_close(model(x), y0, 1e-5, "identity at init")
    assert torch.equal(model[0].base_layer.weight, layer.weight), "base weights stay untouched"
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 4 * (24 + 16)


def test_pissa_trains_the_principal_part_and_saves_a_plain_delta(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 16))
    original = nn.Sequential(nn.Linear(24, 16))
    original.load_state_dict(model.state_dict())
    dt.inject(model, dt.LoraConfig(targets=["0"], rank=4, init="pissa"), name="p")
    delta = model[0].deltas["p"]
    perturb(model, scale=0.1)
    x = torch.randn(3, 24)
    base = model[0].base_layer
    residual = base.weight - delta.scale * delta.B0 @ delta.A0  # PiSSA's W_res
    expected = x @ (residual + delta.scale * delta.B @ delta.A).T + base.bias
    assert_rel_close(model(x), expected, 1e-5, "W_res x + s B A x")
    dt.save(model, tmp_path / "p")
    saved = dt.core.state.read_meta(tmp_path / "p")["config"]
    assert saved["init"] == "default" and saved["rank"] == 8
    assert load_file(tmp_path / "p" / "deltatune_model.safetensors")["0.A"].shape == (8, 24)
    reloaded = dt.load(original, tmp_path / "p")
    assert_rel_close(reloaded(x), expected, 1e-5, "loaded on the original base")


# ------------------------------------------------------------------------ asymmetric LoRA
def test_frozen_a_is_regenerated_from_the_seed_and_never_saved(tmp_path):
    def make(seed=0, targets=("0", "1")):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 6))
        dt.inject(model, dt.LoraConfig(rank=3, freeze_a=True, seed=seed, targets=list(targets)),
                  name="a")
        return model

    model = make()
    delta = model[0].deltas["a"]
    assert "A" in dict(delta.named_buffers()) and "A" not in dict(delta.named_parameters())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 3 * 5 + 3 * 6
    assert torch.count_nonzero(delta.A) == delta.A.numel()
    assert torch.equal(make()[0].deltas["a"].A, delta.A), "same seed and path, same A"
    assert not torch.equal(make(seed=1)[0].deltas["a"].A, delta.A)
    assert not torch.equal(model[1].deltas["a"].A[:, :5], delta.A[:, :5]), "differs per module"
    torch.manual_seed(99)  # the global random state must not matter
    assert torch.equal(make()[0].deltas["a"].A, delta.A)

    perturb(model)
    x = torch.randn(2, 6)
    y = model(x)
    dt.save(model, tmp_path / "a")
    tensors = load_file(tmp_path / "a" / "deltatune_model.safetensors")
    assert sorted(tensors) == ["0.A_check", "0.B", "1.A_check", "1.B"]
    fresh = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 6))
    fresh.load_state_dict(dt.unload(model).state_dict())
    assert torch.equal(dt.load(fresh, tmp_path / "a")(x), y)


def test_frozen_a_drift_is_detected(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    dt.inject(model, dt.LoraConfig(rank=2, freeze_a=True, targets=["0"]), name="a")
    dt.save(model, tmp_path / "a")
    base = dt.unload(model)
    from deltatune.methods import lora

    original = lora.LoraDelta._seeded_a
    monkeypatch.setattr(lora.LoraDelta, "_seeded_a", lambda self: original(self) * 1.5)
    with pytest.raises(dt.AdapterFileError, match="frozen A regenerated from seed 0 differs"):
        dt.load(base, tmp_path / "a")
    assert dt.adapters(base) == {}


def test_lora_trains_end_to_end_on_a_small_regression():
    torch.manual_seed(0)
    teacher = nn.Linear(16, 8)
    student = nn.Sequential(nn.Linear(16, 8))
    with torch.no_grad():  # the target differs from the student's base by a rank-2 update
        student[0].weight.copy_(teacher.weight - torch.randn(8, 2) @ torch.randn(2, 16) * 0.3)
        student[0].bias.copy_(teacher.bias)
    dt.inject(student, dt.LoraConfig(rank=2, targets=["0"]), name="a")
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=3e-2)
    x = torch.randn(256, 16)
    first = None
    for _ in range(300):
        loss = F.mse_loss(student(x), teacher(x).detach())
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1e-3 * first, "a rank-2 LoRA must fit a rank-2 weight difference"


def test_delta_layers_report_geometry():
    model = nn.Sequential(nn.Conv2d(3, 5, 3))
    dt.inject(model, dt.LoraConfig(targets=["0"], rank=2), name="a")
    info = delta_layers(model)["0"].info
    assert (info.kind, info.in_dim, info.out_dim, info.weight_shape) == ("conv", 27, 5,
                                                                         (5, 3, 3, 3))
