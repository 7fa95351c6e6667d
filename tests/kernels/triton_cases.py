"""The Triton kernel itself, run by Triton's interpreter on CPU tensors. Not collected by the
main run (the interpreter must be on before Triton is imported): ``test_triton.py`` runs this
file in its own pytest process with ``TRITON_INTERPRET=1``. bfloat16 is left to the GPU: the
interpreter's ``tl.dot`` mis-reads bfloat16 operands (numpy has no bfloat16)."""

from __future__ import annotations

import os

import pytest
import torch

import deltatune as dt
from deltatune import kernels
from deltatune.kernels import gemm
from deltatune.kernels import lora as fused
from helpers import assert_rel_close, perturb
from zoo import CASES

assert os.environ.get("TRITON_INTERPRET") == "1", "run through test_triton.py"

TOL = {torch.float32: 1e-6, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,k1,n,k2,bias,layout", [
    (37, 50, 29, 5, False, "nt"),    # nothing a multiple of the 16-wide tile
    (64, 48, 40, 16, True, "nt"),    # LoRA's forward layout: W and B transposed views
    (33, 40, 24, 70, True, "nn"),    # K₂ over one 64-wide step: several second-pair steps
    (16, 24, 48, 8, False, "nn"),    # the input-gradient layout: plain W and A
    (1, 16, 16, 1, False, "nt"),     # one row, rank 1
])
def test_dual_gemm_equals_torch(dtype, m, k1, n, k2, bias, layout):
    g = torch.Generator().manual_seed(m + n)
    a1 = torch.randn(m, k1, generator=g).to(dtype)
    a2 = torch.randn(m, k2, generator=g).to(dtype)
    if layout == "nt":  # (N, K) storage read transposed
        b1 = torch.randn(n, k1, generator=g).to(dtype).t()
        b2 = torch.randn(n, k2, generator=g).to(dtype).t()
    else:
        b1 = torch.randn(k1, n, generator=g).to(dtype)
        b2 = torch.randn(k2, n, generator=g).to(dtype)
    c = torch.randn(n, generator=g).to(dtype) if bias else None
    out = gemm.dual_gemm(a1, b1, a2, b2, 0.7, c)
    want = gemm.dual_gemm_reference(a1.double(), b1.double(), a2.double(), b2.double(), 0.7,
                                    None if c is None else c.double())
    assert out.dtype == dtype and out.shape == (m, n) and out.is_contiguous()
    assert_rel_close(out.double(), want, TOL[dtype])


def test_dual_gemm_strided_rows_and_empty():
    a1 = torch.randn(20, 64)[:, :32]  # row stride 64
    b1, a2, b2 = torch.randn(32, 24), torch.randn(40, 3)[::2], torch.randn(3, 24)
    assert_rel_close(gemm.dual_gemm(a1, b1, a2, b2, 2.0),
                     gemm.dual_gemm_reference(a1, b1, a2, b2, 2.0), 1e-6)
    empty = gemm.dual_gemm(a1[:0], b1, a2[:0], b2, 1.0)
    assert empty.shape == (0, 24)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lora_linear_through_the_kernel(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 40, generator=g).to(dtype).requires_grad_()
    w, c = torch.randn(24, 40, generator=g).to(dtype), torch.randn(24, generator=g).to(dtype)
    a = torch.randn(4, 40, generator=g).to(dtype).requires_grad_()
    b = torch.randn(24, 4, generator=g).to(dtype).requires_grad_()
    with kernels.using(True):
        y = fused.lora_linear(x, w, c, a, b, 0.5)
    assert y is not None
    y_ref = fused.lora_linear_reference(x, w, c, a, b, 0.5)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, a, b], grad)
    want = torch.autograd.grad(y_ref, [x, a, b], grad)
    assert_rel_close(y.double(), y_ref.double(), TOL[dtype])
    for g1, g0 in zip(got, want, strict=True):
        assert_rel_close(g1.double(), g0.double(), TOL[dtype])


def test_tiny_llama_trains_the_same_fused():
    """Every linear layer of the tiny Llama through the kernel (each shape checked once on
    its first call), outputs and gradients as the torch path's."""
    case = next(c for c in CASES if c.name == "llama")
    inputs = case.inputs()
    results = []
    for on in (True, False):
        model = case.build()
        dt.inject(model, dt.LoraConfig(rank=4), name="a")
        perturb(model, scale=0.05)
        model.train()
        with kernels.using(on):
            out = model(**inputs).logits
            out.pow(2).mean().backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters()
                              if p.grad is not None}))
    assert fused._checked, "the fused path did not run"
    (y1, g1), (y0, g0) = results
    assert_rel_close(y1, y0, 1e-5)
    assert g1.keys() == g0.keys() and g0
    for name in g0:
        assert_rel_close(g1[name], g0[name], 1e-5, name)
