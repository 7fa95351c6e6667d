"""LoRA-XS and SVFit against naive references of their equations, on a plain MLP and on GPT-2's
Conv1D (weight stored transposed):

    LoRA-XS:  h = W x + s · U_r Σ_r R V_rᵀ x        (only R, r × r, trains)
    SVFit:    h = W x + U_r diag(Δσ) V_rᵀ x         (only Δσ ∈ ℝ^r trains)

plus the frozen basis (buffers, exact through training and save → load), trainable counts,
exact merging and bad configs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.core.lifecycle import delta_layers
from deltatune.methods.svd import LoraXSConfig, SVFitConfig, svd_factors
from helpers import assert_differs, assert_rel_close, perturb

CONFIGS = {"lora_xs": LoraXSConfig, "svfit": SVFitConfig}
CORE = {"lora_xs": "R", "svfit": "sigma"}


def build(arch: str, seed: int = 0) -> nn.Sequential:
    """Two adaptable layers (``"0"``: 12 → 10, ``"2"``: 10 → 6) around a GELU."""
    torch.manual_seed(seed)
    if arch == "mlp":
        return nn.Sequential(nn.Linear(12, 10), nn.GELU(), nn.Linear(10, 6))
    return nn.Sequential(Conv1D(10, 12), nn.GELU(), Conv1D(6, 10))  # Conv1D(nf=out, nx=in)


def matrix(layer: nn.Module) -> torch.Tensor:
    """The weight as ``(out, in)``, read straight from the module (Conv1D stores ``(in, out)``)."""
    return layer.weight.T if isinstance(layer, Conv1D) else layer.weight


def reference_forward(model: nn.Sequential, x: torch.Tensor, new: dict) -> torch.Tensor:
    """The model with each adapted layer's matrix replaced by ``new[index]``, by hand."""
    h = x
    for i, layer in enumerate(model):
        base = getattr(layer, "base_layer", layer)
        h = h @ new[i].T + base.bias if i in new else layer(h)
    return h


def reference_basis(w: torch.Tensor, r: int, gauge: torch.Tensor):
    """Top-r SVD of ``w`` (fp64), each singular pair's sign chosen to match ``gauge``'s
    columns: singular vectors are only defined up to a joint sign flip of ``(u_i, v_i)``."""
    u, s, vh = torch.linalg.svd(w.detach().double(), full_matrices=False)
    u, s, vh = u[:, :r], s[:r], vh[:r]
    sign = torch.sign((u * gauge.detach().double()).sum(0))
    return u * sign, s, vh * sign[:, None]


def adapt(method: str, arch: str, scale: float = 0.5, **config):
    model = build(arch)
    dt.inject(model, CONFIGS[method](targets=["0", "2"], **config), name="a")
    perturb(model, scale=scale)
    return model


# ------------------------------------------------------------------------ golden formulas
@pytest.mark.parametrize("arch", ["mlp", "conv1d"])
@pytest.mark.parametrize("config", [{"rank": 3}, {"rank": 4, "alpha": 12}], ids=["s=1", "s=3"])
def test_lora_xs_matches_the_paper_equation(arch, config):
    model = adapt("lora_xs", arch, **config)
    x = torch.randn(2, 5, 12)
    new = {}
    for i in (0, 2):
        w, delta = matrix(model[i].base_layer), model[i].deltas["a"]
        r = config["rank"]
        u, s, vh = reference_basis(w, r, delta.U)
        scale = config.get("alpha", r) / r
        new[i] = w.double() + scale * u @ torch.diag(s) @ delta.R.double() @ vh  # (out, in)
    expected = reference_forward(model, x.double(), new)
    with dt.disabled(model):
        assert_differs(expected, model(x))
    assert_rel_close(model(x), expected, 1e-5, f"LoRA-XS on {arch}")


@pytest.mark.parametrize("arch", ["mlp", "conv1d"])
def test_svfit_matches_the_paper_equation(arch):
    model = adapt("svfit", arch, rank=3)
    x = torch.randn(7, 12)
    new = {}
    for i in (0, 2):
        w, delta = matrix(model[i].base_layer), model[i].deltas["a"]
        u, _, vh = reference_basis(w, 3, delta.U)
        new[i] = w.double() + u @ torch.diag(delta.sigma.double()) @ vh
    expected = reference_forward(model, x.double(), new)
    with dt.disabled(model):
        assert_differs(expected, model(x))
    assert_rel_close(model(x), expected, 1e-5, f"SVFit on {arch}")


def test_svfit_trains_exactly_the_top_singular_values():
    model = build("mlp")
    dt.inject(model, SVFitConfig(targets=["0"], rank=3), name="a")
    delta, w = model[0].deltas["a"], matrix(model[0].base_layer).detach()
    s = torch.linalg.svdvals(w)
    with torch.no_grad():
        delta.sigma.copy_(0.05 * s[:3])  # σ_i → 1.05 σ_i: the order is kept
    dt.merge(model)
    new = torch.linalg.svdvals(matrix(model[0].base_layer).detach())
    assert_differs(new, s)
    assert_rel_close(new[:3], 1.05 * s[:3], 1e-5, "trained singular values")
    assert_rel_close(new[3:], s[3:], 1e-5, "the other singular values")


def test_basis_is_the_truncated_svd_of_the_weight():
    model = build("conv1d")
    dt.inject(model, LoraXSConfig(targets=["0"], rank=4), name="xs")
    dt.inject(model, SVFitConfig(targets=["0"], rank=4), name="fit")
    w = matrix(model[0].base_layer).detach()
    u, s, vh = torch.linalg.svd(w)
    top = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
    xs, fit = model[0].deltas["xs"], model[0].deltas["fit"]
    assert_rel_close(xs.U @ xs.Vh, top, 1e-5, "LoRA-XS: U holds U_r Σ_r")
    assert_rel_close(fit.U @ torch.diag(s[:4]) @ fit.Vh, top, 1e-5, "SVFit: U holds U_r")
    assert_rel_close(fit.Vh @ fit.Vh.T, torch.eye(4), 1e-5, "orthonormal rows of V_rᵀ")


def test_randomised_svd_is_close_to_the_exact_one():
    torch.manual_seed(0)
    w = torch.randn(40, 4) @ torch.randn(4, 30) + 1e-3 * torch.randn(40, 30)  # ~rank 4
    u, s, vh = svd_factors(w, 4)
    u2, s2, vh2 = svd_factors(w, 4, iters=3)
    assert u2.shape == (40, 4) and s2.shape == (4,) and vh2.shape == (4, 30)
    assert_rel_close(u2 * s2 @ vh2, u * s @ vh, 1e-3, "randomised top-4 part")


# ----------------------------------------------------------------- initialisation and state
@pytest.mark.parametrize("method", ["lora_xs", "svfit"])
def test_identity_at_init_and_only_the_core_trains(method):
    model = build("conv1d")
    x = torch.randn(3, 12)
    y0 = model(x).detach()
    dt.inject(model, CONFIGS[method](targets=["0", "2"], rank=3), name="a")
    assert torch.equal(model(x), y0), "a zero core leaves the base output bit for bit"
    delta = model[0].deltas["a"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == \
        [f"0.deltas.a.{CORE[method]}", f"2.deltas.a.{CORE[method]}"]
    assert {"U", "Vh"} <= dict(delta.named_buffers()).keys()
    frozen = {k: v.clone() for k, v in delta.named_buffers()}
    base = {k: v.clone() for k, v in model.state_dict().items() if ".deltas." not in k}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert torch.count_nonzero(getattr(delta, CORE[method])) > 0, "the core trained"
    assert all(torch.equal(v, dict(delta.named_buffers())[k]) for k, v in frozen.items())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base.items())


def test_lora_xs_gaussian_init():
    model = build("mlp")
    dt.inject(model, LoraXSConfig(targets=["0"], rank=6, init_std=1e-3), name="a")
    r = model[0].deltas["a"].R
    assert abs(r.std().item() - 1e-3) < 3e-4 and torch.count_nonzero(r) == 36


@pytest.mark.parametrize("method", ["lora_xs", "svfit"])
def test_saved_basis_reloads_exactly_into_a_fresh_base(method, tmp_path):
    model = adapt(method, "conv1d", rank=3)
    x = torch.randn(4, 12)
    y = model(x)
    saved = {k: v.clone() for k, v in model[0].deltas["a"].state_dict().items()}
    dt.save(model, tmp_path / "a")
    keys = sorted(load_file(tmp_path / "a" / "deltatune_model.safetensors"))
    assert keys == sorted(f"{i}.{k}" for i in (0, 2) for k in ("U", "Vh", CORE[method]))
    fresh = dt.load(build("conv1d"), tmp_path / "a")
    assert torch.equal(fresh(x), y)
    # The basis comes from the file, not from the base it is loaded on.
    other = dt.load(build("conv1d", seed=1), tmp_path / "a")
    loaded = other[0].deltas["a"].state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())
    u, s, _ = svd_factors(matrix(other[0].base_layer), 3)
    assert_differs(loaded["U"].abs(), (u * s if method == "lora_xs" else u).abs())


def test_a_sign_flip_of_the_basis_changes_lora_xs_but_not_svfit():
    """Why the basis is saved: an SVD regenerated elsewhere may flip a pair (u_i, v_i)."""
    for method, changes in (("lora_xs", True), ("svfit", False)):
        delta = adapt(method, "mlp", rank=3)[0].deltas["a"]
        before = delta.delta_params()["weight"]
        with torch.no_grad():
            delta.U[:, 0].neg_()
            delta.Vh[0].neg_()
        after = delta.delta_params()["weight"]
        if changes:
            assert_differs(after, before, "U D R D Vᵀ ≠ U R Vᵀ")
        else:
            assert_rel_close(after, before, 1e-6, "u_i Δσ_i v_iᵀ is sign-invariant")


# ----------------------------------------------------------------- counts, merge, training
@pytest.mark.parametrize("method, per_layer", [("lora_xs", lambda r: r * r),
                                                ("svfit", lambda r: r)])
def test_trainable_counts(method, per_layer):
    config = CONFIGS[method](targets=["0", "2"], rank=3, overrides={"2": {"rank": 5}})
    model = build("mlp")
    expected = per_layer(3) + per_layer(5)
    assert dt.cost(model, config).params == expected
    dt.inject(model, config, name="a")
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert dt.summary(model).trainable_params == expected


@pytest.mark.parametrize("arch", ["mlp", "conv1d"])
@pytest.mark.parametrize("method", ["lora_xs", "svfit"])
def test_merged_equals_unmerged_and_unmerge_restores(method, arch):
    model = adapt(method, arch, rank=3, **({"alpha": 6} if method == "lora_xs" else {}))
    x = torch.randn(5, 12)
    before = {k: v.clone() for k, v in model.state_dict().items() if ".deltas." not in k}
    y = model(x)
    dt.merge(model)
    assert not torch.equal(model[0].base_layer.weight, before["0.weight"])
    assert_rel_close(model(x), y, 1e-6, "merged")
    dt.unmerge(model)
    for key, value in before.items():
        assert_rel_close(model.state_dict()[key], value, 1e-6, f"restored {key}")


@pytest.mark.parametrize("method", ["lora_xs", "svfit"])
def test_fits_a_target_inside_its_subspace(method):
    """A teacher whose weight differs from the student's only in the student's frozen basis."""
    student = build("mlp")
    dt.inject(student, CONFIGS[method](targets=["0"], rank=4), name="a")
    delta = student[0].deltas["a"]
    with torch.no_grad():
        core = torch.randn(4, 4) * 0.3 if method == "lora_xs" else torch.diag(torch.randn(4))
        target = matrix(student[0].base_layer) + delta.U @ core @ delta.Vh
    x = torch.randn(128, 12)
    goal = x @ target.T + student[0].base_layer.bias
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(200):
        loss = F.mse_loss(student[0](x), goal)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1e-6


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("method", ["lora_xs", "svfit"])
def test_bad_configs(method):
    cls = CONFIGS[method]
    for bad in (0, -2, 2.5, True):
        with pytest.raises(dt.ConfigError, match="rank must be a positive integer"):
            cls(rank=bad)
    with pytest.raises(dt.ConfigError, match="dropout"):
        cls(dropout=1.0)
    with pytest.raises(dt.ConfigError, match="svd_iters"):
        cls(svd_iters=-1)
    with pytest.raises(dt.TargetError, match=r"rank 7 exceeds min\(in, out\) = 6"):
        dt.inject(build("mlp"), cls(targets=["2"], rank=7))
    with pytest.raises(dt.ConfigError, match=r"2: rank 8 exceeds min\(in, out\) = 6"):
        dt.inject(build("mlp"), cls(targets=["0", "2"], rank=3, overrides={"2": {"rank": 8}}))
    model = dt.inject(build("mlp"), cls(targets=r"\d", rank=7), name="a")  # broad: 2 left out
    assert list(delta_layers(model)) == ["0"]


def test_bad_lora_xs_fields():
    with pytest.raises(dt.ConfigError, match="alpha"):
        LoraXSConfig(alpha=float("nan"))
    for bad in (-1e-3, float("inf"), float("nan")):
        with pytest.raises(dt.ConfigError, match="init_std"):
            LoraXSConfig(init_std=bad)
