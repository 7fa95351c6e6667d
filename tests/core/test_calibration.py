"""The calibration pass (``core.calibration``): statistics against naive computations, the model
left exactly as found (also when the pass fails), the hand-over to deltas through ``inject``,
and the errors for missing or unusable data."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.core import registry
from deltatune.core.calibration import calibrate, stats_for
from deltatune.core.config import DeltaConfig
from deltatune.core.delta import Delta
from deltatune.core.geometry import layer_info
from deltatune.core.targeting import Matcher
from helpers import assert_rel_close


def targets(model: nn.Module, *paths: str) -> dict:
    modules = Matcher(model).modules
    return {p: layer_info(modules[p]) for p in paths}


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 10), nn.GELU(), nn.Linear(10, 6))


def batches(n: int = 3, shape=(2, 5, 12), seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) for _ in range(n)]


def square(out, batch):
    return out.pow(2).mean()


# ------------------------------------------------------------------------ naive statistics
def test_linear_statistics_equal_a_naive_computation():
    model, data = mlp(), batches()
    stats = calibrate(model, targets(model, "0", "2"), {"input_cov", "weight_grad"}, data,
                      loss_fn=square)
    inputs = {"0": [], "2": []}
    grads = {"0": torch.zeros(10, 12), "2": torch.zeros(6, 10)}
    for x in data:  # by hand, on a copy with its own grads
        ref = mlp()
        h = ref[1](ref[0](x))
        inputs["0"].append(x.reshape(-1, 12))
        inputs["2"].append(h.detach().reshape(-1, 10))
        ref[2](h).pow(2).mean().backward()
        grads["0"] += ref[0].weight.grad
        grads["2"] += ref[2].weight.grad
    for path in ("0", "2"):
        x = torch.cat(inputs[path]).double()  # (positions, in)
        assert stats[path]["input_cov"].dtype == torch.float32
        assert stats[path]["weight_grad"].shape == model[int(path)].weight.shape
        assert_rel_close(stats[path]["input_cov"], x.T @ x / x.shape[0], 1e-5, f"E[xxᵀ] {path}")
        assert_rel_close(stats[path]["weight_grad"], grads[path] / len(data), 1e-5,
                         f"mean gradient {path}")


def test_conv_covariance_is_over_the_kernel_patches():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=1)
    model = nn.Sequential(conv)
    data = batches(2, (2, 3, 7, 7))
    stats = calibrate(model, targets(model, "0"), {"input_cov", "weight_grad"}, data,
                      loss_fn=square)
    cols = torch.cat([F.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 27)
                      for x in data]).double()  # (positions, in·kh·kw)
    assert_rel_close(stats["0"]["input_cov"], cols.T @ cols / cols.shape[0], 1e-5, "patches")
    assert stats["0"]["weight_grad"].shape == (4, 27)


def test_hf_conv1d_gradient_is_in_matrix_form():
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(6, 12))  # weight stored (in, out) = (12, 6)
    data = batches(2)
    stats = calibrate(model, targets(model, "0"), {"weight_grad"}, data, loss_fn=square)
    ref = nn.Sequential(Conv1D(6, 12))
    ref.load_state_dict(model.state_dict())
    for x in data:
        (ref(x).pow(2).mean() / len(data)).backward()
    assert_rel_close(stats["0"]["weight_grad"], ref[0].weight.grad.T, 1e-5, "(out, in) grad")


def test_embedding_covariance_counts_the_ids():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(9, 4))
    data = [torch.tensor([[1, 2, 2], [0, 8, 2]]), torch.tensor([[3, 3, 1]])]
    stats = calibrate(model, targets(model, "0"), {"input_cov"}, data)
    counts = torch.bincount(torch.cat([d.reshape(-1) for d in data]), minlength=9).float()
    assert torch.equal(stats["0"]["input_cov"], torch.diag(counts / 9))


class WithLoss(nn.Module):
    """A model called with keyword batches that returns its own loss (as HF models do)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(12, 4)

    def forward(self, inputs, labels):
        logits = self.proj(inputs)
        return SimpleNamespace(logits=logits, loss=F.mse_loss(logits, labels))


def test_dict_batches_and_the_output_loss():
    torch.manual_seed(0)
    model = WithLoss()
    data = [{"inputs": x, "labels": torch.ones(2, 5, 4)} for x in batches(2)]
    stats = calibrate(model, targets(model, "proj"), {"weight_grad"}, data)
    ref = WithLoss()
    ref.load_state_dict(model.state_dict())
    for batch in data:
        (ref(**batch).loss / 2).backward()
    assert_rel_close(stats["proj"]["weight_grad"], ref.proj.weight.grad, 1e-5, "output.loss")


# ------------------------------------------------------------------ the model is left as found
class Mixed(nn.Module):
    """Mixed training modes, requires_grad flags, an existing .grad, BatchNorm running stats."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(12, 8)
        self.bn = nn.BatchNorm1d(8)
        self.b = nn.Linear(8, 3)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.b(self.drop(self.bn(self.a(x))))


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone()
                  for n, p in model.named_parameters()},
        "hooks": {n: (len(m._forward_pre_hooks), len(m._forward_hooks),
                      len(m._backward_hooks)) for n, m in model.named_modules()},
    }


def mixed() -> Mixed:
    torch.manual_seed(0)
    model = Mixed()
    model.train()
    model.b.eval()  # a module left in eval inside a model in training
    model.a.bias.requires_grad_(False)
    model.b.weight.grad = torch.full_like(model.b.weight, 3.0)  # the user's own gradient
    return model


@pytest.mark.parametrize("fail", [False, True], ids=["ok", "error-mid-pass"])
def test_the_model_is_left_exactly_as_found(fail):
    model = mixed()
    before = snapshot(model)
    calls = []

    def loss_fn(out, batch):
        calls.append(1)
        if fail and len(calls) == 2:
            raise RuntimeError("boom")
        return out.pow(2).mean()

    data = [torch.randn(6, 12) for _ in range(3)]
    if fail:
        with pytest.raises(RuntimeError, match="boom"):
            calibrate(model, targets(model, "a", "b"), {"input_cov", "weight_grad"}, data,
                      loss_fn=loss_fn)
    else:
        stats = calibrate(model, targets(model, "a", "b"), {"input_cov", "weight_grad"}, data,
                          loss_fn=loss_fn)
        assert stats["a"]["weight_grad"].abs().sum() > 0
    after = snapshot(model)
    for key in ("modes", "flags", "hooks"):
        assert after[key] == before[key], key
    for name, value in before["state"].items():  # BatchNorm's running stats too (eval mode)
        assert torch.equal(after["state"][name], value), name
    for name, grad in before["grads"].items():
        assert (grad is None) == (after["grads"][name] is None), name
        assert grad is None or torch.equal(grad, after["grads"][name]), name


def test_the_pass_runs_in_eval_mode():
    model = mixed()
    model.drop.p = 0.9  # in training mode, dropout would make two passes differ
    data = [torch.randn(6, 12)]
    one = calibrate(model, targets(model, "b"), {"input_cov"}, data)["b"]["input_cov"]
    two = calibrate(model, targets(model, "b"), {"input_cov"}, data)["b"]["input_cov"]
    assert torch.equal(one, two)


# ------------------------------------------------------------------- handing over to deltas
@dataclass(frozen=True, kw_only=True)
class RecorderConfig(DeltaConfig):
    pass


class Recorder(Delta):
    """Records the statistics it is handed; a zero shift (identity at init)."""

    calibration = frozenset({"input_cov", "weight_grad"})
    seen: ClassVar[dict] = {}

    def __init__(self, info, config, path):
        super().__init__(info, config, path)
        self.b = nn.Parameter(torch.zeros(info.out_dim))

    def reset_parameters(self, base):
        Recorder.seen[self.path] = {k: v.clone() for k, v in self.calibration_stats.items()}

    def forward(self, x, y):
        return y + self.cast(self.b, y)

    @classmethod
    def num_trainable(cls, info, config):
        return info.out_dim


@pytest.fixture
def recorder():
    registry.register("toy-recorder", config=RecorderConfig)(Recorder)
    Recorder.seen = {}
    yield RecorderConfig
    registry._REGISTRY.pop("toy-recorder", None)


def test_inject_hands_each_delta_its_layers_statistics_then_frees_them(recorder):
    model, data = mlp(), batches()
    expected = calibrate(mlp(), targets(mlp(), "0", "2"), {"input_cov", "weight_grad"}, data,
                         loss_fn=square)
    dt.inject(model, recorder(targets=["0", "2"]), name="r", data=data, loss_fn=square)
    assert Recorder.seen.keys() == {"0", "2"}
    for path, stats in Recorder.seen.items():
        for key in ("input_cov", "weight_grad"):
            assert torch.equal(stats[key], expected[path][key]), (path, key)
    with pytest.raises(dt.ConfigError, match="pass data="):
        stats_for("0", "toy-recorder")  # nothing kept after inject
    delta = model[0].deltas["r"]
    with pytest.raises(dt.ConfigError, match="pass data="):
        delta.calibration_stats  # noqa: B018
    assert [n for n, p in model.named_parameters() if p.requires_grad] == \
        ["0.deltas.r.b", "2.deltas.r.b"], "base frozen, the new delta trainable"


def test_only_the_targeted_layers_are_observed(recorder):
    model, data = mlp(), batches(1)
    dt.inject(model, recorder(targets=["2"]), name="r", data=data, loss_fn=square)
    assert Recorder.seen.keys() == {"2"}


# ----------------------------------------------------------------------------------- errors
def test_no_data_is_a_clear_error_and_leaves_the_model_unchanged(recorder):
    model = mlp()
    with pytest.raises(dt.ConfigError, match=r"'toy-recorder' initialises from data: pass "
                                             r"data=.*loss"):
        dt.inject(model, recorder(targets=["0"]), name="r")
    assert dt.adapters(model) == {} and isinstance(model[0], nn.Linear)


def test_empty_data_is_a_clear_error(recorder):
    model = mlp()
    with pytest.raises(dt.ConfigError, match="gave no batch"):
        dt.inject(model, recorder(targets=["0"]), name="r", data=iter([]), loss_fn=square)
    assert dt.adapters(model) == {}


def test_no_loss_is_a_clear_error_and_leaves_the_model_as_found(recorder):
    model = mixed()
    before = snapshot(model)
    with pytest.raises(dt.ConfigError, match="no loss.*loss_fn="):
        dt.inject(model, recorder(targets=["a"]), name="r", data=[torch.randn(4, 12)])
    after = snapshot(model)
    assert after["flags"] == before["flags"] and after["modes"] == before["modes"]
    assert after["hooks"] == before["hooks"] and dt.adapters(model) == {}


def test_a_loss_that_is_not_a_scalar_or_has_no_graph_is_refused():
    model = mlp()
    with pytest.raises(dt.ConfigError, match="scalar"):
        calibrate(model, targets(model, "0"), {"weight_grad"}, batches(1),
                  loss_fn=lambda out, b: out)
    with pytest.raises(dt.ConfigError, match="does not depend"):
        calibrate(model, targets(model, "0"), {"weight_grad"}, batches(1),
                  loss_fn=lambda out, b: out.detach().sum())


def test_a_single_batch_must_be_wrapped(recorder):
    with pytest.raises(dt.ConfigError, match=r"data=\[batch\]"):
        dt.inject(mlp(), recorder(targets=["0"]), name="r", data=torch.randn(4, 12),
                  loss_fn=square)


def test_data_for_a_method_that_takes_none_is_refused():
    with pytest.raises(dt.ConfigError, match="does not initialise from data"):
        dt.inject(mlp(), dt.LoraConfig(targets=["0"]), name="l", data=batches(1))


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(12, 3)
        self.unused = nn.Linear(12, 3)

    def forward(self, x):
        return self.used(x)


def test_a_layer_the_data_never_reaches_is_named():
    model = Branchy()
    with pytest.raises(dt.ConfigError, match="unused: the calibration data never reached"):
        calibrate(model, targets(model, "used", "unused"), {"input_cov"}, batches(1))
    with pytest.raises(dt.ConfigError, match="unused: the calibration loss does not depend"):
        calibrate(model, targets(model, "used", "unused"), {"weight_grad"}, batches(1),
                  loss_fn=square)


def test_norm_layers_have_no_matrix_form():
    model = nn.Sequential(nn.LayerNorm(12))
    with pytest.raises(dt.ConfigError, match="norm layers have none"):
        calibrate(model, targets(model, "0"), {"input_cov"}, batches(1))


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_gradient_statistics_of_quantized_layers(scheme):
    """A quantized weight is no differentiable parameter: its gradient is ``Σ gᵀ x`` with ``g``
    read through a zero probe on the layer's output. Every layer's statistics equal those of
    the same model with the weights dequantized (plain Linear layers, autograd's gradients),
    earlier layers included (the probes do not cut the graph)."""
    pytest.importorskip("torchao")
    from deltatune import quant

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(),
                          nn.Linear(64, 8))
    quant.quantize(model, scheme, targets=["0", "2", "4"])
    plain = quant.dequantize(__import__("copy").deepcopy(model))
    data = batches(2, shape=(3, 4, 64))
    needs = ["weight_grad", "weight_grad_sq", "fisher", "input_cov"]
    paths = ("0", "2", "4")

    def loss_fn(out, batch):
        return out.float().pow(2).mean()

    got = calibrate(model, targets(model, *paths), needs, data, loss_fn=loss_fn)
    want = calibrate(plain, targets(plain, *paths), needs, data, loss_fn=loss_fn)
    for path in paths:
        for name in needs:
            assert_rel_close(got[path][name], want[path][name], 1e-5, f"{path} {name}")
    assert all(p.grad is None for p in model.parameters())  # nothing written


def test_lora_ga_initialises_on_a_quantized_base():
    pytest.importorskip("torchao")
    from deltatune import quant

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8))
    quant.quantize(model, "nf4", targets=["0"])
    x = batches(1, shape=(3, 64))[0]
    with torch.no_grad():
        before = model(x)
    dt.inject(model, dt.LoraGAConfig(rank=2, targets=["0"]), name="ga", data=[x],
              loss_fn=lambda out, batch: out.pow(2).mean())
    delta = model[0].deltas["ga"]
    assert delta.B.abs().sum() > 0 and delta.A.abs().sum() > 0  # from the gradient's SVD
    with torch.no_grad():
        assert_rel_close(model(x), before, 1e-5)  # LoRA-GA starts as the base (frozen copy)
