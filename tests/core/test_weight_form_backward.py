"""Weight-form deltas on Linear layers keep no summed-weight copy for backward.

``DeltaLayer`` runs a weight-form delta on a plain ``nn.Linear`` through ``_LinearWithDelta``:
the same outputs and gradients as ``F.linear(x, W + Δ, b + Δb)``, while autograd keeps only
``x`` and ``W``: ``Δ`` (a leaf ``ΔW``, a sparse delta's scatter) and ``W + Δ`` are recomputed
in backward.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from helpers import assert_rel_close


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))


def perturbed(config: dt.DeltaConfig) -> nn.Module:
    m = dt.inject(model(), config, name="d")
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return m


def reference(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The plain composition: each layer with W + Δ, b + Δb (Δ read from the delta)."""
    from deltatune.core.lifecycle import delta_layers

    h = x
    layers = delta_layers(m)
    for i, layer in enumerate(m):
        if f"{i}" in layers:
            base = layers[f"{i}"].base_layer
            params = layers[f"{i}"].deltas["d"].delta_params()
            w = base.weight + params["weight"]
            b = base.bias + params["bias"] if params.get("bias") is not None else base.bias
            h = F.linear(h, w, b)
        else:
            h = layer(h)
    return h


@pytest.mark.parametrize("config", [dt.FullConfig(targets="all-linear"),
                                    dt.SparseConfig(density=0.2, scorer="random",
                                                    targets="all-linear")],
                         ids=["full", "sparse"])
def test_same_outputs_and_gradients_as_the_plain_sum(config) -> None:
    x = torch.randn(5, 16, requires_grad=True)
    m = perturbed(config)
    ref = perturbed(config)
    out, expected = m(x), reference(ref, x)
    assert (out - model()(x)).abs().max() > 1e-3  # the delta is on
    assert_rel_close(out, expected, 1e-6, "output")
    out.square().sum().backward()
    x_grad = x.grad.clone()
    x.grad = None
    expected.square().sum().backward()
    assert_rel_close(x_grad, x.grad, 1e-6, "input gradient")
    for (name, p), q in zip(m.named_parameters(), ref.parameters(), strict=True):
        if p.requires_grad:
            assert_rel_close(p.grad, q.grad, 1e-6, name)


@pytest.mark.parametrize("config", [dt.FullConfig(targets="all-linear"),
                                    dt.SparseConfig(density=0.2, scorer="random",
                                                    targets="all-linear")],
                         ids=["full", "sparse"])
def test_no_weight_sized_copy_is_kept_for_backward(config) -> None:
    m = perturbed(config)
    own = {p.untyped_storage().data_ptr() for p in m.parameters()}
    x = torch.randn(4, 16, requires_grad=True)
    kept = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in own:
            kept.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(x).sum().backward()
    assert kept  # the hook saw what autograd kept (inputs, activations)
    assert not {32 * 16, 8 * 32} & set(kept), kept  # but no weight-sized tensor of its own
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in m.parameters() if p.requires_grad)


def test_weighted_weight_form_deltas_together_match_the_plain_sum() -> None:
    """A full delta (ΔW, Δb) and a sparse one on the same layers, active with weights: outputs
    and every gradient equal ``F.linear(x, W + 0.7 ΔW + 0.3 Δ_sparse, b + 0.7 Δb)``."""
    torch.manual_seed(1)
    m = dt.inject(model(), dt.FullConfig(targets="all-linear"), name="a")
    dt.inject(m, dt.SparseConfig(density=0.3, scorer="random", targets="all-linear"), name="b")
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    dt.activate(m, ["a", "b"], weights=[0.7, 0.3])
    from deltatune.core.lifecycle import delta_layers

    layers = delta_layers(m)
    x = torch.randn(6, 16, requires_grad=True)
    out = m(x)
    out.square().sum().backward()
    got = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    got_x = x.grad.clone()
    m.zero_grad()
    x.grad = None
    h = x
    for i, layer in enumerate(m):
        if f"{i}" in layers:
            dl = layers[f"{i}"]
            full, sparse = dl.deltas["a"].delta_params(), dl.deltas["b"].delta_params()
            w = dl.base_layer.weight + 0.7 * full["weight"] + 0.3 * sparse["weight"]
            h = F.linear(h, w, dl.base_layer.bias + 0.7 * full["bias"])
        else:
            h = layer(h)
    assert_rel_close(out, h, 1e-6, "output")
    h.square().sum().backward()
    assert_rel_close(got_x, x.grad, 1e-6, "input gradient")
    assert len(got) == 6  # ΔW, Δb and the sparse values of both layers
    for n, p in m.named_parameters():
        if n in got:
            assert got[n].abs().sum() > 0, n
            assert_rel_close(got[n], p.grad, 1e-6, n)

