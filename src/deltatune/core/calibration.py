"""One calibration pass over user data: per-layer statistics that data-driven inits start from.

A method whose initialisation reads data (LoRA-GA, CorDA, LoRA-SB, FISH Mask …) declares what it
needs as ``Delta.calibration`` (per config: ``Delta.calibration_for``); ``inject(model, config,
name, data=..., loss_fn=...)`` then runs the model once over ``data`` *before* building the
deltas, with hooks on the targeted base layers only, and hands each delta its layer's statistics
while its ``reset_parameters`` runs (``Delta.calibration_stats``). Statistics, in the layer's
matrix form (``core.geometry``), fp32, on the layer's device, accumulated while streaming (no
activation is kept):

* ``"input_cov"``: ``E[x xᵀ]`` ``(in, in)`` over every position the layer sees (every token,
  padding included; every convolution patch; an embedding's one-hot ids);
* ``"weight_grad"``: ``∂L/∂W`` ``(out, in)``, the loss gradient w.r.t. the base weight, averaged
  over batches. ``L`` is ``loss_fn(output, batch)`` or else the output's ``loss`` (a Hugging
  Face model computes one when the batch has ``labels``);
* ``"weight_grad_sq"``: ``E_batches[(∂L/∂W)²]`` ``(out, in)``, squared batch gradients averaged
  over batches (SPT's parameter sensitivity);
* ``"fisher"``: the diagonal empirical Fisher ``E_samples[(∂ℓ_i/∂W)²]`` ``(out, in)``, squared
  *per-sample* gradients averaged over every sample of every batch (FISH Mask's). Each batch is
  split along its first axis (``split_samples``) and each sample runs forward and backward on
  its own, with ``ℓ_i = loss_fn(output_i, sample_i)``: one backward pass per sample.

The base stays frozen and unchanged: the model runs in eval mode (no dropout, no running-stat
updates); for gradients only the targeted weights require grad during the pass and the
gradients are taken with ``torch.autograd.grad``, so no ``.grad`` is written anywhere. Training
modes, ``requires_grad`` flags and hooks are restored however the pass ends. Batches are dicts
(passed as keyword arguments), tuples / lists (positional) or single tensors, moved to the
device of the model's first parameter. Deltas made this way save everything they need: loading
never needs data.

A method that splits one model-wide budget by these statistics (FISH Mask's top-k over every
targeted weight) does so in its ``Delta.allocate``, after the pass and before any delta is
built, with ``split_top_k``.

Memory: ``in²`` floats per layer for ``input_cov`` and ``out × in`` for each gradient statistic
(for every targeted layer at once: the size of those weights, in fp32), plus one batch's graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .geometry import LayerInfo, is_quantized
from .targeting import Matcher

#: The statistics a ``Delta.calibration`` may name.
STATISTICS = frozenset({"input_cov", "weight_grad", "weight_grad_sq", "fisher"})
#: Those read from loss gradients (they need a loss, and the targeted weights require grad).
GRADIENTS = frozenset({"weight_grad", "weight_grad_sq", "fisher"})
_INT32 = torch.iinfo(torch.int32)

Stats = dict[str, dict[str, Tensor]]
LossFn = Callable[[Any, Any], Tensor]

_CURRENT: ContextVar[Mapping[str, Mapping[str, Tensor]] | None] = ContextVar(
    "deltatune_calibration", default=None)


# ------------------------------------------------------------------------------- handing over
@contextlib.contextmanager
def provide(stats: Stats) -> Iterator[None]:
    """Make ``stats`` (by module path) readable through ``Delta.calibration_stats`` inside the
    block, and free them after it."""
    token = _CURRENT.set(stats)
    try:
        yield
    finally:
        _CURRENT.reset(token)
        stats.clear()


def stats_for(path: str, method: str) -> Mapping[str, Tensor]:
    """The statistics of the layer at ``path`` while ``provide`` is active.

    Raises:
        ConfigError: no calibration pass provides them (``inject`` was not given ``data=``).
    """
    current = _CURRENT.get()
    if current is None or path not in current:
        raise ConfigError(f"{method!r} initialises from calibration data, and none was given "
                          f"for {path}; pass data= (an iterable of batches) to deltatune.inject")
    return current[path]


# -------------------------------------------------------------------------------- the pass
def calibrate(
    model: nn.Module,
    targets: Mapping[str, LayerInfo],
    needs: Iterable[str],
    data: Iterable[Any] | None,
    *,
    loss_fn: LossFn | None = None,
    method: str = "",
) -> Stats:
    """Run ``model`` once over ``data`` and gather ``needs`` for every layer in ``targets``.

    Args:
        model: the model (base frozen or not; it is left exactly as found).
        targets: module path → geometry of the layers to observe (``resolve_targets``).
        needs: statistic names from ``STATISTICS``.
        data: an iterable of batches: dicts (keyword arguments), tuples / lists (positional
            arguments) or tensors (one positional argument).
        loss_fn: ``loss_fn(output, batch)`` → scalar loss, for the gradient statistics (called
            with one sample's output and sub-batch for ``"fisher"``); default: the output's
            ``loss``.
        method: the method's name, for error messages.

    Returns:
        ``{path: {name: tensor}}``, fp32, on each layer's device.

    Raises:
        ConfigError: no data, no batch in it, no loss, a layer the data never reached, a
            layer kind without a matrix form, or (``"fisher"``) a batch without a batch axis.
    """
    needs = frozenset(needs)
    if needs - STATISTICS:
        raise ConfigError(f"unknown calibration statistics {sorted(needs - STATISTICS)}; "
                          f"known: {sorted(STATISTICS)}")
    what = f"{method!r} initialises from data" if method else "this initialisation needs data"
    if data is None:
        loss = (" and a loss (batches with labels=, or loss_fn=)" if needs & GRADIENTS
                else "")
        raise ConfigError(f"{what}: pass data= (an iterable of a few batches: dicts of "
                          f"keyword tensors, or tensors){loss} to deltatune.inject")
    if isinstance(data, (Tensor, Mapping)):
        raise ConfigError("data= is an iterable of batches; wrap a single batch in a list: "
                          "data=[batch]")
    matcher = Matcher(model)
    layers = {path: (matcher.modules[path], info) for path, info in targets.items()}
    for path, (_, info) in layers.items():
        if info.kind not in ("linear", "conv", "embedding"):
            raise ConfigError(f"{path}: calibration statistics need a weight matrix, and "
                              f"{info.kind} layers have none; exclude it")
    pass_ = _Pass(model, layers, needs, loss_fn, what)
    with pass_.prepared():
        batches = 0
        for batch in data:
            pass_.step(batch)
            batches += 1
    if batches == 0:
        raise ConfigError(f"{what}, and data= gave no batch")
    return pass_.results(batches)


class _Pass:
    """The state of one calibration pass: accumulators, hooks, and what to restore."""

    def __init__(self, model: nn.Module, layers: Mapping[str, tuple[nn.Module, LayerInfo]],
                 needs: frozenset[str], loss_fn: LossFn | None, what: str) -> None:
        self.model, self.layers, self.loss_fn, self.what = model, layers, loss_fn, what
        self.cov = "input_cov" in needs
        self.batch_grads = needs & {"weight_grad", "weight_grad_sq"}  # from whole batches
        self.fisher = "fisher" in needs  # from one sample at a time
        self.grad = bool(needs & GRADIENTS)
        first = next(model.parameters(), None)
        self.device = first.device if first is not None else None
        self.sums: Stats = {path: {} for path in layers}
        self.tokens = dict.fromkeys(layers, 0)
        self.samples = 0
        self.observing = True  # whether the covariance hooks count the current forward
        self.seen: set[str] = set()
        self.weights: dict[str, Tensor] = {}
        #: Quantized layers: their weight gradient is ``Σ gᵀ x`` from a zero probe added to
        #: the output (``g = ∂L/∂probe``) and the input, both kept for the current forward.
        self.probed: dict[str, list[tuple[Tensor, Tensor]]] = {}
        for path, (module, info) in layers.items():
            weight = getattr(module, "weight", None)
            if not isinstance(weight, Tensor) or not weight.is_floating_point():
                raise ConfigError(f"{path}: calibration needs a floating-point weight; this "
                                  "layer has none")
            zeros = dict(device=weight.device, dtype=torch.float32)
            if self.cov:
                self.sums[path]["input_cov"] = torch.zeros(info.in_dim, info.in_dim, **zeros)
            for name in sorted(needs & GRADIENTS):
                self.sums[path][name] = torch.zeros(info.out_dim, info.in_dim, **zeros)
            if self.grad and is_quantized(module):
                if info.kind != "linear":
                    raise ConfigError(f"{path}: gradient statistics of a quantized "
                                      f"{info.kind} layer are not supported; exclude it")
                self.probed[path] = []
            elif self.grad:
                self.weights[path] = weight

    @contextlib.contextmanager
    def prepared(self) -> Iterator[None]:
        """Eval mode, hooks, and (for gradients) only the targeted weights requiring grad;
        everything restored on exit, whatever happens."""
        modes = [(m, m.training) for m in self.model.modules()]
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        handles = []
        try:
            self.model.eval()
            if self.grad:
                for p, _ in flags:
                    p.requires_grad_(False)
                for weight in self.weights.values():
                    weight.requires_grad_(True)
            if self.cov:
                handles = [module.register_forward_pre_hook(self._hook(path), with_kwargs=True)
                           for path, (module, _) in self.layers.items()]
            handles += [self.layers[path][0].register_forward_hook(self._probe(path))
                        for path in self.probed]
            yield
        finally:
            for handle in handles:
                handle.remove()
            for p, flag in flags:
                p.requires_grad_(flag)
            for m, mode in modes:
                m.training = mode

    def _hook(self, path: str):
        info = self.layers[path][1]
        acc = self.sums[path]["input_cov"]

        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(iter(kwargs.values()), None)
            if not self.observing or not isinstance(x, Tensor):
                return
            with torch.no_grad():
                self.tokens[path] += _accumulate_cov(acc, info, x.detach())

        return hook

    def _probe(self, path: str):
        """Output hook of a quantized layer: ``y + 0`` through a zero leaf whose gradient is
        ``∂L/∂y`` (the graph continues through it, so every earlier layer's gradient stays
        exact), and the input it multiplies."""
        kept = self.probed[path]

        def hook(mod: nn.Module, args: tuple, output: Any) -> Any:
            if not (torch.is_grad_enabled() and isinstance(output, Tensor) and args):
                return None
            probe = torch.zeros_like(output, requires_grad=True)
            kept.append((probe, args[0].detach()))
            return output + probe

        return hook

    def step(self, batch: Any) -> None:
        """One batch: forward (hooks gather covariances) and the batch gradients, then the
        per-sample gradients."""
        batch = to_device(batch, self.device)
        if self.cov or self.batch_grads:
            self.observing = True
            for path, g in self._gradients(batch, bool(self.batch_grads)).items():
                sums = self.sums[path]
                if "weight_grad" in sums:
                    sums["weight_grad"].add_(g)
                if "weight_grad_sq" in sums:
                    sums["weight_grad_sq"].addcmul_(g, g)
        if self.fisher:
            self.observing = False  # the covariances count each position once, above
            for sample in split_samples(batch):
                for path, g in self._gradients(sample, True).items():
                    self.sums[path]["fisher"].addcmul_(g, g)
                self.samples += 1

    def _gradients(self, batch: Any, grads: bool) -> dict[str, Tensor]:
        """Run the model on ``batch``; with ``grads``, the loss gradient of every targeted
        weight the loss reaches, in matrix form, fp32."""
        with torch.enable_grad() if grads else torch.no_grad():
            output = call_model(self.model, batch)
            if not grads:
                return {}
            loss = self._loss(output, batch)
            unique = list({id(w): w for w in self.weights.values()}.values())
            probes = [(path, probe, x) for path, kept in self.probed.items()
                      for probe, x in kept]
            for kept in self.probed.values():
                kept.clear()
            grads = torch.autograd.grad(loss, [*unique, *(p for _, p, _ in probes)],
                                        allow_unused=True)
            found = dict(zip([id(w) for w in unique], grads, strict=False))
        out = {}
        for path, weight in self.weights.items():
            g = found[id(weight)]
            if g is not None:
                self.seen.add(path)
                out[path] = self.layers[path][1].weight_matrix(g).float()
        for (path, _, x), g in zip(probes, grads[len(unique):], strict=True):
            if g is not None:  # ∂L/∂W = Σ over positions of gᵀ x (every call of the layer)
                self.seen.add(path)
                gw = g.reshape(-1, g.shape[-1]).float().t() @ x.reshape(-1, x.shape[-1]).float()
                out[path] = gw if path not in out else out[path] + gw
        return out

    def _loss(self, output: Any, batch: Any) -> Tensor:
        if self.loss_fn is not None:
            loss = self.loss_fn(output, batch)
        else:
            loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss",
                                                                                   None)
            if loss is None:
                raise ConfigError(f"{self.what} and a loss: the model output has no loss (a "
                                  "Hugging Face model computes one when the batch has labels=); "
                                  "pass labels in each batch, or loss_fn=lambda output, batch: "
                                  "... returning a scalar")
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise ConfigError(f"the calibration loss must be a scalar tensor, got "
                              f"{getattr(loss, 'shape', type(loss).__name__)}")
        if not loss.requires_grad:
            raise ConfigError("the calibration loss does not depend on the targeted layers' "
                              "weights (was it computed under torch.no_grad, or detached?)")
        return loss

    def results(self, batches: int) -> Stats:
        """Means: covariances over positions, batch gradients over batches, the Fisher over
        samples."""
        for path, sums in self.sums.items():
            if self.cov:
                if self.tokens[path] == 0:
                    raise ConfigError(f"{path}: the calibration data never reached this layer; "
                                      "exclude it or pass data that runs through it")
                sums["input_cov"].div_(self.tokens[path])
            if self.grad and path not in self.seen:
                raise ConfigError(f"{path}: the calibration loss does not depend on this "
                                  "layer; exclude it or use a loss that does")
            for name in ("weight_grad", "weight_grad_sq"):
                if name in sums:
                    sums[name].div_(batches)
            if "fisher" in sums:
                sums["fisher"].div_(max(self.samples, 1))
        return self.sums


# ------------------------------------------------------------------------ model-wide budgets
def split_top_k(scores: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]],
                k: int) -> dict[str, int]:
    """How many entries of each score tensor are among the ``k`` best over all of them, each
    tensor keeping at least its own best entry (none is left empty); ties at the threshold go to
    earlier tensors.

    A model-wide top-k (FISH Mask's, SPT's) from per-layer statistics, without concatenating
    them: the k-th best score is found by bisection over the scores' float32 bit patterns (at
    most 32 counting passes, exact). Each tensor is turned into int32 keys as it comes, so an
    iterable of ``(name, scores)`` pairs lets the caller hold one score tensor at a time.

    Args:
        scores: ``{name: scores}`` or ``(name, scores)`` pairs; any shapes, finite, higher is
            better.
        k: the budget, from the number of tensors to their total size.

    Returns:
        ``{name: count}`` in the order given, summing to ``k``.

    Raises:
        ValueError: ``k`` outside that range.
    """
    items = scores.items() if isinstance(scores, Mapping) else scores
    keys = {name: _keys(s.detach().reshape(-1)) for name, s in items}
    total = sum(key.numel() for key in keys.values())
    if not len(keys) <= k <= total:
        raise ValueError(f"a budget of {k} entries cannot give each of {len(keys)} tensors one "
                         f"(they hold {total})")
    counts = dict.fromkeys(keys, 1)
    for key in keys.values():
        key[key.argmax()] = _INT32.min  # each tensor's best is kept anyway
    rest = k - len(keys)
    if rest == 0:
        return counts

    def above(t: int) -> int:
        return sum(int((key > t).sum()) for key in keys.values())

    lo, hi = _INT32.min, _INT32.max - 1  # above(lo) >= rest: the largest such lo
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if above(mid) >= rest else (lo, mid - 1)
    need = rest - above(lo + 1)  # entries strictly better than the k-th best key (lo + 1)
    for name, key in keys.items():
        ties = min(int((key == lo + 1).sum()), need)
        need -= ties
        counts[name] += int((key > lo + 1).sum()) + ties
    return counts


def _keys(score: Tensor) -> Tensor:
    """int32 keys ordered like the float32 ``score`` (negative floats' magnitude bits flipped)."""
    bits = score.float().contiguous().view(torch.int32)
    return torch.where(bits < 0, bits ^ _INT32.max, bits)


def _accumulate_cov(acc: Tensor, info: LayerInfo, x: Tensor) -> int:
    """Add ``Σ x xᵀ`` over the positions of one layer input to ``acc``; return how many."""
    if info.kind == "embedding":  # one-hot ids: a diagonal of counts
        ids = x.reshape(-1)
        acc.diagonal().add_(torch.bincount(ids, minlength=info.in_dim).to(acc))
        return ids.numel()
    if info.kind == "conv":  # the patches the kernel sees, with the layer's own geometry
        eye = torch.eye(info.in_dim, device=x.device, dtype=x.dtype)
        patches = info.apply_in(x, eye)  # (N, in, *spatial) or unbatched (in, *spatial)
        channel = 0 if x.dim() == len(info.kernel_size) + 1 else 1
        x = patches.movedim(channel, -1)
    rows = x.reshape(-1, info.in_dim).float()  # (positions, in)
    acc.addmm_(rows.t(), rows)
    return rows.shape[0]


def to_device(batch: Any, device: torch.device | None) -> Any:
    """``batch`` (a tensor, or dicts / tuples / lists of them) moved to ``device``."""
    if device is None:
        return batch
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if type(batch) in (tuple, list):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def split_samples(batch: Any) -> list[Any]:
    """The samples of one batch, each a batch of one: every tensor whose first axis has the
    batch's size (that of the first tensor with an axis) is sliced along it, other values are
    shared by every sample.

    Raises:
        ConfigError: the batch holds no tensor with a batch axis.
    """
    size = _batch_size(batch)
    if size is None:
        raise ConfigError("per-sample statistics (\"fisher\") split each batch along its first "
                          "axis, and this batch holds no tensor with one")
    return [_sample(batch, i, size) for i in range(size)]


def _batch_size(value: Any) -> int | None:
    if isinstance(value, Tensor):
        return value.shape[0] if value.dim() else None
    items = value.values() if isinstance(value, Mapping) else (
        value if type(value) in (tuple, list) else ())
    return next((n for v in items if (n := _batch_size(v)) is not None), None)


def _sample(value: Any, i: int, size: int) -> Any:
    if isinstance(value, Tensor):
        return value[i:i + 1] if value.dim() and value.shape[0] == size else value
    if isinstance(value, Mapping):
        return {k: _sample(v, i, size) for k, v in value.items()}
    if type(value) in (tuple, list):
        return type(value)(_sample(v, i, size) for v in value)
    return value


def call_model(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for a dict, ``model(*batch)`` for a tuple / list, else
    ``model(batch)`` (a tensor).

    Raises:
        ConfigError: any other batch type.
    """
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    if isinstance(batch, Tensor):
        return model(batch)
    raise ConfigError(f"a calibration batch is a dict, a tuple / list or a tensor; got "
                      f"{type(batch).__name__}")
