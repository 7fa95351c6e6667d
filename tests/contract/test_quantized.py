"""Every registered method on a quantized frozen base (NF4 and int8, torchao), on the tiny
Llama: deltas (data-initialised ones too: calibration reads a quantized layer's gradient through
an output probe) get finite gradients on every trainable tensor and on nothing else, and an
adapter saved there loads into a freshly quantized base with the same outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_contract import PAIRS, inject, make_config

import deltatune as dt
from helpers import assert_rel_close, perturb
from zoo import run

pytest.importorskip("torchao")
from deltatune import quant

CASES = [(m, c) for m, c in PAIRS if m.label == str(m) and c.name == "llama"]


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
@pytest.mark.parametrize("pair", CASES, ids=[str(m) for m, _ in CASES])
def test_trains_saves_and_loads_on_a_quantized_base(pair, scheme, tmp_path: Path):
    method, case = pair
    model = case.build()
    x = case.inputs()
    quant.quantize(model, scheme)
    inject(model, make_config(method, model), "a", x)
    perturb(model, scale=0.05)
    model.train()
    run(model, x).float().pow(2).mean().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name
    dt.save(model, tmp_path / "a", name="a")
    fresh = case.build()
    quant.quantize(fresh, scheme)
    dt.load(fresh, tmp_path / "a")
    model.eval()
    with torch.no_grad():
        assert_rel_close(run(fresh, x), run(model, x), 1e-5)
