"""``QuantizedLinear``: a frozen ``nn.Linear`` whose weight is stored quantized.

It is an ``nn.Linear`` (so targeting sees a Linear layer and model code that checks for one keeps
working) whose ``weight`` parameter is the scheme's storage (``schemes``): 4-bit or 8-bit codes
and their scales, never a dense copy. It implements the core's ``QuantizedWeight`` protocol
(``core.geometry``): merging and DoRA read ``dequantized_weight()``; merging writes through
``requantize_weight`` (lossy, so ``deltatune.merge`` asks for ``allow_lossy=True``);
``dequantized()`` gives the plain ``nn.Linear`` that ``deltatune.unload(..., dequantize=True)``
puts in its place.

Dtypes. ``weight_dtype`` is the dtype the weight dequantizes to (the model's dtype when it was
quantized, or ``compute_dtype``). The matmul runs in ``compute_dtype`` when one is set (inputs
are cast to it and the output back, as bitsandbytes does), otherwise in the activations' own
dtype. ``model.to(dtype)`` changes ``weight_dtype`` (and the bias), never the storage;
``model.to(device)`` moves the storage, still quantized.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.errors import MergeError
from .schemes import Scheme

_PLAIN = (Tensor, nn.Parameter)


class QuantizedLinear(nn.Linear):
    """``y = x Wᵀ + b`` with ``W`` stored by a quantization ``Scheme``; frozen.

    Args:
        storage: the quantized weight (``Scheme.quantize`` of an ``(out, in)`` matrix).
        bias: the bias (kept dense) or ``None``.
        quant: the scheme that made ``storage``.
        weight_dtype: the dtype ``storage`` dequantizes to.
        compute_dtype: the dtype the matmul runs in; ``None``: the activations' dtype.
    """

    def __init__(self, storage: nn.Parameter, bias: nn.Parameter | None, quant: Scheme, *,
                 in_features: int, out_features: int, weight_dtype: torch.dtype,
                 compute_dtype: torch.dtype | None = None) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a dense weight
        self.in_features = in_features
        self.out_features = out_features
        self.weight = storage
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = bias
        self.quant = quant
        self.scheme = quant.name
        self.weight_dtype = weight_dtype
        self.compute_dtype = compute_dtype
        self.weight_version = 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant: Scheme,
                    compute_dtype: torch.dtype | None = None) -> QuantizedLinear:
        """Quantize ``linear``'s weight (in ``compute_dtype`` if given, else its own dtype);
        the bias is kept, frozen."""
        weight = linear.weight.detach()
        dtype = compute_dtype or weight.dtype
        bias = linear.bias
        if bias is not None:
            bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        new = cls(quant.quantize(weight.to(dtype)), bias, quant,
                  in_features=linear.in_features, out_features=linear.out_features,
                  weight_dtype=dtype, compute_dtype=compute_dtype)
        return new.train(linear.training)

    # ------------------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        dtype = self.compute_dtype or x.dtype
        h = x.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        weight = self.weight
        if type(weight) in _PLAIN:  # a dense weight passed in (weight-form deltas' forward)
            y = F.linear(h, weight.to(dtype), bias)
        else:
            y = _FrozenMatmul.apply(h, weight, self.quant)
            if bias is not None:
                y = y + bias
        return y.to(x.dtype)

    # ----------------------------------------------------- core.geometry.QuantizedWeight
    def dequantized_weight(self) -> Tensor:
        """The ``(out, in)`` weight, dequantized to ``weight_dtype`` (a new tensor)."""
        return self.quant.dequantize(self.weight, self.weight_dtype)

    @torch.no_grad()
    def requantize_weight(self, weight: Tensor) -> None:
        """Store ``weight`` (``(out, in)``, any float dtype) quantized: lossy."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise MergeError(f"cannot store a {tuple(weight.shape)} weight in a quantized "
                             f"{(self.out_features, self.in_features)} layer")
        device = self.weight.device
        self.weight = self.quant.quantize(weight.to(device=device, dtype=self.weight_dtype))
        self.weight_version += 1

    def dequantized(self) -> nn.Linear:
        """A plain frozen ``nn.Linear`` with the dequantized weight (``weight_dtype``) and this
        layer's bias."""
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device="meta")
        dense.weight = nn.Parameter(self.dequantized_weight().detach(), requires_grad=False)
        if self.bias is not None:
            dense.bias = nn.Parameter(self.bias.detach().to(self.weight_dtype),
                                      requires_grad=self.bias.requires_grad)
        return dense.train(self.training)

    def storage_bytes(self) -> int:
        """Bytes of the quantized weight (codes and scales) plus the bias."""
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.quant.storage_bytes(self.weight) + bias

    # ----------------------------------------------------------------------- module plumbing
    def _apply(self, fn: Any, recurse: bool = True) -> QuantizedLinear:
        """``to`` / ``cuda`` / ``float`` …: the bias as usual; the storage only moves device
        (casting it would dequantize it), a new float dtype becomes ``weight_dtype``."""
        storage = self._parameters["weight"]
        self._parameters["weight"] = None  # skipped by Module._apply
        try:
            super()._apply(fn, recurse)
        finally:
            self._parameters["weight"] = storage
        probe = fn(torch.empty(0, dtype=self.weight_dtype, device=storage.device))
        if probe.device != storage.device:
            self._parameters["weight"] = self.quant.move(storage, probe.device)
            self.weight_version += 1
        if probe.dtype != self.weight_dtype and probe.dtype.is_floating_point:
            self.weight_dtype = probe.dtype
            self.weight_version += 1
        return self

    def __deepcopy__(self, memo: dict) -> QuantizedLinear:
        """Copies the storage exactly (torchao's NF4 ``clone`` re-quantizes with default
        block sizes)."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key == "_parameters":  # (no temporaries through the memo: their ids get reused)
                new.__dict__[key] = {
                    k: memo.setdefault(id(v), self.quant.clone(v)) if k == "weight"
                    else copy.deepcopy(v, memo) for k, v in value.items()}
            else:
                new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    def extra_repr(self) -> str:
        compute = f", compute_dtype={self.compute_dtype}" if self.compute_dtype else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, scheme={self.quant.describe()}, "
                f"weight_dtype={self.weight_dtype}{compute}")


class _FrozenMatmul(torch.autograd.Function):
    """``x Wᵀ`` with ``W`` stored quantized and frozen: backward dequantizes ``W`` again for the
    input's gradient rather than keeping a dense copy alive from the forward (what makes the
    frozen base cost its quantized size, not its dense size, while training)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, storage: Tensor, quant: Scheme) -> Tensor:
        ctx.storage, ctx.quant = storage, quant  # frozen: nothing to save for a version check
        return quant.matmul(x, storage)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return grad @ ctx.quant.dequantize(ctx.storage, grad.dtype), None, None  # (…, in)


__all__ = ["QuantizedLinear"]
