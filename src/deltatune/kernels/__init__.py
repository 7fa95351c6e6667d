"""Optional fused fast paths (Triton), each beside the pure-torch path every CPU run takes.

* ``dual_gemm``: ``a₁ b₁ + α a₂ b₂ (+ bias)`` in one GEMM, the low-rank product accumulated
  into the same tile (``kernels.gemm``);
* ``lora_linear``: a LoRA linear layer (``x Wᵀ + b + s (x Aᵀ) Bᵀ``) forward and backward on it
  (``kernels.lora``); ``LoraDelta.with_base`` dispatches to it.

They run where Triton does: CUDA tensors in float16/bfloat16 (and, for the tests, CPU tensors
under Triton's interpreter, ``TRITON_INTERPRET=1``). **Off by default**: no GPU has measured
them against the torch path yet (``benchmarks/gpu.py`` runs LoRA both ways); turn them on with
``deltatune.kernels.use(True)`` or ``DELTATUNE_KERNELS=1``. The first call at each shape is
checked against the torch path; a kernel that disagrees is switched off with a warning and the
torch result is used.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Iterator

import torch
from torch import Tensor

_on = os.environ.get("DELTATUNE_KERNELS", "0").strip().lower() in ("1", "true", "yes", "on")


def use(on: bool = True) -> bool:
    """Turn the fused paths on or off (process-wide); returns the previous setting."""
    global _on
    previous, _on = _on, bool(on)
    return previous


def enabled() -> bool:
    """Whether the fused paths are on (``use``, ``DELTATUNE_KERNELS``)."""
    return _on


@contextlib.contextmanager
def using(on: bool = True) -> Iterator[None]:
    """``use(on)`` for the duration of a ``with`` block."""
    previous = use(on)
    try:
        yield
    finally:
        use(previous)


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton's interpreter is on (``TRITON_INTERPRET=1``): kernels then run on CPU
    tensors, slowly, for tests."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def runs_on(t: Tensor) -> bool:
    """Whether the fused paths are on and can run on ``t``: CUDA float16/bfloat16 with Triton
    installed, or a CPU tensor under Triton's interpreter; never while ``torch.compile``
    traces (the compiler fuses on its own)."""
    if not _on or torch.compiler.is_compiling() or not _triton_installed():
        return False
    if t.is_cuda:
        return t.dtype in (torch.float16, torch.bfloat16)
    return t.device.type == "cpu" and interpreting() and t.dtype in (
        torch.float32, torch.float16)


def __getattr__(name: str):  # the kernels' modules import lazily
    if name in ("dual_gemm", "dual_gemm_reference"):
        from deltatune.kernels import gemm as module
        return getattr(module, name)
    if name == "lora_linear":
        from deltatune.kernels.lora import lora_linear
        return lora_linear
    raise AttributeError(f"module 'deltatune.kernels' has no attribute {name!r}")


__all__ = ["dual_gemm", "dual_gemm_reference", "enabled", "interpreting", "lora_linear",
           "runs_on", "use", "using"]
