"""Copies of an adapted model, for every registered method on every architecture it adapts:
a ``copy.deepcopy`` (a reference model, an EMA copy) is independent of the original — its hooks
feed its own deltas, its gradients reach its own parameters —, a whole-model ``torch.save`` /
``torch.load`` gives back the same function, and ``model.state_dict()`` keeps the unadapted
model's keys for its tensors (the deltas' beside them): it loads into the base model as its
base, and into an adapted one whole."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from test_contract import PAIRS, adapted, inject, make_config

import deltatune as dt
from helpers import assert_rel_close
from zoo import run

CASES = [(m, c) for m, c in PAIRS if m.label == str(m)]


def other_inputs(x):
    """The same inputs, rows reversed: not what either model saw last."""
    return {k: v.flip(0) if isinstance(v, torch.Tensor) else v for k, v in x.items()}


@pytest.mark.parametrize("pair", CASES, ids=[f"{m}-{c.name}" for m, c in CASES])
def test_a_deep_copy_is_independent(pair):
    method, case = pair
    model, x, _, _ = adapted(method, case)
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
    model, x, _, _ = adapted(method, case)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    back = torch.load(buffer, weights_only=False)
    x = other_inputs(x)
    with torch.no_grad():
        assert_rel_close(run(back, x), run(model, x), 1e-6)


@pytest.mark.parametrize("pair", CASES, ids=[f"{m}-{c.name}" for m, c in CASES])
def test_state_dict_keeps_the_base_models_keys(pair):
    method, case = pair
    model, x, _, _ = adapted(method, case)
    plain = case.build()
    state = model.state_dict()
    ours = {k for k in state if ".deltas." not in k}
    assert ours == set(plain.state_dict())  # the base's tensors under the base's own keys
    assert all(torch.equal(state[k], v) for k, v in plain.state_dict().items())

    plain.load_state_dict({k: v for k, v in state.items() if k in ours})  # the base
    fresh = case.build()  # the same base (data-initialised frozen copies are rebuilt from
    torch.manual_seed(5)  # it, not saved), another initialisation of the trained tensors
    inject(fresh, make_config(method, fresh), "a", x)
    with torch.no_grad():
        for p in fresh.parameters():  # and other base weights, which the state dict restores
            p.add_(0.5)
    fresh.load_state_dict(state)  # strict: every key, base and deltas
    x = other_inputs(x)
    with torch.no_grad():
        assert_rel_close(run(fresh, x), run(model, x), 1e-6, "adapted model reloaded")
        with dt.disabled(model):
            assert_rel_close(run(plain, x), run(model, x), 1e-6, "base model reloaded")
