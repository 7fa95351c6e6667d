"""Named deltas over their life: inject, activate, disabled, delete, merge, unmerge, unload;
summary and cost; dtype handling; HF generate; composition semantics of the core."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core.layers import DeltaLayer
from deltatune.core.lifecycle import delta_layers
from helpers import assert_differs, assert_rel_close, base_tensors, no_deltatune_modules, perturb
from zoo import CASES_BY_NAME, FAMILIES, run

MLP_CASE = CASES_BY_NAME["mlp"]


def mlp_with(*names, **config):
    model = MLP_CASE.build()
    for name in names:
        dt.inject(model, dt.LoraConfig(rank=2, **config), name=name)
        perturb(model, name, seed=len(name) + ord(name[0]))
    return model


def out(model, case=MLP_CASE):
    with torch.no_grad():
        return run(model, case.inputs())


def test_inject_freezes_base_and_stacks_active_deltas():
    model = MLP_CASE.build()
    for p in model.parameters():
        p.requires_grad_(True)
    dt.inject(model, dt.LoraConfig(rank=2), name="a")
    dt.inject(model, dt.LoraConfig(rank=2, targets=["head"]), name="b", trainable=False)
    assert dt.active_adapters(model) == ["a", "b"] and list(dt.adapters(model)) == ["a", "b"]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    a_params = {id(p) for layer in delta_layers(model).values() if "a" in layer.deltas
                for p in layer.deltas["a"].parameters()}
    assert trainable == a_params


@pytest.mark.parametrize("name", ["", "a/b", "..", "a.b", "-x", "keys", "__base__", "x" * 129,
                                  "a b", 3])
def test_invalid_names(name):
    with pytest.raises(dt.AdapterNameError, match="invalid adapter name"):
        dt.inject(MLP_CASE.build(), dt.LoraConfig(), name=name)


def test_duplicate_name():
    model = mlp_with("a")
    with pytest.raises(dt.AdapterNameError, match="already exists"):
        dt.inject(model, dt.LoraConfig(), name="a")


def test_activate_selects_and_orders_deltas():
    model = mlp_with("a", "b")
    y_ab = out(model)
    dt.activate(model, "a")
    y_a = out(model)
    dt.activate(model, [])
    assert dt.active_adapters(model) == []
    y0 = out(model)
    with dt.disabled(model):
        assert torch.equal(out(model), y0)
    assert_differs(y_a, y0)
    assert_differs(y_ab, y_a)
    dt.activate(model, ["b", "a"])
    assert dt.active_adapters(model) == ["b", "a"]
    assert_rel_close(out(model), y_ab, 1e-6, "order of additive deltas")
    with pytest.raises(dt.AdapterNameError, match="no adapter named 'c'"):
        dt.activate(model, ["a", "c"])
    with pytest.raises(dt.AdapterNameError, match="duplicate"):
        dt.activate(model, ["a", "a"])


def test_disabled_restores_on_error_and_refuses_merged():
    model = mlp_with("a")
    y = out(model)
    with pytest.raises(RuntimeError, match="boom"), dt.disabled(model):
        raise RuntimeError("boom")
    assert torch.equal(out(model), y)
    dt.merge(model)
    with pytest.raises(dt.StateError, match="merged into the base weights.*unmerge"), \
            dt.disabled(model):
        pass


def test_delete_unwraps_layers_left_empty():
    model = mlp_with("a", "b")
    dt.activate(model, ["b"])
    y_b = out(model)
    dt.delete(model, "a")
    assert list(dt.adapters(model)) == ["b"] and torch.equal(out(model), y_b)
    dt.delete(model, "b")
    assert no_deltatune_modules(model)
    assert set(model.state_dict()) == set(MLP_CASE.build().state_dict())
    with pytest.raises(dt.AdapterNameError):
        dt.delete(model, "b")


def test_delete_refuses_merged():
    model = mlp_with("a")
    dt.merge(model)
    with pytest.raises(dt.StateError, match="unmerge it first"):
        dt.delete(model, "a")


def test_merge_requires_active_and_merges_subsets():
    model = mlp_with("a", "b")
    dt.activate(model, ["a"])
    with pytest.raises(dt.StateError, match="not active"):
        dt.merge(model, ["b"])
    dt.activate(model, ["a", "b"])
    y = out(model)
    dt.merge(model, "b")
    assert dt.merged_adapters(model) == ["b"]
    assert_rel_close(out(model), y, 1e-5, "partly merged")
    with pytest.raises(dt.StateError, match="cannot be deactivated"):
        dt.activate(model, ["a"])
    dt.unmerge(model, "b")
    dt.activate(model, ["a"])


def test_nan_merge_is_refused_and_changes_nothing():
    model = mlp_with("a")
    layer = delta_layers(model)["blocks.1.2"]
    with torch.no_grad():
        layer.deltas["a"].B[0, 0] = float("nan")
    before = base_tensors(model)
    with pytest.raises(dt.MergeError, match="blocks.1.2.weight gives NaN or Inf.*nothing was"):
        dt.merge(model)
    after = base_tensors(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert dt.merged_adapters(model) == []
    with pytest.raises(dt.MergeError):
        dt.unload(model, merge=True)
    assert not no_deltatune_modules(model), "a failed unload must leave the deltas in place"


def test_unsafe_merge_skips_the_check():
    model = mlp_with("a")
    with torch.no_grad():
        delta_layers(model)["blocks.1.2"].deltas["a"].B[0, 0] = float("inf")
    dt.merge(model, safe=False)
    assert not torch.isfinite(delta_layers(model)["blocks.1.2"].base_layer.weight).all()


def test_merging_into_tied_weights_is_refused():
    model = FAMILIES["gpt2"]()
    dt.inject(model, dt.LoraConfig(targets=["wte"]), name="a")
    with pytest.raises(dt.MergeError, match="weight of transformer.wte is shared with "
                                            "\\[.lm_head.\\]"):
        dt.merge(model)


def test_merging_only_an_untied_parameter_of_a_tied_layer_is_allowed():
    """GPT-2's lm_head shares its weight with wte; a bias delta leaves the weight alone."""
    from deltatune.methods.selective import BitFitConfig

    model = FAMILIES["gpt2"]()
    wte = model.transformer.wte.weight.detach().clone()
    dt.inject(model, BitFitConfig(targets=["lm_head"], add_missing=True), name="a")
    perturb(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    with torch.no_grad():
        y = model(input_ids=ids).logits
        dt.merge(model)
        assert_rel_close(model(input_ids=ids).logits, y, 1e-5, "bias merged beside a tied weight")
    assert torch.equal(model.transformer.wte.weight, wte)
    assert model.lm_head.base_layer.bias is not None


def test_unload_merge_drops_inactive_and_keeps_active():
    model = mlp_with("a", "b")
    dt.activate(model, ["a"])
    y_a = out(model)
    plain = dt.unload(model, merge=True)
    assert no_deltatune_modules(plain)
    assert_rel_close(out(plain), y_a, 1e-5, "merged a only")


def test_unload_without_merge_unmerges_first():
    model = mlp_with("a")
    y0 = out(MLP_CASE.build())
    dt.merge(model)
    plain = dt.unload(model)
    assert_rel_close(out(plain), y0, 1e-5, "base restored")


def test_train_and_eval_never_merge():
    model = mlp_with("a")
    model.train()
    model.eval()
    assert dt.merged_adapters(model) == []


def test_bias_delta_on_a_bias_free_layer_creates_and_removes_the_bias():
    model = nn.Sequential(nn.Linear(4, 3, bias=False))
    x = torch.randn(2, 4)
    dt.inject(model, dt.LoraConfig(rank=2, bias=True, targets=["0"]), name="a")
    perturb(model)
    y = model(x)
    dt.merge(model)
    assert isinstance(model[0].base_layer.bias, nn.Parameter)
    assert not model[0].base_layer.bias.requires_grad
    assert_rel_close(model(x), y, 1e-5, "merged bias")
    dt.unmerge(model)
    assert model[0].base_layer.bias is None
    dt.merge(model)
    plain = dt.unload(model, merge=True)
    assert_rel_close(plain(x), y, 1e-5, "unloaded with bias")


def test_summary_table():
    model = mlp_with("a", "b")
    dt.activate(model, ["b"])
    dt.merge(model)
    summary = dt.summary(model)
    rows = {r.name: r for r in summary.rows}
    assert rows["a"].method == "lora" and rows["a"].modules == 4 and not rows["a"].active
    assert rows["b"].active and rows["b"].merged
    assert rows["a"].params == sum(2 * (i + o) for i, o in [(12, 24), (24, 12)] * 2)
    text = str(summary)
    assert "adapter" in text and "trainable" in text and "b" in text
    assert summary.trainable_params == rows["a"].trainable + rows["b"].trainable
    empty = dt.summary(MLP_CASE.build())
    assert empty.rows == () and "(no deltas)" in str(empty)


def test_cost_changes_nothing_and_works_on_a_meta_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = MLP_CASE.build()
    before = base_tensors(model)
    cost = dt.cost(model, dt.LoraConfig(rank=3, targets=["blocks.0.0"]))
    assert cost.params == 3 * (12 + 24) and cost.bytes == 4 * cost.params
    assert cost.modules == 1 and cost.share == cost.params / sum(v.numel() for v in before.values())
    assert no_deltatune_modules(model) and base_tensors(model).keys() == before.keys()
    with torch.device("meta"):
        big = LlamaForCausalLM(LlamaConfig(hidden_size=4096, intermediate_size=11008,
                                           num_hidden_layers=32, num_attention_heads=32,
                                           vocab_size=32000))
    c = dt.cost(big, dt.LoraConfig(rank=16, targets=["attn.q", "attn.v"]))
    assert c.params == 32 * 2 * 16 * (4096 + 4096) and c.base_params > 6_000_000_000


def test_delta_dtype_follows_base_or_config_and_activations_stay_in_their_dtype():
    model = MLP_CASE.build(dtype=torch.bfloat16)
    dt.inject(model, dt.LoraConfig(rank=2), name="a")
    dt.inject(model, dt.LoraConfig(rank=2, dtype="float32"), name="b")
    layer = delta_layers(model)["blocks.0.0"]
    assert layer.deltas["a"].A.dtype == torch.bfloat16
    assert layer.deltas["b"].A.dtype == torch.float32
    perturb(model)
    y = run(model, MLP_CASE.inputs(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.deltas["b"].B.grad is not None and layer.deltas["b"].B.grad.dtype == torch.float32


def test_wrapper_passes_attribute_reads_to_the_base_layer():
    model = mlp_with("a")
    layer = model.blocks[0][0]
    assert isinstance(layer, DeltaLayer)
    assert layer.weight is layer.base_layer.weight and layer.in_features == 12
    with pytest.raises(AttributeError):
        layer.no_such_attribute  # noqa: B018


def test_deepcopy_gives_an_independent_model():
    model = mlp_with("a")
    twin = copy.deepcopy(model)
    dt.delete(twin, "a")
    assert list(dt.adapters(model)) == ["a"] and no_deltatune_modules(twin)


def test_generate_with_lora_matches_merged_generate():
    model = FAMILIES["llama"]().eval()
    dt.inject(model, dt.LoraConfig(rank=4), name="a")
    perturb(model, scale=0.5)
    ids = torch.tensor([[5, 6, 7, 8]])
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    adapted = model.generate(ids, **kwargs)
    with dt.disabled(model):
        base = model.generate(ids, **kwargs)
    dt.merge(model)
    merged = model.generate(ids, **kwargs)
    assert torch.equal(adapted, merged)
    assert adapted.shape == (1, 10) and not torch.equal(adapted, base)


# ------------------------------------------------------------------ composition semantics
def single_linear():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5))


@pytest.mark.parametrize("order", [("lora", "in"), ("in", "lora"), ("lora", "out"),
                                   ("out", "lora"), ("in", "out", "lora")])
def test_merged_equals_unmerged_for_any_order_of_mixed_deltas(toy_methods, order):
    configs = {"lora": dt.LoraConfig(rank=2, bias=True, targets=["0"]),
               "in": toy_methods["toy-input-scale"](targets=["0"]),
               "out": toy_methods["toy-output-scale"](targets=["0"])}
    model = single_linear()
    x = torch.randn(3, 6)
    y0 = model(x)
    for name in order:
        dt.inject(model, configs[name], name=name)
    perturb(model, scale=0.5)
    y = model(x)
    assert_differs(y, y0)
    dt.merge(model)
    assert_rel_close(model(x), y, 1e-5, f"merged {order}")
    dt.unmerge(model)
    assert_rel_close(model(x), y, 1e-5, f"unmerged {order}")
    dt.activate(model, [])
    assert_rel_close(model(x), y0, 1e-5, "base restored")


def test_input_transform_is_seen_by_the_base_layer(toy_methods):
    model = single_linear()
    dt.inject(model, toy_methods["toy-input-scale"](targets=["0"]), name="in")
    scale = model[0].deltas["in"].l
    with torch.no_grad():
        scale.mul_(torch.linspace(0.5, 2.0, 6))
    x = torch.randn(3, 6)
    assert_rel_close(model(x), model[0].base_layer(x * scale), 1e-6, "pre(x)")


def test_non_commuting_merges_keep_their_order(toy_methods):
    model = single_linear()
    dt.inject(model, dt.LoraConfig(rank=2, targets=["0"]), name="lora")
    dt.inject(model, toy_methods["toy-output-scale"](targets=["0"]), name="out")
    perturb(model, scale=0.5)
    with pytest.raises(dt.MergeError, match="come before \\['out'\\].*do not commute"):
        dt.merge(model, "out")
    dt.merge(model)
    with pytest.raises(dt.MergeError, match="\\['out'\\] were merged after \\['lora'\\]"):
        dt.unmerge(model, "lora")
    dt.unmerge(model, "out")
    dt.unmerge(model, "lora")
    assert dt.merged_adapters(model) == []


def test_additive_deltas_merge_in_any_subset():
    model = mlp_with("a", "b")
    y = out(model)
    dt.merge(model, "b")
    dt.merge(model, "a")
    dt.unmerge(model, "b")
    assert_rel_close(out(model), y, 1e-5, "a merged after b, b unmerged")


def test_non_mergeable_delta_is_refused(toy_methods):
    model = single_linear()
    dt.inject(model, toy_methods["toy-shift"](targets=["0"]), name="s")
    with pytest.raises(dt.MergeError, match="'toy-shift' deltas cannot be merged"):
        dt.merge(model)
    with pytest.raises(dt.MergeError):
        dt.unload(model, merge=True)
    plain = dt.unload(model)
    assert no_deltatune_modules(plain)
