"""Parity of deltatune's LayerNorm tuning with Hugging Face peft's ``LNTuningConfig``.

peft trains a copy of each norm layer; deltatune trains ``Δw, Δb`` on top of the frozen norm.
The same tuned norm parameters (``w + Δw``, ``b + Δb`` copied into peft's layer copies) give the
same outputs, unmerged and merged, on the same modules, with the same number of trainable
parameters. Our deltas are moved away from their init and checked to change the output first.
"""

from __future__ import annotations

import peft
import pytest
import torch
from peft.tuners.ln_tuning.layer import LNTuningLayer
from torch import nn

import deltatune as dt
import zoo
from deltatune.core.lifecycle import delta_layers
from deltatune.methods.selective import LNTuningConfig
from helpers import assert_differs, assert_rel_close, perturb

pytestmark = [
    # peft 0.21 calls a transformers 5 API deprecated there.
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    # peft looks for in/out features on every layer it wraps; norm layers have none.
    pytest.mark.filterwarnings("ignore:Unsupported layer type:UserWarning"),
]

TOL = 1e-5
PEFT_NAME = "default"
#: peft's target modules: its per-architecture defaults, except BERT which has none.
PEFT_TARGETS = {"llama": None, "t5": None, "gpt2": None, "bert": ["LayerNorm"]}


def build_pair(model: str):
    """(case, ours, peft model, base output); ours perturbed away from its init."""
    case = zoo.CASES_BY_NAME[model]
    base_out = zoo.run(case.build(seed=0), case.inputs())
    ours = dt.inject(case.build(seed=0), LNTuningConfig(), name="a")
    perturb(ours, scale=0.2)
    assert_differs(zoo.run(ours, case.inputs()), base_out, f"{model}: ours vs base")
    theirs = peft.get_peft_model(case.build(seed=0),
                                 peft.LNTuningConfig(target_modules=PEFT_TARGETS[model]))
    theirs.eval()
    return case, ours, theirs, base_out


def peft_adapted(model: peft.PeftModel) -> dict[str, LNTuningLayer]:
    inner = model.base_model.model
    return {n: m for n, m in inner.named_modules() if isinstance(m, LNTuningLayer)}


@torch.no_grad()
def copy_into_peft(ours: nn.Module, theirs: peft.PeftModel) -> None:
    """Set peft's tuned norm copies to ``θ + Δθ`` of ours."""
    layers, targets = delta_layers(ours), peft_adapted(theirs)
    assert set(layers) == set(targets), sorted(set(layers) ^ set(targets))
    for path, layer in layers.items():
        tuned = targets[path].ln_tuning_layers[PEFT_NAME]
        deltas = layer.deltas["a"].delta
        assert set(deltas) == {k for k, _ in tuned.named_parameters()}, path
        for key, value in deltas.items():
            getattr(tuned, key).copy_(getattr(layer.base_layer, key) + value)


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("model", list(PEFT_TARGETS))
def test_same_tuned_norms_same_outputs(model):
    case, ours, theirs, base_out = build_pair(model)
    copy_into_peft(ours, theirs)
    with torch.no_grad():
        adapted = zoo.run(ours, case.inputs())
        assert_rel_close(zoo.run(theirs, case.inputs()), adapted, TOL, f"{model}: peft vs ours")
        merged_ours = zoo.run(plain_ours := dt.unload(ours, merge=True), case.inputs())
        merged_theirs = zoo.run(plain_theirs := theirs.merge_and_unload(), case.inputs())
    assert_differs(merged_ours, base_out, f"{model}: merged vs base")
    assert_rel_close(merged_ours, adapted, TOL, f"{model}: ours merged vs unmerged")
    assert_rel_close(merged_theirs, merged_ours, TOL, f"{model}: merged")
    state_ours, state_theirs = plain_ours.state_dict(), plain_theirs.state_dict()
    assert state_ours.keys() == state_theirs.keys()
    for key, value in state_ours.items():
        assert_rel_close(state_theirs[key].float(), value.float(), TOL, f"{model}: {key}")


@pytest.mark.parametrize("model", list(PEFT_TARGETS))
def test_same_modules_and_trainable_counts(model):
    case = zoo.CASES_BY_NAME[model]
    fresh = case.build()
    planned = dt.cost(fresh, LNTuningConfig())
    ours = dt.inject(fresh, LNTuningConfig(), name="a")
    theirs = peft.get_peft_model(case.build(),
                                 peft.LNTuningConfig(target_modules=PEFT_TARGETS[model]))
    assert set(delta_layers(ours)) == set(peft_adapted(theirs))
    assert planned.params > 0
    assert trainable(ours) == planned.params == trainable(theirs)
