"""DoRA — weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv:2402.09353).

    W' = m ⊙ (W + s B A) / ‖W + s B A‖_r          ‖·‖_r: the norm of each output row

LoRA's update gives the *direction*; a trained magnitude vector ``m`` (initialised to ``‖W‖_r``,
so DoRA starts as the base) rescales each output row. As in the paper (§4.3) and HF peft, the
norm is treated as a constant in the backward pass. Per call, with ``y = W x + b`` the base
output the layer already computed::

    y' = (m / n) ⊙ (y − b + s B A x) + b,        n = ‖W + s B A‖_r

so DoRA costs LoRA plus one scale — the base matmul is not run twice (peft runs it again). The
norm never materialises ``W + s B A``::

    n² = ‖W‖²_r + 2 s ⟨B, W Aᵀ⟩_r + s² ⟨B (A Aᵀ), B⟩_r

(``W Aᵀ`` is ``(out, r)``), and is cached while ``W``, ``A`` and ``B`` do not change (in
evaluation, once). Built on LoRA (``DoraConfig`` is a ``LoraConfig``): the low-rank path,
initialisations, dropout and saving are LoRA's; Linear and HF Conv1D layers.

Several DoRA deltas active on one layer each read the base output and their effects add, as in
peft. Merging writes ``W' `` and must start from the layer's own weights: a DoRA delta merges
first on its layer (``merges_first``), and unmerging restores ``W`` with the norm kept from the
merge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.delta import Params
from ..core.errors import ConfigError, MergeError
from ..core.geometry import LayerInfo, dense_weight, weight_key
from ..core.registry import register
from ..core.selection import Selection, each_delta, per_row, stack_rows
from .lora import LoraConfig, LoraDelta, lora_rows


@dataclass(frozen=True, kw_only=True)
class DoraConfig(LoraConfig):
    """DoRA hyper-parameters: LoRA's (see ``LoraConfig``); the magnitude ``m`` is added."""

    def validate(self) -> None:
        super().validate()
        if self.init == "pissa":
            raise ConfigError("DoRA decomposes the base weight itself; init='pissa' (which "
                              "subtracts a frozen copy from it) is not supported with DoRA")
        if self.bias:
            raise ConfigError("DoRA has no bias delta (its magnitude already rescales each "
                              "output); use bias=False")


@register("dora", config=DoraConfig)
class DoraDelta(LoraDelta):
    """``(m / ‖W + sBA‖_r) ⊙ (W x + s B A x) + b`` on one Linear / HF Conv1D layer."""

    layer_kinds = frozenset({"linear"})
    reads_output = True  # each DoRA rescales the base output; several add their effects
    merges_first = True
    examples = ({}, {"rank": 3, "alpha": 5, "rslora": True},
                {"init": "gaussian", "freeze_a": True, "seed": 3, "dropout": 0.1},
                {"rank": 2, "gate": True})
    swappable = LoraDelta.swappable  # hot swaps: LoRA's, the norm reading ``factor`` too
    swap_reads = (*LoraDelta.swap_reads, "_norm", "_row_norm")

    def __init__(self, info: LayerInfo, config: DoraConfig, path: str) -> None:
        super().__init__(info, config, path)
        self.magnitude = nn.Parameter(torch.ones(info.out_dim))  # m: (out,)
        self._norm_cache: tuple[tuple, Tensor] | None = None
        self._merged_norm: Tensor | None = None

    @classmethod
    def num_trainable(cls, info: LayerInfo, config: DoraConfig) -> int:
        return super().num_trainable(info, config) + info.out_dim

    @torch.no_grad()
    def reset_parameters(self, base: nn.Module) -> None:
        super().reset_parameters(base)
        weight = self.info.weight_matrix(dense_weight(base).detach()).float()  # (out, in)
        self.magnitude.copy_(weight.norm(dim=1))

    # --------------------------------------------------------------------------- compute
    def _row_norm(self, weight: Tensor) -> Tensor:
        """``‖W + s B A‖_r`` in fp32, without forming ``W + s B A`` (``weight``: native)."""
        a, b = (t.detach().float() for t in self.factors())
        w = self.info.weight_matrix(weight.detach()).float()  # (out, in)
        s = self.factor
        sq = w.pow(2).sum(1) + 2 * s * (b * (w @ a.t())).sum(1) + s * s * ((b @ (a @ a.t())) * b
                                                                            ).sum(1)
        return sq.clamp_min(0).sqrt()  # (out,)

    def _norm(self, base: nn.Module) -> Tensor:
        """The row norm, cached while the base weight and the factors are unchanged (a
        quantized base weight is dequantized only when the norm is recomputed)."""
        if torch.compiler.is_compiling():  # a compiled graph keeps no Python cache: recompute
            return self._row_norm(dense_weight(base))
        a, b = self.factors()
        key = (weight_key(base), a._version, b._version, a.data_ptr(), b.data_ptr(),
               torch.is_inference_mode_enabled())  # an inference tensor cannot enter autograd
        if self._norm_cache is None or self._norm_cache[0] != key:
            with torch.no_grad():
                self._norm_cache = (key, self._row_norm(dense_weight(base)))
        return self._norm_cache[1]

    def _base(self) -> nn.Module:
        base = self.__dict__.get("_base_layer")
        if base is None:
            raise MergeError(f"{self.path}: DoRA reads its base layer's weight; attach it with "
                             "deltatune.inject or deltatune.load")
        return base

    def effect(self, x: Tensor, y: Tensor) -> Tensor:
        """``(m/n − 1) ⊙ (y − b) + (m/n) ⊙ s B A x``: what DoRA adds to the base output."""
        base = self._base()
        scale = (self.magnitude.float() / self._norm(base)).to(y.dtype)  # (out,)
        shape = self.info.channel_shape(y.dim())
        bias = getattr(base, "bias", None)
        wx = y if bias is None else y - self.cast(bias, y).view(shape)
        b, h = self._down(x, y)
        low_rank = self.info.apply_out(h, b) * self.factor
        return (scale.view(shape) - 1) * wx + scale.view(shape) * low_rank

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """``(m/n) ⊙ (y − b + s B A x) + b``: the low-rank add fused into its GEMM, then one
        rescale, so backward keeps one output-sized tensor (for ``m``'s gradient), not two."""
        base = self._base()
        scale = (self.magnitude.float() / self._norm(base)).to(y.dtype)  # (out,)
        shape = self.info.channel_shape(y.dim())
        bias = getattr(base, "bias", None)
        wx = y if bias is None else y - self.cast(bias, y).view(shape)
        b, h = self._down(x, y)
        out = self.add_scaled(wx, h, b) * scale.view(shape)
        return out if bias is None else out + self.cast(bias, y).view(shape)

    # ------------------------------------------------------------------ per-sample batches
    batched_reads = (*LoraDelta.batched_reads, "_norm", "_row_norm", "_base")

    @classmethod
    def batched_forward(cls, sel: Selection, x: Tensor, y: Tensor) -> Tensor:
        return y + cls.batched_effect(sel, x, y)

    @classmethod
    def batched_effect(cls, sel: Selection, x: Tensor, y: Tensor) -> Tensor:
        """``(m/n)_i ⊙ (W x + s B_i A_i x) − W x`` per row: LoRA's gathered low-rank part plus a
        gathered per-channel scale (``1`` for rows without a DoRA delta here)."""
        stacks = cls.stacks(sel, x, y)
        if stacks is None:
            return each_delta(sel, "effect", x, y)
        chosen = sel.picked
        base = chosen[0]._base()

        def scales() -> Tensor:  # (1+n, out): m / ‖W + sBA‖_r
            return stack_rows([d.magnitude.float() / d._norm(base) for d in chosen],
                              1.0, y)

        table = sel.cached("dora", scales, like=y,
                           watch=lambda d: (d.magnitude, d.A, d.B, base.weight))
        index = sel.index(x)
        bias = getattr(base, "bias", None)
        wx = y if bias is None else y - cls.cast(bias, y)  # (N, …, out)
        a, b, _ = stacks
        direction = lora_rows(index, x, y, a, b, None, base=wx)  # W x + s B A x
        return per_row(table, index, y) * direction - wx

    def bind(self, base: nn.Module) -> None:
        """Keep a plain reference to the base layer (not a submodule: not saved, not moved)."""
        self.__dict__["_base_layer"] = base

    # ------------------------------------------------------------------------------ merge
    def merged_params(self, params: Params) -> Params:
        weight = params["weight"]
        norm = self._row_norm(weight)
        self._merged_norm = norm
        direction = self.info.weight_matrix(weight) + self.delta_matrix()  # (out, in)
        scale = self.magnitude.detach().float() / norm
        return {"weight": self.info.weight_from_matrix(scale[:, None] * direction)}

    def unmerged_params(self, params: Params) -> Params:
        if self._merged_norm is None:
            raise MergeError(f"{self.path}: this DoRA delta was not merged by this process; "
                             "reload the base weights instead")
        scale = self._merged_norm / self.magnitude.detach().float()
        weight = scale[:, None] * self.info.weight_matrix(params["weight"]) - self.delta_matrix()
        return {"weight": self.info.weight_from_matrix(weight)}

    def delta_matrix(self) -> Tensor:
        """``s B A`` in fp32, ``(out, in)``."""
        a, b = self.factors()
        return self.scale * (b.detach().float() @ a.detach().float())

    def state_tensors(self) -> dict[str, Tensor]:
        return {**super().state_tensors(), "magnitude": self.magnitude}

    def delta_params(self) -> Params:
        raise NotImplementedError("DoRA merges through merged_params (it is not additive)")


__all__ = ["DoraConfig", "DoraDelta"]
