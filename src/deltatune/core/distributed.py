"""Deltas on models run by a distributed engine (DDP, FSDP2, ``torch.compile``).

deltatune does not train models itself; it lets the engine the user already runs do it:

* **DDP** (``DistributedDataParallel``) and ``DataParallel`` wrap the model: the wrapper is
  transparent to deltatune (``unwrap_model``), so ``dt.save(ddp_model)``, ``dt.merge`` … see the
  same logical module names as on the bare model. ``torch.compile``'s ``OptimizedModule`` is
  seen through the same way.
* **FSDP2** (``torch.distributed.fsdp.fully_shard``) keeps the modules but shards every
  parameter, delta parameters included, as a ``DTensor``: saving gathers each one
  (``full_tensor``, a collective — every rank must call ``save``) and loading shards the read
  tensor the same way as the parameter it is copied into. Inside a unit's forward its
  parameters are whole; a delta reading its parameters elsewhere (a regulariser between steps,
  prefixes built before the layers run) reads them through ``gathered``. An adapter-wide
  shared module (``Delta.build_shared``: Compacter's rules, intrinsic's projection, a prefix
  projection) is registered under every layer, so such an adapter is sharded at the model's
  root only (``fully_shard(model)``, no per-layer units).

Under an initialised process group only rank 0 writes files; the others take part in the
gathers and return.
"""

from __future__ import annotations

from torch import Tensor, nn

#: Wrapper classes and the attribute that holds the wrapped model.
_WRAPPERS = {"DistributedDataParallel": "module", "DataParallel": "module",
             "OptimizedModule": "_orig_mod"}


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / ``DataParallel`` / ``torch.compile`` wrappers (``model`` if none).

    Args:
        model: a model, possibly wrapped (several times).

    Returns:
        The innermost wrapped model.
    """
    while (attr := _WRAPPERS.get(type(model).__name__)) and isinstance(
            getattr(model, attr, None), nn.Module):
        model = getattr(model, attr)
    return model


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a distributed tensor (an FSDP2-sharded parameter)."""
    return type(t).__name__ == "DTensor" and hasattr(t, "full_tensor")


def full_tensor(t: Tensor) -> Tensor:
    """``t`` whole: the gathered tensor for a ``DTensor`` (collective), else ``t`` itself."""
    return t.full_tensor() if is_sharded(t) else t


def gathered(t: Tensor) -> Tensor:
    """``t`` whole, for a read outside the forward of the FSDP2 unit that holds it (a loss term
    between steps, prefixes built before the layers run): a differentiable all-gather whose
    gradient is averaged over the ranks and scattered back to the shards, as FSDP's own
    reduce-scatter averages the gradients of the forward; ``t`` itself if it is not sharded."""
    if not is_sharded(t):
        return t
    from torch.distributed.tensor import Partial

    return t.full_tensor(grad_placements=[Partial("avg")] * t.device_mesh.ndim)


def like(value: Tensor, target: Tensor) -> Tensor:
    """``value`` (a whole tensor) laid out as ``target``: sharded the same way for a
    ``DTensor`` target (each rank keeps its own shard), else ``value`` on ``target``'s device.
    A floating-point ``value`` takes ``target``'s dtype; a mask stays boolean."""
    if is_sharded(target):
        from torch.distributed.tensor import distribute_tensor

        dtype = target.dtype if value.is_floating_point() else value.dtype
        return distribute_tensor(value.to(target.device, dtype), target.device_mesh,
                                 target.placements)
    return value.to(target.device)


def is_main_process() -> bool:
    """Whether this process writes files: rank 0, or the only process."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def architecture(model: nn.Module) -> str:
    """The class name of the user's model, whatever wraps it: seen through DDP /
    ``torch.compile`` wrappers and FSDP2's dynamic ``FSDP<Model>`` subclass."""
    cls = type(unwrap_model(model))
    fsdp = [b for b in cls.__bases__ if b.__name__ == "FSDPModule"]
    if fsdp and cls.__name__.startswith("FSDP"):
        cls = next(b for b in cls.__bases__ if b not in fsdp)
    return cls.__name__
