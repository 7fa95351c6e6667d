"""(IA)³ against naive references of its equation, k ← l_k ⊙ k, v ← l_v ⊙ v, h ← l_ff ⊙ h_ff:
the FFN by hand, a whole Llama against hooks that rescale by hand, output and input scaling on
every layer type with exact merge / unmerge, the defaults, config errors and the JSON form."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
import zoo
from deltatune.core.lifecycle import delta_layers
from deltatune.methods.ia3 import IA3Config, IA3Delta
from helpers import assert_differs, assert_rel_close, perturb


def vectors(model: nn.Module, name: str = "a") -> dict[str, torch.Tensor]:
    return {p: layer.deltas[name].l.detach() for p, layer in delta_layers(model).items()}


# ------------------------------------------------------------------------- golden formula
def test_llama_ffn_by_hand():
    """LlamaMLP: down(l_ff ⊙ (silu(gate x) · up x)), l_ff on the intermediate activation."""
    model = zoo.llama().eval()
    dt.inject(model, IA3Config(), name="a")
    perturb(model, scale=0.3)
    mlp = model.model.layers[0].mlp
    l_ff = mlp.down_proj.deltas["a"].l
    x = torch.randn(2, 5, 32)
    w = {n: getattr(mlp, n).weight for n in ("gate_proj", "up_proj", "down_proj")}
    h = F.silu(x @ w["gate_proj"].T) * (x @ w["up_proj"].T)  # (2, 5, 48)
    expected = (l_ff * h) @ w["down_proj"].T
    with torch.no_grad():
        assert_differs(expected, h @ w["down_proj"].T, "l_ff must matter")
        assert_rel_close(mlp(x), expected, 1e-6, "FFN")


def test_llama_against_hooks_that_rescale_k_v_and_the_ffn_activation():
    """A fresh base model rescaled by plain torch hooks (no deltatune) gives the same logits."""
    case = zoo.CASES_BY_NAME["llama"]
    ours = dt.inject(case.build(), IA3Config(), name="a")
    perturb(ours, scale=0.3)
    ls = vectors(ours)
    assert len(ls) == 6 and sum(p.endswith("down_proj") for p in ls) == 2
    reference = case.build()
    for path, vec in ls.items():
        module = reference.get_submodule(path)
        if path.endswith("down_proj"):  # the input: the FFN's intermediate activation
            module.register_forward_pre_hook(lambda m, args, v=vec: (args[0] * v,))
        else:  # k = l_k ⊙ W_k x, v = l_v ⊙ W_v x
            module.register_forward_hook(lambda m, args, out, v=vec: out * v)
    with torch.no_grad():
        expected = zoo.run(reference, case.inputs())
        assert_differs(expected, zoo.run(case.build(), case.inputs()), "IA3 must matter")
        assert_rel_close(zoo.run(ours, case.inputs()), expected, 1e-5, "Llama with IA3")


def test_plain_mlp_output_and_input_scaling():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4))
    dt.inject(model, IA3Config(targets=["0", "2"], feedforward=["2"]), name="a")
    perturb(model, scale=0.5)
    l1, l2 = model[0].deltas["a"].l, model[2].deltas["a"].l
    assert l1.shape == (10,) and l2.shape == (10,)  # out of layer 0, in of layer 2
    w1, b1 = model[0].base_layer.weight, model[0].base_layer.bias
    w2, b2 = model[2].base_layer.weight, model[2].base_layer.bias
    x = torch.randn(3, 6)
    expected = (l2 * torch.relu(l1 * (x @ w1.T + b1))) @ w2.T + b2
    with torch.no_grad():
        assert_rel_close(model(x), expected, 1e-6, "MLP")


# ---------------------------------------------------------------- layer types and merging
LAYERS = {
    "linear": (lambda: nn.Linear(7, 5), (2, 3, 7)),
    "linear-no-bias": (lambda: nn.Linear(7, 5, bias=False), (4, 7)),
    "conv1d-hf": (lambda: Conv1D(5, 7), (2, 3, 7)),  # nf=5 outputs, nx=7 inputs
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1), (2, 3, 9)),
    "conv2d-reflect": (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="reflect"),
                       (2, 3, 9, 9)),
    "conv2d-dilated-no-bias": (lambda: nn.Conv2d(3, 4, (2, 3), dilation=2, bias=False),
                               (2, 3, 8, 8)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2), (1, 2, 4, 4, 4)),
}


def reference(base: nn.Module, x: torch.Tensor, vec: torch.Tensor, feedforward: bool):
    """The base layer with the input channels (feedforward) or output channels rescaled."""
    shape = (-1,) + (1,) * (x.dim() - 2) if isinstance(base, nn.modules.conv._ConvNd) else (-1,)
    if feedforward:
        return base(x * vec.view(shape))
    return base(x) * vec.view(shape)


@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "input"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_every_layer_type_against_the_reference_and_merged(kind, feedforward):
    make, shape = LAYERS[kind]
    torch.manual_seed(0)
    model = nn.Sequential(make())
    original = {k: v.clone() for k, v in model[0].state_dict().items()}
    dt.inject(model, IA3Config(targets=["0"], feedforward=feedforward), name="a")
    perturb(model, scale=0.5)
    delta, base = model[0].deltas["a"], model[0].base_layer
    assert delta.transforms_input is feedforward
    x = torch.randn(*shape)
    with torch.no_grad():
        expected = reference(base, x, delta.l, feedforward)
        assert_differs(expected, base(x), kind)
        assert_rel_close(model(x), expected, 1e-6, f"{kind} unmerged")
        dt.merge(model)
        assert_rel_close(model(x), expected, 1e-6, f"{kind} merged")
        # The merged weights themselves: W' = diag(l) W, b' = l ⊙ b or W' = W diag(l).
        matrix = delta.info.weight_matrix(original["weight"])
        vec = delta.l
        if feedforward and delta.info.kind == "conv":
            vec = vec.repeat_interleave(delta.info.in_dim // vec.numel())
        scaled = matrix * (vec[None, :] if feedforward else vec[:, None])
        assert_rel_close(base.weight, delta.info.weight_from_matrix(scaled), 1e-7, "merged W")
        if "bias" in original:
            bias = original["bias"] if feedforward else original["bias"] * delta.l
            assert_rel_close(base.bias, bias, 1e-7, "merged bias")
        dt.unmerge(model)
    for key, value in original.items():
        assert_rel_close(model[0].base_layer.state_dict()[key], value, 1e-6, f"restored {key}")


def test_two_deltas_multiply_on_input_and_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    for name in ("a", "b"):
        dt.inject(model, IA3Config(targets=["0", "2"], feedforward=["2"]), name=name)
    perturb(model, scale=0.4)
    x = torch.randn(4, 5)
    la = vectors(model, "a")
    lb = vectors(model, "b")
    w1, b1 = model[0].base_layer.weight, model[0].base_layer.bias
    w2, b2 = model[2].base_layer.weight, model[2].base_layer.bias
    h = torch.tanh(la["0"] * lb["0"] * (x @ w1.T + b1))
    expected = (la["2"] * lb["2"] * h) @ w2.T + b2
    with torch.no_grad():
        assert_rel_close(model(x), expected, 1e-6, "a and b")
        dt.merge(model)
        assert_rel_close(model(x), expected, 1e-6, "a and b merged")
        dt.unmerge(model, "b")
        assert dt.merged_adapters(model) == ["a"]
        dt.unmerge(model)


@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "input"])
def test_unmerge_refuses_a_zero_scale_and_changes_nothing(feedforward):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    dt.inject(model, IA3Config(targets=["0"], feedforward=feedforward), name="a")
    with torch.no_grad():
        model[0].deltas["a"].l[1] = 0.0  # switches a channel off: fine to merge
    dt.merge(model)
    merged = {k: v.clone() for k, v in model[0].base_layer.state_dict().items()}
    with pytest.raises(dt.MergeError, match=r"\|l\| < 1e-06.*Reload the base"):
        dt.unmerge(model)
    assert dt.merged_adapters(model) == ["a"]
    for key, value in model[0].base_layer.state_dict().items():
        assert torch.equal(value, merged[key])
    with torch.no_grad():
        model[0].deltas["a"].l[1] = 1e-9  # tiny but not zero: still refused
    with pytest.raises(dt.MergeError, match="smallest 1e-09"):
        dt.unmerge(model)


def test_merge_refuses_non_finite_vectors():
    model = nn.Sequential(nn.Linear(4, 4))
    dt.inject(model, IA3Config(targets=["0"]), name="a")
    with torch.no_grad():
        model[0].deltas["a"].l[0] = float("inf")
    with pytest.raises(dt.MergeError, match="NaN or Inf"):
        dt.merge(model)
    assert dt.merged_adapters(model) == []


# --------------------------------------------------------------------------- dtypes
def test_bf16_activations_stay_bf16_with_fp32_vectors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)).to(torch.bfloat16)
    dt.inject(model, IA3Config(targets=["0", "1"], feedforward=["1"], dtype="float32"),
              name="a")
    assert all(v.dtype == torch.float32 for v in vectors(model).values())
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    seen = []
    model[1].base_layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    y = model(x)
    assert y.dtype == torch.bfloat16 and seen == [torch.bfloat16], "never upcast activations"
    y.float().sum().backward()
    assert model[0].deltas["a"].l.grad.dtype == torch.float32


# --------------------------------------------------------------------------- defaults
def positions(model: nn.Module) -> dict[str, str]:
    return {p: "in" if layer.deltas["a"].transforms_input else "out"
            for p, layer in delta_layers(model).items()}


@pytest.mark.parametrize("family, expected", [
    ("llama", {"self_attn.k_proj": "out", "self_attn.v_proj": "out", "mlp.down_proj": "in"}),
    ("bert", {"attention.self.key": "out", "attention.self.value": "out",
              "output.dense": "in"}),  # output.dense of the FFN, not attention.output.dense
    ("t5", {"SelfAttention.k": "out", "SelfAttention.v": "out", "DenseReluDense.wo": "in"}),
    ("vit", {"attention.k_proj": "out", "attention.v_proj": "out", "mlp.fc2": "in"}),
])
def test_default_placement_is_keys_values_and_ffn_input(family, expected):
    model = zoo.FAMILIES[family]()
    config = IA3Config()
    assert config.targets is None and config.feedforward == ("ffn.down",)
    dt.inject(model, config, name="a")
    found = positions(model)
    blocks = 4 if family == "t5" else 2  # T5: encoder and decoder blocks
    assert len(found) == 3 * blocks
    for path, where in found.items():
        suffix = next(s for s in expected if path.endswith("." + s))
        assert where == expected[suffix], path
        assert "attention.output" not in path


def test_default_trainable_count_on_llama():
    model = zoo.llama()
    # per block: k (2 kv heads × 8 = 16) + v (16) + the FFN activation (48)
    assert dt.cost(model, IA3Config()).params == 2 * (16 + 16 + 48)
    dt.inject(model, IA3Config(), name="a")
    assert dt.summary(model).trainable_params == 160


def test_fused_qkv_models_ask_for_attn_qkv():
    """GPT-2 has no separate key/value layers: the defaults refuse with what to target."""
    model = zoo.gpt2()
    with pytest.raises(dt.TargetError, match="fuses q, k and v.*'attn.qkv'"):
        dt.inject(model, IA3Config(), name="a")
    assert dt.adapters(model) == {}
    config = IA3Config(targets=["attn.qkv", "ffn.down"], feedforward=["ffn.down"])
    dt.inject(model, config, name="a")
    assert positions(model) == {f"transformer.h.{i}.{p}": w for i in range(2)
                                for p, w in (("attn.c_attn", "out"), ("mlp.c_proj", "in"))}
    assert dt.summary(model).trainable_params == 2 * (3 * 32 + 4 * 32)


def test_explicit_targets_without_feedforward_scale_outputs_only():
    model = zoo.llama()
    dt.inject(model, IA3Config(targets=["attn.k", "ffn.down"]), name="a")
    assert set(positions(model).values()) == {"out"}
    assert delta_layers(model)["model.layers.0.mlp.down_proj"].deltas["a"].l.shape == (32,)


def test_feedforward_forms_and_overrides():
    model = zoo.llama()
    dt.inject(model, IA3Config(targets=["k_proj", "down_proj"], feedforward=True), name="a")
    assert set(positions(model).values()) == {"in"}
    model = zoo.llama()
    dt.inject(model, IA3Config(targets=["k_proj", "v_proj", "down_proj"],
                               feedforward=r".*\.1\.mlp\.down_proj"), name="a")
    assert [p for p, w in positions(model).items() if w == "in"] == \
        ["model.layers.1.mlp.down_proj"]
    model = zoo.llama()
    dt.inject(model, IA3Config(targets=["k_proj", "v_proj"],
                               overrides={"attn.v": {"feedforward": True}}), name="a")
    assert {p.rsplit(".", 1)[1]: w for p, w in positions(model).items()} == \
        {"k_proj": "out", "v_proj": "in"}


# --------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("config, match", [
    ({"targets": ["k_proj", "v_proj"], "feedforward": ["down_proj"]},
     "feedforward entry 'down_proj' matches none of the targeted modules"),
    ({"targets": ["k_proj"], "feedforward": ".*up_proj"},
     r"feedforward entry '\.\*up_proj' matches none"),
    ({"targets": ["k_proj"], "feedforward": ["no_such_layer"]}, "matches none"),
])
def test_feedforward_must_name_targeted_modules(config, match):
    model = zoo.llama()
    with pytest.raises(dt.TargetError, match=match):
        dt.inject(model, IA3Config(**config), name="a")
    assert dt.adapters(model) == {}


@pytest.mark.parametrize("config, match", [
    ({"feedforward": [1]}, "feedforward must be a regex string or a list"),
    ({"feedforward": [""]}, "non-empty names"),
    ({"rank": 4}, "unexpected keyword"),
])
def test_bad_configs(config, match):
    with pytest.raises((dt.ConfigError, TypeError), match=match):
        IA3Config(**config)


def test_unknown_key_in_json_is_refused():
    with pytest.raises(dt.ConfigError, match=r"unknown keys \['rank'\].*feedforward"):
        dt.config_from_dict({"method": "ia3", "rank": 4})


# --------------------------------------------------------------------------- JSON
@pytest.mark.parametrize("config", [
    {}, {"feedforward": []}, {"targets": ["k_proj", "down_proj"]},
    {"targets": ["attn.k", "ffn.down"], "feedforward": ["ffn.down"], "dtype": "float32"},
    {"targets": r".*(k|down)_proj", "feedforward": True, "layers": [-1]},
    {"targets": ["k_proj", "v_proj"], "overrides": {"v_proj": {"feedforward": True}}},
], ids=["default", "default-no-ff", "targets", "canonical", "regex", "overrides"])
def test_json_round_trip(config):
    first = IA3Config(**config)
    text = first.to_json()
    again = dt.config_from_dict(json.loads(text))
    assert again == first and isinstance(again, IA3Config)
    assert again.to_json() == text
    assert json.loads(text)["method"] == "ia3"


def test_defaults_survive_a_round_trip_and_a_save(tmp_path):
    config = IA3Config()
    assert config.to_dict()["targets"] is None
    assert config.to_dict()["feedforward"] == ["ffn.down"]
    assert IA3Config(targets=["k_proj"]).feedforward is None
    case = zoo.CASES_BY_NAME["llama"]
    model = dt.inject(case.build(), config, name="a")
    perturb(model, scale=0.2)
    with torch.no_grad():
        expected = zoo.run(model, case.inputs())
    dt.save(model, tmp_path / "a")
    fresh = dt.load(case.build(), tmp_path / "a")
    assert dt.adapters(fresh)["a"] == config
    assert positions(fresh) == positions(model)
    with torch.no_grad():
        assert_rel_close(zoo.run(fresh, case.inputs()), expected, 1e-6, "reloaded")


def test_registered_capabilities():
    spec = dt.get_method("ia3")
    assert spec.config_class is IA3Config and spec.delta_class is IA3Delta
    assert IA3Delta.mergeable and IA3Delta.composition == "scale"
    assert IA3Delta.layer_kinds == {"linear", "conv"}
    with pytest.raises(dt.TargetError, match="cannot adapt"):
        dt.inject(nn.Sequential(nn.Embedding(4, 3)), IA3Config(targets=["0"]))


def test_unbatched_conv_inputs():
    torch.manual_seed(0)
    for feedforward in (False, True):
        model = nn.Sequential(nn.Conv2d(3, 4, 3))
        dt.inject(model, IA3Config(targets=["0"], feedforward=feedforward), name="a")
        perturb(model, scale=0.5)
        x = torch.randn(3, 6, 6)  # (C, H, W): no batch dimension
        with torch.no_grad():
            assert_rel_close(model(x), model(x[None])[0], 1e-6, "unbatched")
            assert_rel_close(model(x), reference(model[0].base_layer, x[None],
                                                 model[0].deltas["a"].l, feedforward)[0],
                             1e-6, "unbatched reference")


def test_excluding_the_ffn_from_the_defaults_needs_an_empty_feedforward():
    model = zoo.llama()
    with pytest.raises(dt.TargetError, match="feedforward entry 'ffn.down' matches none"):
        dt.inject(model, IA3Config(exclude=["ffn.down"]), name="a")
    dt.inject(model, IA3Config(exclude=["ffn.down"], feedforward=[]), name="a")
    assert len(delta_layers(model)) == 4 and set(positions(model).values()) == {"out"}


def test_output_scaling_layers_keep_the_wrappers_fast_path():
    model = zoo.llama()
    dt.inject(model, IA3Config(), name="a")
    layers = delta_layers(model)
    assert layers["model.layers.0.self_attn.k_proj"]._simple
    assert not layers["model.layers.0.mlp.down_proj"]._simple  # pre() must run
