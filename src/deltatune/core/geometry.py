"""The geometry of a base layer seen as a matrix ``(out_dim, in_dim)``.

Every weight-shaped method (LoRA and its variants, DoRA, VeRA, sparse deltas …) needs the same
three things from a layer, whatever its type: its weight as a matrix, a way to push an input
through a ``(k, in_dim)`` matrix with the layer's own geometry (a linear map, a convolution with
the layer's kernel/stride/padding, an embedding lookup), and a pointwise ``(out_dim, k)`` channel
map added to the output. ``LayerInfo`` provides them for

* ``linear``: ``nn.Linear`` and Hugging Face's ``Conv1D`` (weight stored transposed),
* ``conv``: ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` (``groups=1``),
* ``embedding``: ``nn.Embedding`` (one-hot input: ``in_dim`` is the vocabulary size),
* ``norm``: LayerNorm / RMSNorm (torch's and Hugging Face's ``*RMSNorm``, ``T5LayerNorm`` …),
  GroupNorm and BatchNorm with a per-channel affine ``weight`` (``in_dim == out_dim`` channels).

A target found through a block-level canonical name (``attn``, ``ffn``) also carries a *tap*:
the module whose input is the block's input, which parallel-form deltas read instead of the
layer's own input.

A base layer may store its weight quantized (``deltatune.quant``: NF4, int8): it then implements
``QuantizedWeight``. Whatever reads a base weight as numbers (merging, DoRA's row norm, task
vectors) goes through ``dense_weight`` / ``read_param``, which dequantize; writing one back
(``requantize_weight``) is lossy, so ``lifecycle`` only does it when asked (``allow_lossy``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import TargetError

_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): a linear layer whose weight is stored ``(in, out)``."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


@dataclass(frozen=True)
class LayerInfo:
    """Shape and geometry of one adaptable base layer."""

    kind: str  # "linear" | "conv" | "embedding" | "norm"
    in_dim: int  # fan-in of the matrix form
    out_dim: int  # output features / channels / embedding size
    transposed: bool = False  # weight stored (in, out) — HF Conv1D
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    padding_mode: str = "zeros"
    pad_for_mode: tuple[int, ...] = ()  # explicit F.pad amounts when padding_mode != "zeros"
    padding_idx: int | None = None
    type_name: str = ""
    channels_first: bool = False  # norm over dim 1 (BatchNorm, GroupNorm)
    tap: str | None = None  # logical path of the module whose input is the block's input
    #: "own": the layer has a bias tensor; "creatable": it has none but its forward would use
    #: one if set (``creatable``); "none": neither (RMSNorm, T5LayerNorm, embeddings).
    bias: str = "none"

    # ----------------------------------------------------------------------- weight forms
    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the base layer's native weight."""
        if self.kind == "linear":
            return (self.in_dim, self.out_dim) if self.transposed else (self.out_dim, self.in_dim)
        if self.kind == "embedding":
            return (self.in_dim, self.out_dim)
        if self.kind == "norm":
            return (self.out_dim,)
        in_ch = self.in_dim // math.prod(self.kernel_size)
        return (self.out_dim, in_ch, *self.kernel_size)

    def weight_matrix(self, weight: Tensor) -> Tensor:
        """The native weight as an ``(out_dim, in_dim)`` matrix (a view where possible)."""
        if self.kind == "linear":
            return weight.t() if self.transposed else weight
        if self.kind == "embedding":
            return weight.t()
        return weight.reshape(self.out_dim, self.in_dim)

    def weight_from_matrix(self, matrix: Tensor) -> Tensor:
        """An ``(out_dim, in_dim)`` matrix in the base layer's native weight layout."""
        if self.kind == "linear":
            return matrix.t() if self.transposed else matrix
        if self.kind == "embedding":
            return matrix.t()
        return matrix.reshape(self.weight_shape)

    def channel_shape(self, ndim: int) -> tuple[int, ...]:
        """Shape that broadcasts a per-output-channel vector against an output of ``ndim`` dims."""
        if self.kind == "conv":  # (N, C, *spatial) or unbatched (C, *spatial)
            return (self.out_dim,) + (1,) * len(self.kernel_size)
        if self.channels_first and ndim > 1:  # BatchNorm / GroupNorm: (N, C, *spatial)
            return (self.out_dim,) + (1,) * (ndim - 2)
        return (self.out_dim,)

    # ----------------------------------------------------------------------- computation
    def apply_in(self, x: Tensor, matrix: Tensor) -> Tensor:
        """Push the layer input through a ``(k, in_dim)`` matrix with the layer's geometry.

        Returns ``(..., k)`` for linear/embedding inputs, ``(N, k, *spatial_out)`` for convs.
        """
        if self.kind == "linear":
            return F.linear(x, matrix)
        if self.kind == "embedding":
            return F.embedding(x, matrix.t(), padding_idx=self.padding_idx)
        kernel = matrix.reshape(matrix.shape[0], -1, *self.kernel_size)  # (k, in_ch, *kernel)
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self.pad_for_mode, mode=self.padding_mode)
            padding = 0
        return _CONV_FNS[len(self.kernel_size)](
            x, kernel, None, self.stride, padding, self.dilation
        )

    def apply_out(self, h: Tensor, matrix: Tensor) -> Tensor:
        """Apply an ``(out_dim, k)`` channel map to ``h`` from ``apply_in``."""
        if self.kind == "conv":
            # (N, k, *spatial) -> (N, out, *spatial): a 1x1 convolution
            dims = len(self.kernel_size)
            return _CONV_FNS[dims](h, matrix.reshape(*matrix.shape, *(1,) * dims))
        return F.linear(h, matrix)

    def add_out(self, y: Tensor, h: Tensor, matrix: Tensor, scale: float) -> Tensor:
        """``y + scale * apply_out(h, matrix)``, the add fused into the GEMM where possible."""
        if self.kind != "conv" and y.is_contiguous() and h.shape[:-1] == y.shape[:-1]:
            out = torch.addmm(
                y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), matrix.t(), alpha=scale
            )
            return out.view(y.shape)
        return torch.add(y, self.apply_out(h, matrix), alpha=scale)


def layer_info(module: nn.Module) -> LayerInfo | None:
    """Describe ``module`` if it is a layer type deltatune can adapt, else ``None``.

    Raises:
        TargetError: a convolution with ``groups > 1`` or a transposed convolution (these
            are recognised but not supported yet).
    """
    info = _shape_info(module)
    if info is None:
        return None
    if isinstance(getattr(module, "bias", None), Tensor):
        return dataclasses.replace(info, bias="own")
    return dataclasses.replace(info, bias="creatable" if creatable(module, "bias") else "none")


def _shape_info(module: nn.Module) -> LayerInfo | None:
    name = type(module).__name__
    if _is_norm(module):
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() != 1:
            return None  # no affine parameters, or a multi-dimensional normalized_shape
        first = isinstance(module, (nn.GroupNorm, nn.modules.batchnorm._NormBase))
        return LayerInfo("norm", weight.numel(), weight.numel(), channels_first=first,
                         type_name=name)
    if isinstance(module, nn.Linear):
        return LayerInfo("linear", module.in_features, module.out_features, type_name=name)
    if is_hf_conv1d(module):
        in_dim, out_dim = module.weight.shape
        return LayerInfo("linear", in_dim, out_dim, transposed=True, type_name=name)
    if isinstance(module, nn.Embedding):
        return LayerInfo("embedding", module.num_embeddings, module.embedding_dim,
                         padding_idx=module.padding_idx, type_name=name)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if module.groups != 1:
            raise TargetError(f"{name} with groups={module.groups} is not supported yet; "
                              "exclude it (exclude=[...]) or target other layers")
        return LayerInfo(
            "conv",
            module.in_channels * math.prod(module.kernel_size),
            module.out_channels,
            kernel_size=tuple(module.kernel_size),
            stride=tuple(module.stride),
            padding=module.padding if isinstance(module.padding, str) else tuple(module.padding),
            dilation=tuple(module.dilation),
            padding_mode=module.padding_mode,
            pad_for_mode=tuple(module._reversed_padding_repeated_twice),
            type_name=name,
        )
    return None


_NORM_SUFFIXES = ("LayerNorm", "RMSNorm", "GroupNorm", "BatchNorm1d", "BatchNorm2d",
                  "BatchNorm3d")


def _is_norm(module: nn.Module) -> bool:
    """Torch normalisation layers and Hugging Face's (``LlamaRMSNorm``, ``T5LayerNorm`` …)."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm,
                           nn.modules.batchnorm._NormBase)):
        return True
    return type(module).__name__.endswith(_NORM_SUFFIXES)


def creatable(module: nn.Module, key: str) -> bool:
    """Whether a missing ``key`` parameter (a bias) would be used by ``module``'s forward."""
    if key != "bias":
        return False
    return isinstance(module, (nn.Linear, nn.LayerNorm, nn.GroupNorm,
                               nn.Conv1d, nn.Conv2d, nn.Conv3d,
                               nn.modules.batchnorm._NormBase)) or is_hf_conv1d(module)


def base_params(module: nn.Module) -> dict[str, Tensor | None]:
    """The base layer's own ``weight`` and ``bias`` (``None`` where absent), as plain tensors
    (a quantized weight dequantized)."""
    return {"weight": read_param(module, "weight"), "bias": read_param(module, "bias")}


# ------------------------------------------------------------------------ quantized storage
@runtime_checkable
class QuantizedWeight(Protocol):
    """A base layer whose ``weight`` is stored quantized (``deltatune.quant.QuantizedLinear``).

    The stored tensor is not a plain matrix of numbers; the core reads it through
    ``dequantized_weight`` and writes it through ``requantize_weight`` (lossy: the new value is
    rounded to the quantization grid).
    """

    #: The quantization scheme, for messages (``"nf4"``, ``"int8"`` …).
    scheme: str
    #: The dtype the weight dequantizes to (the dtype the layer computes in).
    weight_dtype: torch.dtype
    #: Incremented whenever the stored weight changes (requantized, moved).
    weight_version: int

    def dequantized_weight(self) -> Tensor:
        """The weight in its native layout, dequantized to ``weight_dtype``."""
        ...

    def requantize_weight(self, weight: Tensor) -> None:
        """Quantize ``weight`` (native layout, any float dtype) and store it in place."""
        ...

    def dequantized(self) -> nn.Module:
        """A plain full-precision module computing what this one computes."""
        ...


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` stores its weight quantized (implements ``QuantizedWeight``)."""
    return callable(getattr(type(module), "requantize_weight", None))


def read_param(module: nn.Module, key: str) -> Tensor | None:
    """``module``'s parameter ``key`` as a plain tensor (``None`` if absent): a quantized
    weight is dequantized."""
    if key == "weight" and is_quantized(module):
        return module.dequantized_weight()
    value = getattr(module, key, None)
    return value if isinstance(value, Tensor) else None


def dense_weight(module: nn.Module) -> Tensor:
    """``module.weight`` as a plain tensor in its native layout (dequantized if quantized)."""
    return module.dequantized_weight() if is_quantized(module) else module.weight


def weight_dtype(module: nn.Module) -> torch.dtype:
    """The dtype ``module`` computes its weight in (a quantized weight's dequantized dtype)."""
    return module.weight_dtype if is_quantized(module) else module.weight.dtype


def weight_key(module: nn.Module) -> tuple:
    """A key that changes whenever ``module.weight``'s value does (for caches of quantities
    derived from it, e.g. DoRA's row norm)."""
    if is_quantized(module):
        return (id(module), module.weight_version)
    weight = module.weight
    return (weight.data_ptr(), weight._version)
