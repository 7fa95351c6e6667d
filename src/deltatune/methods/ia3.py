"""(IA)³ — learned vectors that rescale inner activations (Liu et al. 2022, arXiv:2205.05638).

    k ← l_k ⊙ k,   v ← l_v ⊙ v,   h_ff ← l_ff ⊙ h_ff  (h_ff: the FFN's intermediate activation)

Each targeted layer gets one vector ``l``, initialised to ones (identity). By default it rescales
the layer's *output* per channel, ``y ← l ⊙ W x + l ⊙ b``; on the modules ``feedforward`` names it
rescales the layer's *input* instead, ``y ← W (l ⊙ x) + b`` — on the FFN's down projection that is
the paper's ``l_ff ⊙ γ(W₁ x)``. Both fold exactly into the weights: ``W' = diag(l) W, b' = l ⊙ b``
(output) and ``W' = W diag(l)`` (input; per input channel across the kernel for convolutions).

Defaults: with ``targets=None`` the keys, values and FFN down projections (``attn.k``, ``attn.v``,
``ffn.down`` through the model's structure map) are adapted, and ``feedforward`` defaults to
``["ffn.down"]``; with explicit targets and no ``feedforward`` every vector scales an output.
Models that fuse q, k and v (GPT-2, GPT-NeoX) have no separate keys: target ``attn.qkv`` there
(which scales the queries too, as peft's default does). On encoder-decoder models (T5) add
``xattn.k`` / ``xattn.v`` to adapt cross-attention as the paper does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta, Params
from ..core.errors import MergeError
from ..core.geometry import LayerInfo
from ..core.registry import register
from ..core.selection import Selection, each_delta, per_row, stack_rows

DEFAULT_TARGETS = ("attn.k", "attn.v", "ffn.down")
DEFAULT_FEEDFORWARD = ("ffn.down",)
#: Unmerging divides by ``l``; below this magnitude the division would blow up the rounding
#: errors of the merged weights (and ``l = 0`` erased the channel for good).
MIN_UNMERGE_SCALE = 1e-6
#: A cross-family ``feedforward`` regex: the FFN down projections of Llama, GPT-2, BERT, T5 and
#: ViT, plus layers of the plain test models. It lets the contract suite run input scaling on
#: every architecture it builds.
_FFN_DOWN = r".*\.(down_proj|mlp\.c_proj|\d+\.output\.dense|wo|fc2|\d+\.2)|c1|out"


@dataclass(frozen=True, kw_only=True)
class IA3Config(DeltaConfig):
    """(IA)³ placement (targeting fields: see ``DeltaConfig``).

    Args:
        feedforward: the targeted modules whose *input* is rescaled (the FFN's down projection,
            where the input is the intermediate activation), in the syntax of ``targets`` (a
            list of names / canonical names, or a regex); ``True`` means every target. Each
            entry must match a targeted module. ``None``: ``["ffn.down"]`` when ``targets`` is
            ``None`` (the paper's placement; pass ``[]`` with ``exclude=["ffn.down"]``),
            otherwise none.
    """

    module_sets = ("feedforward",)

    feedforward: Sequence[str] | str | bool | None = None

    def __post_init__(self) -> None:
        if self.targets is None and self.feedforward is None:
            object.__setattr__(self, "feedforward", DEFAULT_FEEDFORWARD)
        super().__post_init__()


@register("ia3", config=IA3Config)
class IA3Delta(Delta):
    """``y ← l ⊙ y`` (output scaling) or ``x ← l ⊙ x`` (input scaling, ``feedforward``)."""

    default_targets = DEFAULT_TARGETS
    layer_kinds = frozenset({"linear", "conv"})
    mergeable = True
    composition = "scale"
    #: Class-wide: the method may rewrite inputs. Each delta narrows it to its own position,
    #: so that output-scaling layers keep the wrapper's fast path.
    transforms_input = True
    examples = ({}, {"feedforward": _FFN_DOWN})

    def __init__(self, info: LayerInfo, config: IA3Config, path: str) -> None:
        super().__init__(info, config, path)
        self.transforms_input = bool(config.feedforward)
        self.l = nn.Parameter(torch.ones(self.size(info, self.transforms_input)))

    @staticmethod
    def size(info: LayerInfo, feedforward: bool) -> int:
        """Length of ``l``: input channels (``feedforward``) or output channels."""
        if not feedforward:
            return info.out_dim
        return info.in_dim // math.prod(info.kernel_size) if info.kind == "conv" else info.in_dim

    @classmethod
    def num_trainable(cls, info: LayerInfo, config: IA3Config) -> int:
        return cls.size(info, bool(config.feedforward))

    @torch.no_grad()
    def reset_parameters(self, base: nn.Module) -> None:
        nn.init.ones_(self.l)

    # --------------------------------------------------------------------------- compute
    def _broadcast(self, like: Tensor) -> Tensor:
        """``l`` in ``like``'s dtype, shaped to scale its channel dimension."""
        vec = self.cast(self.l, like)
        if self.info.kind == "conv":  # (C, 1, …) for ([N,] C, *spatial), batched or not
            return vec.view(-1, *(1,) * len(self.info.kernel_size))
        return vec  # (…, C)

    def pre(self, x: Tensor) -> Tensor:
        return x * self._broadcast(x) if self.transforms_input else x

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return y if self.transforms_input else y * self._broadcast(y)

    # ------------------------------------------------------------------ per-sample batches
    @classmethod
    def batched_forward(cls, sel: Selection, x: Tensor, y: Tensor) -> Tensor:
        """``l_i ⊙ y`` per row, ``l_i`` gathered (ones for rows without output scaling)."""
        if all(d.transforms_input for d in sel.picked):
            return y  # input scaling only: done in batched_pre
        table = cls._table(sel, y, inputs=False)
        return each_delta(sel, "forward", x, y) if table is None else \
            y * per_row(table, sel.index(y), y)

    @classmethod
    def batched_effect(cls, sel: Selection, x: Tensor, y: Tensor) -> Tensor:
        return cls.batched_forward(sel, x, y) - y

    @classmethod
    def batched_pre(cls, sel: Selection, x: Tensor) -> Tensor:
        """``l_i ⊙ x`` per row for the input-scaling (``feedforward``) deltas."""
        table = cls._table(sel, x, inputs=True)
        return each_delta(sel, "pre", x, x) if table is None else \
            x * per_row(table, sel.index(x), x)

    @classmethod
    def _table(cls, sel: Selection, like: Tensor, *, inputs: bool) -> Tensor | None:
        """``(1+n, C)`` vectors of the deltas scaling this side (ones elsewhere); ``None`` on
        convolutions (channels first: the generic path)."""
        chosen = sel.picked
        if chosen[0].info.kind != "linear" or like.dim() < 2:
            return None
        vectors = [d.l if d.transforms_input == inputs else None for d in chosen]
        return sel.cached(f"ia3.{'in' if inputs else 'out'}",
                          lambda: stack_rows(vectors, 1.0, like), like=like,
                          watch=lambda d: (d.l,))

    # ----------------------------------------------------------------------------- merge
    def _fold(self, params: Params, vec: Tensor) -> Params:
        """``params`` with ``vec`` (fp32) multiplied into the scaled channels."""
        info = self.info
        matrix = info.weight_matrix(params["weight"])  # (out, in_dim)
        if self.transforms_input:
            if info.kind == "conv":  # one value per input channel, repeated over the kernel
                vec = vec.repeat_interleave(math.prod(info.kernel_size))
            return {"weight": info.weight_from_matrix(matrix * vec[None, :])}
        out: Params = {"weight": info.weight_from_matrix(matrix * vec[:, None])}
        if params.get("bias") is not None:
            out["bias"] = params["bias"] * vec
        return out

    def merged_params(self, params: Params) -> Params:
        return self._fold(params, self.l.detach().float())

    def unmerged_params(self, params: Params) -> Params:
        vec = self.l.detach().float()
        smallest = vec.abs().min().item()
        if not smallest >= MIN_UNMERGE_SCALE:  # also catches NaN
            raise MergeError(
                f"cannot unmerge the (IA)³ delta on {self.path}: its vector has entries with "
                f"|l| < {MIN_UNMERGE_SCALE:g} (smallest {smallest:.3g}), so dividing by it "
                "cannot restore the base weights. Reload the base model's weights instead, or "
                "keep the delta merged (deltatune.unload(model, merge=True))")
        return self._fold(params, vec.reciprocal())

    def extra_repr(self) -> str:
        where = "input" if self.transforms_input else "output"
        return f"{self.method}: {self.path} ({where} × {self.l.shape[0]})"
