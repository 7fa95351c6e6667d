"""Core forms beyond LoRA's: weight-form deltas, sub-layer taps for parallel forms, the norm
layer kind, per-module ``module_sets`` fields, and how several deltas on one layer combine
(sum, stack, weights)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from deltatune.core import registry
from deltatune.core.config import DeltaConfig
from deltatune.core.delta import Delta
from deltatune.core.errors import ConfigError, MergeError, StateError, TargetError
from deltatune.core.geometry import layer_info
from deltatune.core.lifecycle import delta_layers
from deltatune.core.targeting import Matcher, module_config
from helpers import assert_differs, assert_rel_close, base_tensors, perturb
from zoo import CASES_BY_NAME, FAMILIES, run

MLP = CASES_BY_NAME["mlp"]


def _out(model, case):
    with torch.no_grad():
        return run(model, case.inputs())


# ------------------------------------------------------------------------------ norm kind
@pytest.mark.parametrize("module, channels_first", [
    (nn.LayerNorm(8), False), (nn.RMSNorm(8), False), (nn.GroupNorm(2, 8), True),
    (nn.BatchNorm1d(8), True), (nn.BatchNorm2d(8), True)])
def test_norm_layers_are_a_layer_kind(module, channels_first):
    info = layer_info(module)
    assert info.kind == "norm" and info.out_dim == 8 and info.weight_shape == (8,)
    assert info.channels_first == channels_first
    assert info.channel_shape(4) == ((8, 1, 1) if channels_first else (8,))


def test_hf_norms_are_found_and_affine_free_norms_are_not():
    llama = FAMILIES["llama"]()
    matcher = Matcher(llama)
    assert matcher.info("model.layers.0.input_layernorm").kind == "norm"
    t5 = FAMILIES["t5"]()
    assert Matcher(t5).info("encoder.block.0.layer.0.layer_norm").kind == "norm"
    assert layer_info(nn.LayerNorm(8, elementwise_affine=False)) is None
    assert layer_info(nn.LayerNorm((4, 8))) is None  # multi-dimensional affine


@pytest.mark.parametrize("module, bias", [
    (nn.Linear(4, 8), "own"), (nn.Linear(4, 8, bias=False), "creatable"),
    (nn.Conv2d(2, 8, 3, bias=False), "creatable"), (nn.LayerNorm(8, bias=False), "creatable"),
    (nn.LayerNorm(8), "own"), (nn.RMSNorm(8), "none"), (nn.Embedding(5, 8), "none"),
    (nn.BatchNorm1d(8), "own")])
def test_layer_info_says_whether_the_layer_has_or_would_use_a_bias(module, bias):
    assert layer_info(module).bias == bias


def test_layer_info_reads_bias_of_hf_norms_from_the_module():
    llama, t5 = FAMILIES["llama"](), FAMILIES["t5"]()
    assert Matcher(llama).info("model.layers.0.input_layernorm").bias == "none"
    assert Matcher(t5).info("encoder.block.0.layer.0.layer_norm").bias == "none"
    assert Matcher(FAMILIES["bert"]()).info(
        "bert.encoder.layer.0.output.LayerNorm").bias == "own"


# ------------------------------------------------------------------------------ weight form
def test_weight_form_runs_the_layer_with_changed_parameters(toy_methods):
    model = FAMILIES["llama"]()
    case = CASES_BY_NAME["llama"]
    y0 = _out(model, case)
    norm = "model.layers.0.post_attention_layernorm"
    dt.inject(model, toy_methods["toy-weight-bias"](targets=["0.self_attn.q_proj"]), name="w")
    perturb(model, "w", scale=0.5)
    layer = delta_layers(model)["model.layers.0.self_attn.q_proj"]
    x = torch.randn(2, 3, layer.info.in_dim)
    expected = F.linear(x, layer.base_layer.weight, layer.deltas["w"].db)
    with torch.no_grad():
        assert_rel_close(layer(x), expected, 1e-6, "weight-form forward")
    assert_differs(_out(model, case), y0, "weight-form delta")
    # A norm that would ignore a created bias cannot take the merge; nothing changes.
    dt.inject(model, toy_methods["toy-weight-bias"](targets=[norm]), name="n")
    perturb(model, "n", scale=0.5)
    before = base_tensors(model)
    with pytest.raises(MergeError, match="would ignore"):
        dt.merge(model)
    after = base_tensors(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    dt.delete(model, "n")
    y1 = _out(model, case)
    dt.merge(model)
    assert_rel_close(_out(model, case), y1, 1e-5, "merged weight-form delta")
    assert "bias" in dict(delta_layers(model)["model.layers.0.self_attn.q_proj"]
                          .base_layer.named_parameters())
    dt.unmerge(model)
    assert delta_layers(model)["model.layers.0.self_attn.q_proj"].base_layer.bias is None


def test_weight_form_gradients_reach_only_the_delta(toy_methods):
    model = MLP.build()
    dt.inject(model, toy_methods["toy-weight-bias"](targets=["blocks.0.0"]), name="w")
    dt.inject(model, dt.LoraConfig(rank=2, targets=["blocks.0.0"]), name="l")
    perturb(model, scale=0.3)
    run(model, MLP.inputs()).square().sum().backward()
    layer = delta_layers(model)["blocks.0.0"]
    assert layer.deltas["w"].db.grad is not None and layer.deltas["l"].B.grad is not None
    assert all(p.grad is None for p in layer.base_layer.parameters())


def test_weight_form_deltas_act_on_the_base_layer_before_output_deltas(toy_methods):
    """An output scaling activated *before* a weight delta still scales the weight delta's
    effect: weight deltas act on the base layer itself, as merged deltas do."""
    model = MLP.build()
    dt.inject(model, toy_methods["toy-output-scale"](targets=["blocks.0.0"]), name="s")
    dt.inject(model, toy_methods["toy-weight-bias"](targets=["blocks.0.0"]), name="w")
    perturb(model, scale=0.3)
    layer = delta_layers(model)["blocks.0.0"]
    x = torch.randn(4, layer.info.in_dim)
    expected = F.linear(x, layer.base_layer.weight, layer.base_layer.bias
                        + layer.deltas["w"].db) * layer.deltas["s"].l
    with torch.no_grad():
        assert_rel_close(layer(x), expected, 1e-6, "weight delta inside the scaling")


# ------------------------------------------------------------------------------ taps
def _capture_input(module):
    seen = {}

    def hook(mod, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]
    return seen, module.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("family, tap, out", [
    ("llama", "model.layers.0.mlp", "model.layers.0.mlp.down_proj"),
    ("bert", "bert.encoder.layer.0.intermediate", "bert.encoder.layer.0.output.dense"),
    ("gpt2", "transformer.h.0.mlp", "transformer.h.0.mlp.c_proj"),
])
def test_sub_layer_target_reads_the_sub_layer_input(toy_methods, family, tap, out):
    model = FAMILIES[family]()
    case = CASES_BY_NAME[family]
    y0 = _out(model, case)
    dt.inject(model, toy_methods["toy-parallel"](targets=["ffn"], layers=[0]), name="p")
    layer = delta_layers(model)[out]
    delta = layer.deltas["p"]
    assert delta.info.tap == tap and delta.reads_tap
    perturb(model, "p", scale=0.3)
    modules = dict(model.named_modules())
    tap_module = modules[tap]
    seen, h1 = _capture_input(tap_module)
    with dt.disabled(model):
        base_out = {}
        h3 = layer.register_forward_hook(lambda m, a, o: base_out.setdefault("y", o))
        _out(model, case)
        h3.remove()
    assert not layer._tapped, "a disabled layer must not keep tapped activations"
    seen.clear()
    got = {}
    h2 = layer.register_forward_hook(lambda m, a, o: got.setdefault("y", o))
    _out(model, case)
    h1.remove()
    h2.remove()
    expected = base_out["y"] + seen["x"] @ delta.W.t()
    assert_rel_close(got["y"], expected, 1e-5, "parallel output")
    assert not layer._tapped, "tapped activations must not outlive the call"
    assert_differs(_out(model, case), y0, "parallel delta")


def test_taps_are_saved_loaded_and_removed(toy_methods, tmp_path):
    case = CASES_BY_NAME["llama"]
    model = case.build()
    dt.inject(model, toy_methods["toy-parallel"](targets=["ffn"]), name="p")
    perturb(model, "p", scale=0.3)
    y1 = _out(model, case)
    dt.save(model, tmp_path / "p")
    fresh = case.build()
    dt.load(fresh, tmp_path / "p")
    assert_rel_close(_out(fresh, case), y1, 1e-6, "reloaded tapped delta")
    mlp = fresh.model.layers[0].mlp
    assert len(mlp._forward_pre_hooks) == 1
    dt.delete(fresh, "p")
    assert not mlp._forward_pre_hooks, "delete must remove the tap hook"
    dt.load(fresh, tmp_path / "p")
    dt.unload(fresh)
    assert not any(m._forward_pre_hooks for m in fresh.modules()), "unload must remove hooks"


def test_tap_that_never_runs_is_a_clear_error(toy_methods):
    model = FAMILIES["llama"]()
    dt.inject(model, toy_methods["toy-parallel"](targets=["ffn"], layers=[0]), name="p")
    layer = delta_layers(model)["model.layers.0.mlp.down_proj"]
    with pytest.raises(RuntimeError, match="was not seen"):
        layer(torch.randn(1, 2, layer.info.in_dim))


def test_plain_module_target_has_no_tap(toy_methods):
    model = FAMILIES["llama"]()
    dt.inject(model, toy_methods["toy-parallel"](targets=["mlp.down_proj"]), name="p")
    delta = delta_layers(model)["model.layers.0.mlp.down_proj"].deltas["p"]
    assert delta.info.tap is None and not delta.reads_tap
    assert delta.W.shape == (delta.info.out_dim, delta.info.in_dim)


def test_sub_layer_names_are_listed_and_checked():
    model = FAMILIES["t5"]()
    present = Matcher(model).present()
    assert {"attn", "xattn", "ffn"} <= set(present)
    with pytest.raises(TargetError, match="no 'xattn'"):
        dt.inject(FAMILIES["llama"](), dt.LoraConfig(targets=["xattn"]))


# ------------------------------------------------------------------------------ module_sets
@dataclass(frozen=True, kw_only=True)
class _SetsConfig(DeltaConfig):
    module_sets = ("special",)
    special: tuple[str, ...] | str | None = None


def test_module_sets_resolve_per_module_and_must_name_targets():
    class _Probe(Delta):
        def __init__(self, info, config, path):
            super().__init__(info, config, path)
            self.flag = config.special

    registry.register("toy-sets", config=_SetsConfig)(_Probe)
    try:
        model = MLP.build()
        config = _SetsConfig(targets=["blocks.0.0", "blocks.0.2"], special=["0.2"])
        matcher = Matcher(model)
        assert module_config(matcher, config, "blocks.0.0").special is False
        assert module_config(matcher, config, "blocks.0.2").special is True
        dt.inject(model, config)
        flags = {p: layer.deltas["default"].flag for p, layer in delta_layers(model).items()}
        assert flags == {"blocks.0.0": False, "blocks.0.2": True}
        with pytest.raises(TargetError, match="special entry 'head'"):
            dt.inject(MLP.build(), _SetsConfig(targets=["blocks.0.0"], special=["head"]))
        with pytest.raises(ConfigError, match="special"):
            _SetsConfig(special=[3])
    finally:
        registry._REGISTRY.pop("toy-sets", None)


# ------------------------------------------------------------------------------ combining
def _two_sequential(toy_methods):
    model = MLP.build()
    for name, seed in (("a", 1), ("b", 2)):
        dt.inject(model, toy_methods["toy-sequential"](targets=["blocks.0.0"]), name=name)
        perturb(model, name, seed=seed, scale=0.3)
    layer = delta_layers(model)["blocks.0.0"]
    x = torch.randn(4, layer.info.in_dim)
    with torch.no_grad():
        y0 = layer.base_layer(x)
    wa, wb = layer.deltas["a"].W, layer.deltas["b"].W
    return model, layer, x, y0, wa, wb


def test_sum_stack_and_weights_for_sequential_deltas(toy_methods):
    model, layer, x, y0, wa, wb = _two_sequential(toy_methods)
    with torch.no_grad():
        assert dt.activate(model, ["a", "b"]) is None
        assert_rel_close(layer(x), y0 + y0 @ wa.t() + y0 @ wb.t(), 1e-6, "sum")
        dt.activate(model, ["a", "b"], combine="stack")
        y1 = y0 + y0 @ wa.t()
        assert_rel_close(layer(x), y1 + y1 @ wb.t(), 1e-6, "stack")
        dt.activate(model, ["a", "b"], weights=[0.25, 0.75])
        assert_rel_close(layer(x), y0 + 0.25 * y0 @ wa.t() + 0.75 * y0 @ wb.t(), 1e-6,
                         "weighted")
        dt.activate(model, ["b", "a"], weights={"a": 0.5, "b": 2.0})
        assert_rel_close(layer(x), y0 + 0.5 * y0 @ wa.t() + 2.0 * y0 @ wb.t(), 1e-6,
                         "weights by name")


def test_weights_scale_additive_and_weight_form_deltas(toy_methods):
    model = MLP.build()
    dt.inject(model, dt.LoraConfig(rank=2, targets=["blocks.0.0"]), name="l")
    dt.inject(model, toy_methods["toy-weight-bias"](targets=["blocks.0.0"]), name="w")
    perturb(model, scale=0.3)
    layer = delta_layers(model)["blocks.0.0"]
    x = torch.randn(4, layer.info.in_dim)
    with torch.no_grad():
        y0 = layer.base_layer(x)
        dt.activate(model, ["l"])
        el = layer(x) - y0
        dt.activate(model, ["w"])
        ew = layer(x) - y0
        dt.activate(model, ["l", "w"], weights=[0.5, -1.0])
        assert_rel_close(layer(x), y0 + 0.5 * el - ew, 1e-5, "weighted lora + weight form")
    with pytest.raises(MergeError, match="weight"):
        dt.merge(model)
    # Injecting a third delta keeps the weights; the newcomer joins at weight 1.
    dt.inject(model, dt.LoraConfig(rank=2, targets=["blocks.0.2"]), name="m")
    assert layer.weight_of("l") == 0.5 and delta_layers(model)["blocks.0.2"].weight_of("m") == 1.0


def test_weights_are_refused_for_scaling_deltas_and_bad_values(toy_methods):
    model = MLP.build()
    dt.inject(model, toy_methods["toy-output-scale"](targets=["blocks.0.0"]), name="s")
    dt.inject(model, dt.LoraConfig(rank=2, targets=["blocks.0.0"]), name="l")
    with pytest.raises(ConfigError, match="cannot be weighted"):
        dt.activate(model, ["s", "l"], weights=[1.0, 0.5])
    with pytest.raises(ConfigError, match="finite"):
        dt.activate(model, ["l"], weights=[float("nan")])
    with pytest.raises(ConfigError, match="exactly"):
        dt.activate(model, ["l"], weights={"s": 1.0})
    with pytest.raises(ConfigError, match="combine"):
        dt.activate(model, ["l"], combine="mean")
    dt.merge(model)
    with pytest.raises(StateError, match="merged"):
        dt.activate(model, ["s", "l"], weights=[1.0, 0.5])


def test_sum_of_one_sequential_and_additive_deltas_matches_stacking(toy_methods):
    """With one output-reading delta, sum and stack agree (the fast path is taken)."""
    model, layer, x, _, _, _ = _two_sequential(toy_methods)
    dt.inject(model, dt.LoraConfig(rank=2, targets=["blocks.0.0"]), name="l")
    perturb(model, "l", scale=0.3)
    with torch.no_grad():
        dt.activate(model, ["a", "l"])
        assert layer._simple
        summed = layer(x)
        dt.activate(model, ["a", "l"], combine="stack")
        assert_rel_close(layer(x), summed, 1e-6, "one sequential delta")


# ------------------------------------------------------------------------------ shared tensors
def test_shared_tensors_are_tied_counted_once_and_saved_once(toy_methods, tmp_path):
    from safetensors.torch import load_file

    config = toy_methods["toy-shared"](targets=["blocks.0.0", "blocks.1.0", "head"])
    model = MLP.build()
    predicted = dt.cost(model, config)
    dt.inject(model, config, name="s")
    deltas = [layer.deltas["s"] for layer in delta_layers(model).values()]
    assert len({id(d.shared) for d in deltas}) == 1, "one shared module for the adapter"
    counted = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counted == predicted.params == dt.summary(model).rows[0].params == 24 + 24 + 3 + 3
    perturb(model, "s", scale=0.3)
    run(model, MLP.inputs()).square().sum().backward()
    assert deltas[0].shared.g.grad is not None
    y1 = _out(model, MLP)
    dt.save(model, tmp_path / "s")
    keys = set(load_file(str(tmp_path / "s" / "deltatune_model.safetensors")))
    assert [k for k in keys if k.endswith("shared.g")] == ["blocks.0.0.shared.g"]
    fresh = MLP.build()
    dt.load(fresh, tmp_path / "s")
    again = [layer.deltas["s"] for layer in delta_layers(fresh).values()]
    assert len({id(d.shared) for d in again}) == 1
    assert torch.equal(again[-1].shared.g, deltas[0].shared.g)
    assert_rel_close(_out(fresh, MLP), y1, 1e-6, "reloaded shared")
    fresh.to(torch.bfloat16)
    assert len({id(d.shared.g) for d in again}) == 1, "a dtype cast keeps the tie"
