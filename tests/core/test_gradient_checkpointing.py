"""Gradient checkpointing works with every delta type.

Parametrized over the registry (every example config on Llama, the default one on GPT-2): with
transformers' layer checkpointing switched on, in the non-reentrant and the reentrant variant,
the loss and every delta parameter's gradient equal those of the run without it. Configs are
built (and data-initialised methods calibrated) as the contract suite does.
"""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from contract.test_contract import PERTURB, Variant, comparable, inject, make_config
from deltatune.core.errors import ConfigError
from deltatune.core.lifecycle import delta_layers
from deltatune.core.targeting import find_block_lists, walk
from deltatune.methods.prefix import PrefixConfig
from deltatune.train.checkpointing import enable_gradient_checkpointing
from helpers import assert_differs, assert_rel_close, perturb
from zoo import CASES_BY_NAME, output

CASES = [CASES_BY_NAME["llama"], CASES_BY_NAME["gpt2"]]
PAIRS = [(Variant(m, i), c) for m in dt.methods()
         for i in range(len(dt.get_method(m).delta_class.examples)) for c in CASES
         if dt.get_method(m).delta_class.layer_kinds & c.kinds
         and (i == 0 or c.name == "llama")]
#: Relative error allowed between gradients with and without checkpointing (fp32: the
#: recomputation runs the same kernels on the same inputs).
TOL = 1e-6


def hf_enable(model, reentrant: bool) -> None:
    """What a user does: transformers' own switch (and, for the reentrant variant, marks the
    input embeddings' output as requiring grad, which transformers ≥ 5 also does itself)."""
    enable = getattr(model, "activation_checkpointing_enable", None) \
        or model.gradient_checkpointing_enable  # transformers < 5
    enable({"use_reentrant": reentrant})
    if reentrant:
        model.enable_input_require_grads()


def recomputations(model) -> list[int]:
    """A call counter on the first sub-module of the first block: it runs once per forward,
    and once more in the backward pass when the block is checkpointed."""
    blocks = dict(walk(model))[find_block_lists(model)[0]]
    layer = blocks[0]
    calls = [0]
    next(layer.children()).register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def loss_and_grads(model, inputs):
    torch.manual_seed(0)  # the same dropout masks in both runs (recomputation keeps them)
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()
             if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def adapted(method, case):
    """A model with one delta perturbed away from its init (checked to change the output)."""
    model = case.build()
    inputs = case.inputs()
    with torch.no_grad():
        y0 = output(model(**inputs))
    inject(model, make_config(method, model), "a", inputs)
    perturb(model, scale=PERTURB)
    with torch.no_grad():
        assert_differs(comparable(output(model(**inputs)), y0), y0, f"{method} on {case}")
    model.train()
    return model, inputs


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize(("method", "case"), PAIRS,
                         ids=[f"{m.label}-{c.name}" for m, c in PAIRS])
def test_checkpointing_gives_the_same_loss_and_gradients(method, case, reentrant):
    model, inputs = adapted(method, case)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    loss0, grads0 = loss_and_grads(model, inputs)
    assert set(grads0) == trainable, "every delta parameter gets a gradient"
    assert any(g.abs().sum() > 0 for g in grads0.values())
    hf_enable(model, reentrant)
    calls = recomputations(model)
    loss1, grads1 = loss_and_grads(model, inputs)
    assert calls[0] == 2, "the layer was not recomputed: checkpointing is not on"
    assert_rel_close(loss1, loss0, TOL, "loss")
    assert set(grads1) == set(grads0), "a delta parameter lost its gradient"
    for name, grad in grads0.items():
        assert_rel_close(grads1[name], grad, TOL, name)


# ------------------------------------------------------------------------- the helper
@pytest.mark.parametrize("config", [dt.LoraConfig(rank=4, targets=["q_proj", "v_proj"]),
                                    PrefixConfig(num_tokens=3)], ids=["lora", "prefix"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_helper_enables_checkpointing(config, reentrant):
    case = CASES_BY_NAME["llama"]
    model, inputs = case.build(), case.inputs()
    enable_gradient_checkpointing(model, use_reentrant=reentrant)  # before inject works too
    dt.inject(model, config)
    perturb(model)
    model.train()
    calls = recomputations(model)
    loss1, grads1 = loss_and_grads(model, inputs)
    assert calls[0] == 2
    model.gradient_checkpointing_disable() if not hasattr(
        model, "activation_checkpointing_disable") else model.activation_checkpointing_disable()
    loss0, grads0 = loss_and_grads(model, inputs)
    assert_rel_close(loss1, loss0, TOL, "loss")
    assert grads1.keys() == grads0.keys() and grads0
    for name, grad in grads0.items():
        assert_rel_close(grads1[name], grad, TOL, name)


def test_helper_marks_the_inputs_the_reentrant_variant_needs():
    """Reentrant checkpointing gives the deltas inside a layer no gradient unless something
    entering the layer requires grad; the helper marks the input embeddings' output."""
    case = CASES_BY_NAME["llama"]
    model, inputs = case.build(), case.inputs()
    dt.inject(model, dt.LoraConfig(rank=4, targets=["q_proj"]))
    perturb(model)
    model.train()
    enable = getattr(model, "activation_checkpointing_enable", None) \
        or model.gradient_checkpointing_enable
    enable({"use_reentrant": True})
    model.disable_input_require_grads()  # as transformers < 5 leaves it
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad"), \
            pytest.raises(RuntimeError, match="does not require grad"):
        loss_and_grads(model, inputs)  # the deltas (inside the layers) get no gradient
    enable_gradient_checkpointing(model, use_reentrant=True)
    _, grads = loss_and_grads(model, inputs)
    assert len(grads) == 2 * len(delta_layers(model))


def test_helper_refuses_a_model_without_checkpointing():
    with pytest.raises(ConfigError, match="torch.utils.checkpoint"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


def test_prefix_fallback_is_inert_after_unload():
    """The prefixes' attention hook stays on the model after ``unload``, doing nothing: the
    plain model's checkpointed output equals the base's."""
    case = CASES_BY_NAME["gpt2"]
    model, inputs = case.build(), case.inputs()
    with torch.no_grad():
        base = output(model(**inputs))
    dt.inject(model, PrefixConfig(num_tokens=3))
    perturb(model)
    model.train()
    hf_enable(model, reentrant=False)
    loss_and_grads(model, inputs)
    dt.unload(model)
    with torch.no_grad():
        assert torch.equal(output(model(**inputs)), base)
