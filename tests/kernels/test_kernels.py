"""The fused paths' CPU side: the autograd function they run (with torch GEMMs in place of the
kernel), the dispatch from a LoRA layer, the switch, and the first-call check that turns a
wrong kernel off. The Triton kernel itself: ``test_triton.py``."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune import kernels
from deltatune.kernels import gemm
from deltatune.kernels import lora as fused
from deltatune.kernels.lora import lora_linear, lora_linear_reference
from helpers import assert_rel_close, perturb
from zoo import CASES

LLAMA = next(c for c in CASES if c.name == "llama")


def naive(x, weight, bias, a, b, scale):
    """The paper's formula, composed by autograd."""
    return x @ weight.t() + (bias if bias is not None else 0) + scale * (x @ a.t()) @ b.t()


def operands(dtype=torch.float64, shape=(2, 5, 12), out=7, rank=3, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=dtype)
    w = torch.randn(out, shape[-1], generator=g, dtype=dtype)
    b0 = torch.randn(out, generator=g, dtype=dtype) if bias else None
    a = torch.randn(rank, shape[-1], generator=g, dtype=dtype)
    b = torch.randn(out, rank, generator=g, dtype=dtype)
    return x, w, b0, a, b


@pytest.mark.parametrize("bias", [True, False])
def test_function_gradients_are_the_formulas_derivative(bias):
    """float64 finite differences, every input (x, W, bias, A, B) requiring gradients."""
    x, w, b0, a, b = (t.requires_grad_() if t is not None else None
                      for t in operands(bias=bias))
    assert torch.autograd.gradcheck(
        lambda *t: lora_linear_reference(*t, 0.7), (x, w, b0, a, b), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(6, 12), (2, 5, 12), (2, 3, 4, 12)])
def test_function_equals_the_naive_composition(shape):
    """Values and every gradient, 2-D to 4-D inputs; the frozen weight gets none."""
    x, w, b0, a, b = operands(torch.float32, shape=shape)
    leaves = [x.requires_grad_(), a.requires_grad_(), b.requires_grad_()]
    y = lora_linear_reference(x, w, b0, a, b, 2.0)
    grad = torch.randn_like(y).transpose(0, -1).contiguous().transpose(0, -1)  # strided
    got = torch.autograd.grad(y, leaves, grad)
    y_ref = naive(x, w, b0, a, b, 2.0)
    want = torch.autograd.grad(y_ref, leaves, grad)
    assert_rel_close(y, y_ref, 1e-6, "output")
    for name, g1, g0 in zip("xab", got, want, strict=True):
        assert_rel_close(g1, g0, 1e-6, f"grad {name}")


def test_function_computes_only_the_gradients_asked_for(monkeypatch):
    """A frozen adapter under a trained input: one GEMM pair for ∂x, no factor gradients."""
    x, w, b0, a, b = operands(torch.float32)
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return gemm.dual_gemm_reference(*args, **kwargs)

    x.requires_grad_()
    y = fused._LoraLinear.apply(x, w, b0, a, b, 1.5, counting)
    (gx,) = torch.autograd.grad(y.sum(), [x])
    assert len(calls) == 2  # forward and ∂x
    assert_rel_close(gx, torch.autograd.grad(naive(x, w, b0, a, b, 1.5).sum(), [x])[0], 1e-6)


def test_dual_gemm_reference_and_bad_shapes():
    g = torch.Generator().manual_seed(3)
    a1, b1 = torch.randn(4, 6, generator=g), torch.randn(6, 5, generator=g)
    a2, b2 = torch.randn(4, 2, generator=g), torch.randn(2, 5, generator=g)
    bias = torch.randn(5, generator=g)
    assert_rel_close(gemm.dual_gemm_reference(a1, b1, a2, b2, 0.5, bias),
                     a1 @ b1 + 0.5 * a2 @ b2 + bias, 1e-6)
    with pytest.raises(ValueError, match="do not chain"):
        gemm.dual_gemm(a1, b1, a2, b2.t(), 1.0)
    with pytest.raises(ValueError, match="do not chain"):
        gemm.dual_gemm(a1, b1, a2, b2, 1.0, bias[:3])


# ---------------------------------------------------------------------------- the switch
def test_switch_and_where_the_kernels_run(monkeypatch):
    assert not kernels.enabled()  # off by default: not measured on a GPU yet
    cpu = torch.zeros(2, dtype=torch.float16)
    with kernels.using(True):
        assert kernels.enabled()
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        assert not kernels.runs_on(cpu)  # CPU tensors only under Triton's interpreter
        monkeypatch.setattr(kernels, "_triton_installed", lambda: True)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert kernels.runs_on(cpu)
        assert not kernels.runs_on(cpu.to(torch.float64))
        assert not kernels.runs_on(torch.zeros(2, dtype=torch.int64))
        monkeypatch.setattr(kernels, "_triton_installed", lambda: False)
        assert not kernels.runs_on(cpu)
    assert not kernels.enabled()
    assert kernels.use(True) is False and kernels.use(False) is True


def test_environment_variable_turns_them_on():
    import subprocess
    import sys
    code = "from deltatune import kernels; print(kernels.enabled())"
    for value, expected in (("1", "True"), ("on", "True"), ("0", "False"), ("", "False")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**__import__("os").environ, "DELTATUNE_KERNELS": value},
                             check=True).stdout.split()[-1]
        assert out == expected, value


def test_lora_linear_declines_where_it_cannot_run(monkeypatch):
    x, w, b0, a, b = operands(torch.float32)
    assert lora_linear(x, w, b0, a, b, 1.0) is None  # kernels off
    monkeypatch.setattr(kernels, "runs_on", lambda t: True)
    with kernels.using(True):
        assert lora_linear(x, w, b0, a.double(), b, 1.0) is None  # a dtype differs
        assert lora_linear(x, w[:, :5], b0, a, b, 1.0) is None  # shapes do not chain
        assert lora_linear(x, w.to_sparse(), b0, a, b, 1.0) is None  # not a dense tensor

        class Quantized(torch.Tensor):
            pass

        assert lora_linear(x, w.as_subclass(Quantized), b0, a, b, 1.0) is None


# --------------------------------------------------------------- dispatch from a LoRA layer
@pytest.fixture
def cpu_fused(monkeypatch):
    """The fused path on the CPU with torch GEMMs standing in for the kernel (the dispatch,
    the autograd function and the first-call check all run; only the kernel differs)."""
    monkeypatch.setattr(kernels, "runs_on", lambda t: kernels.enabled())
    monkeypatch.setattr(fused, "dual_gemm", gemm.dual_gemm_reference)
    calls = []
    real = fused._LoraLinear.apply
    monkeypatch.setattr(fused._LoraLinear, "apply",
                        lambda *args: calls.append(args[0].shape) or real(*args))
    with kernels.using(True):
        yield calls


def train_step(model, inputs):
    out = model(**inputs).logits
    out.pow(2).mean().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def lora_llama(config, seed=0):
    model = LLAMA.build(seed=seed)
    dt.inject(model, config, name="a")
    perturb(model, scale=0.05)
    return model.train()


@pytest.mark.parametrize("config", [
    dt.LoraConfig(rank=4), dt.LoraConfig(rank=3, alpha=5, rslora=True),
    dt.LoraConfig(rank=2, init="pissa"), dt.LoraConfig(rank=2, freeze_a=True, init="gaussian"),
    dt.LoraGAConfig(rank=2)], ids=["lora", "rslora", "pissa", "freeze_a", "lora_ga"])
def test_fused_layers_train_as_the_unfused_ones(cpu_fused, config):
    inputs = LLAMA.inputs()
    data = dict(data=[inputs], loss_fn=lambda out, _: out.logits.pow(2).mean()) \
        if isinstance(config, dt.LoraGAConfig) else {}
    models = []
    for _ in range(2):
        model = LLAMA.build()
        dt.inject(model, config, name="a", **data)
        perturb(model, scale=0.05)
        models.append(model.train())
    y1, g1 = train_step(models[0], inputs)
    assert len(cpu_fused) == 14  # 7 linear layers a block, 2 blocks: every one fused
    with kernels.using(False):
        y0, g0 = train_step(models[1], inputs)
    assert len(cpu_fused) == 14
    assert_rel_close(y1, y0, 1e-5, "output")
    assert g1.keys() == g0.keys() and g0
    for name in g0:
        assert_rel_close(g1[name], g0[name], 1e-5, name)


def test_what_is_not_fused(cpu_fused):
    """Methods that change LoRA's math, dropout in training, a delta bias, two active deltas,
    a merged delta: the torch path, the same outputs."""
    inputs = LLAMA.inputs()
    for config in (dt.DoraConfig(rank=2), dt.LoraConfig(rank=2, dropout=0.1),
                   dt.LoraConfig(rank=2, bias=True), dt.DyLoraConfig(rank=4),
                   dt.AdaLoraConfig(rank=4, total_steps=10)):
        train_step(lora_llama(config), inputs)
        assert not cpu_fused, config.method
    model = lora_llama(dt.LoraConfig(rank=2, dropout=0.1)).eval()
    with torch.no_grad():
        model(**inputs)
    assert len(cpu_fused) == 14  # dropout only applies in training
    cpu_fused.clear()
    dt.inject(model, dt.LoraConfig(rank=2), name="b")
    dt.activate(model, ["a", "b"])
    with torch.no_grad():
        model(**inputs)
    assert not cpu_fused
    dt.activate(model, "b")
    dt.merge(model, "b")
    dt.activate(model, ["b", "a"])  # b merged: a alone runs, fused, on the merged weight
    with torch.no_grad():
        y1 = model(**inputs).logits
        with kernels.using(False):
            y0 = model(**inputs).logits
    assert len(cpu_fused) == 14
    assert_rel_close(y1, y0, 1e-5)


def test_fused_layers_keep_no_copy_of_their_input(cpu_fused):
    """Under ``core.recompute.lean_inputs`` the function saves a recipe of ``x``: the forward
    keeps as many bytes alive as the unfused path does."""
    from deltatune.train.memory import TensorMemory
    inputs = LLAMA.inputs()
    kept = []
    for on in (True, False):
        model = lora_llama(dt.LoraConfig(rank=4))
        with kernels.using(on), TensorMemory() as memory:
            out = model(**inputs).logits  # alive: so is what its graph keeps for backward
            kept.append(memory.current_bytes)
        del out
    assert len(cpu_fused) == 14
    assert kept[0] == kept[1]


def test_a_kernel_that_disagrees_is_turned_off(cpu_fused, monkeypatch):
    monkeypatch.setattr(fused, "_checked", set())
    monkeypatch.setattr(fused, "dual_gemm",
                        lambda *a, **k: gemm.dual_gemm_reference(*a, **k) * 1.5)
    model = lora_llama(dt.LoraConfig(rank=4)).eval()
    inputs = LLAMA.inputs()
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="kernels are now off"):
        y1 = model(**inputs).logits
    assert not kernels.enabled()
    assert len(cpu_fused) == 1  # the first layer ran the (corrected) fused call, then none
    with torch.no_grad():
        y0 = model(**inputs).logits
    assert_rel_close(y1, y0, 1e-6)
    kernels.use(True)  # the fixture restores the setting on exit


def test_module_attributes():
    assert kernels.dual_gemm is gemm.dual_gemm
    assert kernels.lora_linear is lora_linear
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        kernels.nope  # noqa: B018
