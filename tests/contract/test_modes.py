"""Execution modes a user's loop puts the model in, for every registered method on every
architecture it adapts: training under ``torch.autocast`` (bfloat16, on the CPU) — outputs close
to float32, every trainable parameter with a finite gradient — and ``torch.inference_mode``,
equal to ``torch.no_grad``."""

from __future__ import annotations

import pytest
import torch
from test_contract import PAIRS, adapted

from helpers import assert_rel_close
from zoo import run

CASES = [(m, c) for m, c in PAIRS if m.label == str(m)]
#: bfloat16 keeps 8 bits of mantissa: a few roundings in a tiny model stay within this.
AUTOCAST_TOL = 5e-2


@pytest.mark.parametrize("pair", CASES, ids=[f"{m}-{c.name}" for m, c in CASES])
def test_training_under_autocast(pair):
    method, case = pair
    model, x, _, _ = adapted(method, case)
    model.train()
    with torch.no_grad():
        want = run(model, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = run(model, x)
    y.float().pow(2).mean().backward()
    assert_rel_close(y.float(), want, AUTOCAST_TOL)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for name, p in trainable:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.dtype == p.dtype, name  # gradients land in the parameters' own dtype


@pytest.mark.parametrize("pair", CASES, ids=[f"{m}-{c.name}" for m, c in CASES])
def test_inference_mode_equals_no_grad(pair):
    method, case = pair
    model, x, _, _ = adapted(method, case)
    model.eval()
    with torch.inference_mode():
        y = run(model, x)
    with torch.no_grad():
        assert_rel_close(y, run(model, x), 1e-6)
