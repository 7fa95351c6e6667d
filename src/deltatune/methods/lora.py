"""LoRA — low-rank adaptation (Hu et al. 2021, arXiv:2106.09685).

    h = W x + (α / r) · B A x          (rsLoRA, Kalajdzievski 2023: α / √r)

``A`` is ``(r, in_dim)``, ``B`` is ``(out_dim, r)`` in the layer's matrix form (see
``core.geometry``), so one implementation covers Linear, HF Conv1D, Conv1d/2d/3d and Embedding.

Initialisations:

* ``"default"``: ``A`` Kaiming-uniform, ``B = 0`` (embeddings: ``A = 0``, ``B ~ N(0, 1)``, as in
  the reference implementation);
* ``"gaussian"``: ``A ~ N(0, 1/r)``, ``B = 0``;
* ``"pissa"`` (Meng et al. 2024, arXiv:2404.02948): ``B A`` starts as the top-``r`` singular
  components of ``W``; the frozen copy ``B₀ A₀`` is subtracted, so the base weights themselves
  are never rewritten: ``h = W x + s (B A − B₀ A₀) x`` equals PiSSA's ``W_res x + s B A x``.
  Saved, it is the plain rank-2r delta ``[B, −B₀] [A; A₀]``, which loads on the original base.
  The price, in bf16: the unmerged forward subtracts ``s B₀A₀ x`` from ``W x``, so its rounding
  error is relative to the whole ``W x`` rather than to the residual; the declared bf16 tolerance
  is twice plain LoRA's. Merging computes ``W + s (B A − B₀ A₀)`` in fp32 and is exact.

The frozen-copy path is generic: a variant whose ``B A`` starts nonzero says so with its
config's ``frozen_copy`` and returns its initial factors from ``initial_factors`` (the
data-driven inits LoRA-GA and CorDA, ``methods.data_lora``); it is saved as plain LoRA too.

``freeze_a=True`` is the asymmetric variant (Zhu et al. 2024, arXiv:2402.16842): ``A`` is a frozen
random projection regenerated from ``seed`` and the module path — never saved — and only ``B``
trains.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels
from ..core.config import DeltaConfig
from ..core.delta import Delta, Params
from ..core.distributed import gathered
from ..core.errors import AdapterFileError, ConfigError
from ..core.geometry import LayerInfo, dense_weight
from ..core.recompute import lean_inputs
from ..core.registry import register
from ..core.selection import Selection, each_delta, stack_rows
from ..kernels.lora import lora_linear

_INITS = ("default", "gaussian", "pissa")


@dataclass(frozen=True, kw_only=True)
class LoraConfig(DeltaConfig):
    """LoRA hyper-parameters (targeting fields: see ``DeltaConfig``).

    Args:
        rank: ``r``, the rank of ``B A``.
        alpha: ``α``; the update is scaled by ``α / r`` (``α / √r`` with ``rslora``).
            ``None`` means ``α = r`` (scale 1), also when ``rank`` is overridden per module.
        dropout: dropout probability on the input of the low-rank path.
        rslora: rank-stabilised scaling ``α / √r``.
        init: ``"default"``, ``"gaussian"`` or ``"pissa"``.
        pissa_iters: for ``"pissa"``, iterations of a fast randomised SVD instead of a full SVD.
        bias: also learn an additive bias delta (zero-initialised, merged into the base bias;
            on an embedding it shifts every row of the table).
        freeze_a: asymmetric LoRA: ``A`` frozen, random, regenerated from ``seed``.
        seed: seed of the frozen ``A`` (combined with each module's path).
    """

    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    rslora: bool = False
    init: str = "default"
    pissa_iters: int | None = None
    bias: bool = False
    freeze_a: bool = False
    seed: int = 0

    def validate(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ConfigError(f"rank must be a positive integer, got {self.rank!r}")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float))
                                           and math.isfinite(self.alpha)):
            raise ConfigError(f"alpha must be a finite number or None, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in _INITS:
            raise ConfigError(f"init must be one of {_INITS}, got {self.init!r}")
        if self.pissa_iters is not None and (self.init != "pissa" or self.pissa_iters < 0):
            raise ConfigError("pissa_iters is a non-negative iteration count for init='pissa'")
        if self.freeze_a and self.init == "pissa":
            raise ConfigError("freeze_a=True needs a random A; it cannot be combined with "
                              "init='pissa'")

    @property
    def scale(self) -> float:
        """The factor applied to ``B A``."""
        alpha = self.rank if self.alpha is None else self.alpha
        return alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def frozen_copy(self) -> bool:
        """Whether ``B A`` starts nonzero, with its frozen copy ``s B₀ A₀`` subtracted (PiSSA;
        variants built on LoRA whose ``initial_factors`` start elsewhere say so too)."""
        return self.init == "pissa"

    def for_saving(self) -> LoraConfig:
        """Deltas with a frozen copy are saved as plain rank-2r LoRA (a ``LoraConfig``, also
        for variants) with the same scale."""
        if not self.frozen_copy:
            return self
        plain = LoraConfig.field_names()
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(LoraConfig)}
        values.update(init="default", pissa_iters=None, **_doubled(self, None))
        if self.overrides is not None:
            values["overrides"] = {
                key: {**{k: v for k, v in per.items() if k in plain}, **_doubled(self, per)}
                for key, per in self.overrides.items()}
        return LoraConfig(**values)


def _doubled(config: LoraConfig, values: Mapping | None) -> dict:
    """Rank 2r with alpha adjusted so that the scale α/r (or α/√r) stays the same."""
    return _at_rank(config, values, None)


def _at_rank(config: LoraConfig, values: Mapping | None, rank: int | None) -> dict:
    """``rank`` (``None``: twice the rank) and the alpha that keeps the scale α/r (α/√r) of
    ``config`` with the override ``values`` applied; ``{}`` for an override that changes none
    of the three."""
    if values is not None and not {"rank", "alpha", "rslora"} & set(values):
        return {}
    merged = config.replace(overrides=None, **(values or {}))
    rank = 2 * merged.rank if rank is None else rank
    factor = math.sqrt(rank) if merged.rslora else rank
    return {"rank": rank, "alpha": merged.scale * factor}


@register("lora", config=LoraConfig)
class LoraDelta(Delta):
    """``y + (α/r) · B A x`` on one layer."""

    layer_kinds = frozenset({"linear", "conv", "embedding"})
    mergeable = True
    gating = "output"
    examples = ({}, {"rank": 3, "alpha": 5, "rslora": True, "bias": True},
                {"init": "pissa", "rank": 2}, {"init": "gaussian", "freeze_a": True, "seed": 3},
                {"dropout": 0.1}, {"rank": 2, "gate": True})
    #: Hot swaps (``core.hotswap``) may change the rank (zero-padded), the scale and dropout.
    swappable = frozenset({"rank", "alpha", "rslora", "dropout", "init"})
    swap_reads = ("__init__", "forward", "effect", "factors", "_down", "state_tensors",
                  "load_state_tensors", "delta_params")
    #: On CUDA, with ``deltatune.kernels`` on, ``with_base`` runs the layer in fused kernels.
    fuses_base = True

    def __init__(self, info: LayerInfo, config: LoraConfig, path: str) -> None:
        super().__init__(info, config, path)
        r = config.rank
        self.scale = config.scale
        self.dropout = config.dropout if info.kind != "embedding" else 0.0
        #: ``scale`` as a 0-d fp32 tensor once ``prepare_swap`` ran (the forward reads it).
        self.register_buffer("scaling", None, persistent=False)
        if config.freeze_a:
            self.register_buffer("A", self._seeded_a(), persistent=False)
        else:
            self.A = nn.Parameter(torch.empty(r, info.in_dim))  # (r, in)
        self.B = nn.Parameter(torch.empty(info.out_dim, r))  # (out, r)
        self.bias = nn.Parameter(torch.zeros(info.out_dim)) if config.bias else None
        copy = config.frozen_copy  # the initial B A, frozen and subtracted
        if copy and r > min(info.in_dim, info.out_dim):
            what = "init='pissa'" if config.init == "pissa" else repr(self.method)
            raise ConfigError(f"{what} needs rank <= min(in, out) = "
                              f"{min(info.in_dim, info.out_dim)} for {path} (rank {r}); lower "
                              "the rank there with overrides=, or exclude= the module")
        self.register_buffer("A0", torch.empty(r, info.in_dim) if copy else None,
                             persistent=False)
        self.register_buffer("B0", torch.empty(info.out_dim, r) if copy else None,
                             persistent=False)

    @classmethod
    def tolerance_for(cls, config: LoraConfig) -> Mapping[torch.dtype, float]:
        if not config.frozen_copy:
            return cls.tolerance
        return {**cls.tolerance, torch.bfloat16: 2 * cls.tolerance[torch.bfloat16]}

    @classmethod
    def num_trainable(cls, info: LayerInfo, config: LoraConfig) -> int:
        r = config.rank
        return r * info.out_dim + (0 if config.freeze_a else r * info.in_dim) \
            + (info.out_dim if config.bias else 0)

    # ------------------------------------------------------------------------------ init
    def _seeded_a(self) -> Tensor:
        """Kaiming-uniform ``A`` from a CPU generator seeded by ``seed`` and the module path."""
        shape, device = (self.config.rank, self.info.in_dim), torch.get_default_device()
        if device.type == "meta":
            return torch.empty(shape, device=device)
        seed = (self.config.seed * 1_000_003 + zlib.crc32(self.path.encode())) % 2**63
        bound = 1.0 / math.sqrt(self.info.in_dim)  # the bound of kaiming_uniform(a=√5)
        a = torch.empty(shape, device="cpu")
        a.uniform_(-bound, bound, generator=torch.Generator().manual_seed(seed))
        return a.to(device)

    @torch.no_grad()
    def reset_parameters(self, base: nn.Module) -> None:
        init, kind = self.config.init, self.info.kind
        if self.A0 is not None:  # a nonzero start, minus its frozen copy
            a, b = self.initial_factors(base)
            self.A.copy_(a)
            self.B.copy_(b)
            self.A0.copy_(self.A)
            self.B0.copy_(self.B)
            return
        if self.config.freeze_a or kind != "embedding":
            if isinstance(self.A, nn.Parameter):
                if init == "gaussian":
                    nn.init.normal_(self.A, std=1.0 / self.config.rank)
                else:
                    nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
            nn.init.zeros_(self.B)
        else:
            nn.init.zeros_(self.A)
            nn.init.normal_(self.B)

    def initial_factors(self, base: nn.Module) -> tuple[Tensor, Tensor]:
        """``(A, B)`` ``(r, in)``, ``(out, r)`` of a nonzero start (``config.frozen_copy``),
        whose ``s B A`` the frozen copy cancels at init. LoRA's: PiSSA's top-r part of ``W``."""
        w = self.info.weight_matrix(dense_weight(base).detach()).float()  # (out, in)
        r = self.config.rank
        if self.config.pissa_iters is None:
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            u, s, vh = u[:, :r], s[:r], vh[:r]
        else:  # randomised SVD, oversampled by 10 (Halko et al. 2011), then truncated
            q = min(r + 10, *w.shape)
            u, s, v = torch.svd_lowrank(w, q=q, niter=self.config.pissa_iters)
            u, s, vh = u[:, :r], s[:r], v[:, :r].t()
        root = (s / self.scale).sqrt()
        return root[:, None] * vh, u * root[None, :]  # A: (r, in), B: (out, r)

    # -------------------------------------------------------------------------- hot swap
    @classmethod
    def pad_config(cls, config: LoraConfig, rank: int) -> LoraConfig:
        """``config`` at rank ``rank`` with alpha set to keep every module's scale (overrides
        included): the same function once ``A`` and ``B`` are padded with zeros."""
        ranks = {config.rank, *(v["rank"] for v in (config.overrides or {}).values()
                                if "rank" in v)}
        if ranks == {rank}:
            return config
        if config.frozen_copy:
            raise ConfigError("a delta whose B A starts from a frozen copy (init='pissa', data "
                              "inits) cannot be padded; save it and load the saved (plain "
                              "LoRA) delta, then prepare that one")
        if config.freeze_a:
            raise ConfigError("the frozen A of freeze_a=True is regenerated from its seed at "
                              "its own rank, so it cannot be padded; prepare it at the rank "
                              "it has (max_rank=None)")
        overrides = None
        if config.overrides is not None:
            overrides = {key: {**per, **_at_rank(config, per, rank)}
                         for key, per in config.overrides.items()}
        return config.replace(overrides=overrides, **_at_rank(config, None, rank))

    def prepare_swap(self) -> None:
        self.scaling = torch.tensor(self.scale, dtype=torch.float32, device=self.B.device)

    def apply_config(self, config: LoraConfig) -> None:
        super().apply_config(config)
        self.scale = config.scale
        self.dropout = config.dropout if self.info.kind != "embedding" else 0.0
        scaling = self._buffers.get("scaling")  # (subclasses may build without one)
        if scaling is not None:
            with torch.no_grad():
                scaling.fill_(self.scale)

    @property
    def factor(self) -> Tensor | float:
        """The scale as the forward applies it: ``scale``, or the ``scaling`` tensor holding
        it after ``prepare_swap`` (a swap then changes a value, not a compiled constant)."""
        scaling = self._buffers.get("scaling")
        return self.scale if scaling is None else scaling

    def add_scaled(self, y: Tensor, h: Tensor, b: Tensor) -> Tensor:
        """``y + s · apply_out(h, b)``, fused into the GEMM (``s`` on ``h``, ``(…, r)``, when
        it is a tensor)."""
        scaling = self._buffers.get("scaling")
        if scaling is None:
            return self.info.add_out(y, h, b, self.scale)
        return self.info.add_out(y, h * scaling.to(h.dtype), b, 1.0)

    # --------------------------------------------------------------------------- compute
    def factors(self) -> tuple[Tensor, Tensor]:
        """``(A, B)`` of the whole update; rank 2r ``[A; A₀]``, ``[B, −B₀]`` with a frozen
        copy (PiSSA …)."""
        if self.A0 is None:
            return self.A, self.B
        a, b = gathered(self.A), gathered(self.B)  # FSDP2 shards outside a forward (saving)
        return torch.cat([a, self.A0]), torch.cat([b, -self.B0], dim=1)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        b, h = self._down(x, y)
        y = self.add_scaled(y, h, b)
        if self.bias is not None:
            y = y + self.cast(self.bias, y).view(self.info.channel_shape(y.dim()))
        return y

    def with_base(self, base: nn.Module, x: Tensor) -> Tensor | None:
        """``W x + b + s B A x`` in fused kernels (``kernels.lora``) where they run: a plain
        ``nn.Linear``, this class's own math (a subclass that changes it is not fused), no
        bias of the delta's, no dropout in this call, the scale a constant."""
        if (not kernels.runs_on(x) or type(base) is not nn.Linear or self.bias is not None
                or (self.training and self.dropout) or self._buffers.get("scaling") is not None
                or not _own_math(type(self))):
            return None
        a, b = self.factors()
        with lean_inputs(x):  # x saved as a recipe, as the unfused delta saves it
            return lora_linear(x, base.weight, base.bias, self.cast(a, x), self.cast(b, x),
                               self.scale)

    def effect(self, x: Tensor, y: Tensor) -> Tensor:
        b, h = self._down(x, y)
        e = self.info.apply_out(h, b) * self.factor
        if self.bias is not None:
            e = e + self.cast(self.bias, y).view(self.info.channel_shape(y.dim()))
        return e

    def _down(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``B`` in the activation dtype and ``h = A x`` (dropout on ``x`` in training)."""
        a, b = self.factors()
        if self.training and self.dropout:  # in eval, a compiled graph never reads dropout
            x = F.dropout(x, self.dropout, training=True)
        return self.cast(b, y), self.info.apply_in(x, self.cast(a, y))  # h: (..., r)

    # ------------------------------------------------------------------ per-sample batches
    batched_reads = ("forward", "effect", "pre", "factors", "_down")

    @classmethod
    def batched_forward(cls, sel: Selection, x: Tensor, y: Tensor) -> Tensor:
        """``y + s B A x`` with each row's own ``A``, ``B`` (gathered; batched matmuls)."""
        stacks = cls.stacks(sel, x, y)
        if stacks is None:
            return each_delta(sel, "forward", x, y)
        return lora_rows(sel.index(x), x, y, *stacks, base=y)

    @classmethod
    def batched_effect(cls, sel: Selection, x: Tensor, y: Tensor) -> Tensor:
        stacks = cls.stacks(sel, x, y)
        if stacks is None:
            return each_delta(sel, "effect", x, y)
        return lora_rows(sel.index(x), x, y, *stacks)

    @classmethod
    def stacks(cls, sel: Selection, x: Tensor, y: Tensor
               ) -> tuple[Tensor, Tensor, Tensor | None] | None:
        """``A`` ``(1+n, r, in)``, ``s·B`` ``(1+n, out, r)`` and the bias ``(1+n, out)`` (or
        ``None``) of the choices in ``y``'s dtype: ranks padded to the largest with zeros, the
        scale folded into ``B``, zeros for "no delta". Cached while the factors are unchanged.
        ``None`` where the generic path must run (conv / embedding layers, dropout in
        training)."""
        chosen = sel.picked
        if (chosen[0].info.kind != "linear" or x.dim() < 2 or x.shape[0] != y.shape[0]
                or any([d.dropout and d.training for d in chosen])):
            return None

        def build() -> tuple[Tensor, Tensor, Tensor | None]:
            pairs = [d.factors() for d in chosen]
            r = max(a.shape[0] for a, _ in pairs)
            a_all = y.new_zeros(1 + len(chosen), r, chosen[0].info.in_dim)
            b_all = y.new_zeros(1 + len(chosen), chosen[0].info.out_dim, r)
            for k, (d, (a, b)) in enumerate(zip(chosen, pairs, strict=True), 1):
                a_all[k, :a.shape[0]] = a.to(y.dtype)
                b_all[k, :, :b.shape[1]] = (b * d.scale).to(y.dtype)
            bias = None
            if any(d.bias is not None for d in chosen):
                bias = stack_rows([d.bias for d in chosen], 0.0, y)
            return a_all, b_all, bias

        return sel.cached("lora", build, like=y,
                          watch=lambda d: (d.A, d.B, d.bias, d.A0, d.B0))

    def delta_params(self) -> Params:
        a, b = self.factors()
        weight = self.info.weight_from_matrix(self.scale * (b.float() @ a.float()))
        bias = None if self.bias is None else self.bias.float()
        if bias is not None and self.info.kind == "embedding":  # a shift of every table row
            weight, bias = weight + bias, None
        return {"weight": weight, "bias": bias}

    # ----------------------------------------------------------------------------- state
    def state_tensors(self) -> dict[str, Tensor]:
        a, b = self.factors()
        out = {"B": b}
        if self.config.freeze_a:  # regenerated on load; a few values guard against drift
            out["A_check"] = self.A.reshape(-1)[:8]
        else:
            out["A"] = a
        if self.bias is not None:
            out["bias"] = self.bias
        return out

    def load_state_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        if "A_check" in tensors:
            mine = self.A.reshape(-1)[:8].float().cpu()
            if not torch.allclose(mine, tensors["A_check"].float().cpu(), atol=1e-6):
                raise AdapterFileError(
                    f"{self.path}: the frozen A regenerated from seed {self.config.seed} differs "
                    "from the one this delta was trained with (another torch version's random "
                    "generator?); it cannot be used")
        with torch.no_grad():
            for key, value in tensors.items():
                if key != "A_check":
                    getattr(self, key).copy_(value)


#: The methods whose math ``with_base`` fuses: a subclass overriding one is not fused.
_FUSED_MATH = ("forward", "factors", "_down", "add_scaled", "with_base")


@functools.cache
def _own_math(cls: type) -> bool:
    """Whether ``cls`` computes LoRA's own math (overrides none of ``_FUSED_MATH``)."""
    return all(getattr(cls, n) is getattr(LoraDelta, n) for n in _FUSED_MATH)


def lora_rows(index: Tensor, x: Tensor, y: Tensor, a: Tensor, b: Tensor, bias: Tensor | None,
              *, base: Tensor | None = None) -> Tensor:
    """``base + B_i A_i x_i (+ bias_i)`` per row ``i`` from stacks (see ``LoraDelta.stacks``),
    shaped like ``y``: ``(N, T, in) → (N, T, r) → (N, T, out)``, ``index`` ``(N,)``."""
    n = x.shape[0]
    h = torch.bmm(x.reshape(n, -1, x.shape[-1]), a.index_select(0, index).transpose(1, 2))
    b_rows = b.index_select(0, index).transpose(1, 2)  # (N, r, out)
    if base is None:
        out = torch.bmm(h, b_rows)  # (N, T, out)
    else:
        out = torch.baddbmm(base.reshape(n, -1, base.shape[-1]), h, b_rows)
    if bias is not None:
        out = out + bias.index_select(0, index).unsqueeze(1)
    return out.view(y.shape)
