"""QST as its paper runs it: the side network over a 4-bit (NF4) backbone.

The backbone is quantized first (``deltatune.quant``), then QST is injected: the model starts
as the quantized base, only the side network trains, the NF4 storage never changes, the
backbone records no autograd graph, and the adapter reloads into a fresh NF4 base exactly.
"""

from __future__ import annotations

import pytest
import torch
from quant_helpers import ids, logits, quantized, same_storage, storage

import deltatune as dt
from helpers import assert_differs

pytest.importorskip("transformers")
pytest.importorskip("torchao")


def test_qst_trains_beside_a_frozen_nf4_backbone(tmp_path) -> None:
    model = quantized(torch.float32, "nf4")
    tokens = ids()
    base = logits(model, tokens)
    stored = storage(model)
    dt.inject(model, dt.QSTConfig(), name="qst")
    torch.testing.assert_close(logits(model, tokens), base)  # β = 1, U = 0: the NF4 base

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("side" in n or ".deltas." in n for n in trainable)
    blocks = []
    hook = model.model.layers[-1].register_forward_hook(lambda m, a, out: blocks.append(out))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    hook.remove()
    out = blocks[0][0] if isinstance(blocks[0], tuple) else blocks[0]
    assert out.grad_fn is None  # the backbone ran without recording a graph
    assert losses[-1] < losses[0]
    assert same_storage(storage(model), stored)  # NF4 codes and scales untouched
    model.eval()
    tuned = logits(model, tokens)
    assert_differs(tuned, base, "QST output after training")

    dt.save(model, tmp_path / "qst")
    fresh = quantized(torch.float32, "nf4")
    dt.load(fresh, tmp_path / "qst")
    torch.testing.assert_close(logits(fresh, tokens), tuned)
