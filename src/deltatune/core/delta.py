"""``Delta``: one named delta applied to one base layer — the unit every method implements.

In the unified view a delta modifies a hidden state of the frozen model. A delta has one of two
forms:

* ``"output"`` (sequential / parallel / scaling): it sees the layer's input ``x`` and output
  ``y`` and returns the modified output (``forward``); a delta at the input position also
  rewrites the input first (``pre``). A delta that sets ``reads_tap`` gets, as ``x``, the input
  of the sub-layer its target was found through (``attn`` / ``ffn``: parallel adapters).
* ``"weight"``: it changes the base layer's own parameters, ``θ + Δθ`` (``delta_params``), and
  the layer runs once with them. This is how selected-parameter methods (BitFit, LayerNorm
  tuning, sparse deltas) work on any module type without knowing its forward.
* ``"tokens"``: it adds positions to a sequence — soft tokens before the input embeddings
  (prompt tuning, ``tokens_at = "inputs"``) or keys and values before every attention's own
  (prefix tuning, ``tokens_at = "keys"``). Its layer is where it lives (and is saved); it acts
  once per model call, through ``prepare_call``, and ``core.sequence`` keeps the model's other
  inputs (attention mask, labels, positions) consistent with the longer sequence.

Mergeable deltas say how they fold into the base layer's parameters; the machinery that merges
(fp32 math, NaN checks, dtype casts, ordering, unmerge) is written once in ``lifecycle``.

Subclasses declare their capabilities as class attributes, which the core and the contract
test-suite read instead of special-casing methods by name.

Per-sample batches (``core.per_sample``): when the rows of one batch choose different deltas,
the core hands each method's deltas to its classmethods ``batched_forward`` /
``batched_effect`` / ``batched_pre`` together with a ``Selection`` saying which row takes which.
The defaults here run each delta on the rows that chose it (correct for every output-form
method); methods override them with one batched computation (gathered weights, batched
matmuls).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError
from .geometry import LayerInfo

if TYPE_CHECKING:
    from .config import DeltaConfig
    from .selection import Selection
    from .sequence import TokenCall

Params = dict[str, "Tensor | None"]


class Delta(nn.Module):
    """One named delta on one base layer.

    Args:
        info: geometry of the base layer.
        config: the method's config, with per-module overrides already applied.
        path: the base layer's module name in the model (stable across injection).
    """

    # Set by @register.
    method: ClassVar[str] = ""
    config_class: ClassVar[type[DeltaConfig]]

    #: Targets used when the config's ``targets`` is None.
    default_targets: ClassVar[Sequence[str] | str] = "all-linear"
    #: Layer kinds (see ``LayerInfo.kind``) this method can adapt.
    layer_kinds: ClassVar[frozenset[str]] = frozenset({"linear"})
    #: Whether the delta can be folded into the base parameters exactly.
    mergeable: ClassVar[bool] = False
    #: Whether a freshly injected delta leaves the model's output unchanged.
    identity_at_init: ClassVar[bool] = True
    #: How two deltas of this method on one layer combine: "add" (effects sum), "scale"
    #: (effects multiply) or "affine" (each maps the previous output: the later delta's
    #: ``forward`` applied to the earlier one's result, as stacked SSF maps compose).
    composition: ClassVar[str] = "add"
    #: Whether ``pre`` rewrites the layer input (input-position methods).
    transforms_input: ClassVar[bool] = False
    #: "output": ``forward(x, y)`` rewrites the layer output; "weight": ``delta_params()`` is
    #: added to the base parameters for the forward (weight deltas act on the base layer
    #: itself, before every output-form delta, as merged ones do).
    form: ClassVar[str] = "output"
    #: How ``config.gate`` applies: "output" (the core multiplies the delta's effect by a
    #: ``Gate`` of ``gate_input``), "own" (the method gates itself, e.g. prefix tuning) or ""
    #: (not gateable: weight-form and scaling methods, whose effect is not one added term).
    gating: ClassVar[str] = ""
    #: Whether the delta's effect depends on the layer's whole weight (DoRA's row norm, HUT's
    #: product): merging must start from the layer's own weights (nothing merged before it on
    #: the layer), and nothing may be merged into that weight while it is active unmerged.
    merges_first: ClassVar[bool] = False
    #: Whether the deltas of one adapter on layers that share their base weight (an input
    #: embedding tied to the output layer) share their parameters too: one ``ΔW`` for the one
    #: weight, trained by both uses, merged and saved once (``core.ties``).
    #: Weight-form methods that change the weight itself set it; a method acting per layer
    #: (LoRA's ``B A x``) keeps one delta per layer, as peft does.
    ties: ClassVar[bool] = False
    #: The ``core.schedule.Schedule`` subclass that changes this method's deltas during
    #: training (AdaLoRA's budget, DyLoRA's rank sampling …); ``None``: nothing to schedule.
    schedule_class: ClassVar[type | None] = None
    #: Tokens form: "inputs" (prepended to the input embeddings) or "keys" (to attention keys).
    tokens_at: ClassVar[str] = ""
    #: Whether ``forward`` reads the base output ``y`` beyond adding to it (sequential forms:
    #: ``y + f(y)``); such deltas see the same base output when several are summed.
    reads_output: ClassVar[bool] = False
    #: Whether the gradient this delta sends back to its layer's input (and so to every
    #: earlier layer) is the derivative of its forward. False only by design: side networks
    #: read the backbone detached, so nothing back-propagates into it.
    exact_input_gradient: ClassVar[bool] = True
    #: Whether ``with_base`` may compute the base layer and this delta in one fused step.
    fuses_base: ClassVar[bool] = False
    #: Statistics of the base layer that ``reset_parameters`` initialises from, gathered by one
    #: calibration pass over user data in ``inject(..., data=, loss_fn=)`` (``core.calibration``):
    #: ``"input_cov"`` (``E[x xᵀ]``, ``(in, in)``), ``"weight_grad"`` (the loss gradient w.r.t.
    #: the weight, ``(out, in)``), ``"weight_grad_sq"`` (squared batch gradients), ``"fisher"``
    #: (squared per-sample gradients); read through ``calibration_stats``. Such deltas save all
    #: they built from the data (``load`` never has any). The statistics a given config needs
    #: are ``calibration_for(config)`` (a subset; empty: that config takes no data).
    calibration: ClassVar[frozenset[str]] = frozenset()
    #: Config variants (keyword arguments) the contract test-suite runs, besides the defaults.
    examples: ClassVar[tuple[Mapping[str, object], ...]] = ({},)
    #: Relative error ‖a − b‖ / ‖b‖ allowed between merged and unmerged outputs (and for
    #: unmerge round trips), per dtype.
    tolerance: ClassVar[Mapping[torch.dtype, float]] = {
        torch.float32: 1e-5,
        torch.bfloat16: 2e-2,
        torch.float16: 4e-3,
    }

    def __init__(self, info: LayerInfo, config: DeltaConfig, path: str) -> None:
        super().__init__()
        self.info = info
        self.config = config
        self.path = path
        #: The whole config the delta was injected with (set by ``inject``; saved with it).
        self.adapter_config: DeltaConfig = config
        #: Whether ``forward`` receives the tapped sub-layer input as ``x`` (parallel forms).
        self.reads_tap = False
        #: Modules (logical paths) whose inputs ``on_tap`` receives as the model runs them,
        #: while the delta is live: a side network's ladder (``methods.side``).
        self.taps: tuple[str, ...] = ()
        #: Tokens form: how many positions this delta adds to the sequence.
        self.num_tokens = 0
        #: The core's gate when ``config.gate`` and ``gating == "output"`` (set by the core).
        self.gate: Gate | None = None

    # ------------------------------------------------------------------------- to implement
    def bind(self, base: nn.Module) -> None:
        """Called with the base layer whenever the delta is attached (inject and load); a
        method whose forward reads the base weights keeps a reference here (default: none)."""

    def on_tap(self, path: str, x: Tensor) -> None:
        """Receive the input of tapped module ``path`` (one of ``taps``), each time the model
        calls it while this delta is live; before this layer's own call in the same forward."""

    def reset_parameters(self, base: nn.Module) -> None:
        """Initialise parameters (may read the base layer's weights). Skipped on ``meta``."""

    @property
    def calibration_stats(self) -> Mapping[str, Tensor]:
        """This layer's statistics named in ``calibration`` (fp32, matrix form, on the layer's
        device), readable while ``reset_parameters`` runs inside ``inject(..., data=)``; they
        are freed right after.

        Raises:
            ConfigError: outside such an injection (no data was given).
        """
        from .calibration import stats_for

        return stats_for(self.path, self.method)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """The layer output with this delta applied, given the layer input and base output."""
        return y

    def effect(self, x: Tensor, y: Tensor) -> Tensor:
        """What this delta adds to output ``y`` (used when deltas are summed or weighted).

        The default is ``forward(x, y) - y``; additive methods return their term directly.
        """
        return self.forward(x, y) - y

    def pre(self, x: Tensor) -> Tensor:
        """The layer input with this delta applied (only if ``transforms_input``)."""
        return x

    def with_base(self, base: nn.Module, x: Tensor) -> Tensor | None:
        """``forward(x, base(x))`` computed in one fused step (``deltatune.kernels``), or
        ``None`` where no fused path applies to this call; the layer then runs the base and
        ``forward``. Called only for classes that set ``fuses_base``, when the delta is the
        only one active on its layer and the layer is called with ``x`` alone. A fused step
        saves ``x`` as ``forward`` does: inside ``core.recompute.lean_inputs(x)``."""
        return None

    def delta_params(self) -> Params:
        """Additive form ``{param_name: Δ}`` of a mergeable delta, in the native layout.

        The merge machinery converts the values to fp32; the default ``merged_params`` /
        ``unmerged_params`` add and subtract them. Methods whose merge is not additive override
        those two instead. For ``form = "weight"`` deltas this is also the forward: it is then
        computed with autograd in the delta's dtype and cast to the base parameter's dtype.
        """
        raise NotImplementedError(f"{type(self).__name__} is not mergeable")

    def merged_params(self, params: Params) -> Params:
        """New base parameter values after folding this delta into ``params`` (fp32 in/out).

        Only the returned keys change; a key whose base value is ``None`` (e.g. a missing
        bias) is created.
        """
        out: Params = {}
        for key, delta in self.delta_params().items():
            if delta is not None:
                delta = delta.float()
                out[key] = delta if params.get(key) is None else params[key] + delta
        return out

    def unmerged_params(self, params: Params) -> Params:
        """Inverse of ``merged_params``: the parameters before this delta was folded in."""
        return {key: params[key] - delta.float() for key, delta in self.delta_params().items()
                if delta is not None}

    @classmethod
    def complete(cls, model: nn.Module, config: DeltaConfig) -> DeltaConfig:
        """``config`` with fields that depend on the model filled in, before targeting (e.g.
        prefix tuning's key/value head geometry). Saved with the adapter, so a load builds the
        same shapes. The default returns ``config`` unchanged."""
        return config

    @classmethod
    def calibration_for(cls, config: DeltaConfig) -> frozenset[str]:
        """The statistics deltas made with ``config`` need from the calibration pass: a subset
        of ``calibration`` (default: all of it); empty when this config reads no data (e.g. a
        sparse delta that selects by weight magnitude)."""
        return cls.calibration

    @classmethod
    def allocate(cls, model: nn.Module, config: DeltaConfig, targets: Mapping[str, LayerInfo],
                 stats: Mapping[str, Mapping[str, Tensor]]) -> DeltaConfig:
        """``config`` with what depends on every target at once filled in, after targeting and
        the calibration pass (``stats``: ``{path: {statistic: tensor}}``, empty without one) and
        before any delta is built — e.g. how a model-wide budget splits into per-module sizes,
        written as per-module ``overrides``. Saved with the adapter, so a load rebuilds the same
        shapes without data. The default returns ``config`` unchanged."""
        return config

    @classmethod
    def prepare_call(cls, call: TokenCall, deltas: Sequence[Delta]) -> None:
        """Tokens form: act on one model call (``call``, see ``core.sequence``) with this
        method's active deltas, in module order (e.g. prepend prompts to the input embeddings,
        pre-fill the key/value cache with prefixes)."""
        raise NotImplementedError(f"{cls.__name__} has no tokens form")

    @classmethod
    def build_shared(cls, config: DeltaConfig,
                     targets: Mapping[str, LayerInfo]) -> nn.Module | None:
        """Parameters shared by all of one adapter's deltas (e.g. Compacter's slow weights).

        Built once per ``inject`` / ``load``, in fp32 on the model's device; its
        ``reset_parameters()`` (if any) initialises it, then it is cast like the deltas and set
        as every delta's ``shared`` submodule before their own ``reset_parameters``. Shared
        tensors are counted once and saved once (under the first module's path).
        """
        return None

    @classmethod
    def num_shared(cls, config: DeltaConfig, targets: Mapping[str, LayerInfo]) -> int:
        """The method's formula for the trainable parameters in ``build_shared``'s module."""
        return 0

    @classmethod
    def supports(cls, module: nn.Module, info: LayerInfo, config: DeltaConfig) -> str | None:
        """``None`` if this method can adapt ``module`` (of a supported kind), else why not.

        Targeting leaves such modules out of a broad selection and reports the reason when an
        explicit target has nothing else.
        """
        return None

    @classmethod
    def tolerance_for(cls, config: DeltaConfig) -> Mapping[torch.dtype, float]:
        """The declared tolerance for deltas made with ``config`` (default: ``tolerance``)."""
        return cls.tolerance

    @classmethod
    def num_trainable(cls, info: LayerInfo, config: DeltaConfig) -> int:
        """The method's own formula for its trainable parameter count on one layer."""
        raise NotImplementedError

    def gate_input(self, x: Tensor, y: Tensor) -> Tensor:
        """What the core gate reads: the layer input ``x`` (default; width ``gate_dim``)."""
        return x

    @classmethod
    def gate_dim(cls, info: LayerInfo, config: DeltaConfig) -> int | None:
        """Width of ``gate_input`` (default: a Linear layer's fan-in); ``None`` where the
        input has no feature axis last (convolutions, embedding ids), so no gate fits."""
        return info.in_dim if info.kind == "linear" else None

    @classmethod
    def accepts(cls, module: nn.Module, info: LayerInfo, config: DeltaConfig) -> str | None:
        """``supports`` plus the core's own conditions (a gate needs ``gate_dim``)."""
        if config.gate and cls.gating == "output" and cls.gate_dim(info, config) is None:
            return (f"a gate reads the layer input's last axis, and {info.kind} layers have "
                    "none to read; gate Linear layers only")
        return cls.supports(module, info, config)

    @classmethod
    def can_merge(cls, config: DeltaConfig) -> bool:
        """Whether deltas made with ``config`` fold into the weights (never when gated)."""
        return cls.mergeable and not config.gate

    @classmethod
    def trainable_count(cls, info: LayerInfo, config: DeltaConfig) -> int:
        """Trainable parameters on one layer: the method's formula plus the core's gate."""
        gate = cls.gate_dim(info, config) + 1 if config.gate and cls.gating == "output" else 0
        return cls.num_trainable(info, config) + gate

    @property
    def gated(self) -> bool:
        """Whether the core multiplies this delta's effect by its gate."""
        return self.gate is not None

    def saved_tensors(self) -> dict[str, Tensor]:
        """What ``save`` writes: ``state_tensors`` plus the core gate's (``gate.*``)."""
        out = self.state_tensors()
        if self.gate is not None:
            out.update({f"gate.{k}": v for k, v in self.gate.state_dict(keep_vars=True).items()})
        return out

    def load_saved(self, tensors: Mapping[str, Tensor]) -> None:
        """Inverse of ``saved_tensors``."""
        own = {k: v for k, v in tensors.items() if not k.startswith("gate.")}
        if self.gate is not None:
            with torch.no_grad():
                for key, value in self.gate.state_dict(keep_vars=True).items():
                    value.copy_(tensors[f"gate.{key}"])
        self.load_state_tensors(own)

    # ------------------------------------------------------------------ per-sample batches
    #: What a class's batched implementation computes by itself (besides its parameters): a
    #: subclass that overrides one of these without a batched implementation of its own gets
    #: the generic one, so it can never be computed with its parent's formula by mistake.
    batched_reads: ClassVar[tuple[str, ...]] = ("forward", "effect", "pre")

    @classmethod
    def batched_forward(cls, sel: Selection, x: Tensor, y: Tensor) -> Tensor:
        """``forward`` with a delta chosen per row: row ``i`` of the result is
        ``sel.deltas[k].forward(x[i], y[i])`` for ``k = sel.index(x)[i]``, and ``y[i]`` where
        ``k = 0`` (``sel.deltas[0]`` is ``None``: the row has no delta of this kind here).

        The default runs each delta on the rows that chose it (``index_select`` /
        ``index_copy``): correct for every output-form method, one small batch per delta.
        """
        from .selection import each_delta

        return each_delta(sel, "forward", x, y)

    @classmethod
    def batched_effect(cls, sel: Selection, x: Tensor, y: Tensor) -> Tensor:
        """``effect`` with a delta chosen per row (zero for rows with ``k = 0``); see
        ``batched_forward``."""
        from .selection import each_delta

        return each_delta(sel, "effect", x, y)

    @classmethod
    def batched_pre(cls, sel: Selection, x: Tensor) -> Tensor:
        """``pre`` with a delta chosen per row (``x[i]`` unchanged for rows with ``k = 0``);
        see ``batched_forward``. Only called for deltas that transform their input."""
        from .selection import each_delta

        return each_delta(sel, "pre", x, x)

    # ---------------------------------------------------------------------------- hot swap
    #: Config fields a hot swap (``core.hotswap``) may change: the swapped-in delta's config
    #: must equal this one's in every other field but the placement ones. ``"rank"`` here
    #: means that rank-sized tensors are padded with zeros (``pad_config``) without changing
    #: the output. The defaults: nothing may differ, so the tensors have the same shapes.
    swappable: ClassVar[frozenset[str]] = frozenset()
    #: The methods a class's hot-swap support (``swappable``, ``pad_config``,
    #: ``prepare_swap``, ``apply_config``) relies on: a subclass that overrides one of them
    #: without declaring ``swappable`` itself gets the default (equal configs only).
    swap_reads: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def pad_config(cls, config: DeltaConfig, rank: int) -> DeltaConfig:
        """A config for the same function at rank ``rank`` (its extra rows and columns zero),
        overrides included; only called on methods with ``"rank"`` in ``swappable``.

        Raises:
            ConfigError: the delta cannot be padded (say why, and what to do).
        """
        raise ConfigError(f"{cls.method!r} deltas have no rank to pad")

    def prepare_swap(self) -> None:
        """Move the numbers the forward reads from the config (scalings) into tensors, so that
        a swap changes tensor values, not Python constants a compiled graph depends on.
        Default: nothing (such methods read no config number in their forward)."""

    def apply_config(self, config: DeltaConfig) -> None:
        """Take ``config`` (differing from ``self.config`` in ``swappable`` fields only) after
        a hot swap: update what was derived from it, in place. Default: store it."""
        self.config = config

    # --------------------------------------------------------------------------- state
    def state_tensors(self) -> dict[str, Tensor]:
        """Tensors to save, by local name (default: parameters and persistent buffers)."""
        return dict(self.state_dict(keep_vars=True))

    def load_state_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        """Copy saved tensors in (the keys were already checked against ``state_tensors``)."""
        from .distributed import like

        own = self.state_tensors()
        with torch.no_grad():
            for key, value in tensors.items():
                own[key].copy_(like(value, own[key]))

    # --------------------------------------------------------------------------- helpers
    @staticmethod
    def cast(t: Tensor, like: Tensor) -> Tensor:
        """``t`` in ``like``'s dtype: adapter weights follow activations, never the reverse."""
        return t if t.dtype == like.dtype or not like.is_floating_point() else t.to(like.dtype)

    def extra_repr(self) -> str:
        return f"{self.method}: {self.path}"


class Gate(nn.Module):
    """``sigmoid(w·z + b)``: one learned scalar per position (UniPELT, Mao et al. 2022,
    arXiv:2110.07577), multiplying a delta's effect. ``w`` is Kaiming-uniform, ``b = 0``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, dim))  # (1, d)
        self.bias = nn.Parameter(torch.zeros(1))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        nn.init.zeros_(self.bias)

    def forward(self, z: Tensor) -> Tensor:
        w, b = Delta.cast(self.weight, z), Delta.cast(self.bias, z)
        return torch.sigmoid(F.linear(z, w, b))  # (..., 1)
