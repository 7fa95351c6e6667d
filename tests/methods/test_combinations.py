"""Several methods in one model, each a named delta: MAM (prefix + scaled parallel adapter) and
UniPELT (prefix + adapter + LoRA, each gated) train on tiny Llama and BERT, save and reload; the
core gate is checked against its formula."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
import zoo
from deltatune import recipes
from deltatune.core.lifecycle import delta_layers
from helpers import assert_differs, assert_rel_close

TOL = 1e-5


def build(family: str) -> nn.Module:
    torch.manual_seed(0)
    model = zoo.FAMILIES[family]()
    if family == "bert":  # stands in for a trained head: BERT's N(0, 0.02²) init is near mute
        with torch.no_grad():
            model.classifier.weight.normal_(0.0, 1.0)
    return model


def data(family: str):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 96, (4, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    if family == "llama":  # learnable: the next token is always 7
        labels = torch.full_like(ids, 7).masked_fill(mask == 0, -100)
    else:
        labels = torch.tensor([0, 1, 2, 1])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train(model, batch, steps=25, lr=1e-2):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def inject_recipe(model, recipe):
    for name, config in recipe.items():
        dt.inject(model, config, name=name)
    return model


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("recipe", ["mam", "unipelt"])
def test_combination_trains_saves_and_reloads(family, recipe, tmp_path):
    configs = recipes.mam(num_tokens=4, bottleneck=8) if recipe == "mam" else \
        recipes.unipelt(num_tokens=4, rank=4)
    model = inject_recipe(build(family), configs)
    assert sorted(dt.active_adapters(model)) == sorted(configs)
    batch = data(family)
    base_params = {n: p.detach().clone() for n, p in model.named_parameters()
                   if not p.requires_grad}
    losses = train(model, batch, steps=40, lr=3e-2)
    assert losses[-1] < losses[0] * 0.9, f"{recipe} should learn ({losses[0]:.3f} → " \
                                         f"{losses[-1]:.3f})"
    assert all(torch.equal(p, base_params[n]) for n, p in model.named_parameters()
               if n in base_params), "the base stays frozen"
    with torch.no_grad():
        y = model(**batch).logits
        for part in configs:  # every part contributes
            others = [n for n in configs if n != part]
            dt.activate(model, others)
            assert_differs(model(**batch).logits, y, f"{recipe} without {part}")
        dt.activate(model, list(configs))
    dt.save(model, tmp_path / recipe)
    fresh = dt.load(build(family), tmp_path / recipe)
    assert sorted(dt.active_adapters(fresh)) == sorted(configs)
    dt.activate(fresh, list(configs))
    with torch.no_grad():
        assert_rel_close(fresh(**batch).logits, y, TOL, f"{recipe} reloaded")


def test_unipelt_gates_are_trained_and_saved(tmp_path):
    model = inject_recipe(build("llama"), recipes.unipelt(num_tokens=4, rank=4))
    layers = delta_layers(model)
    lora = next(layer.deltas["lora"] for layer in layers.values() if "lora" in layer.deltas)
    adapter = next(layer.deltas["adapter"] for layer in layers.values()
                   if "adapter" in layer.deltas)
    prefix = next(layer.deltas["prefix"] for layer in layers.values()
                  if "prefix" in layer.deltas)
    before = [lora.gate.weight.detach().clone(), adapter.gate.weight.detach().clone(),
              prefix.gate_logit.detach().clone()]
    train(model, data("llama"), steps=3)
    after = [lora.gate.weight, adapter.gate.weight, prefix.gate_logit]
    assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    with pytest.raises(dt.MergeError, match="gated"):
        dt.merge(model, "lora")


def test_gated_lora_is_the_gate_times_the_low_rank_term():
    """y = W x + σ(w·x + b) · (α/r) B A x, the gate one scalar per position."""
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(6, 5))
    dt.inject(layer, dt.LoraConfig(rank=2, alpha=4, gate=True, targets=["0"]), name="g")
    delta = layer[0].deltas["g"]
    with torch.no_grad():
        delta.B.normal_()
    x = torch.randn(3, 4, 6)
    with torch.no_grad():
        gate = torch.sigmoid(x @ delta.gate.weight.T + delta.gate.bias)  # (3, 4, 1)
        ref = layer[0].base_layer(x) + gate * (2.0 * x @ delta.A.T @ delta.B.T)
        assert_rel_close(layer(x), ref, TOL, "gated LoRA")
    base = dt.unload(layer)
    with torch.no_grad():
        assert_differs(ref, base(x), "the gated term is not zero")
    assert dt.cost(nn.Sequential(nn.Linear(6, 5)),
                   dt.LoraConfig(rank=2, gate=True, targets=["0"])).params == 2 * 6 + 5 * 2 + 7


def test_gates_are_refused_where_they_cannot_apply():
    with pytest.raises(dt.ConfigError, match="gate must be True or False"):
        dt.LoraConfig(gate="yes")
    with pytest.raises(dt.ConfigError, match="cannot be gated"):
        dt.inject(build("llama"), dt.IA3Config(gate=True))
    conv = zoo.ConvNet()
    with pytest.raises(dt.TargetError, match="gate Linear layers only"):
        dt.inject(conv, dt.LoraConfig(gate=True, targets=["c2a"]))
