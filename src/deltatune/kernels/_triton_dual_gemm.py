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
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    rk = tl.arange(0, BK)
    for k in range(0, tl.cdiv(K1, BK)):
        kk = k * BK + rk
        a = tl.load(a1 + rm[:, None] * s_a1m + kk[None, :] * s_a1k,
                    mask=in_m & (kk[None, :] < K1), other=0.0)
        b = tl.load(b1 + kk[:, None] * s_b1k + rn[None, :] * s_b1n,
                    mask=(kk[:, None] < K1) & in_n, other=0.0)
        acc = tl.dot(a, b, acc)
    low = tl.zeros((BM, BN), dtype=tl.float32)  # the low-rank product, scaled once at the end
    rk2 = tl.arange(0, BK2)
    for k in range(0, tl.cdiv(K2, BK2)):
        kk = k * BK2 + rk2
        a = tl.load(a2 + rm[:, None] * s_a2m + kk[None, :] * s_a2k,
                    mask=in_m & (kk[None, :] < K2), other=0.0)
        b = tl.load(b2 + kk[:, None] * s_b2k + rn[None, :] * s_b2n,
                    mask=(kk[:, None] < K2) & in_n, other=0.0)
        low = tl.dot(a, b, low)
    acc += alpha * low
    if HAS_BIAS:
        acc += tl.load(bias + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out + rm[:, None] * s_om + rn[None, :] * s_on, acc.to(out.dtype.element_ty),
             mask=in_m & in_n)


tuned = triton.autotune(
    [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_stages=s, num_warps=w)
     for bm, bn, bk, s, w in CONFIGS],
    key=["M_BUCKET", "N", "K1", "K2", "HAS_BIAS"])(kernel)
