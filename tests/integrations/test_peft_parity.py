"""Parity of deltatune's LoRA with Hugging Face peft's LoRA (a dev dependency).

Same weights give the same outputs (unmerged and merged), the same modules are adapted, the same
number of parameters train, and PiSSA initialises to the same factors. Both models are built
from the same seed; our deltas are moved away from their init, checked to change the output
(so no comparison can pass vacuously), then copied into peft's ``lora_A`` / ``lora_B``.

Conventions mapped here (not differences in what is computed):

* peft's ``lora_alpha`` is required; our ``alpha=None`` means ``alpha = rank``;
* peft adds its LoRA bias (``lora_B.bias``) *inside* the scaled path, ``s · (B A x + b)``; ours
  is added unscaled, so peft's bias is ours divided by the scale;
* peft's Conv2d ``lora_A`` is a convolution with weight ``(r, in, kh, kw)`` and ``lora_B`` a
  1x1 convolution ``(out, r, 1, 1)``; our ``A`` is the flattened kernel ``(r, in·kh·kw)``;
* peft's PiSSA rewrites the base weight to ``W − s B₀ A₀``; ours keeps ``W`` and subtracts the
  frozen ``B₀ A₀`` in the forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import peft
import pytest
import torch
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

import deltatune as dt
import zoo
from deltatune.core.lifecycle import delta_layers
from helpers import assert_differs, assert_rel_close, perturb

pytestmark = [
    # peft switches fan_in_fan_out on by itself for GPT-2's Conv1D, and warns about it.
    pytest.mark.filterwarnings("ignore:fan_in_fan_out:UserWarning"),
    # peft warns that a LoRA bias on a layer without a bias cannot be merged (see SETUPS).
    pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed"),
    # peft 0.21 calls a transformers 5 API deprecated there.
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

TOL = 1e-5  # fp32 relative error
PEFT_NAME = "default"


# ----------------------------------------------------------------------------- models
class ConvNet2d(nn.Module):
    """Plain Conv2d layers peft supports: padded 3x3, strided 3x3, 1x1 (peft's 1x1 merge path)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))
        return self.fc(self.conv3(h).mean((-2, -1)))


CASES = {
    **zoo.CASES_BY_NAME,
    "conv2d": zoo.Case("conv2d", ConvNet2d,
                       lambda: {"x": lambda g: torch.randn(2, 3, 8, 8, generator=g)},
                       kinds=frozenset({"linear", "conv"})),
}


@dataclass(frozen=True)
class Setup:
    """One model and one LoRA config, expressed once and translated for both libraries."""

    id: str
    model: str
    lora: dict[str, Any]  # deltatune LoraConfig keyword arguments
    task_type: str | None = None  # peft only: SEQ_CLS leaves the classifier out of all-linear
    mergeable: bool = True  # False where one library cannot merge it (reason at the setup)

    def __str__(self) -> str:
        return self.id


SETUPS = [
    Setup("llama-qv", "llama", {"rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}),
    Setup("llama-all-linear", "llama", {"rank": 4, "alpha": 12, "targets": "all-linear"}),
    Setup("llama-rslora", "llama",
          {"rank": 4, "alpha": 6, "rslora": True, "targets": ["q_proj", "k_proj", "down_proj"]}),
    Setup("llama-embedding", "llama",
          {"rank": 3, "alpha": 6, "targets": ["embed_tokens", "o_proj", "up_proj"]}),
    # Llama's projections have no bias: peft cannot merge its LoRA bias there (ours creates one).
    Setup("llama-bias", "llama",
          {"rank": 2, "alpha": 4, "bias": True, "targets": ["q_proj", "gate_proj"]},
          mergeable=False),
    Setup("gpt2-conv1d", "gpt2", {"rank": 4, "targets": ["c_attn"]}),  # alpha=None: alpha = r
    Setup("gpt2-all-linear-bias", "gpt2",
          {"rank": 2, "alpha": 5, "bias": True, "targets": "all-linear"}),
    # wte is tied to lm_head: our merge refuses to write a shared weight (peft writes it).
    Setup("gpt2-embedding", "gpt2", {"rank": 4, "alpha": 8, "targets": ["wte", "c_fc"]},
          mergeable=False),
    Setup("bert-qv-rslora-bias", "bert",
          {"rank": 4, "alpha": 8, "rslora": True, "bias": True, "targets": ["query", "value"]}),
    Setup("bert-all-linear", "bert", {"rank": 4, "alpha": 8, "targets": "all-linear"},
          task_type="SEQ_CLS"),
    Setup("bert-embedding", "bert",
          {"rank": 2, "alpha": 3, "targets": ["word_embeddings", "dense"]}),
    Setup("plain-embedding", "embedding", {"rank": 3, "alpha": 4, "targets": ["embed", "proj"]}),
    Setup("conv2d", "conv2d",
          {"rank": 2, "alpha": 4, "targets": ["conv1", "conv2", "conv3", "fc"]}),
    Setup("conv2d-regex-rslora-bias", "conv2d",
          {"rank": 3, "alpha": 5, "rslora": True, "bias": True, "targets": r"conv\d"}),
]
MERGEABLE = [s for s in SETUPS if s.mergeable]


# ----------------------------------------------------------------------------- translation
def peft_config(lora: dict[str, Any], task_type: str | None = None) -> peft.LoraConfig:
    """peft's LoraConfig equivalent to our ``LoraConfig(**lora)``."""
    known = {"rank", "alpha", "targets", "rslora", "bias", "init", "pissa_iters"}
    assert set(lora) <= known, f"no translation for {set(lora) - known}"
    init: bool | str = True
    if lora.get("init") == "pissa":
        iters = lora.get("pissa_iters")
        init = "pissa" if iters is None else f"pissa_niter_{iters}"
    targets = lora["targets"]
    return peft.LoraConfig(
        r=lora["rank"],
        lora_alpha=lora.get("alpha") if lora.get("alpha") is not None else lora["rank"],
        target_modules=targets if isinstance(targets, str) else list(targets),
        lora_dropout=0.0,
        use_rslora=lora.get("rslora", False),
        lora_bias=lora.get("bias", False),
        init_lora_weights=init,
        task_type=task_type,
    )


def build_pair(setup: Setup, *, perturbed: bool = True):
    """(case, ours, peft model, base output) from one seed; ours perturbed away from its init."""
    case = CASES[setup.model]
    base = case.build(seed=0)
    base_out = zoo.run(base, case.inputs())
    ours = dt.inject(case.build(seed=0), dt.LoraConfig(**setup.lora), name="a")
    if perturbed:
        perturb(ours, scale=0.2)
        assert_differs(zoo.run(ours, case.inputs()), base_out, f"{setup}: ours vs base")
    theirs = peft.get_peft_model(case.build(seed=0), peft_config(setup.lora, setup.task_type))
    theirs.eval()
    return case, ours, theirs, base_out


def peft_inner(model: peft.PeftModel) -> nn.Module:
    """The wrapped transformers / torch model, whose module names are the original ones."""
    return model.base_model.model


def peft_adapted(model: peft.PeftModel) -> set[str]:
    return {n for n, m in peft_inner(model).named_modules() if isinstance(m, LoraLayer)}


def peft_factors(layer: LoraLayer) -> tuple[Tensor, Tensor]:
    """peft's (A, B) parameters of one layer, in peft's own shapes."""
    if PEFT_NAME in layer.lora_embedding_A:
        return layer.lora_embedding_A[PEFT_NAME], layer.lora_embedding_B[PEFT_NAME]
    return layer.lora_A[PEFT_NAME].weight, layer.lora_B[PEFT_NAME].weight


def check_shapes(delta, a: Tensor, b: Tensor) -> None:
    """Our factor shapes against peft's (documented layouts; conv kernels flattened)."""
    r, info = delta.config.rank, delta.info
    assert delta.A.shape == (r, info.in_dim) and delta.B.shape == (info.out_dim, r)
    if info.kind == "conv":
        assert a.shape[:2] == (r, info.in_dim // math.prod(info.kernel_size))
        assert tuple(a.shape[2:]) == info.kernel_size
        assert tuple(b.shape) == (info.out_dim, r) + (1,) * len(info.kernel_size)
    else:
        assert a.shape == delta.A.shape and b.shape == delta.B.shape


@torch.no_grad()
def copy_into_peft(ours: nn.Module, theirs: peft.PeftModel) -> None:
    """Copy every delta of ``ours`` into peft's LoRA weights (after checking the module sets,
    the scales and the shapes agree)."""
    layers = delta_layers(ours)
    assert set(layers) == peft_adapted(theirs), "different modules adapted"
    inner = peft_inner(theirs)
    for path, layer in layers.items():
        delta, target = layer.deltas["a"], inner.get_submodule(path)
        assert target.scaling[PEFT_NAME] == pytest.approx(delta.scale, rel=1e-12), path
        a, b = peft_factors(target)
        check_shapes(delta, a, b)
        a.copy_(delta.A.reshape(a.shape))
        b.copy_(delta.B.reshape(b.shape))
        if delta.bias is not None:  # peft scales its bias with the rest of the path
            target.lora_B[PEFT_NAME].bias.copy_(delta.bias / delta.scale)


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("setup", SETUPS, ids=str)
def test_same_weights_same_outputs(setup):
    case, ours, theirs, _ = build_pair(setup)
    copy_into_peft(ours, theirs)
    with torch.no_grad():
        assert_rel_close(zoo.run(theirs, case.inputs()), zoo.run(ours, case.inputs()), TOL,
                         f"{setup}: peft vs ours")


@pytest.mark.parametrize("model", ["llama", "gpt2", "bert"])
def test_all_linear_adapts_the_same_modules(model):
    task_type = "SEQ_CLS" if model == "bert" else None  # peft drops the classifier only then
    lora = {"rank": 2, "targets": "all-linear"}
    ours = dt.inject(CASES[model].build(), dt.LoraConfig(**lora), name="a")
    theirs = peft.get_peft_model(CASES[model].build(), peft_config(lora, task_type))
    mine = set(delta_layers(ours))
    expected = {"llama": 7 * 2, "gpt2": 4 * 2, "bert": 6 * 2 + 1}[model]  # per block; pooler
    assert len(mine) == expected, sorted(mine)
    assert mine == peft_adapted(theirs), (sorted(mine ^ peft_adapted(theirs)))


@pytest.mark.parametrize("setup", SETUPS, ids=str)
def test_trainable_parameter_counts(setup):
    case = CASES[setup.model]
    config = dt.LoraConfig(**setup.lora)
    fresh = case.build()
    planned = dt.cost(fresh, config).params
    ours = dt.inject(fresh, config, name="a")
    theirs = peft.get_peft_model(case.build(), peft_config(setup.lora, setup.task_type))
    extra = 0
    if setup.task_type == "SEQ_CLS":  # peft also trains the classifier head (modules_to_save)
        extra = sum(p.numel() for p in case.build().classifier.parameters())
    assert planned > 0
    assert trainable(ours) == planned == dt.summary(ours).trainable_params
    assert trainable(theirs) == planned + extra


@pytest.mark.parametrize("setup", MERGEABLE, ids=str)
def test_merged_outputs_and_weights(setup):
    case, ours, theirs, base_out = build_pair(setup)
    copy_into_peft(ours, theirs)
    with torch.no_grad():
        adapted = zoo.run(ours, case.inputs())
        plain_ours = dt.unload(ours, merge=True)
        plain_theirs = theirs.merge_and_unload()
        merged_ours = zoo.run(plain_ours, case.inputs())
        merged_theirs = zoo.run(plain_theirs, case.inputs())
    assert not any(isinstance(m, LoraLayer) for m in plain_theirs.modules())
    assert_differs(merged_ours, base_out, f"{setup}: merged vs base")
    assert_rel_close(merged_ours, adapted, TOL, f"{setup}: ours merged vs unmerged")
    assert_rel_close(merged_theirs, merged_ours, TOL, f"{setup}: peft vs ours, merged")
    state_ours, state_theirs = plain_ours.state_dict(), plain_theirs.state_dict()
    assert state_ours.keys() == state_theirs.keys()
    for key, value in state_ours.items():
        if value.is_floating_point():
            assert_rel_close(state_theirs[key], value, TOL, f"{setup}: merged {key}")


# ----------------------------------------------------------------------------- PiSSA
PISSA = [
    Setup("llama-qv", "llama", {"rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}),
    Setup("gpt2-conv1d", "gpt2", {"rank": 4, "targets": ["c_attn", "c_fc"]}),
    Setup("bert-rslora", "bert",
          {"rank": 3, "alpha": 6, "rslora": True, "targets": ["query", "dense"]}),
]


def pissa(setup: Setup, **more: Any) -> Setup:
    return Setup(setup.id, setup.model, {**setup.lora, "init": "pissa", **more})


@pytest.mark.parametrize("setup", PISSA, ids=str)
def test_pissa_exact_svd(setup):
    setup = pissa(setup)
    case, ours, theirs, base_out = build_pair(setup, perturbed=False)
    with torch.no_grad():
        assert_rel_close(zoo.run(ours, case.inputs()), base_out, TOL, f"{setup}: ours at init")
        assert_rel_close(zoo.run(theirs, case.inputs()), base_out, TOL, f"{setup}: peft at init")

    layers, inner = delta_layers(ours), peft_inner(theirs)
    assert set(layers) == peft_adapted(theirs)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for path, layer in layers.items():
            delta, target = layer.deltas["a"], inner.get_submodule(path)
            a, b = peft_factors(target)
            check_shapes(delta, a, b)
            assert target.scaling[PEFT_NAME] == pytest.approx(delta.scale, rel=1e-12)
            # The principal part is substantial, so identity at init was not vacuous.
            weight = delta.info.weight_matrix(layer.base_layer.weight)
            assert (delta.scale * delta.B @ delta.A).norm() > 0.1 * weight.norm()
            assert_rel_close(delta.B @ delta.A, b @ a, TOL, f"{path}: B A at init")
            # Singular vectors are defined up to a sign per component: align, then compare.
            sign = torch.sign((delta.A * a).sum(1))
            assert_rel_close(delta.A * sign[:, None], a, TOL, f"{path}: A at init")
            assert_rel_close(delta.B * sign[None, :], b, TOL, f"{path}: B at init")
            assert torch.equal(delta.A0, delta.A) and torch.equal(delta.B0, delta.B)
            # The same additive noise on both sides (in each side's sign convention).
            noise_a = 0.2 * torch.randn(a.shape, generator=gen)
            noise_b = 0.2 * torch.randn(b.shape, generator=gen)
            delta.A.add_(noise_a * sign[:, None])
            delta.B.add_(noise_b * sign[None, :])
            a.add_(noise_a)
            b.add_(noise_b)

        out_ours = zoo.run(ours, case.inputs())
        assert_differs(out_ours, base_out, f"{setup}: perturbed vs base")
        assert_rel_close(zoo.run(theirs, case.inputs()), out_ours, TOL, f"{setup}: perturbed")
        # Merged: W + s(B A − B₀ A₀) (ours) against W_res + s B A (peft).
        merged_ours = zoo.run(dt.unload(ours, merge=True), case.inputs())
        merged_theirs = zoo.run(theirs.merge_and_unload(), case.inputs())
    assert_rel_close(merged_ours, out_ours, TOL, f"{setup}: ours merged vs unmerged")
    assert_rel_close(merged_theirs, merged_ours, TOL, f"{setup}: merged")


@pytest.mark.parametrize("setup", PISSA, ids=str)
def test_pissa_fast_svd_is_identity_at_init(setup):
    """Randomised SVD (ours oversamples by 10, peft does not) gives different factors, so only
    the init behaviour is compared: both start exactly at the base model's output."""
    setup = pissa(setup, pissa_iters=2)
    case, ours, theirs, base_out = build_pair(setup, perturbed=False)
    assert set(delta_layers(ours)) == peft_adapted(theirs)
    with torch.no_grad():
        assert_rel_close(zoo.run(ours, case.inputs()), base_out, TOL, f"{setup}: ours at init")
        assert_rel_close(zoo.run(theirs, case.inputs()), base_out, TOL, f"{setup}: peft at init")
    for layer in delta_layers(ours).values():
        delta = layer.deltas["a"]
        weight = delta.info.weight_matrix(layer.base_layer.weight)
        assert (delta.scale * delta.B @ delta.A).norm() > 0.1 * weight.norm()


# ----------------------------------------------------------------------------- conv geometry
@pytest.mark.parametrize("target", ["c2a", "c2b", "c2c", "c1", "c3"])
def test_conv_geometry_matches_peft_merged(target):
    """zoo's ConvNet: reflect padding (c2b), dilation (c2c), Conv1d (c1), Conv3d (c3).

    peft's *unmerged* conv path builds ``lora_A`` without the base layer's dilation and
    padding_mode (wrong output on c2b, a shape error on c2c), but its merged weight
    ``B ⊛ A`` is right, so ours unmerged is compared with peft merged.
    """
    lora = {"rank": 2, "alpha": 3, "targets": [target]}
    case, ours, theirs, _ = build_pair(Setup(f"conv-{target}", "conv", lora))
    copy_into_peft(ours, theirs)
    with torch.no_grad():
        theirs.merge_adapter()
        assert_rel_close(zoo.run(theirs, case.inputs()), zoo.run(ours, case.inputs()), TOL,
                         f"{target}: peft merged vs ours")
