"""GaLore: memory-efficient training by gradient low-rank projection (Zhao et al. 2024,
arXiv:2403.03507), as a wrapper around any ``torch.optim`` optimizer.

For a weight matrix ``W ∈ ℝ^{m×n}`` with gradient ``G_t`` the optimizer's state lives in a rank-r
subspace of the gradient, refreshed every ``T`` steps from its SVD (Algorithm 2 of the paper,
written for ``m ≤ n``; ``ρ`` is the inner optimizer's update rule, Adam in the paper):

    P_t = U[:, :r]   where  U S Vᵀ = SVD(G_t)     if t mod T = 0,   else  P_t = P_{t-1}
    R_t = P_tᵀ G_t                                 (r × n: the projected gradient)
    N_t = ρ_t(R_t)                                 (Adam: M_t, V_t of R_t, N_t = M̂_t / (√V̂_t + ε))
    W_t = W_{t-1} − η · α · P_t N_t                (α: ``scale``)

so Adam's two moments take ``2 r n`` numbers instead of ``2 m n``. For a tall matrix (``m > n``)
the right singular vectors are used instead: ``Q_t = Vᵀ[:r]``, ``R_t = G_t Q_tᵀ`` (m × r) and
``W_t = W_{t-1} − η α N_t Q_t``. ``proj_type="std"`` always reduces the smaller side, as the
paper's code does; ``"left"`` / ``"right"`` force one side. The SVD runs in fp32; ``P`` is kept
in the parameter's dtype.

The full-size gradient is still materialised by autograd (the paper's per-layer weight update,
which frees each gradient inside the backward pass, is not done here).

Design. ``GaLore(params, inner=torch.optim.AdamW, rank=…, **inner_kwargs)`` builds the inner
optimizer over *shadow* tensors: for every projected matrix one zero tensor of the projected
shape whose gradient, at each step, is ``R_t``. The inner optimizer steps the shadows — its state
(moments, momentum buffers …) is therefore rank-sized — and the shadow's new value, ``−η N_t``,
is projected back, scaled by ``α`` and added to the real parameter. Because a shadow is zero
before each step, the inner optimizer's own weight decay has nothing to act on there; GaLore
applies decoupled weight decay to the full matrix instead, ``W ← W (1 − η λ)`` before the update
(AdamW's order; λ is the group's ``weight_decay``). Everything that is not a matrix (biases,
norms, conv kernels), every matrix whose reduced side is not larger than ``rank`` (its full
state is no larger than the projected one would be) and every frozen matrix (no shadow is
allocated for a frozen base) goes to the inner optimizer unchanged.

The moments are kept across a projector refresh, as in the paper. The inner optimizer sees
zero-valued shadows, so rules that scale a step by the parameter's own norm (Adafactor's
relative step, LAMB / LARS trust ratios) do not fit; Adam, AdamW, SGD, RMSprop, Adagrad … do.
Param groups, ``state_dict`` / ``load_state_dict`` (bit-identical resume) and
``torch.optim.lr_scheduler`` work on the wrapper as on any optimizer: each group's
hyper-parameters are copied to the inner optimizer at every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

#: Keys of a param group that belong to GaLore (the rest go to the inner optimizer).
GALORE_KEYS = ("rank", "update_proj_gap", "scale", "proj_type")
PROJ_TYPES = ("std", "left", "right")


def _side(shape: torch.Size, proj_type: str) -> str:
    """Which side of an ``(m, n)`` matrix is reduced: "left" (``Pᵀ G``) or "right" (``G Qᵀ``)."""
    if proj_type == "std":
        return "right" if shape[0] >= shape[1] else "left"
    return proj_type


def _reduced(shape: torch.Size, side: str) -> int:
    return shape[0] if side == "left" else shape[1]


def _check_group(group: dict[str, Any]) -> None:
    rank, gap, scale = group["rank"], group["update_proj_gap"], group["scale"]
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive integer (or None: no projection for this "
                         f"group), got {rank!r}")
    if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
        raise ValueError(f"update_proj_gap must be a positive integer (steps between projector "
                         f"refreshes), got {gap!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number (the paper's α, e.g. 0.25), got "
                         f"{scale!r}")
    if group["proj_type"] not in PROJ_TYPES:
        raise ValueError(f"proj_type must be one of {list(PROJ_TYPES)}, got "
                         f"{group['proj_type']!r}")


def _sync(group: dict[str, Any], inner_group: dict[str, Any]) -> None:
    """Copy ``group``'s hyper-parameters (as a scheduler left them) into the inner group; an
    inner optimizer that keeps one as a tensor (torchao's ``lr``) has it filled in place."""
    for key, value in group.items():
        if key in GALORE_KEYS or key == "params":
            continue
        current = inner_group.get(key)
        if current is value:
            continue
        if isinstance(current, Tensor) and not isinstance(value, Tensor) and current.numel() == 1:
            current.fill_(value)
        else:
            inner_group[key] = value


class GaLore(torch.optim.Optimizer):
    """Gradient low-rank projection around an inner optimizer (see the module docstring).

    Args:
        params: parameters or param groups, as for any ``torch.optim`` optimizer; a group may
            override ``rank`` (``None``: nothing projected in it), ``update_proj_gap``,
            ``scale``, ``proj_type`` and the inner optimizer's hyper-parameters.
        inner: the optimizer class (or any callable ``inner(param_groups, **inner_kwargs)``
            returning a ``torch.optim.Optimizer``) that runs in the low-rank space.
        rank: ``r``, the projection rank.
        update_proj_gap: ``T``, steps between projector refreshes (SVD of the gradient).
        scale: ``α``, the factor on the projected-back update.
        proj_type: "std" (reduce the smaller side), "left" (``Pᵀ G``) or "right" (``G Qᵀ``).
        **inner_kwargs: the inner optimizer's hyper-parameters (``lr``, ``betas``,
            ``weight_decay`` …).

    Raises:
        ValueError: a bad ``rank`` / ``update_proj_gap`` / ``scale`` / ``proj_type``, or no
            parameter to project (no matrix whose reduced side is larger than ``rank``).
        TypeError: ``inner`` does not build a ``torch.optim.Optimizer``.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]],
                 inner: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW, *,
                 rank: int | None = 128, update_proj_gap: int = 200, scale: float = 0.25,
                 proj_type: str = "std", **inner_kwargs: Any) -> None:
        #: The inner optimizer (its parameters: the shadows and the unprojected tensors).
        self.inner: torch.optim.Optimizer | None = None
        self._shadows: dict[Tensor, Tensor] = {}  # projected parameter -> its shadow
        defaults = {"rank": rank, "update_proj_gap": update_proj_gap, "scale": scale,
                    "proj_type": proj_type, **inner_kwargs}
        super().__init__(params, defaults)
        built = inner([self._inner_group(g) for g in self.param_groups], **inner_kwargs)
        if not isinstance(built, torch.optim.Optimizer):
            raise TypeError(f"inner must build a torch.optim.Optimizer (e.g. "
                            f"torch.optim.AdamW), got {type(built).__name__}")
        self.inner = built
        for group, inner_group in zip(self.param_groups, built.param_groups, strict=True):
            self._adopt_defaults(group, inner_group)
        if not self._shadows:
            raise ValueError(
                f"GaLore projects nothing: no parameter is a matrix whose reduced side is larger "
                f"than rank={rank} (largest reduced side: {self._largest_side()}); lower rank, "
                "or use the inner optimizer directly")

    # ----------------------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (to the inner optimizer too, once it exists).

        Raises:
            ValueError: a bad GaLore hyper-parameter in the group.
        """
        _check_group({**self.defaults, **param_group})
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if self.inner is not None:
            self.inner.add_param_group(self._inner_group(group))
            self._adopt_defaults(group, self.inner.param_groups[-1])

    def is_projected(self, param: Tensor) -> bool:
        """Whether ``param``'s gradient is projected (else the inner optimizer sees it as is)."""
        return param in self._shadows

    def _inner_group(self, group: dict[str, Any]) -> dict[str, Any]:
        """The inner optimizer's view of ``group``: shadows for the projected matrices."""
        tensors = []
        for p in group["params"]:
            if group["rank"] is not None and p.dim() == 2 and p.requires_grad:
                side = _side(p.shape, group["proj_type"])
                if _reduced(p.shape, side) > group["rank"]:
                    shape = ((group["rank"], p.shape[1]) if side == "left"
                             else (p.shape[0], group["rank"]))
                    self._shadows[p] = torch.zeros(shape, dtype=p.dtype, device=p.device)
                    tensors.append(self._shadows[p])
                    continue
            tensors.append(p)
        return {**{k: v for k, v in group.items() if k not in GALORE_KEYS}, "params": tensors}

    @staticmethod
    def _adopt_defaults(group: dict[str, Any], inner_group: dict[str, Any]) -> None:
        """The inner optimizer's defaults (``lr`` …) become visible (and schedulable) here."""
        for key, value in inner_group.items():
            if key != "params":
                group.setdefault(key, value)

    def _largest_side(self) -> int:
        sides = [_reduced(p.shape, _side(p.shape, g["proj_type"])) for g in self.param_groups
                 for p in g["params"] if p.dim() == 2 and p.requires_grad]
        return max(sides, default=0)

    # ----------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One optimizer step (``closure`` re-evaluates the loss, as for any optimizer).

        Returns:
            The closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stepped = []
        for group, inner_group in zip(self.param_groups, self.inner.param_groups, strict=True):
            _sync(group, inner_group)
            for p in group["params"]:
                shadow = self._shadows.get(p)
                if shadow is None:
                    continue
                if p.grad is None:
                    shadow.grad = None
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("GaLore does not support sparse gradients")
                shadow.zero_()
                shadow.grad = self._project(p, group)
                stepped.append((p, shadow, group))
        self.inner.step()
        for p, shadow, group in stepped:
            decay = group.get("weight_decay", 0.0) or 0.0
            if decay:
                p.mul_(1.0 - group["lr"] * decay)
            basis = self.state[p]["projector"]
            back = basis @ shadow if _side(p.shape, group["proj_type"]) == "left" \
                else shadow @ basis  # (m, n)
            p.add_(back, alpha=group["scale"])
            shadow.grad = None
            self.state[p]["step"] += 1
        return loss

    def _project(self, p: Tensor, group: dict[str, Any]) -> Tensor:
        """``R_t``: the gradient in the rank-r subspace, refreshing ``P`` every ``T`` steps."""
        state = self.state[p]
        grad, side = p.grad, _side(p.shape, group["proj_type"])
        if not state:
            state["step"] = 0
        if state["step"] % group["update_proj_gap"] == 0:
            u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
            rank = group["rank"]
            basis = u[:, :rank] if side == "left" else vh[:rank]  # (m, r) | (r, n)
            state["projector"] = basis.to(p.dtype).contiguous()
        basis = state["projector"]
        return basis.T @ grad if side == "left" else grad @ basis.T  # (r, n) | (m, r)

    # ----------------------------------------------------------------------------- state
    def __getstate__(self) -> dict[str, Any]:  # deepcopy / pickle keep the inner optimizer
        return {**super().__getstate__(), "inner": self.inner, "_shadows": self._shadows}

    def state_dict(self) -> dict[str, Any]:
        """GaLore's state (projectors, step counts, groups) plus the inner optimizer's."""
        out = super().state_dict()
        out["inner"] = self.inner.state_dict()
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Inverse of ``state_dict``; training then continues bit-identically.

        Raises:
            ValueError: the saved state is not a GaLore state, or its GaLore hyper-parameters
                (rank, projection side …) differ from this optimizer's.
        """
        if "inner" not in state_dict:
            raise ValueError("not a GaLore state dict (no 'inner' entry): load the state "
                             "saved by GaLore.state_dict()")
        state_dict = dict(state_dict)
        inner = state_dict.pop("inner")
        saved = state_dict.get("param_groups", [])
        if len(saved) != len(self.param_groups) or any(
                s.get(k) != g[k] for s, g in zip(saved, self.param_groups, strict=False)
                for k in GALORE_KEYS):
            raise ValueError("the saved GaLore state has other param groups or GaLore "
                             f"settings ({', '.join(GALORE_KEYS)}) than this optimizer; build "
                             "it with the settings it was saved with")
        super().load_state_dict(state_dict)
        self.inner.load_state_dict(inner)


__all__ = ["GaLore"]
