"""Parity of deltatune's prompt and prefix tuning with Hugging Face peft's (a dev dependency).

The same soft tokens (or prefixes) give the same logits and loss in training-style calls (padded
batch, labels), the same greedy ``generate()`` output, and the same trainable count. Our
tensors are copied into peft's prompt encoder; layouts mapped here:

* prompt: peft's ``embedding.weight`` is ``(n, d)``, as ours;
* prefix: peft's ``embedding.weight`` is ``(n, L · 2 · d_kv)``, read as ``(n, L, 2, d_kv)``
  (layer, then keys / values); ours is ``(2, n, d_kv)`` per layer. With the projection, peft's
  last Linear ``(L · 2 · d_kv, h)`` is our per-layer ``up`` stacked, and its embedding and first
  Linear are our shared ``embedding`` and ``down``.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import deltatune as dt
import zoo
from deltatune.core.lifecycle import delta_layers
from deltatune.methods.prefix import PrefixConfig
from deltatune.methods.prompt import PromptConfig
from helpers import assert_differs, assert_rel_close

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
TOL = 1e-5


def llama_mha() -> nn.Module:
    """peft sizes prefixes with num_attention_heads, so parity needs keys with every head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        tie_word_embeddings=False))


MODELS = {"llama": llama_mha, "gpt2": zoo.FAMILIES["gpt2"], "bert": zoo.FAMILIES["bert"]}
TASKS = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS"}


def pair(family: str):
    torch.manual_seed(0)
    ours = MODELS[family]().eval()
    theirs = copy.deepcopy(ours)
    return ours, theirs


def batch(family: str):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 96, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0  # left padding, as for generation
    labels = ids.clone() if TASKS[family] == "CAUSAL_LM" else torch.tensor([0, 2])
    if TASKS[family] == "CAUSAL_LM":
        labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def compare(ours, theirs, family):
    if family == "bert":  # peft trains the classifier too (modules_to_save)
        ours.classifier.requires_grad_(True)
    inputs = batch(family)
    with torch.no_grad():
        a, b = ours(**inputs), theirs(**inputs)
        with dt.disabled(ours):
            base = ours(**inputs)
    assert_differs(a.logits[:, -base.logits.shape[1]:] if a.logits.dim() == 3 else a.logits,
                   base.logits, "the tokens change the output")
    assert a.logits.shape == b.logits.shape
    assert_rel_close(a.logits, b.logits, TOL, f"{family} logits")
    assert_rel_close(a.loss, b.loss, TOL, f"{family} loss")
    trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert trainable == theirs.get_nb_trainable_parameters()[0]


# ------------------------------------------------------------------------------- prompt
@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_prompt_tuning_matches_peft(family):
    ours, base = pair(family)
    dt.inject(ours, PromptConfig(num_tokens=5, init="random"), name="p")
    theirs = peft.get_peft_model(base, peft.PromptTuningConfig(
        task_type=TASKS[family], num_virtual_tokens=5))
    delta = next(iter(delta_layers(ours).values())).deltas["p"]
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.copy_(delta.prompt)
    compare(ours, theirs, family)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prompt_tuning_generate_matches_peft(family):
    ours, base = pair(family)
    dt.inject(ours, PromptConfig(num_tokens=4, init="random"), name="p")
    theirs = peft.get_peft_model(base, peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4))
    delta = next(iter(delta_layers(ours).values())).deltas["p"]
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.copy_(delta.prompt)
    inputs = batch(family)
    del inputs["labels"]
    a = ours.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
    b = theirs.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------- prefix
def _copy_prefix_into_peft(ours, theirs, projection):
    deltas = [layer.deltas["p"] for layer in delta_layers(ours).values()]
    encoder = theirs.prompt_encoder["default"]
    with torch.no_grad():
        if projection is None:
            table = torch.stack([d.prefix.transpose(0, 1) for d in deltas], 1)  # (n, L, 2, kv)
            encoder.embedding.weight.copy_(table.flatten(1))
            return
        shared = deltas[0].shared
        encoder.embedding.weight.copy_(shared.embedding)
        first, _, last = encoder.transform
        first.weight.copy_(shared.down.weight)
        first.bias.copy_(shared.down.bias)
        last.weight.copy_(torch.cat([d.up.weight for d in deltas]))
        last.bias.copy_(torch.cat([d.up.bias for d in deltas]))


@pytest.mark.parametrize("projection", [None, 16], ids=["plain", "projection"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_prefix_tuning_matches_peft(family, projection):
    ours, base = pair(family)
    dt.inject(ours, PrefixConfig(num_tokens=4, projection=projection), name="p")
    kwargs = {"prefix_projection": True, "encoder_hidden_size": projection} if projection else {}
    theirs = peft.get_peft_model(base, peft.PrefixTuningConfig(
        task_type=TASKS[family], num_virtual_tokens=4, **kwargs))
    _copy_prefix_into_peft(ours, theirs, projection)
    compare(ours, theirs, family)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prefix_tuning_generate_matches_peft(family):
    ours, base = pair(family)
    dt.inject(ours, PrefixConfig(num_tokens=4), name="p")
    theirs = peft.get_peft_model(base, peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4))
    _copy_prefix_into_peft(ours, theirs, None)
    inputs = batch(family)
    inputs["attention_mask"][:] = 1  # peft positions padded rows differently in generate
    del inputs["labels"]
    a = ours.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
    b = theirs.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)
