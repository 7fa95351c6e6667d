"""Frozen quantized base layers (QLoRA and kin): NF4 and int8 through torchao (bitsandbytes as
an optional second backend), with deltas trained on top.

    from deltatune import quant

    model = quant.quantize(model, "nf4")            # every Linear but the head, in place
    model = dt.inject(model, dt.LoraConfig(rank=16))  # QLoRA: LoRA on the frozen NF4 base
    ...                                              # train, dt.save / dt.load as usual
    merged = dt.unload(model, merge=True, dequantize=True)  # exact, full-precision merge

Merging into the quantized weights themselves re-quantizes ``W + ΔW``, which rounds the delta
away in part; ``dt.merge`` / ``dt.unload(merge=True)`` do it only with ``allow_lossy=True``.
The backends are imported on first use (``pip install torchao``; bitsandbytes optional).
"""

from .convert import dequantize, load_quantized, quantize, quantized_layers
from .linear import QuantizedLinear
from .schemes import BACKENDS, SCHEMES, Scheme, make_scheme

__all__ = ["BACKENDS", "SCHEMES", "QuantizedLinear", "Scheme", "dequantize", "load_quantized",
           "make_scheme", "quantize", "quantized_layers"]
