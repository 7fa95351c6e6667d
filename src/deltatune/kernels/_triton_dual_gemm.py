"""The Triton kernel behind ``dual_gemm`` (imported only when it runs)."""

from __future__ import annotations

import triton
import triton.language as tl

#: Tiles tried on CUDA (bf16/fp16 tensor cores; the Triton tutorial's Hopper/Ampere set).
CONFIGS = [  # (BM, BN, BK, stages, warps)
    (128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 32, 4, 4),
    (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 256, 32, 4, 4), (64, 64, 32, 5, 2),
]


@triton.jit
def _product(acc, a, b, rm, rn, in_m, in_n, K, s_ak, s_bk, s_am, s_bn,
             BK: tl.constexpr):
    """``acc + a[rm, :] @ b[:, rn]`` over the inner dimension ``K``, ``BK`` at a time."""
    rk = tl.arange(0, BK)
    for k in range(0, tl.cdiv(K, BK)):
        kk = k * BK + rk
        a_tile = tl.load(a + rm[:, None] * s_am + kk[None, :] * s_ak,
                         mask=in_m & (kk[None, :] < K), other=0.0)
        b_tile = tl.load(b + kk[:, None] * s_bk + rn[None, :] * s_bn,
                         mask=(kk[:, None] < K) & in_n, other=0.0)
        acc = tl.dot(a_tile, b_tile, acc)
    return acc


@triton.jit
def kernel(a1, b1, a2, b2, bias, out, M, N, K1, K2,
           s_a1m, s_a1k, s_b1k, s_b1n, s_a2m, s_a2k, s_b2k, s_b2n, s_om, s_on, alpha,
           M_BUCKET, HAS_BIAS: tl.constexpr, BK2: tl.constexpr,
           GROUP_M: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
           BK: tl.constexpr):
    """One (BM, BN) tile of ``a₁ b₁ + α a₂ b₂ + bias``, both products in one fp32 accumulator
    pass; ``M_BUCKET`` (M rounded up to a power of two) only keys the autotuner."""
    # tiles in groups of GROUP_M rows, so that consecutive programs share b₁ tiles in L2
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    rn = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    in_m = rm[:, None] < M
    in_n = rn[None, :] < N
    acc = _product(tl.zeros((BM, BN), dtype=tl.float32), a1, b1, rm, rn, in_m, in_n, K1,
                   s_a1k, s_b1k, s_a1m, s_b1n, BK)
    # the low-rank product, scaled once at the end
    low = _product(tl.zeros((BM, BN), dtype=tl.float32), a2, b2, rm, rn, in_m, in_n, K2,
                   s_a2k, s_b2k, s_a2m, s_b2n, BK2)
    acc += alpha * low
    if HAS_BIAS:
        acc += tl.load(bias + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out + rm[:, None] * s_om + rn[None, :] * s_on, acc.to(out.dtype.element_ty),
             mask=in_m & in_n)


tuned = triton.autotune(
    [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_stages=s, num_warps=w)
     for bm, bn, bk, s, w in CONFIGS],
    key=["M_BUCKET", "N", "K1", "K2", "HAS_BIAS"])(kernel)
