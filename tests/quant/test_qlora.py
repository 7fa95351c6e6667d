"""Deltas on a quantized base (QLoRA and kin): LoRA, DoRA and IA3 train on NF4 / int8 layers in
the activation dtype, save and load unchanged, and merging is exact only through dequantization —
merging into the quantized weights is lossy, opted into, and its error measured."""

from __future__ import annotations

import copy

import pytest
import torch
from quant_helpers import (
    adapted,
    config,
    ids,
    llama,
    logits,
    mlp,
    quantized,
    same_storage,
    storage,
    train,
)
from torch import nn

import deltatune as dt
from deltatune import quant
from deltatune.core.errors import MergeError
from deltatune.core.lifecycle import delta_layers
from deltatune.methods.dora import DoraDelta
from helpers import assert_differs, assert_rel_close, no_deltatune_modules, perturb, rel_err

pytest.importorskip("torchao")
pytest.importorskip("transformers")

METHODS = ["lora", "dora", "ia3"]
SCHEMES = ["nf4", "int8"]
LR = {"lora": 2e-2, "dora": 2e-2, "ia3": 1e-1}  # IA3's scalings move slowly from one


def dense_base(model: nn.Module) -> dict[str, torch.Tensor]:
    """Clones of the base tensors stored dense (quantized storage: ``storage``)."""
    stored = {id(layer.weight) for layer in quant.quantized_layers(model).values()}
    own = {id(p) for layer in delta_layers(model).values() for p in layer.deltas.parameters()}
    return {n: t.detach().clone() for n, t in [*model.named_parameters(),
                                               *model.named_buffers()]
            if id(t) not in stored and id(t) not in own}


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("method", METHODS)
def test_deltas_train_on_a_quantized_base_and_only_they_change(scheme, method):
    model = quantized(torch.bfloat16, scheme)
    tokens = ids()
    base_out = logits(model, tokens)
    kwargs = {} if method == "ia3" else {"rank": 4, "alpha": 8}
    dt.inject(model, config(method, **kwargs), name="a")
    assert_rel_close(logits(model, tokens), base_out, DoraDelta.tolerance[torch.bfloat16],
                     "identity at init")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".deltas.a." in n for n in trainable)
    assert {p.dtype for p in trainable.values()} == {torch.bfloat16}  # the activation dtype
    before_dense, before_storage = dense_base(model), storage(model)
    before_delta = {n: p.detach().clone() for n, p in trainable.items()}

    losses = train(model, tokens, steps=8, lr=LR[method])

    assert losses[-1] < losses[0] - 0.05, losses
    assert same_storage(storage(model), before_storage)  # bit for bit
    after = dense_base(model)
    assert after.keys() == before_dense.keys()
    for name, value in before_dense.items():  # norms, embeddings, head
        assert torch.equal(after[name], value), name
    assert any(not torch.equal(p, before_delta[n]) for n, p in trainable.items())
    for layer in quant.quantized_layers(model).values():
        assert layer.weight.grad is None


@pytest.mark.parametrize(("scheme", "method"), [("nf4", "lora"), ("nf4", "dora"),
                                                ("nf4", "ia3"), ("int8", "lora")])
def test_a_delta_saved_on_a_quantized_base_loads_into_a_fresh_one(tmp_path, scheme, method):
    model = adapted(scheme, method, steps=3)
    perturb(model, scale=0.1)  # well away from the identity
    tokens = ids()
    expected = logits(model, tokens)
    with dt.disabled(model):
        assert_differs(expected, logits(model, tokens), "adapted vs base")
    dt.save(model, tmp_path / "a", name="a")

    fresh = quantized(torch.bfloat16, scheme)  # same seed: the same base, quantized alike
    dt.load(fresh, tmp_path / "a", name="a")
    assert torch.equal(logits(fresh, tokens), expected)


def _merge_errors(scheme: str, method: str, dtype: torch.dtype) -> dict[str, float]:
    """Relative errors of the two merge paths against the unmerged output."""
    dense = llama(dtype)
    tokens = ids()
    model = adapted(scheme, method, dtype, tokens)
    unmerged = logits(model, tokens)
    with dt.disabled(model):
        base = logits(model, tokens)
    exact = dt.unload(copy.deepcopy(model), merge=True, dequantize=True)
    assert no_deltatune_modules(exact) and not quant.quantized_layers(exact)
    dt.merge(model, allow_lossy=True)
    assert dt.merged_adapters(model) == ["a"]
    return {"effect": rel_err(unmerged, base),
            "quantization": rel_err(base, logits(dense, tokens)),
            "dequantized": rel_err(logits(exact, tokens), unmerged),
            "lossy": rel_err(logits(model, tokens), unmerged)}


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("method", METHODS)
def test_merge_error_lossy_vs_dequantized_fp32(scheme, method):
    """fp32: merging into a dequantized copy is exact (float rounding); merging into the
    quantized weights rounds ``W + ΔW`` to the grid once more — an error of the order of the
    base's own quantization error, and far above the exact path's."""
    err = _merge_errors(scheme, method, torch.float32)
    assert err["effect"] > 1e-3, err  # the delta does something, so the merge is tested
    assert err["dequantized"] < 1e-5, err
    assert 1e-4 < err["lossy"] < 1.5 * err["quantization"], err
    assert err["lossy"] > 50 * err["dequantized"], err


@pytest.mark.parametrize("method", METHODS)
def test_merge_error_dequantized_bf16_is_within_the_declared_tolerance(method):
    err = _merge_errors("nf4", method, torch.bfloat16)
    assert err["effect"] > 1e-3, err
    assert err["dequantized"] <= DoraDelta.tolerance[torch.bfloat16], err
    assert err["lossy"] < 1.5 * err["quantization"], err


def test_merging_into_quantized_weights_must_be_asked_for():
    model = adapted("nf4", "lora", steps=2)
    tokens = ids()
    expected, before = logits(model, tokens), storage(model)
    for call in (lambda: dt.merge(model), lambda: dt.merge(model, safe=False),
                 lambda: dt.unload(model, merge=True)):
        with pytest.raises(MergeError, match="allow_lossy=True.*dequantize=True"):
            call()
        assert not dt.merged_adapters(model)
        assert same_storage(storage(model), before)
        assert delta_layers(model)
        assert torch.equal(logits(model, tokens), expected)
    dt.merge(model, allow_lossy=True)
    with pytest.raises(MergeError, match="unmerging 'a'.*allow_lossy"):
        dt.unmerge(model)
    with pytest.raises(MergeError, match="allow_lossy"):
        dt.unload(model)  # unloading unmerges
    assert dt.merged_adapters(model) == ["a"]
    dt.unmerge(model, allow_lossy=True)
    assert not dt.merged_adapters(model)
    assert rel_err(logits(model, tokens), expected) < 0.2  # W re-rounded twice: close, not exact


def test_lossy_unload_gives_a_plain_model_with_quantized_layers():
    model = adapted("int8", "lora", steps=2)
    tokens = ids()
    expected = logits(model, tokens)
    plain = dt.unload(model, merge=True, allow_lossy=True)
    assert no_deltatune_modules(plain) and len(quant.quantized_layers(plain)) == 14
    assert rel_err(logits(plain, tokens), expected) < 0.05


def test_unload_dequantize_without_merge_gives_the_base_in_full_precision():
    model = adapted("nf4", "dora", torch.float32, steps=2)
    tokens = ids()
    with dt.disabled(model):
        base = logits(model, tokens)
    plain = dt.unload(model, dequantize=True)
    assert no_deltatune_modules(plain) and not quant.quantized_layers(plain)
    assert rel_err(logits(plain, tokens), base) < 1e-6


def test_dora_norm_follows_a_requantized_weight():
    """After a lossy merge and unmerge the stored weight changed; DoRA's cached row norm must
    be recomputed from it (the core's ``weight_key`` sees the new version)."""
    model = adapted("nf4", "dora", torch.float32, steps=3)
    tokens = ids()
    logits(model, tokens)  # fills the norm caches
    dt.merge(model, allow_lossy=True)
    dt.unmerge(model, allow_lossy=True)
    cached = logits(model, tokens)
    for layer in delta_layers(model).values():
        layer.deltas["a"]._norm_cache = None
    assert torch.equal(cached, logits(model, tokens))


def test_bias_only_deltas_merge_exactly_without_asking():
    """BitFit changes the (dense) bias only: nothing is re-quantized, nothing is lossy."""
    model = quant.quantize(mlp(torch.float32), "nf4")
    before = storage(model)
    dt.inject(model, dt.BitFitConfig(), name="b")
    perturb(model, scale=0.5)
    x = torch.randn(4, 64)
    with torch.no_grad():
        expected = model(x)
        dt.merge(model)
        assert_rel_close(model(x), expected, 1e-6, "merged bias")
    assert same_storage(storage(model), before)


def test_weight_form_deltas_run_on_the_dequantized_weight():
    """A weight-form delta (intrinsic dimension) adds ΔW to the weight for the call: the layer
    runs with the dequantized weight plus ΔW; merging it would re-quantize."""
    from deltatune.methods.intrinsic import IntrinsicConfig

    model = quant.quantize(mlp(torch.float32), "nf4")
    x = torch.randn(4, 64)
    with torch.no_grad():
        base = model(x)
    dt.inject(model, IntrinsicConfig(dim=32, projection="dense"), name="i")
    perturb(model, scale=0.5)
    layer = model[0]
    delta = layer.deltas["i"].delta_params()["weight"]
    with torch.no_grad():
        out = model(x)
        first = nn.functional.linear(x, layer.base_layer.dequantized_weight() + delta,
                                     layer.base_layer.bias)
        assert_rel_close(layer(x), first, 1e-5, "dequantized weight + ΔW")
    assert_differs(out, base, "intrinsic delta")
    with pytest.raises(MergeError, match="allow_lossy"):
        dt.merge(model)


def test_unload_refuses_what_cannot_merge_before_dequantizing():
    model = quantized()
    dt.inject(model, dt.AdapterConfig(), name="seq")  # a bottleneck adapter: not mergeable
    with pytest.raises(MergeError, match="cannot be merged"):
        dt.unload(model, merge=True, dequantize=True)
    assert len(quant.quantized_layers(model)) == 14 and delta_layers(model)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_activation_checkpointing_gives_the_same_gradients(scheme):
    """QLoRA is usually trained with activation checkpointing: the recomputed forward runs the
    quantized matmul again and the gradients are the same."""
    model = quantized(torch.float32, scheme)
    dt.inject(model, dt.LoraConfig(rank=4), name="a")
    perturb(model, scale=0.1)
    twin = copy.deepcopy(model)
    enable = getattr(twin, "activation_checkpointing_enable", None) \
        or twin.gradient_checkpointing_enable  # transformers < 5
    enable({"use_reentrant": False})
    calls = []
    twin.model.layers[0].mlp.down_proj.base_layer.register_forward_hook(
        lambda *_: calls.append(1))
    tokens = ids()
    grads = []
    for m in (model, twin):
        m.train()
        m(input_ids=tokens, labels=tokens).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert len(calls) == 2  # the quantized layer ran again in the backward pass
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        assert_rel_close(grads[1][name], grad, 1e-6, name)
