"""BitFit and LayerNorm tuning against naive references of their equations.

BitFit: y = W x + (b + Δb), checked on a hand-written BERT layer and on every layer type (with
biases created where the layer has none, ``add_missing``). LN tuning: y = (w + Δw) ⊙ norm(x) +
(b + Δb), checked against ``F.layer_norm`` / a hand-written RMSNorm / ``F.group_norm`` /
``F.batch_norm``. Merge / unmerge exactness (created biases included), refusals, trainable
counts, save / load and training only the deltas.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import BertConfig, BertModel
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.t5.modeling_t5 import T5LayerNorm
from transformers.pytorch_utils import Conv1D

import deltatune as dt
import zoo
from deltatune.core.lifecycle import delta_layers
from deltatune.methods.selective import BitFitConfig, LNTuningConfig
from helpers import assert_differs, assert_rel_close, base_tensors, perturb


def deltas(model: nn.Module, name: str = "a") -> dict[str, dict[str, Tensor]]:
    """``{module path: {base param name: Δ}}`` of delta ``name``."""
    return {path: dict(layer.deltas[name].delta.items())
            for path, layer in delta_layers(model).items() if name in layer.deltas}


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------- BitFit
def bert_layer() -> nn.Module:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=4, intermediate_size=48, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, attn_implementation="eager")
    return BertModel(config).encoder.layer[0].eval()


def reference_bert_layer(layer: nn.Module, x: Tensor, db: dict[str, Tensor]) -> Tensor:
    """A BERT layer written out, every bias ``b + Δb`` (``db`` by module path)."""

    def lin(path: str, h: Tensor) -> Tensor:
        m = layer.get_submodule(path)
        return h @ m.weight.T + m.bias + db[path]

    def norm(path: str, h: Tensor) -> Tensor:
        m = layer.get_submodule(path)
        mu, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
        return (h - mu) / torch.sqrt(var + m.eps) * m.weight + m.bias + db[path]

    b, t, heads = x.shape[0], x.shape[1], 4

    def split(h: Tensor) -> Tensor:  # (B, T, H) -> (B, heads, T, d)
        return h.view(b, t, heads, -1).transpose(1, 2)

    q, k, v = (split(lin(f"attention.self.{n}", x)) for n in ("query", "key", "value"))
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
    ctx = (att @ v).transpose(1, 2).reshape(b, t, -1)  # (B, T, H)
    h = norm("attention.output.LayerNorm", lin("attention.output.dense", ctx) + x)
    inter = F.gelu(lin("intermediate.dense", h))
    return norm("output.LayerNorm", lin("output.dense", inter) + h)


def test_bitfit_on_a_bert_layer_matches_the_written_out_layer():
    layer = bert_layer()
    x = torch.randn(2, 5, 32)
    y0 = layer(x)
    dt.inject(layer, BitFitConfig(), name="a")
    assert set(delta_layers(layer)) == {
        "attention.self.query", "attention.self.key", "attention.self.value",
        "attention.output.dense", "attention.output.LayerNorm", "intermediate.dense",
        "output.dense", "output.LayerNorm"}
    perturb(layer, scale=0.5)
    db = {path: d["bias"] for path, d in deltas(layer).items()}
    with torch.no_grad():
        expected = reference_bert_layer(layer, x, db)
        assert_rel_close(reference_bert_layer(layer, x, {p: 0 * v for p, v in db.items()}), y0,
                         1e-5, "the written-out layer is BERT's")
        assert_differs(expected, y0, "b + Δb")
        assert_rel_close(layer(x), expected, 1e-5, "BitFit on a BERT layer")
        biases = {p: layer.get_submodule(p).bias.detach().clone() for p in db}
        dt.merge(layer)
        assert_rel_close(layer(x), expected, 1e-5, "merged")
        for path, value in db.items():
            assert torch.equal(layer.get_submodule(path).base_layer.bias, biases[path] + value)
        dt.unmerge(layer)
        assert_rel_close(layer(x), expected, 1e-5, "unmerged")
        with dt.disabled(layer):
            assert_rel_close(layer(x), y0, 1e-6, "disabled")


@pytest.mark.parametrize("make, shape, reference", [
    (lambda: nn.Linear(6, 4, bias=False), (3, 6), lambda m, x, b: x @ m.weight.T + b),
    (lambda: Conv1D(4, 6), (3, 6), lambda m, x, b: x @ m.weight + m.bias + b),
    (lambda: nn.Conv2d(3, 4, 3, padding=1, bias=False), (2, 3, 5, 5),
     lambda m, x, b: F.conv2d(x, m.weight, b, padding=1)),
    (lambda: nn.Conv1d(3, 4, 3), (2, 3, 7),
     lambda m, x, b: F.conv1d(x, m.weight, m.bias + b)),
    (lambda: nn.LayerNorm(4, bias=False), (3, 4),
     lambda m, x, b: F.layer_norm(x, (4,), m.weight, b, m.eps)),
    (lambda: nn.GroupNorm(2, 4), (2, 4, 3),
     lambda m, x, b: F.group_norm(x, 2, m.weight, m.bias + b, m.eps)),
], ids=["linear-no-bias", "hf-conv1d", "conv2d-no-bias", "conv1d", "layernorm-no-bias",
        "groupnorm"])
def test_bitfit_adds_delta_b_on_every_layer_type(make, shape, reference):
    torch.manual_seed(0)
    model = nn.Sequential(make())
    x = torch.randn(*shape)
    y0 = model(x)
    had_bias = model[0].bias is not None
    dt.inject(model, BitFitConfig(targets=["0"], add_missing=True), name="a")
    perturb(model, scale=0.5)
    base, db = model[0].base_layer, model[0].deltas["a"].delta["bias"]
    with torch.no_grad():
        expected = reference(base, x, db)
        assert_differs(expected, y0)
        assert_rel_close(model(x), expected, 1e-6, "y = W x + (b + Δb)")
        keys = set(model.state_dict())
        dt.merge(model)
        assert isinstance(base.bias, nn.Parameter) and not base.bias.requires_grad
        assert_rel_close(model(x), expected, 1e-6, "merged")
        dt.unmerge(model)
        assert (base.bias is not None) == had_bias, "a created bias is removed on unmerge"
        assert set(model.state_dict()) == keys
        assert_rel_close(model(x), expected, 1e-6, "unmerged")
        plain = dt.unload(model, merge=True)
    assert_rel_close(plain(x), expected, 1e-6, "unloaded")
    assert plain[0].bias is not None


def test_bitfit_merge_is_exact_addition():
    model = zoo.CASES_BY_NAME["bert"].build()
    dt.inject(model, BitFitConfig(), name="a")
    before = base_tensors(model)
    perturb(model)
    db = deltas(model)
    dt.merge(model)
    for path, d in db.items():
        assert torch.equal(model.get_submodule(path).base_layer.bias,
                           before[f"{path}.base_layer.bias"] + d["bias"])
    dt.unmerge(model)
    for name, value in base_tensors(model).items():
        assert_rel_close(value, before[name], 1e-7, name)


def test_bitfit_on_llama_needs_add_missing():
    with pytest.raises(dt.TargetError, match="Linear has no bias; set add_missing=True"):
        dt.inject(zoo.CASES_BY_NAME["llama"].build(), BitFitConfig(), name="a")
    model = zoo.CASES_BY_NAME["llama"].build()
    dt.inject(model, BitFitConfig(add_missing=True), name="a")
    layers = delta_layers(model)
    assert len(layers) == 7 * 2 + 1  # every Linear incl. lm_head; no RMSNorm
    assert not any("norm" in path for path in layers)
    with pytest.raises(dt.TargetError, match="LlamaRMSNorm has no bias and its forward would "
                                             "not use one"):
        dt.inject(zoo.CASES_BY_NAME["llama"].build(),
                  BitFitConfig(targets=["input_layernorm"], add_missing=True), name="a")


def test_bitfit_default_targets_and_counts_on_bert():
    model = zoo.CASES_BY_NAME["bert"].build()
    biases = {n.rpartition(".")[0]: p.numel() for n, p in model.named_parameters()
              if n.endswith(".bias")}
    assert any("LayerNorm" in n for n in biases)
    planned = dt.cost(model, BitFitConfig())
    dt.inject(model, BitFitConfig(), name="a")
    assert set(delta_layers(model)) == set(biases), "every bias, LayerNorm and heads included"
    assert trainable(model) == planned.params == sum(biases.values())
    assert dt.summary(model).trainable_params == sum(biases.values())


def test_bitfit_config_is_validated():
    with pytest.raises(dt.ConfigError, match="add_missing must be True or False"):
        BitFitConfig(add_missing="yes")
    config = BitFitConfig(add_missing=True, targets=["dense"])
    assert dt.config_from_dict(config.to_dict()) == config


def test_bitfit_save_load_and_file_layout(tmp_path):
    case = zoo.CASES_BY_NAME["gpt2"]
    model = case.build()
    dt.inject(model, BitFitConfig(targets=["c_attn", "ln_f"]), name="a")
    perturb(model)
    y = zoo.run(model, case.inputs())
    dt.save(model, tmp_path / "a")
    tensors = load_file(tmp_path / "a" / "deltatune_model.safetensors")
    assert sorted(tensors) == ["transformer.h.0.attn.c_attn.delta.bias",
                               "transformer.h.1.attn.c_attn.delta.bias",
                               "transformer.ln_f.delta.bias"]
    fresh = dt.load(case.build(), tmp_path / "a")
    assert_rel_close(zoo.run(fresh, case.inputs()), y, 1e-6, "reloaded")


def test_bitfit_training_moves_only_the_biases():
    """A student whose biases differ from the teacher's learns them back; nothing else moves."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    student = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    student.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        student[0].bias.add_(torch.randn(16) * 0.5)
        student[2].bias.add_(torch.randn(4) * 0.5)
    weights = {n: p.detach().clone() for n, p in student.named_parameters()}
    dt.inject(student, BitFitConfig(), name="a")
    x = torch.randn(64, 8)
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(60):
        loss = F.mse_loss(student(x), teacher(x).detach())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.01 * losses[0]
    plain = dt.unload(student)
    for n, p in plain.named_parameters():
        assert torch.equal(p, weights[n]), f"base {n} moved"


# -------------------------------------------------------------------------- LN tuning
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Llama's RMSNorm, written out (fp32 statistics)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


@pytest.mark.parametrize("make, shape, reference, keys", [
    (lambda: nn.LayerNorm(6), (3, 6),
     lambda m, x, d: F.layer_norm(x, (6,), m.weight + d["weight"], m.bias + d["bias"], m.eps),
     {"weight", "bias"}),
    (lambda: LlamaRMSNorm(6, eps=1e-5), (2, 3, 6),
     lambda m, x, d: rms_norm(x, m.weight + d["weight"], 1e-5), {"weight"}),
    (lambda: T5LayerNorm(6, eps=1e-6), (2, 3, 6),
     lambda m, x, d: rms_norm(x, m.weight + d["weight"], 1e-6), {"weight"}),
    (lambda: nn.RMSNorm(6, eps=1e-5), (3, 6),
     lambda m, x, d: rms_norm(x, m.weight + d["weight"], 1e-5), {"weight"}),
    (lambda: nn.GroupNorm(2, 6), (2, 6, 4),
     lambda m, x, d: F.group_norm(x, 2, m.weight + d["weight"], m.bias + d["bias"], m.eps),
     {"weight", "bias"}),
    (lambda: nn.BatchNorm2d(6, track_running_stats=False), (4, 6, 3, 3),
     lambda m, x, d: F.batch_norm(x, None, None, m.weight + d["weight"], m.bias + d["bias"],
                                  True, 0.0, m.eps), {"weight", "bias"}),
    (lambda: nn.LayerNorm(6, bias=False), (3, 6),
     lambda m, x, d: F.layer_norm(x, (6,), m.weight + d["weight"], d["bias"], m.eps),
     {"weight", "bias"}),
], ids=["layernorm", "llama-rmsnorm", "t5-layernorm", "torch-rmsnorm", "groupnorm", "batchnorm",
        "layernorm-no-bias"])
def test_ln_tuning_matches_the_norm_with_tuned_affine(make, shape, reference, keys):
    torch.manual_seed(0)
    model = nn.Sequential(make())
    x = torch.randn(*shape)
    y0 = model(x)
    had_bias = getattr(model[0], "bias", None) is not None
    dt.inject(model, LNTuningConfig(), name="a")
    delta = model[0].deltas["a"]
    assert set(delta.delta) == keys
    assert trainable(model) == 6 * len(keys) == type(delta).num_trainable(delta.info,
                                                                          delta.config)
    perturb(model, scale=0.5)
    base, d = model[0].base_layer, dict(delta.delta.items())
    with torch.no_grad():
        expected = reference(base, x, d)
        assert_differs(expected, y0)
        assert_rel_close(model(x), expected, 1e-6, "(w + Δw) ⊙ norm(x) + (b + Δb)")
        w = base.weight.detach().clone()
        dt.merge(model)
        assert torch.equal(base.weight, w + d["weight"])
        assert_rel_close(model(x), expected, 1e-6, "merged")
        dt.unmerge(model)
        assert_rel_close(base.weight, w, 1e-7, "restored weight")
        assert (getattr(base, "bias", None) is not None) == had_bias
        assert_rel_close(model(x), expected, 1e-6, "unmerged")


def test_ln_tuning_params_choose_weight_or_bias():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(5), LlamaRMSNorm(5))
    dt.inject(model, LNTuningConfig(params=["weight"]), name="w")
    assert {k for layer in delta_layers(model).values() for k in layer.deltas["w"].delta} \
        == {"weight"}
    dt.inject(model, LNTuningConfig(params=("bias",), targets=["0"]), name="b")
    assert set(model[0].deltas["b"].delta) == {"bias"} and "b" not in model[1].deltas
    assert trainable(model) == 5 + 5 + 5
    with pytest.raises(dt.TargetError, match="LlamaRMSNorm has no bias to tune"):
        dt.inject(model, LNTuningConfig(params=["bias"], targets=["1"]), name="c")


@pytest.mark.parametrize("params, match", [
    ("weight", "must be a list"), ((), "each once"), (("gain",), "'weight' and/or 'bias'"),
    (("bias", "bias"), "each once"), (5, "must be a list")])
def test_ln_tuning_config_is_validated(params, match):
    with pytest.raises(dt.ConfigError, match=match):
        LNTuningConfig(params=params)


def test_ln_tuning_round_trips_and_overrides():
    config = LNTuningConfig(params=["weight"], targets=["input_layernorm", "norm"])
    assert config.params == ("weight",)
    assert dt.config_from_dict(config.to_dict()) == config
    model = zoo.CASES_BY_NAME["bert"].build()
    dt.inject(model, LNTuningConfig(overrides={"embeddings.LayerNorm": {"params": ["weight"]}}),
              name="a")
    layers = delta_layers(model)
    assert set(layers["bert.embeddings.LayerNorm"].deltas["a"].delta) == {"weight"}
    assert set(layers["bert.encoder.layer.0.output.LayerNorm"].deltas["a"].delta) == \
        {"weight", "bias"}
    assert trainable(model) == 32 + 4 * 64


class BiaslessLayerNorm(nn.Module):
    """A custom norm whose type name does not tell that it has no bias."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weight)


class BiasedRMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, 1e-6) + self.bias


@pytest.mark.parametrize("norm, keys", [(BiaslessLayerNorm, ["weight"]),
                                         (BiasedRMSNorm, ["bias", "weight"])])
def test_ln_tuning_reads_bias_from_the_module_not_its_type_name(norm, keys):
    """A custom norm's bias is found on the module (``LayerInfo.bias``), whatever its name says:
    a bias-less "LayerNorm" trains its weight only, a biased "RMSNorm" trains both."""
    model = nn.Sequential(norm(4), nn.LayerNorm(4))
    dt.inject(model, LNTuningConfig(targets=["0"]), name="a")
    assert sorted(model[0].deltas["a"].delta.keys()) == keys
    perturb(model)
    x = torch.randn(3, 4)
    with torch.no_grad():
        y = model(x)
        dt.merge(model)
        assert torch.allclose(model(x), y, atol=1e-6)
    with pytest.raises(dt.TargetError, match="no bias to tune"):
        dt.inject(nn.Sequential(BiaslessLayerNorm(4)), LNTuningConfig(targets=["0"],
                                                                       params=["bias"]))


@pytest.mark.parametrize("case, modules, count", [
    ("llama", 2 * 2 + 1, (2 * 2 + 1) * 32), ("bert", 1 + 2 * 2, (1 + 2 * 2) * 64),
    ("t5", 2 * 2 + 1 + 2 * 3 + 1, 12 * 32), ("gpt2", 2 * 2 + 1, 5 * 64),
])
def test_ln_tuning_default_targets_every_norm(case, modules, count):
    model = zoo.CASES_BY_NAME[case].build()
    norm_params = sum(p.numel() for name, m in model.named_modules()
                      if type(m).__name__.endswith(("Norm", "LayerNorm"))
                      for p in m.parameters(recurse=False))
    planned = dt.cost(model, LNTuningConfig())
    dt.inject(model, LNTuningConfig(), name="a")
    assert len(delta_layers(model)) == modules
    assert trainable(model) == planned.params == count == norm_params


def test_ln_tuning_trains_only_the_norm_deltas_and_saves(tmp_path):
    case = zoo.CASES_BY_NAME["llama"]
    model = case.build()
    model.train()
    dt.inject(model, LNTuningConfig(), name="a")
    before = base_tensors(model)
    inputs = case.inputs()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        out = model(**inputs, labels=inputs["input_ids"])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    for name, value in base_tensors(model).items():
        assert torch.equal(value, before[name]), f"base {name} moved"
    assert all(torch.count_nonzero(d["weight"]) > 0 for d in deltas(model).values())
    model.eval()
    with torch.no_grad():
        y = zoo.run(model, inputs)
    assert_differs(y, zoo.run(case.build(), inputs), "trained")
    dt.save(model, tmp_path / "a")
    fresh = dt.load(case.build(), tmp_path / "a")
    with torch.no_grad():
        assert_rel_close(zoo.run(fresh, inputs), y, 1e-6, "reloaded")
