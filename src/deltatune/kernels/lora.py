"""A LoRA linear layer, ``y = x Wᵀ + b + s (x Aᵀ) Bᵀ``, forward and backward on ``dual_gemm``.

Forward: ``h = x Aᵀ`` ``(N, r)``, then ``y`` in one GEMM (``[x Wᵀ + s h Bᵀ]``, written once).
Backward: ``gB = g B`` ``(N, r)``; ``∂x = g W + s (gB) A`` in one GEMM; ``∂A = s (gB)ᵀ x``,
``∂B = s gᵀ h``. It saves ``x`` (a recipe of it under ``core.recompute.lean_inputs``, as the
unfused delta does), ``h`` and the weights — the unfused composition's saved set.

``lora_linear`` returns ``None`` where the fused path does not apply (kernels off, the device,
the dtype, a quantized or otherwise non-plain weight); the caller then runs the torch path.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from deltatune import kernels
from deltatune.kernels.gemm import dual_gemm, dual_gemm_reference

#: Largest ‖fused − torch‖ / ‖torch‖ the first call at a shape may show (per dtype): the two
#: differ by rounding only (one rounding of the sum instead of two).
CHECK_TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}

#: Shapes (device, dtype, operand shapes but M, bias) whose fused result was checked.
_checked: set[tuple] = set()

Gemm = Callable[..., Tensor]


def checked_dual_gemm(a1: Tensor, b1: Tensor, a2: Tensor, b2: Tensor, alpha: float,
                      bias: Tensor | None = None) -> Tensor:
    """``dual_gemm``, compared with the torch path on the first call at each shape; on a
    mismatch the kernels are switched off (``kernels.use(False)``) with a warning and the
    torch result is returned."""
    key = (a1.device, a1.dtype, tuple(b1.shape), a2.shape[1], tuple(a1.stride()[1:]),
           tuple(b1.stride()), tuple(b2.stride()), bias is not None)
    out = dual_gemm(a1, b1, a2, b2, alpha, bias)
    if key in _checked:
        return out
    ref = dual_gemm_reference(a1, b1, a2, b2, alpha, bias)
    err = ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()
    if not err <= CHECK_TOLERANCE[a1.dtype]:  # NaN fails too
        kernels.use(False)
        warnings.warn(
            f"deltatune.kernels: the fused GEMM differs from torch's by {err:.2e} (relative) at "
            f"shape {tuple(a1.shape)} x {tuple(b1.shape)} + {tuple(a2.shape)} x "
            f"{tuple(b2.shape)} ({a1.dtype}, {a1.device}); the kernels are now off and the "
            "torch path runs. Please report this with your GPU, torch and triton versions.",
            RuntimeWarning, stacklevel=2)
        return ref
    _checked.add(key)
    return out


def plain(t: Tensor) -> bool:
    """A dense tensor the kernel can read (not a quantized or distributed tensor subclass)."""
    return type(t) in (Tensor, torch.nn.Parameter) and t.layout == torch.strided


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor,
                scale: float) -> Tensor | None:
    """``x Wᵀ + bias + scale · (x Aᵀ) Bᵀ`` through the fused kernels, or ``None`` where they
    do not apply here (``kernels.runs_on``; every operand plain, 2-D and in ``x``'s dtype)."""
    if not kernels.runs_on(x):
        return None
    operands = (weight, a, b) if bias is None else (weight, a, b, bias)
    if not all(plain(t) and t.dtype == x.dtype and t.device == x.device for t in operands):
        return None
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1] or a.shape[1] != weight.shape[1]:
        return None
    return _LoraLinear.apply(x, weight, bias, a, b, float(scale), checked_dual_gemm)


def lora_linear_reference(x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor,
                          scale: float) -> Tensor:
    """The same function and backward with torch GEMMs (``dual_gemm_reference``): what the
    CPU tests run to check the autograd function apart from the kernel."""
    return _LoraLinear.apply(x, weight, bias, a, b, float(scale), dual_gemm_reference)


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor,
                b: Tensor, scale: float, gemm: Gemm) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        h = x2 @ a.t()  # (N, r)
        y = gemm(x2, weight.t(), h, b.t(), scale, bias)  # (N, out)
        ctx.save_for_backward(x, weight, a, b, h)
        ctx.scale, ctx.gemm = scale, gemm
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, a, b, h = ctx.saved_tensors
        s = ctx.scale
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        gb = g @ b if need_x or need_a else None  # (N, r)
        grad_x = ctx.gemm(g, weight, gb, a, s).view(x.shape) if need_x else None
        grad_w = g.t() @ x2 if need_w else None
        grad_bias = g.sum(0) if need_bias else None
        grad_a = (gb.t() @ x2).mul_(s) if need_a else None  # (r, in)
        grad_b = (g.t() @ h).mul_(s) if need_b else None  # (out, r)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None
