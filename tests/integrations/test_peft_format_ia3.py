"""HF peft's file format for (IA)³: our deltas exported load in peft with the same outputs, and
peft IA3 adapters import into deltatune with the same outputs, positions and counts."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from peft.tuners.ia3 import IA3Layer
from safetensors.torch import load_file, save_file
from test_peft_parity import CASES
from torch import nn

import deltatune as dt
import zoo
from deltatune.core.lifecycle import delta_layers
from deltatune.integrations.peft import CONFIG_FILE, WEIGHTS_FILE, load_peft, save_peft
from deltatune.methods.ia3 import IA3Config
from helpers import assert_differs, assert_rel_close, perturb
from zoo import run

pytestmark = [
    pytest.mark.filterwarnings("ignore:fan_in_fan_out:UserWarning"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]
TOL = 1e-5


class Shadowed(nn.Module):
    """A top-level ``fc`` and a nested ``inner.fc``: the name "fc" alone selects both."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.inner = nn.Module()
        self.inner.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.inner.fc(torch.relu(self.fc(x)))))


FORMAT_CASES = {**CASES, "shadowed": zoo.Case(
    "shadowed", Shadowed, lambda: {"x": lambda g: torch.randn(4, 6, generator=g)})}

EXPORTS = {
    "llama-default": ("llama", {}),
    "gpt2-conv1d": ("gpt2", {"targets": ["attn.qkv", "c_proj"], "feedforward": ["ffn.down"]}),
    "bert-regex": ("bert", {"targets": r".*\.(key|value|dense)",
                            "feedforward": r".*\d\.output\.dense"}),
    "conv2d": ("conv2d", {"targets": ["conv1", "conv2", "conv3", "fc"],
                          "feedforward": ["conv2", "conv3"]}),
    # "fc" as a peft list entry would also select inner.fc (and feed it the wrong vector)
    "shadowed": ("shadowed", {"targets": r"fc|out", "feedforward": r"out"}),
}


def positions(model: nn.Module, name: str) -> dict[str, bool]:
    return {p: layer.deltas[name].transforms_input for p, layer in delta_layers(model).items()}


def peft_positions(model: peft.PeftModel) -> dict[str, bool]:
    return {n: m.is_feedforward for n, m in model.base_model.model.named_modules()
            if isinstance(m, IA3Layer)}


@pytest.mark.parametrize("setup", list(EXPORTS))
def test_exported_adapter_loads_in_peft_with_the_same_outputs(setup, tmp_path):
    model_name, config = EXPORTS[setup]
    case = FORMAT_CASES[model_name]
    ours = dt.inject(case.build(), IA3Config(**config), name="a")
    perturb(ours, scale=0.3)
    with torch.no_grad():
        expected = run(ours, case.inputs())
        assert_differs(expected, run(case.build(), case.inputs()))
    save_peft(ours, tmp_path / "peft")
    meta = json.loads((tmp_path / "peft" / CONFIG_FILE).read_text())
    assert meta["peft_type"] == "IA3" and meta["feedforward_modules"] is not None
    tensors = load_file(tmp_path / "peft" / WEIGHTS_FILE)
    assert all(k.startswith("base_model.model.") and k.endswith(".ia3_l") for k in tensors)
    theirs = peft.PeftModel.from_pretrained(case.build(), tmp_path / "peft").eval()
    assert peft_positions(theirs) == positions(ours, "a")
    with torch.no_grad():
        assert_rel_close(run(theirs, case.inputs()), expected, TOL, f"{setup}: peft vs ours")
    back = load_peft(case.build(), tmp_path / "peft", name="back")
    assert positions(back, "back") == positions(ours, "a")
    with torch.no_grad():
        assert_rel_close(run(back, case.inputs()), expected, TOL, f"{setup}: re-imported")


def test_names_that_would_select_too_much_are_exported_as_an_exact_regex(tmp_path):
    ours = dt.inject(Shadowed(), IA3Config(targets=r"fc|out", feedforward=["out"]), name="a")
    save_peft(ours, tmp_path / "peft")
    meta = json.loads((tmp_path / "peft" / CONFIG_FILE).read_text())
    assert meta["target_modules"] == "fc|out"  # a list ["fc", "out"] would catch inner.fc
    assert meta["feedforward_modules"] == ["out"]
    back = load_peft(Shadowed(), tmp_path / "peft")
    assert set(positions(back, "default")) == {"fc", "out"}
    assert dt.adapters(back)["default"].targets == "fc|out"


IMPORTS = {
    "llama-default": ("llama", {}),
    "gpt2-default": ("gpt2", {}),  # c_attn and the FFN's c_proj (fan_in_fan_out)
    "bert-default": ("bert", {}),  # also attention.output.dense as feedforward (peft's suffix)
    "t5-default": ("t5", {}),
    "vit-regex": ("vit", {"target_modules": r".*\.(k_proj|v_proj|fc2|projection)",
                          "feedforward_modules": r".*fc2"}),
    "conv2d": ("conv2d", {"target_modules": ["conv1", "conv2", "fc"],
                          "feedforward_modules": ["conv2"]}),
}


@pytest.mark.parametrize("setup", list(IMPORTS))
def test_peft_adapter_imports_with_the_same_outputs(setup, tmp_path):
    model_name, config = IMPORTS[setup]
    case = FORMAT_CASES[model_name]
    theirs = peft.get_peft_model(case.build(), peft.IA3Config(**config)).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
        expected = run(theirs, case.inputs())
        assert_differs(expected, run(case.build(), case.inputs()))
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_peft(case.build(), tmp_path / "peft", name="imported")
    assert dt.active_adapters(ours) == ["imported"]
    assert not any(p.requires_grad for p in ours.parameters())
    assert positions(ours, "imported") == peft_positions(theirs)
    assert any(positions(ours, "imported").values()), "some vectors scale inputs"
    with torch.no_grad():
        assert_rel_close(run(ours, case.inputs()), expected, TOL, f"{setup}: ours vs peft")
    n_theirs = sum(p.numel() for n, p in theirs.named_parameters() if "ia3_l" in n)
    assert dt.summary(ours).rows[0].params == n_theirs
    # The imported config is a plain deltatune config: save / load reproduce the delta.
    dt.save(ours, tmp_path / "ours", name="imported")
    again = dt.load(case.build(), tmp_path / "ours")
    with torch.no_grad():
        assert_rel_close(run(again, case.inputs()), expected, TOL, f"{setup}: saved again")


def test_import_trainable_and_merge(tmp_path):
    case = FORMAT_CASES["llama"]
    theirs = peft.get_peft_model(case.build(), peft.IA3Config(init_ia3_weights=False)).eval()
    theirs.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = run(theirs, case.inputs())
    ours = load_peft(case.build(), tmp_path / "peft", trainable=True)
    assert dt.summary(ours).trainable_params == 2 * (16 + 16 + 48)
    dt.merge(ours)
    with torch.no_grad():
        assert_rel_close(run(ours, case.inputs()), expected, TOL, "merged import")


def _rewrite(directory, meta_changes=None, tensors=None):
    """Edit a saved peft adapter in place; returns its directory."""
    meta = json.loads((directory / CONFIG_FILE).read_text())
    meta.update(meta_changes or {})
    (directory / CONFIG_FILE).write_text(json.dumps(meta))
    if tensors is not None:
        save_file(tensors, str(directory / WEIGHTS_FILE))
    return directory


def test_import_refusals_leave_the_model_untouched(tmp_path):
    case = FORMAT_CASES["llama"]
    theirs = peft.get_peft_model(case.build(), peft.IA3Config())
    model = case.build()

    def saved(label):
        theirs.save_pretrained(tmp_path / label)
        return tmp_path / label

    with pytest.raises(dt.ConfigError, match="modules_to_save"):
        load_peft(model, _rewrite(saved("mts"), {"modules_to_save": ["lm_head"]}))
    with pytest.raises(dt.AdapterFileError, match="no feedforward_modules"):
        load_peft(model, _rewrite(saved("noff"), {"feedforward_modules": None}))
    # The config says outputs only, but the down_proj vectors are (1, in): inconsistent.
    with pytest.raises(dt.AdapterFileError, match=r"ia3_l has shape \(1, 48\).*\(32, 1\)"):
        load_peft(model, _rewrite(saved("shape"), {"feedforward_modules": []}))
    path = saved("alien")
    tensors = load_file(path / WEIGHTS_FILE)
    tensors["base_model.model.model.layers.0.mlp.nope.ia3_l"] = torch.ones(4, 1)
    _rewrite(path, tensors=tensors)
    with pytest.raises(dt.AdapterFileError, match="not an adaptable layer"):
        load_peft(model, path)
    path = saved("stray")
    _rewrite(path, tensors={**load_file(path / WEIGHTS_FILE),
                            "base_model.model.lm_head.weight": torch.zeros(96, 32)})
    with pytest.raises(dt.AdapterFileError, match="unexpected tensor"):
        load_peft(model, path)
    assert dt.adapters(model) == {}
    load_peft(model, saved("good"))  # the same model still imports the unmodified adapter
    assert list(dt.adapters(model)) == ["default"]


def test_export_refusals(tmp_path):
    model = zoo.ConvNet()
    dt.inject(model, IA3Config(targets=["c1"]), name="a")  # an nn.Conv1d
    with pytest.raises(dt.ConfigError, match="peft's IA3 has no Conv1d layers"):
        save_peft(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()
