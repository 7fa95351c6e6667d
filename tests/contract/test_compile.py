"""Every registered method under ``torch.compile``: the compiled model (AOT autograd, eager
kernels: the tracing and autograd paths inductor builds on) gives the eager model's output
and gradients, in training mode, on the tiny Llama. Slow (about 100 s for the registry): run
with ``make test-slow``."""

from __future__ import annotations

import pytest
import torch
from test_contract import PAIRS, adapted

from helpers import assert_rel_close
from zoo import run

LLAMA = [(m, c) for m, c in PAIRS if m.label == str(m) and c.name == "llama"]


@pytest.mark.slow
@pytest.mark.parametrize("pair", LLAMA, ids=[m.label for m, _ in LLAMA])
def test_compiled_training_step_matches_eager(pair):
    method, case = pair
    torch._dynamo.reset()
    model, inputs, _, _ = adapted(method, case)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    def step(m):
        torch.manual_seed(3)  # the same dropout masks and sampled ranks
        y = run(m, inputs)
        y.float().pow(2).mean().backward()
        grads = [None if p.grad is None else p.grad.clone() for p in params]
        model.zero_grad()
        return y.detach(), grads

    y, grads = step(model)
    y_c, grads_c = step(torch.compile(model, backend="aot_eager"))
    assert_rel_close(y_c, y, 1e-5, f"{method}: compiled output")
    assert any(g is not None for g in grads)
    for g_c, g in zip(grads_c, grads, strict=True):
        assert (g_c is None) == (g is None)
        if g is not None:
            assert_rel_close(g_c, g, 1e-4, f"{method}: compiled gradient")
