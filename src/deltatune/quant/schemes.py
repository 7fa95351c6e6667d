"""Quantization schemes: how one frozen weight matrix is stored, read back and multiplied.

A ``Scheme`` turns a dense ``(out, in)`` weight into a storage parameter (``quantize``), reads it
back (``dequantize``) and computes ``x Wᵀ`` from the storage in the activations' dtype
(``matmul``; ``linear.QuantizedLinear`` wraps it so that backward dequantizes again instead of
keeping a dense copy of ``W``). Every scheme is weight-only: activations are never quantized.
torchao is the default backend, bitsandbytes the optional second one; both are imported on
first use.

===========  ==============  ==================================================================
scheme       backend         storage
===========  ==============  ==================================================================
``nf4``      torchao         ``NF4Tensor``: 4-bit NormalFloat codes in blocks of ``block_size``;
                             the block absmax scales are themselves quantized to int8 in groups
                             of ``scaler_block_size`` (double quantization, QLoRA: Dettmers et
                             al. 2023, arXiv:2305.14314)
``int8``     torchao         ``Int8Tensor``: symmetric int8 with one fp32 scale per row
``nf4``      bitsandbytes    ``Params4bit``, NF4 with nested (double-quantized) statistics
``int8``     bitsandbytes    ``Int8Params``: LLM.int8()'s row-wise int8 weight, used weight-only
===========  ==============  ==================================================================
"""

from __future__ import annotations

import importlib
from copy import deepcopy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.errors import ConfigError

SCHEMES = ("nf4", "int8")
BACKENDS = ("torchao", "bitsandbytes")
#: Block sizes bitsandbytes' 4-bit kernels accept.
_BNB_BLOCKS = (64, 128, 256, 512, 1024, 2048, 4096)


def _require(module: str, backend: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        hint = ("pip install torchao (or deltatune[quant])" if backend == "torchao"
                else "pip install bitsandbytes, or use backend='torchao'")
        raise ConfigError(f"the {backend} backend is not installed ({exc}); {hint}") from exc


def _inner_tensors(storage: Tensor) -> list[Tensor]:
    """The plain tensors a traceable tensor subclass (torchao) is made of."""
    names, _ = storage.__tensor_flatten__()
    return [getattr(storage, n) for n in names]


@dataclass(frozen=True)
class Scheme:
    """How a frozen weight is stored: subclasses per (scheme, backend).

    Args:
        block_size: weights per quantization block (NF4).
        scaler_block_size: block scales per second-level scale (NF4 double quantization).
    """

    name: ClassVar[str] = ""
    backend: ClassVar[str] = ""

    block_size: int = 64
    scaler_block_size: int = 256

    def check(self, shape: torch.Size, path: str) -> None:
        """Raise ``ConfigError`` if a weight of ``shape`` cannot be stored this way."""

    def quantize(self, weight: Tensor) -> nn.Parameter:
        """The storage of a dense ``(out, in)`` ``weight`` (frozen), on its device."""
        raise NotImplementedError

    def dequantize(self, storage: Tensor, dtype: torch.dtype) -> Tensor:
        """The ``(out, in)`` weight the storage holds, as a new dense tensor of ``dtype``."""
        raise NotImplementedError

    def matmul(self, x: Tensor, storage: Tensor) -> Tensor:
        """``x Wᵀ`` in ``x``'s dtype (called without autograd)."""
        return F.linear(x, self.dequantize(storage, x.dtype))

    def storage_bytes(self, storage: Tensor) -> int:
        """Bytes the storage occupies (codes and every scale)."""
        return sum(t.numel() * t.element_size() for t in _inner_tensors(storage))

    def clone(self, storage: Tensor) -> nn.Parameter:
        """An exact copy of the storage (no re-quantization)."""
        names, meta = storage.__tensor_flatten__()
        inner = {n: getattr(storage, n).clone() for n in names}
        copy = type(storage).__tensor_unflatten__(inner, meta, storage.size(), storage.stride())
        return nn.Parameter(copy, requires_grad=False)

    def move(self, storage: Tensor, device: torch.device) -> nn.Parameter:
        """The storage on ``device``, still quantized."""
        return nn.Parameter(storage.to(device), requires_grad=False)

    def describe(self) -> str:
        return f"{self.name} ({self.backend})"


# ------------------------------------------------------------------------------- torchao
def _torchao_nf4() -> Any:
    _require("torchao", "torchao")
    try:
        from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor as module
    except ImportError:  # torchao < 0.15 kept it under dtypes
        from torchao.dtypes import nf4tensor as module
    return module


@dataclass(frozen=True)
class TorchaoNF4(Scheme):
    """NF4 with double-quantized scales (torchao's ``NF4Tensor``, as in torchtune's QLoRA).

    torchao needs the weight's element count divisible by ``block_size``; the number of blocks
    must be divisible by the second-level group, so where ``scaler_block_size`` does not divide
    it the largest divisor below it is used (recorded in the storage's ``scaler_block_size``).
    """

    name = "nf4"
    backend = "torchao"

    def check(self, shape: torch.Size, path: str) -> None:
        numel = shape.numel()
        if numel % self.block_size:
            fits = [b for b in (256, 128, 64, 32, 16) if numel % b == 0]
            raise ConfigError(
                f"{path}: its {tuple(shape)} weight ({numel} values) does not split into NF4 "
                f"blocks of block_size={self.block_size}; "
                + (f"use block_size={fits[0]}" if fits else "no usual block size divides it")
                + ", or leave the layer out with exclude=[...]")

    def scaler_group(self, numel: int) -> int:
        """The second-level group size used for a weight of ``numel`` values."""
        blocks = numel // self.block_size
        return max(d for d in range(1, min(self.scaler_block_size, blocks) + 1)
                   if blocks % d == 0)

    def quantize(self, weight: Tensor) -> nn.Parameter:
        nf4 = _torchao_nf4()
        group = self.scaler_group(weight.numel())
        return nn.Parameter(nf4.to_nf4(weight.detach().contiguous(), self.block_size, group),
                            requires_grad=False)

    def dequantize(self, storage: Tensor, dtype: torch.dtype) -> Tensor:
        return storage.get_original_weight().to(dtype)


@dataclass(frozen=True)
class TorchaoInt8(Scheme):
    """Weight-only int8 (torchao's ``Int8WeightOnlyConfig``): one scale per output row."""

    name = "int8"
    backend = "torchao"

    def quantize(self, weight: Tensor) -> nn.Parameter:
        ao = _require("torchao.quantization", "torchao")
        holder = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        holder.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=False)
        ao.quantize_(holder, ao.Int8WeightOnlyConfig())
        return nn.Parameter(holder.weight, requires_grad=False)

    def dequantize(self, storage: Tensor, dtype: torch.dtype) -> Tensor:
        return storage.dequantize(dtype)

    def matmul(self, x: Tensor, storage: Tensor) -> Tensor:
        return F.linear(x, storage)  # torchao's kernel: x · int8ᵀ, then the row scales


# --------------------------------------------------------------------------- bitsandbytes
@dataclass(frozen=True)
class BnbNF4(Scheme):
    """NF4 through bitsandbytes (``compress_statistics=True``: double quantization; its
    second-level group is fixed at 256 by bitsandbytes)."""

    name = "nf4"
    backend = "bitsandbytes"

    def __post_init__(self) -> None:
        if self.block_size not in _BNB_BLOCKS:
            raise ConfigError(f"bitsandbytes NF4 takes block_size in {_BNB_BLOCKS}, got "
                              f"{self.block_size}")
        if self.scaler_block_size != 256:
            raise ConfigError("bitsandbytes fixes the double-quantization group at 256; leave "
                              "scaler_block_size at its default (or use backend='torchao')")

    def quantize(self, weight: Tensor) -> nn.Parameter:
        bnb = _require("bitsandbytes", "bitsandbytes")
        codes, state = bnb.functional.quantize_4bit(
            weight.detach().contiguous(), blocksize=self.block_size, compress_statistics=True,
            quant_type="nf4")
        return bnb.nn.Params4bit(codes, requires_grad=False, quant_state=state,
                                 blocksize=self.block_size, compress_statistics=True,
                                 quant_type="nf4", bnb_quantized=True)

    def dequantize(self, storage: Tensor, dtype: torch.dtype) -> Tensor:
        bnb = _require("bitsandbytes", "bitsandbytes")
        return bnb.functional.dequantize_4bit(storage.data, storage.quant_state).to(dtype)

    def matmul(self, x: Tensor, storage: Tensor) -> Tensor:
        bnb = _require("bitsandbytes", "bitsandbytes")
        return bnb.matmul_4bit(x, storage.t(), quant_state=storage.quant_state)

    def storage_bytes(self, storage: Tensor) -> int:
        state = storage.quant_state.as_dict(packed=True)
        return storage.data.nbytes + sum(v.nbytes for v in state.values()
                                         if isinstance(v, Tensor))

    def clone(self, storage: Tensor) -> nn.Parameter:
        return self.move(storage, storage.device, copy=True)

    def move(self, storage: Tensor, device: torch.device, *, copy: bool = False) -> nn.Parameter:
        bnb = _require("bitsandbytes", "bitsandbytes")
        state = deepcopy(storage.quant_state)
        state.to(device)
        data = storage.data.to(device)
        return bnb.nn.Params4bit(data.clone() if copy else data, requires_grad=False,
                                 quant_state=state, blocksize=storage.blocksize,
                                 compress_statistics=True, quant_type="nf4",
                                 bnb_quantized=True)


@dataclass(frozen=True)
class BnbInt8(Scheme):
    """LLM.int8()'s weight storage through bitsandbytes: row-wise absmax int8 (``CB``, ``SCB``).
    Run weight-only (the weight dequantized into the activations' dtype), not as LLM.int8()'s
    int8 × int8 matmul, which would also round the activations (through fp16)."""

    name = "int8"
    backend = "bitsandbytes"

    def quantize(self, weight: Tensor) -> nn.Parameter:
        bnb = _require("bitsandbytes", "bitsandbytes")
        codes, scales, _ = bnb.functional.int8_vectorwise_quant(
            weight.detach().contiguous().to(torch.float16))
        return self._param(codes, scales)

    @staticmethod
    def _param(codes: Tensor, scales: Tensor) -> nn.Parameter:
        bnb = _require("bitsandbytes", "bitsandbytes")
        return bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False,
                                 CB=codes, SCB=scales)

    def dequantize(self, storage: Tensor, dtype: torch.dtype) -> Tensor:
        return (storage.data.float() * (storage.SCB.float() / 127)[:, None]).to(dtype)

    def storage_bytes(self, storage: Tensor) -> int:
        return storage.data.nbytes + storage.SCB.nbytes

    def clone(self, storage: Tensor) -> nn.Parameter:
        return self._param(storage.data.clone(), storage.SCB.clone())

    def move(self, storage: Tensor, device: torch.device) -> nn.Parameter:
        return self._param(storage.data.to(device), storage.SCB.to(device))


_CLASSES: dict[tuple[str, str], type[Scheme]] = {
    ("nf4", "torchao"): TorchaoNF4, ("int8", "torchao"): TorchaoInt8,
    ("nf4", "bitsandbytes"): BnbNF4, ("int8", "bitsandbytes"): BnbInt8,
}


def make_scheme(scheme: str, backend: str = "torchao", *, block_size: int = 64,
                scaler_block_size: int = 256) -> Scheme:
    """The ``Scheme`` for ``scheme`` on ``backend``.

    Raises:
        ConfigError: an unknown scheme or backend, bad block sizes, or the backend is not
            installed.
    """
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown quantization scheme {scheme!r}; choose one of {SCHEMES}")
    if backend not in BACKENDS:
        raise ConfigError(f"unknown quantization backend {backend!r}; choose one of {BACKENDS}")
    for field, value in (("block_size", block_size), ("scaler_block_size", scaler_block_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{field} must be a positive integer, got {value!r}")
    if block_size % 2:
        raise ConfigError(f"block_size must be even (two 4-bit codes per byte), got {block_size}")
    _require("torchao" if backend == "torchao" else "bitsandbytes", backend)
    return _CLASSES[scheme, backend](block_size=block_size, scaler_block_size=scaler_block_size)


__all__ = ["BACKENDS", "SCHEMES", "Scheme", "make_scheme"]
