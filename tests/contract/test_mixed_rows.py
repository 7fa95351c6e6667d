"""Per-sample adapters for every registered method: two adapters of the method on one model,
rows choosing ``a``, ``b``, the base or ``a`` again; each row's output — and the gradients of
the whole batch — equal what that row gets alone with its adapter active. Weight-form and
tokens-form methods (which change a layer's parameters or the sequence length) and side
networks (which read other modules' inputs for the whole batch) are refused with what to do
instead, leaving the model as it was."""

from __future__ import annotations

import pytest
import torch
from test_contract import PAIRS, delta_class, inject, make_config

import deltatune as dt
from deltatune.core.lifecycle import delta_layers
from deltatune.core.per_sample import BASE
from helpers import assert_differs, assert_rel_close, perturb
from zoo import output

CASES = [(m, c) for m, c in PAIRS if m.label == str(m) and c.name in ("mlp", "llama")]
NAMES = ["a", "b", BASE, "a"]
TOL = 1e-5


def call(model, x, **kwargs):
    if "input_ids" in x:
        return output(model(input_ids=x["input_ids"], **kwargs))
    return output(model(x["x"], **kwargs))


def row(x, i):
    return {k: v[i:i + 1] for k, v in x.items()}


def two_adapters(method, case):
    model = case.build()
    x = case.inputs()
    key = next(iter(x))
    x = {key: torch.cat([x[key], x[key].flip(0)])[:len(NAMES)]}  # one row per name
    assert len(x[key]) == len(NAMES)
    for seed, name in enumerate(("a", "b")):
        torch.manual_seed(seed)
        inject(model, make_config(method, model), name, x)
        perturb(model, name, scale=0.05, seed=7 + seed)
    return model, x


@pytest.mark.parametrize("pair", CASES, ids=[f"{m.label}-{c.name}" for m, c in CASES])
def test_each_row_gets_what_it_gets_alone(pair):
    method, case = pair
    model, x = two_adapters(method, case)
    model.eval()
    if delta_class(method).form in ("weight", "tokens") or any(
            d.taps for layer in delta_layers(model).values() for d in layer.deltas.values()):
        before = {p: layer.plan_state() for p, layer in delta_layers(model).items()}
        with torch.no_grad(), pytest.raises(dt.StateError, match="separate batches"):
            call(model, x, adapter_names=NAMES)
        assert {p: layer.plan_state() for p, layer in delta_layers(model).items()} == before
        return
    expected = []
    with torch.no_grad():
        for i, entry in enumerate(NAMES):
            dt.activate(model, [] if entry == BASE else [entry])
            expected.append(call(model, row(x, i)))
        ours = call(model, x, adapter_names=NAMES)
    assert_differs(expected[0], expected[1], f"{method}: adapters a and b differ")
    assert_rel_close(ours, torch.cat(expected), TOL, f"{method}: mixed rows vs each alone")

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(call(model, x, adapter_names=NAMES).square().sum(), params,
                                allow_unused=True)
    alone = [torch.zeros_like(p) for p in params]
    for i, entry in enumerate(NAMES):
        if entry == BASE:
            continue
        dt.activate(model, [entry])
        for acc, g in zip(alone, torch.autograd.grad(call(model, row(x, i)).square().sum(),
                                                     params, allow_unused=True), strict=True):
            if g is not None:
                acc += g
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    for g, e in zip(grads, alone, strict=True):
        assert_rel_close(torch.zeros_like(e) if g is None else g, e, 1e-4,
                         f"{method}: mixed-batch gradient")
