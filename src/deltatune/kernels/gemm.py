"""``out = a₁ b₁ + α a₂ b₂ (+ bias)`` in one GEMM: the second product (a small inner dimension,
a low-rank factor's) accumulates into the same tile as the first, so the ``(M, N)`` result is
written once instead of written, read back and written again by a separate ``addmm``.

That is LoRA's forward (``x Wᵀ + s (x Aᵀ) Bᵀ``) and its input gradient
(``g W + s (g B) A``): per layer and step, it saves two passes over an ``(N, out)`` and two over
an ``(N, in)`` activation, about half of the memory traffic a rank-16 LoRA adds to its frozen
layer (``≈ 4N (in + out)`` elements).

``dual_gemm`` runs the Triton kernel (CUDA; or Triton's interpreter on the CPU, under
``TRITON_INTERPRET=1``, which is how the CPU tests check it); ``dual_gemm_reference`` is the
same result from two torch GEMMs, the path every CPU run takes.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor


def dual_gemm_reference(a1: Tensor, b1: Tensor, a2: Tensor, b2: Tensor, alpha: float,
                        bias: Tensor | None = None) -> Tensor:
    """``a₁ b₁ + α a₂ b₂ + bias`` with torch (``(M, K₁) (K₁, N) + (M, K₂) (K₂, N)``)."""
    out = a1 @ b1 if bias is None else torch.addmm(bias, a1, b1)
    return out.addmm_(a2, b2, alpha=alpha)


def dual_gemm(a1: Tensor, b1: Tensor, a2: Tensor, b2: Tensor, alpha: float,
              bias: Tensor | None = None) -> Tensor:
    """``a₁ b₁ + α a₂ b₂ + bias`` in one Triton kernel, accumulated in float32, written once in
    ``a₁``'s dtype. Operands may be strided (transposed views need no copy)."""
    m, k1 = a1.shape
    k2, n = b2.shape
    if b1.shape != (k1, n) or a2.shape != (m, k2) or (bias is not None and bias.shape != (n,)):
        raise ValueError(f"dual_gemm: shapes {tuple(a1.shape)} {tuple(b1.shape)} "
                         f"{tuple(a2.shape)} {tuple(b2.shape)} do not chain")
    out = torch.empty(m, n, dtype=a1.dtype, device=a1.device)
    if m == 0 or n == 0:
        return out
    kernel, tuned = _kernels()
    block_k2 = max(16, min(64, 1 << max(k2 - 1, 0).bit_length()))
    args = (a1, b1, a2, b2, bias if bias is not None else out, out, m, n, k1, k2,
            *a1.stride(), *b1.stride(), *a2.stride(), *b2.stride(), *out.stride(), float(alpha))
    if a1.is_cuda:
        def grid(meta: dict[str, Any]) -> tuple[int]:
            return (_cdiv(m, meta["BM"]) * _cdiv(n, meta["BN"]),)

        tuned[grid](*args, 1 << max(m - 1, 0).bit_length(), HAS_BIAS=bias is not None,
                    BK2=block_k2, GROUP_M=8)
    else:  # Triton's interpreter (tests): one small fixed tile
        kernel[(_cdiv(m, 16) * _cdiv(n, 16),)](
            *args, 0, HAS_BIAS=bias is not None, BK2=block_k2, GROUP_M=2, BM=16, BN=16, BK=16)
    return out


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _kernels() -> tuple[Any, Any]:
    """(the jitted kernel, its autotuned version keyed by the shape), imported on first use so
    that importing deltatune never imports Triton."""
    from deltatune.kernels import _triton_dual_gemm as t

    return t.kernel, t.tuned
