"""Parity of deltatune's (IA)³ with Hugging Face peft's IA3 (a dev dependency).

Same vectors give the same outputs (unmerged and merged) and the same merged weights; the same
modules are adapted at the same position (output vs feedforward input); the same number of
parameters train. Both models are built from the same seed; our vectors are moved away from
their init (ones), checked to change the output, then copied into peft's ``ia3_l``.

Conventions mapped here: peft's ``ia3_l`` is ``(out, 1)`` / ``(1, in)`` on linear layers and
``(1, C, 1, 1)`` on convolutions; ours is the flat vector ``l``. Targets are written in each
library's own syntax (ours may use canonical names such as ``attn.qkv``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import peft
import pytest
import torch
from peft.tuners.ia3 import IA3Layer
from test_peft_parity import CASES
from torch import nn

import deltatune as dt
import zoo
from deltatune.core.lifecycle import delta_layers
from deltatune.methods.ia3 import IA3Config
from helpers import assert_differs, assert_rel_close, perturb

pytestmark = [
    pytest.mark.filterwarnings("ignore:fan_in_fan_out:UserWarning"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]
TOL = 1e-5
PEFT_NAME = "default"


@dataclass(frozen=True)
class Setup:
    """One model, our IA3Config keywords and peft's IA3Config keywords for the same thing."""

    id: str
    model: str
    ours: dict[str, Any]
    theirs: dict[str, Any]

    def __str__(self) -> str:
        return self.id


SETUPS = [
    # Both libraries' defaults: k_proj, v_proj, down_proj (input) on Llama.
    Setup("llama-default", "llama", {}, {}),
    Setup("llama-explicit", "llama",
          {"targets": ["q_proj", "o_proj", "up_proj", "down_proj"],
           "feedforward": ["o_proj", "down_proj"]},
          {"target_modules": ["q_proj", "o_proj", "up_proj", "down_proj"],
           "feedforward_modules": ["o_proj", "down_proj"]}),
    # peft's GPT-2 default is the fused c_attn (q, k and v) and the FFN's c_proj (input).
    Setup("gpt2-default", "gpt2",
          {"targets": ["attn.qkv", "ffn.down"], "feedforward": ["ffn.down"]}, {}),
    Setup("gpt2-conv1d", "gpt2",
          {"targets": ["c_attn", "c_proj", "c_fc"], "feedforward": ["attn.c_proj"]},
          # peft wants feedforward_modules to be a subset of target_modules, name for name
          {"target_modules": ["c_attn", "attn.c_proj", "mlp.c_proj", "c_fc"],
           "feedforward_modules": ["attn.c_proj"]}),
    Setup("bert", "bert",
          {"targets": ["key", "value", "dense"], "feedforward": r".*\.\d+\.output\.dense"},
          {"target_modules": ["key", "value", "dense"],
           "feedforward_modules": r".*\.\d+\.output\.dense"}),
    Setup("conv2d", "conv2d",
          {"targets": ["conv1", "conv2", "conv3", "fc"], "feedforward": ["conv2", "fc"]},
          {"target_modules": ["conv1", "conv2", "conv3", "fc"],
           "feedforward_modules": ["conv2", "fc"]}),
]


def build_pair(setup: Setup):
    """(case, ours perturbed, peft model, base output) from one seed."""
    case = CASES[setup.model]
    base_out = zoo.run(case.build(seed=0), case.inputs())
    ours = dt.inject(case.build(seed=0), IA3Config(**setup.ours), name="a")
    perturb(ours, scale=0.3)
    with torch.no_grad():
        assert_differs(zoo.run(ours, case.inputs()), base_out, f"{setup}: ours vs base")
    theirs = peft.get_peft_model(case.build(seed=0), peft.IA3Config(**setup.theirs)).eval()
    return case, ours, theirs, base_out


def peft_layers(model: peft.PeftModel) -> dict[str, IA3Layer]:
    return {n: m for n, m in model.base_model.model.named_modules() if isinstance(m, IA3Layer)}


@torch.no_grad()
def copy_into_peft(ours: nn.Module, theirs: peft.PeftModel) -> None:
    """Copy our vectors into peft's ``ia3_l`` after checking modules, positions and shapes."""
    layers, targets = delta_layers(ours), peft_layers(theirs)
    assert set(layers) == set(targets), sorted(set(layers) ^ set(targets))
    for path, layer in layers.items():
        delta, target = layer.deltas["a"], targets[path]
        assert target.is_feedforward == delta.transforms_input, path
        vector = target.ia3_l[PEFT_NAME]
        assert vector.numel() == delta.l.numel() and vector.shape.count(1) == vector.dim() - 1
        vector.copy_(delta.l.reshape(vector.shape))


@pytest.mark.parametrize("setup", SETUPS, ids=str)
def test_same_vectors_same_outputs(setup):
    case, ours, theirs, _ = build_pair(setup)
    copy_into_peft(ours, theirs)
    with torch.no_grad():
        assert_rel_close(zoo.run(theirs, case.inputs()), zoo.run(ours, case.inputs()), TOL,
                         f"{setup}: peft vs ours")


@pytest.mark.parametrize("setup", SETUPS, ids=str)
def test_trainable_parameter_counts(setup):
    case = CASES[setup.model]
    config = IA3Config(**setup.ours)
    planned = dt.cost(case.build(), config).params
    ours = dt.inject(case.build(), config, name="a")
    theirs = peft.get_peft_model(case.build(), peft.IA3Config(**setup.theirs))
    counted = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert planned > 0
    assert planned == dt.summary(ours).trainable_params == counted


@pytest.mark.parametrize("setup", SETUPS, ids=str)
def test_merged_outputs_and_weights(setup):
    case, ours, theirs, base_out = build_pair(setup)
    copy_into_peft(ours, theirs)
    with torch.no_grad():
        adapted = zoo.run(ours, case.inputs())
        plain_ours = dt.unload(ours, merge=True)
        plain_theirs = theirs.merge_and_unload()
        merged_ours = zoo.run(plain_ours, case.inputs())
        merged_theirs = zoo.run(plain_theirs, case.inputs())
    assert not any(isinstance(m, IA3Layer) for m in plain_theirs.modules())
    assert_differs(merged_ours, base_out, f"{setup}: merged vs base")
    assert_rel_close(merged_ours, adapted, TOL, f"{setup}: ours merged vs unmerged")
    assert_rel_close(merged_theirs, merged_ours, TOL, f"{setup}: peft vs ours, merged")
    state_ours, state_theirs = plain_ours.state_dict(), plain_theirs.state_dict()
    assert state_ours.keys() == state_theirs.keys()
    for key, value in state_ours.items():
        if value.is_floating_point():
            assert_rel_close(state_theirs[key], value, TOL, f"{setup}: merged {key}")


def test_bert_defaults_differ_from_peft_only_on_the_attention_output():
    """peft's BERT default ``feedforward_modules=["output.dense"]`` is a plain suffix, so it
    also rescales the input of ``attention.output.dense``; ours follows the paper: keys,
    values and the FFN's intermediate activation only."""
    case = CASES["bert"]
    ours = dt.inject(case.build(), IA3Config(), name="a")
    theirs = peft.get_peft_model(case.build(), peft.IA3Config())
    mine = {p: layer.deltas["a"].transforms_input for p, layer in delta_layers(ours).items()}
    peft_positions = {p: m.is_feedforward for p, m in peft_layers(theirs).items()}
    extra = {p: ff for p, ff in peft_positions.items() if p not in mine}
    assert extra == {f"bert.encoder.layer.{i}.attention.output.dense": True for i in range(2)}
    assert {p: ff for p, ff in peft_positions.items() if p in mine} == mine
