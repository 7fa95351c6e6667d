"""The gradient every registered method sends to earlier layers is the derivative of its
forward — alone, and beside a LoRA summed or stacked — on every architecture it can adapt;
the one declared exception is ``Delta.exact_input_gradient = False`` (side networks read the
backbone detached). A straight-through term read from a layer's input (IncreLoRA's reserves
once did this) fails it with a 14–58% error."""

from __future__ import annotations

import functools

import pytest
import torch
from test_contract import PAIRS, PERTURB, adapted, delta_class

import deltatune as dt
from deltatune.core.lifecycle import delta_layers
from helpers import assert_rel_close, delta_params, perturb
from zoo import run


@pytest.fixture(params=PAIRS, ids=[f"{m.label}-{c.name}" for m, c in PAIRS])
def pair(request):
    return request.param


def test_gradients_reaching_earlier_layers_are_the_derivative_of_the_forward(pair):
    """What a delta sends back to its layer's input — and so to every earlier layer — is the
    derivative of the adapted forward (``_assert_input_gradient_exact``). A delta may not send
    gradient of something its forward does not compute (a straight-through term read from the
    input), nor drop some, unless it declares ``exact_input_gradient = False`` (side
    networks)."""
    method, case = pair
    if not delta_class(method).exact_input_gradient:
        pytest.skip(f"{method} declares exact_input_gradient=False")
    model, inputs, _, _ = adapted(method, case, torch.float64)
    _assert_input_gradient_exact(model, inputs)


COMPOSED = [(m, c) for m, c in PAIRS if m.label == str(m) and c.name in ("mlp", "llama")]


@pytest.mark.parametrize("combine", ["sum", "stack"])
@pytest.mark.parametrize("pair", COMPOSED, ids=[f"{m.label}-{c.name}" for m, c in COMPOSED])
def test_composed_gradients_reaching_earlier_layers_are_exact(pair, combine):
    """The same with a LoRA active beside the method on every linear layer, summed or
    stacked (the composition paths: ``effect``, ``pre``, gates)."""
    method, case = pair
    if not delta_class(method).exact_input_gradient:
        pytest.skip(f"{method} declares exact_input_gradient=False")
    model, inputs, _, _ = adapted(method, case, torch.float64)
    dt.inject(model, dt.LoraConfig(rank=2, targets="all-linear"), name="b")
    perturb(model, "b", scale=PERTURB)
    dt.activate(model, ["a", "b"], combine=combine)
    _assert_input_gradient_exact(model, inputs)


def _assert_input_gradient_exact(model, inputs) -> None:
    """In training mode, with the base parameters outside the adapted layers unfrozen
    (embeddings, norms, heads …), float inputs and the token embeddings' outputs varied,
    ``∇L · v`` equals a central difference in float64 along a random direction ``v``."""
    model.train()
    for module in model.modules():  # RMS norms (Llama, T5) compute in float32: make them
        if "variance_epsilon" in vars(module):  # float64, or differences measure rounding
            module.forward = functools.partial(_rms_norm, module)
    skip = {id(p) for p in delta_params(model).values()}
    skip |= {id(p) for layer in delta_layers(model).values()
             for p in layer.base_layer.parameters()}  # their gradient: the method's own rule
    base = [p for p in model.parameters() if id(p) not in skip and p.is_floating_point()]
    for key, value in inputs.items():  # float inputs vary too (models adapted everywhere)
        if value.is_floating_point():
            inputs[key] = value.clone()
            base.append(inputs[key])
    base += _embedding_probes(model, inputs)  # and what token embeddings give the layers
    for p in base:
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in base]
    for module in model.modules():  # a padding row gets no gradient by nn.Embedding's design
        if isinstance(module, torch.nn.Embedding) and module.padding_idx is not None:
            for p, v in zip(base, direction, strict=True):
                if p is module.weight:
                    v[module.padding_idx] = 0
    cotangent = []

    def loss() -> torch.Tensor:
        torch.manual_seed(7)  # the same dropout masks and sampled ranks in every call
        y = run(model, inputs)
        if not cotangent:
            cotangent.append(torch.randn(y.shape, generator=g, dtype=y.dtype))
        return (y * cotangent[0]).sum()

    loss().backward()
    analytic = sum((p.grad * v).sum() for p, v in zip(base, direction, strict=True)
                   if p.grad is not None)
    eps = 1e-6
    with torch.no_grad():
        for p, v in zip(base, direction, strict=True):
            p.add_(v, alpha=eps)
        up = loss()
        for p, v in zip(base, direction, strict=True):
            p.add_(v, alpha=-2 * eps)
        down = loss()
    numeric = (up - down) / (2 * eps)
    assert numeric.abs() > 1e-6, "nothing upstream moves the output: the check would be empty"
    assert_rel_close(torch.as_tensor(analytic), numeric, 1e-5, "∇L · v vs finite difference")


def _embedding_probes(model, inputs) -> list[torch.Tensor]:
    """A zero tensor added to the output of each token embedding (after its delta, if it has
    one), so that a model whose every layer is adapted still has something upstream to vary."""
    owners = {id(layer.base_layer): layer for layer in delta_layers(model).values()}
    probes: list[torch.Tensor] = []
    for module in list(model.modules()):
        if isinstance(module, torch.nn.Embedding):
            owner = owners.get(id(module), module)
            index = len(probes)
            probes.append(None)

            def hook(_, __, out, index=index):
                if probes[index] is None:
                    probes[index] = torch.zeros_like(out)
                return out + probes[index]

            owner.register_forward_hook(hook)
    if probes:
        with torch.no_grad():
            run(model, inputs)  # creates them, with the shapes the embeddings give
    return [p for p in probes if p is not None]


def _rms_norm(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``w · x / rms(x)`` in the input's dtype (HF's RMS norms in float64 math)."""
    return module.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)
                                           + module.variance_epsilon)
