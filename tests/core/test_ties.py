"""Deltas on tied layers: one ``ΔW`` for one weight.

On Llama with ``tie_word_embeddings=True`` the input embedding and the output layer share one
weight. Methods whose deltas change the weight itself (``Delta.ties``: full, LISA, HFT) put one
delta on it: its parameters are shared by both layers' deltas, so the adapter trains what full
fine-tuning of the tied model trains (the same count, the same gradients), merging folds it in
once and keeps the tie, and the file holds it once. Methods acting per layer (LoRA) keep a delta
per layer, as peft does, and merging them into the tied weight stays refused.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune.core.accounting import count_parameters
from deltatune.core.lifecycle import delta_layers
from deltatune.core.state import WEIGHTS_FILE
from helpers import assert_rel_close, perturb

CONFIGS = {"full": lambda: dt.FullConfig(),
           "lisa": lambda: dt.LisaConfig(active_layers=1, interval=2),
           "hft": lambda: dt.HftConfig(stage_steps=1)}
IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))


def llama(tied: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied))


def pair(model, name: str = "a"):
    layers = delta_layers(model)
    return layers["model.embed_tokens"].deltas[name], layers["lm_head"].deltas[name]


def tied_weight(model):
    embed, head = model.model.embed_tokens, model.lm_head
    embed, head = getattr(embed, "base_layer", embed), getattr(head, "base_layer", head)
    return embed.weight, head.weight


@pytest.mark.parametrize("method", list(CONFIGS))
def test_one_delta_trains_the_tied_weight_as_full_fine_tuning_does(method):
    reference = llama()
    base_params = count_parameters(reference)
    assert dt.cost(reference, CONFIGS[method]()).params == base_params
    model = dt.inject(copy.deepcopy(reference), CONFIGS[method](), name="a")
    embed, head = pair(model)
    assert embed.delta["weight"] is head.delta["weight"]
    assert count_parameters(model, trainable_only=True) == base_params  # Llama: no biases
    a, b = tied_weight(model)
    assert a is b, "the base stays tied"

    model(input_ids=IDS, labels=IDS).loss.backward()
    reference(input_ids=IDS, labels=IDS).loss.backward()  # full fine-tuning, tied weight
    grads = dict(reference.named_parameters(remove_duplicate=False))
    for path, layer in delta_layers(model).items():
        grad = layer.deltas["a"].delta["weight"].grad
        assert_rel_close(grad, grads[f"{path}.weight"].grad, 1e-5, path)


def test_an_untied_model_keeps_one_delta_per_layer():
    model = dt.inject(llama(tied=False), dt.FullConfig(), name="a")
    embed, head = pair(model)
    assert embed.delta["weight"] is not head.delta["weight"]


@pytest.mark.parametrize("method", list(CONFIGS))
def test_merge_folds_the_tied_delta_in_once_and_keeps_the_tie(method):
    model = dt.inject(llama(), CONFIGS[method](), name="a")
    perturb(model, scale=0.05)
    w0 = tied_weight(model)[0].detach().clone()
    delta = pair(model)[0].delta["weight"].detach().clone()
    with torch.no_grad():
        y = model(input_ids=IDS).logits
        dt.merge(model)
        assert_rel_close(model(input_ids=IDS).logits, y, 1e-5, "merged")
        a, b = tied_weight(model)
        assert a is b
        assert_rel_close(a, w0 + delta, 1e-6, "W + ΔW, once")
        dt.unmerge(model)
        assert_rel_close(tied_weight(model)[0], w0, 1e-6, "W restored, once")
        assert_rel_close(model(input_ids=IDS).logits, y, 1e-5, "unmerged")
        dt.unload(model, merge=True)
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert_rel_close(model(input_ids=IDS).logits, y, 1e-5, "unloaded")


def test_a_delta_on_one_of_the_tied_layers_is_not_merged():
    model = dt.inject(llama(), dt.FullConfig(targets=["lm_head"]), name="a")
    perturb(model, scale=0.05)
    with pytest.raises(dt.MergeError, match="shared with \\['model.embed_tokens'\\]"):
        dt.merge(model)


def test_per_layer_deltas_on_tied_layers_stay_per_layer_and_unmerged():
    model = dt.inject(llama(), dt.LoraConfig(targets=["embed_tokens", "lm_head"]), name="a")
    embed, head = pair(model)
    assert not {id(p) for p in embed.parameters()} & {id(p) for p in head.parameters()}
    perturb(model, scale=0.05)
    with pytest.raises(dt.MergeError, match="shared with"):
        dt.merge(model)


def test_the_tied_delta_is_saved_once_and_loaded_tied(tmp_path):
    model = dt.inject(llama(), dt.FullConfig(), name="a")
    perturb(model, scale=0.05)
    dt.save(model, tmp_path / "a")
    keys = set(load_file(tmp_path / "a" / WEIGHTS_FILE))
    assert "model.embed_tokens.delta.weight" in keys
    assert not any(k.startswith("lm_head.") for k in keys)
    loaded = dt.load(llama(), tmp_path / "a")
    embed, head = pair(loaded)
    assert embed.delta["weight"] is head.delta["weight"]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_hft_trains_the_tied_delta_when_either_of_its_layers_is_drawn():
    model = dt.inject(llama(), dt.HftConfig(stage_steps=1, fraction=0.5), name="a")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    schedule = dt.Scheduler(model, opt).schedules["a"]
    embed, _ = pair(model)
    outcomes = set()
    for step in range(1, 30):
        trained = set(schedule.trained)
        expected = bool(trained & {"model.embed_tokens", "lm_head"})
        assert embed.delta["weight"].requires_grad == expected, trained
        outcomes.add((("model.embed_tokens" in trained), ("lm_head" in trained)))
        schedule.step(step, opt)
    assert (True, False) in outcomes and (False, True) in outcomes  # both orders were drawn
