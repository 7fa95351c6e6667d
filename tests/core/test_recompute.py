"""Deltas keep no copy of their layer's input (``core.recompute``).

Where a delta's input is one elementwise step from tensors the base's graph keeps (Llama's
RMSNorm outputs, the SwiGLU product), autograd saves a recipe instead of the tensor: the same
loss and bit-identical gradients for every registered method, and on Llama LoRA on every linear
layer keeps about what the frozen model keeps (measured exactly with ``TensorMemory``).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from test_gradient_checkpointing import PAIRS, adapted, loss_and_grads
from torch.autograd.graph import saved_tensors_hooks

import deltatune as dt
from deltatune.core import recompute
from deltatune.core.recompute import lean_inputs, saving_inputs
from deltatune.train.memory import TensorMemory


def equal_runs(model, inputs) -> tuple:
    """(loss, grads) with lean inputs and with inputs saved: asserted bit-identical."""
    loss1, grads1 = loss_and_grads(model, inputs)
    with saving_inputs():
        loss0, grads0 = loss_and_grads(model, inputs)
    assert torch.equal(loss1, loss0)
    assert grads1.keys() == grads0.keys() and grads0
    for name, grad in grads0.items():
        assert torch.equal(grads1[name], grad), name
    return grads0


@pytest.mark.parametrize(("method", "case"), PAIRS, ids=[f"{m.label}-{c.name}" for m, c in PAIRS])
def test_every_method_gets_the_same_gradients(method, case):
    model, inputs = adapted(method, case)
    equal_runs(model, inputs)


# ------------------------------------------------------------------------------ Llama
def llama(dtype=torch.float32, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=128, intermediate_size=344, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)).to(dtype)


IDS = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(0))


def gpt2(dtype=torch.float32):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=128, n_layer=2, n_head=4,
                                      bos_token_id=0, eos_token_id=0)).to(dtype)


def bert(dtype=torch.float32):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    return BertForMaskedLM(BertConfig(vocab_size=128, hidden_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=512)).to(dtype)


def kept_after_forward(model) -> int:
    """Bytes of what one forward leaves alive for the backward (the loss's graph)."""
    with TensorMemory() as mem:
        loss = model(input_ids=IDS, labels=IDS).loss
        kept = mem.current_bytes
        loss.backward()
    model.zero_grad(set_to_none=True)
    return kept


#: (model, dtype, LoRA targets, most kept × the floor with recipes, least without them).
#: Llama: every input of an adapted layer has a recipe (but layer 0's first norm, which reads
#: the frozen embeddings); GPT-2 and BERT: the GELU outputs have one, LayerNorm outputs not.
KEEPS = {
    "llama-fp32": (llama, torch.float32, "all-linear", 1.04, 1.25),
    "llama-bf16": (llama, torch.bfloat16, "all-linear", 1.04, 1.2),
    "gpt2-fp32": (gpt2, torch.float32, ["c_attn", "c_proj", "c_fc"], 1.07, 1.15),
    "bert-fp32": (bert, torch.float32, "all-linear", 1.10, 1.25),
}


@pytest.mark.parametrize("case", list(KEEPS))
def test_lora_on_every_linear_layer_keeps_about_what_the_frozen_model_keeps(case):
    build, dtype, targets, most, least = KEEPS[case]
    floor = build(dtype)
    floor.requires_grad_(False)
    floor.get_input_embeddings().weight.requires_grad_(True)  # the floor: backward to the bottom
    lean = kept_after_forward(floor)
    model = dt.inject(build(dtype), dt.LoraConfig(rank=8, targets=targets))
    with saving_inputs():
        saving = kept_after_forward(model)
    kept = kept_after_forward(model)
    assert saving > least * lean  # each adapted layer's input, kept for LoRA's ∂L/∂A
    assert kept < most * lean  # with recipes: LoRA's own (…, r) activations, and what has none
    equal_runs(model, {"input_ids": IDS})


def test_one_recomputation_per_input_however_many_deltas_read_it(monkeypatch):
    made: list = []
    calls = [0]

    class Counting(recompute._Recipe):
        __slots__ = ()

        def __init__(self, fn):
            def counted():
                calls[0] += 1
                return fn()
            super().__init__(counted)
            made.append(self)

    monkeypatch.setattr(recompute, "_Recipe", Counting)
    model = dt.inject(llama(layers=1), dt.LoraConfig(rank=4, targets=["q_proj", "k_proj",
                                                                      "v_proj", "down_proj"]))
    loss = model(input_ids=IDS, labels=IDS).loss
    # layer 0's input norm reads the frozen embeddings (no graph: saved as usual); the SwiGLU
    # product feeding down_proj has a recipe.
    assert [r.readers for r in made] == [1]
    loss.backward()
    assert calls[0] == 1 and made[0].value is None  # dropped after its last reader

    made.clear()
    calls[0] = 0
    model = dt.inject(llama(layers=2), dt.LoraConfig(rank=4, targets=["q_proj", "k_proj",
                                                                      "v_proj"]))
    loss = model(input_ids=IDS, labels=IDS).loss
    assert [r.readers for r in made] == [3]  # layer 1's norm output, read by q, k and v
    loss.backward()
    assert calls[0] == 1 and made[0].value is None


def test_retained_graph_backpropagates_twice_with_the_same_gradients():
    model = dt.inject(llama(), dt.LoraConfig(rank=4, targets="all-linear"))
    grads = []
    for saving in (False, True):
        with saving_inputs() if saving else contextlib.nullcontext():
            loss = model(input_ids=IDS, labels=IDS).loss
            loss.backward(retain_graph=True)
            loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
        model.zero_grad(set_to_none=True)
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


# ---------------------------------------------------------------------- the mechanism
def norm_like(dtype=torch.bfloat16):
    """``w · (h · r).to(dtype)`` with fp32 ``h``, ``r``: Llama's RMSNorm output in bf16."""
    torch.manual_seed(0)
    h = torch.randn(4, 8, requires_grad=True)
    r = torch.rand(4, 1, requires_grad=True) + 0.5
    w = torch.randn(8, dtype=dtype)
    return w * (h * r).to(dtype), (h, r, w)


def test_the_recipe_recomputes_the_input_exactly():
    x, _ = norm_like()
    recipe = recompute._recipe_for(x)
    assert recipe is not None
    assert torch.equal(recipe.fn(), x)


def test_a_cast_is_recomputed_to_the_dtype_the_graph_recorded():
    """``w · c.to(bf16)`` with fp32 ``w`` (no grad: the cast's output is not saved): the cast
    is recomputed to bf16 (its node's output), not to the product's fp32."""
    torch.manual_seed(0)
    w = torch.randn(4, 8)
    c = torch.randn(4, 8, requires_grad=True)
    x = w * (c * c).to(torch.bfloat16)
    assert x.dtype == torch.float32 and x.grad_fn.next_functions[1][0] is not None
    recipe = recompute._recipe_for(x)
    assert recipe is not None and torch.equal(recipe.fn(), x)
    assert not torch.equal(w * (c * c), x)  # the rounding the recipe must not skip


def test_a_recipe_that_does_not_reproduce_the_input_is_never_used(monkeypatch):
    """The bit-for-bit check once per graph shape is the safety net under the rules: a wrong
    rule (a sum for a product) is refused and the input is saved as usual."""
    monkeypatch.setattr(recompute, "_VERIFIED", {})
    monkeypatch.setitem(recompute._RULES, "MulBackward0", wrong_mul)
    x, (h, r, w) = norm_like(torch.float32)
    assert recompute._recipe_for(x) is None
    assert isinstance(lean_inputs(x), contextlib.nullcontext)
    p = torch.randn(8, requires_grad=True)
    with lean_inputs(x):
        (x * p).sum().backward()
    assert torch.equal(p.grad, (w * (h * r)).detach().sum(0))


def wrong_mul(node, depth, sig):
    product = recompute._mul(node, depth, sig)
    return None if product is None else (lambda: product() + 1)


@pytest.mark.parametrize("why", ["no grad", "outer hooks", "saving_inputs", "leaf", "no recipe"])
def test_stands_aside(why):
    x, _ = norm_like()
    ctx = {"no grad": torch.no_grad(), "saving_inputs": saving_inputs(),
           "outer hooks": saved_tensors_hooks(lambda t: t, lambda t: t)}.get(
        why, contextlib.nullcontext())
    if why == "leaf":
        x = torch.randn(3, requires_grad=True)
    if why == "no recipe":
        x = torch.tanh(x)
    with ctx:
        assert isinstance(lean_inputs(x), contextlib.nullcontext)
    if why == "saving_inputs":
        assert not isinstance(lean_inputs(x), contextlib.nullcontext)  # restored on exit


def test_an_in_place_change_of_a_tensor_a_delta_saved_still_raises():
    x, _ = norm_like(torch.float32)
    p = torch.randn(8, requires_grad=True)
    with lean_inputs(x):
        y = (x * p).sum()  # saves x (a recipe) and p (as a tensor)
    with torch.no_grad():
        p.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_a_recipe_gives_the_gradient_of_the_value_the_delta_saw():
    x, (h, r, w) = norm_like(torch.float32)
    p = torch.randn(8, requires_grad=True)
    with lean_inputs(x):
        y = (x * p).sum()
    y.backward()
    assert torch.equal(p.grad, (w * (h * r)).detach().sum(0))


# ------------------------------------------------------------------------ TensorMemory
def test_tensor_memory_counts_live_storage_once():
    base = torch.ones(256)
    with TensorMemory() as mem:
        a = base * 2  # 1 KiB
        view = a.view(16, 16)
        a.mul_(3)
        b = torch.zeros(512, dtype=torch.float64)  # 4 KiB
        assert mem.current_bytes == 1024 + 4096
        del a, view
        assert mem.current_bytes == 4096
        del b
    assert mem.current_bytes == 0 and mem.peak_bytes == 1024 + 4096


def test_an_input_changed_in_place_inside_the_delta_is_saved_as_it_is():
    """The recipe gives ``x`` as it was; a delta that changes it in place and saves the result
    must keep the changed tensor."""
    x, (h, r, w) = norm_like(torch.float32)
    p = torch.randn(8, requires_grad=True)
    with lean_inputs(x):
        z = x.clone()
        x.mul_(2.0)  # (a delta would never; the hooks must still not mistake it)
        y = (x * p).sum()
    y.backward()
    assert torch.equal(p.grad, (2.0 * w * (h * r)).detach().sum(0))
    assert torch.equal(z, (w * (h * r)).detach())
