"""Side networks: a small ladder network beside the frozen backbone, never back-propagated
through it. LST (Sung et al. 2022, "Ladder Side-Tuning", arXiv:2206.06522) and QST (Zhang et
al. 2024, "Quantized Side Tuning", arXiv:2401.07159):

    s_0 = D_0(h_0)                                  h_k: the stream entering tapped block k
    s_k = f_k(μ_k s_{k-1} + (1 − μ_k) D_k(h_k))     μ_k = σ(α_k / T),  k = 1 … K  (h_K = y)
    LST:  y' = y + U LN(s_K)                        U = 0 at init
    QST:  y' = β ⊙ y + (1 − β) ⊙ U LN(s_K)          β ∈ ℝ^d, β = 1 at init

``y`` is the final hidden state as the head reads it: the output of the module the delta sits
on (``core.side`` finds it: ``model.norm`` on Llama, ``transformer.ln_f`` on GPT-2 …). The
``h_k`` are the inputs of the tapped blocks (``Delta.taps``), handed to ``on_tap``, detached, as
the backbone runs them; the ladder advances rung by rung, so the backbone keeps no activation for
backward and each ``h_k`` lives only as long as ``D_k``'s weight gradient needs it. ``D_k``: width
``d`` → ``d_s = d / reduction``; ``f_k(z) = z + W_2 σ(W_1 LN(z) + b_1) + b_2``, hidden width
``ffn_ratio · d_s``. Only ``y`` changes, so the model starts as the base.

QST (``QSTConfig``): low-rank downsamplers ``D_k(h) = LN(B σ(A h))`` (``"adapter"``, A: d → q,
B: q → d_s; ``"lowrank"`` without σ) or gradient-free ones (``"avgpool"`` / ``"maxpool"`` over
groups of ``reduction`` features: nothing kept for backward), gates from ``α_k = 0.5`` at
``T = 1``, and the output mix ``β``. Its 4-bit backbone is the user's: quantize the model first
(``deltatune.quant.quantize(model, "nf4")``), then inject.

Deviations: position-wise side blocks (the papers use reduced transformer blocks), so no
attention mask or key/value cache is needed and generation just works; random init (LST prunes
the backbone into its side network); LST feeds ``U s_K`` to the head (alone or gate-mixed with
``y``), here it is added to ``y``; the last rung reads ``y`` after the final norm. After a no-grad
forward the last side state (``d_s`` wide) is kept, so the output layer can be re-run with other
active side networks; with autograd on it is dropped once used. One forward at a time per model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.errors import ConfigError, StateError, TargetError
from ..core.geometry import LayerInfo
from ..core.registry import register
from ..core.side import FINAL_HIDDEN, ladder_taps, output_module
from ..core.targeting import Matcher

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu, "relu": F.relu, "silu": F.silu, "tanh": torch.tanh}
_DOWNSAMPLERS = ("adapter", "lowrank", "linear", "avgpool", "maxpool")


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


@dataclass(frozen=True, kw_only=True)
class LSTConfig(DeltaConfig):
    """Ladder side-tuning (targeting: leave ``targets`` unset, or name the final norm).

    Args:
        reduction: ``r``; the side network is ``d_s = d // r`` wide.
        ffn_ratio: hidden width of each side block, as a multiple of ``d_s``.
        activation: ``σ`` of the side blocks (and of QST's adapter downsamplers).
        gate_init: ``α_k`` at init (LST: 0, so ``μ_k = 1/2``).
        temperature: ``T`` in ``μ_k = σ(α_k / T)`` (LST: 0.1).
        ladder_layers: indices of the blocks that feed the ladder (negative from the end);
            ``None``: every block (LST drops some to save memory).
        taps: the tapped blocks' paths — filled in by ``inject`` from ``ladder_layers``.
    """

    reduction: int = 8
    ffn_ratio: float = 4.0
    activation: str = "gelu"
    gate_init: float = 0.0
    temperature: float = 0.1
    ladder_layers: Sequence[int] | None = None
    taps: Sequence[str] | None = None

    def validate(self) -> None:
        indices, paths = self.ladder_layers, self.taps
        for name, ok, what in [
            ("reduction", _positive_int(self.reduction), "a positive integer"),
            ("ffn_ratio", _number(self.ffn_ratio) and self.ffn_ratio > 0, "a positive number"),
            ("activation", self.activation in _ACTIVATIONS, f"one of {sorted(_ACTIVATIONS)}"),
            ("gate_init", _number(self.gate_init), "a finite number"),
            ("temperature", _number(self.temperature) and self.temperature > 0,
             "a positive number"),
            ("ladder_layers", indices is None or (indices and all(
                isinstance(i, int) and not isinstance(i, bool) for i in indices)),
             "a non-empty list of block indices"),
            ("taps", paths is None or (paths and all(isinstance(x, str) and x for x in paths)),
             "a non-empty list of module paths")]:
            if not ok:
                raise ConfigError(f"{name} must be {what}, got {getattr(self, name)!r}")
        if self.layers is not None:
            raise ConfigError("a side network sits after the blocks; choose the blocks that feed "
                              "its ladder with ladder_layers=[...], not layers=")

    def side_width(self, d: int) -> int:
        """``d_s`` on a model of width ``d``."""
        return max(1, d // self.reduction)

    def ffn_width(self, d: int) -> int:
        """Hidden width of a side block."""
        return max(1, round(self.ffn_ratio * self.side_width(d)))


@dataclass(frozen=True, kw_only=True)
class QSTConfig(LSTConfig):
    """Quantized side tuning: LST's ladder with QST's downsamplers, gates and output mix.

    Args:
        downsample: ``"adapter"`` (``LN(B σ(A h))``), ``"lowrank"`` (``LN(B A h)``),
            ``"linear"`` (LST's), or gradient-free ``"avgpool"`` / ``"maxpool"``.
        downsample_rank: ``q``, the rank of the low-rank downsamplers.
    """

    reduction: int = 16
    gate_init: float = 0.5
    temperature: float = 1.0
    downsample: str = "adapter"
    downsample_rank: int = 16

    def validate(self) -> None:
        super().validate()
        if self.downsample not in _DOWNSAMPLERS:
            raise ConfigError(f"downsample must be one of {_DOWNSAMPLERS}, got "
                              f"{self.downsample!r}")
        if not _positive_int(self.downsample_rank):
            raise ConfigError(f"downsample_rank must be a positive integer, got "
                              f"{self.downsample_rank!r}")


def _linear(layer: nn.Linear, x: Tensor) -> Tensor:
    """``layer(x)`` with the weights in ``x``'s dtype (math stays in the activation dtype)."""
    bias = None if layer.bias is None else Delta.cast(layer.bias, x)
    return F.linear(x, Delta.cast(layer.weight, x), bias)


def _norm(layer: nn.LayerNorm, x: Tensor) -> Tensor:
    return F.layer_norm(x, layer.normalized_shape, Delta.cast(layer.weight, x),
                        Delta.cast(layer.bias, x), layer.eps)


class _Down(nn.Module):
    """One downsampler ``D_k``: d → d_s (see the module docstring for the kinds)."""

    def __init__(self, kind: str, d: int, ds: int, rank: int, act: Callable) -> None:
        super().__init__()
        self.kind, self.ds, self.act = kind, ds, act
        if kind == "linear":
            self.proj = nn.Linear(d, ds)
        elif kind in ("adapter", "lowrank"):
            self.a = nn.Linear(d, rank, bias=False)
            self.b = nn.Linear(rank, ds, bias=False)
            self.norm = nn.LayerNorm(ds)

    def forward(self, h: Tensor) -> Tensor:
        if self.kind == "linear":
            return _linear(self.proj, h)
        if self.kind in ("avgpool", "maxpool"):
            groups = h.unflatten(-1, (self.ds, -1))  # (..., d_s, r)
            return groups.mean(-1) if self.kind == "avgpool" else groups.amax(-1)
        z = _linear(self.a, h)  # (..., q)
        return _norm(self.norm, _linear(self.b, self.act(z) if self.kind == "adapter" else z))

    @staticmethod
    def count(kind: str, d: int, ds: int, rank: int) -> int:
        return {"linear": d * ds + ds, "adapter": (d + ds) * rank + 2 * ds,
                "lowrank": (d + ds) * rank + 2 * ds}.get(kind, 0)


class _SideBlock(nn.Module):
    """``f(z) = z + W_2 σ(W_1 LN(z) + b_1) + b_2`` at width ``d_s``."""

    def __init__(self, ds: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(ds)
        self.fc1 = nn.Linear(ds, hidden)
        self.fc2 = nn.Linear(hidden, ds)

    def forward(self, z: Tensor, act: Callable) -> Tensor:
        return z + _linear(self.fc2, act(_linear(self.fc1, _norm(self.norm, z))))

    @staticmethod
    def count(ds: int, hidden: int) -> int:
        return 2 * ds + 2 * ds * hidden + hidden + ds


@register("lst", config=LSTConfig)
class LSTDelta(Delta):
    """The side network of one adapter, on the module that outputs the final hidden state."""

    default_targets = (FINAL_HIDDEN,)
    layer_kinds = frozenset({"norm"})
    reads_output = True  # the last rung reads y: summed side networks all read the base's
    exact_input_gradient = False  # the backbone is read detached: nothing flows back into it
    examples = ({}, {"reduction": 4, "ffn_ratio": 2.0, "activation": "relu",
                     "ladder_layers": [-1]},
                {"gate_init": 1.0, "temperature": 1.0, "activation": "silu"})

    def __init__(self, info: LayerInfo, config: LSTConfig, path: str) -> None:
        super().__init__(info, config, path)
        if config.taps is None:
            raise ConfigError(f"{path}: the config names no tapped blocks; inject() fills them "
                              "in (a saved adapter carries them)")
        d, ds = info.out_dim, config.side_width(info.out_dim)
        self.taps = tuple(config.taps)
        self._rung = {p: k for k, p in enumerate(self.taps)}
        rungs = len(self.taps) + 1  # the last one reads y
        self.act = _ACTIVATIONS[config.activation]
        self.down = nn.ModuleList(self.downsampler(d, ds) for _ in range(rungs))
        self.gates = nn.Parameter(torch.empty(rungs - 1))  # α_1 … α_K
        self.blocks = nn.ModuleList(_SideBlock(ds, config.ffn_width(d))
                                    for _ in range(rungs - 1))
        self.norm = nn.LayerNorm(ds)
        self.up = nn.Linear(ds, d)
        self._state: Tensor | None = None  # s_k after the last rung seen
        self._next = 0  # the next tap rung expected

    def downsampler(self, d: int, ds: int) -> nn.Module:
        """``D_k`` (LST: a linear map with bias)."""
        return _Down("linear", d, ds, 0, self.act)

    @torch.no_grad()
    def reset_parameters(self, base: nn.Module) -> None:
        for module in self.modules():
            if module is not self and isinstance(module, (nn.Linear, nn.LayerNorm)):
                module.reset_parameters()
        self.gates.fill_(self.config.gate_init)
        nn.init.zeros_(self.up.weight)  # U = 0: the model starts as the base
        nn.init.zeros_(self.up.bias)

    # ----------------------------------------------------------------------------- ladder
    def _step(self, k: int, s: Tensor, h: Tensor) -> Tensor:
        """Rung ``k ≥ 1``: ``f_k(μ_k s + (1 − μ_k) D_k(h))``."""
        mu = torch.sigmoid(self.cast(self.gates[k - 1], s) / self.config.temperature)
        return self.blocks[k - 1](torch.lerp(self.down[k](h), s, mu), self.act)

    def on_tap(self, path: str, x: Tensor) -> None:
        k = self._rung[path]
        if not isinstance(x, Tensor) or x.shape[-1] != self.info.out_dim:
            raise StateError(f"{self.path}: the input of {path!r} is not a hidden state of width "
                             f"{self.info.out_dim}; tap the model's blocks (ladder_layers)")
        x = x.detach()  # never back-propagate into the backbone
        if k == 0:
            self._state, self._next = self.down[0](x), 1
            return
        if k != self._next or self._state is None:
            raise StateError(f"{self.path}: the ladder expected the input of "
                             f"{self.taps[self._next]!r} next, got {path!r}; a side network "
                             "needs each tapped block run once, in order, per forward")
        self._state, self._next = self._step(k, self._state, x), k + 1

    def _final(self, y: Tensor) -> Tensor:
        """``LN(s_K)`` with the last rung read from ``y``."""
        s = self._state
        if s is None or self._next != len(self.taps) or s.shape[:-1] != y.shape[:-1]:
            raise StateError(f"{self.path}: the side network has not seen this call's blocks "
                             f"({list(self.taps)[:2]} …): run the whole model (per-sample "
                             "mixing of side networks is not supported)")
        s = self._step(len(self.taps), s, y.detach())
        if s.requires_grad:  # drop the graph once used; a no-grad state may be re-read
            self._state, self._next = None, 0
        return _norm(self.norm, s)

    def effect(self, x: Tensor, y: Tensor) -> Tensor:
        return _linear(self.up, self._final(y))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return y + self.effect(x, y)

    # ------------------------------------------------------------------------ placement
    @classmethod
    def complete(cls, model: nn.Module, config: LSTConfig) -> LSTConfig:
        matcher = Matcher(model)
        out = output_module(matcher, config.targets)
        taps = config.taps or ladder_taps(matcher, out, config.ladder_layers)
        missing = [p for p in taps if p not in matcher.modules]
        if missing:
            raise TargetError(f"taps {missing} name no module of {type(model).__name__}")
        return config.replace(targets=(out,), taps=tuple(taps))

    @classmethod
    def supports(cls, module: nn.Module, info: LayerInfo, config: LSTConfig) -> str | None:
        if info.channels_first:
            return "a side network's output is a hidden state with features on the last axis"
        if info.out_dim < config.reduction:
            return f"its width {info.out_dim} is below reduction={config.reduction}"
        return None

    @classmethod
    def num_trainable(cls, info: LayerInfo, config: LSTConfig) -> int:
        d, ds, rungs = info.out_dim, config.side_width(info.out_dim), len(config.taps) + 1
        ladder = (rungs - 1) * (1 + _SideBlock.count(ds, config.ffn_width(d)))
        return rungs * cls.down_count(d, ds, config) + ladder + 2 * ds + ds * d + d

    @classmethod
    def down_count(cls, d: int, ds: int, config: LSTConfig) -> int:
        """Trainable parameters of one downsampler."""
        return _Down.count("linear", d, ds, 0)

    def extra_repr(self) -> str:
        ds = self.config.side_width(self.info.out_dim)
        return (f"{self.method}: {self.path}, {len(self.taps) + 1} rungs, "
                f"{self.info.out_dim}->{ds}, taps {self.taps[0]} … {self.taps[-1]}")


@register("qst", config=QSTConfig)
class QSTDelta(LSTDelta):
    """LST's ladder with QST's downsamplers and the learned output mix ``β`` (starts at 1)."""

    examples = ({}, {"downsample": "avgpool", "reduction": 8},
                {"downsample": "maxpool", "reduction": 4, "activation": "relu"},
                {"downsample": "lowrank", "downsample_rank": 3, "ladder_layers": [0]},
                {"downsample": "linear"})

    def __init__(self, info: LayerInfo, config: QSTConfig, path: str) -> None:
        super().__init__(info, config, path)
        self.mix = nn.Parameter(torch.empty(info.out_dim))  # β

    def downsampler(self, d: int, ds: int) -> nn.Module:
        return _Down(self.config.downsample, d, ds, self.config.downsample_rank, self.act)

    @torch.no_grad()
    def reset_parameters(self, base: nn.Module) -> None:
        super().reset_parameters(base)
        self.up.reset_parameters()  # β = 1 makes the start the base; U starts random
        self.mix.fill_(1.0)

    def effect(self, x: Tensor, y: Tensor) -> Tensor:
        beta = self.cast(self.mix, y)
        return (1 - beta) * (_linear(self.up, self._final(y)) - y)

    @classmethod
    def supports(cls, module: nn.Module, info: LayerInfo, config: QSTConfig) -> str | None:
        if config.downsample in ("avgpool", "maxpool") and info.out_dim % config.reduction:
            return (f"pooling groups reduction={config.reduction} features, and the width "
                    f"{info.out_dim} is not a multiple of it")
        return super().supports(module, info, config)

    @classmethod
    def num_trainable(cls, info: LayerInfo, config: QSTConfig) -> int:
        return super().num_trainable(info, config) + info.out_dim

    @classmethod
    def down_count(cls, d: int, ds: int, config: QSTConfig) -> int:
        return _Down.count(config.downsample, d, ds, config.downsample_rank)


__all__ = ["LSTConfig", "LSTDelta", "QSTConfig", "QSTDelta"]
