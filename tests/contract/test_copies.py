"""Copies of an adapted model, for every registered method on every architecture it adapts:
a ``copy.deepcopy`` (a reference model, an EMA copy) is independent of the original — its hooks
feed its own deltas, its gradients reach its own parameters — and a whole-model
``torch.save`` / ``torch.load`` gives back the same function."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from test_contract import PAIRS, inject, make_config

from helpers import assert_rel_close, perturb
from zoo import run

CASES = [(m, c) for m, c in PAIRS if m.label == str(m)]


def adapted(method, case):
    model = case.build()
    x = case.inputs()
    inject(model, make_config(method, model), "a", x)
    perturb(model, scale=0.05)
    with torch.no_grad():
        run(model, x)  # deltas that keep per-call state have run once before the copy
    return model, x


def other_inputs(x):
    """The same inputs, rows reversed: not what either model saw last."""
    return {k: v.flip(0) if isinstance(v, torch.Tensor) else v for k, v in x.items()}


@pytest.mark.parametrize("pair", CASES, ids=[f"{m}-{c.name}" for m, c in CASES])
def test_a_deep_copy_is_independent(pair):
    method, case = pair
    model, x = adapted(method, case)
    clone = copy.deepcopy(model)
    with torch.no_grad():  # the same change to both: equal functions again, new values
        for m in (model, clone):
            for p in m.parameters():
                if p.requires_grad:
                    p.mul_(1.5)
    model.train()
    clone.train()
    x = other_inputs(x)
    y_clone = run(clone, x)
    y_clone.float().pow(2).mean().backward()
    assert not any(p.grad is not None for p in model.parameters()), "gradients left the copy"
    assert any(p.grad is not None for p in clone.parameters() if p.requires_grad)
    assert_rel_close(y_clone.detach(), run(model, x).detach(), 1e-5)


@pytest.mark.parametrize("pair", CASES, ids=[f"{m}-{c.name}" for m, c in CASES])
def test_whole_model_save_and_load(pair):
    method, case = pair
    model, x = adapted(method, case)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    back = torch.load(buffer, weights_only=False)
    x = other_inputs(x)
    with torch.no_grad():
        assert_rel_close(run(back, x), run(model, x), 1e-6)
