"""One rank of the distributed tests (``test_distributed.py`` starts two with ``torchrun``).

Trains a LoRA delta on the tiny Llama with each rank on its half of a fixed batch, through DDP,
FSDP2 (``fully_shard``) or accelerate, then saves it with ``dt.save`` on every rank (rank 0
writes) and writes, from rank 0, what the test compares with a single-process run:
``result.json`` (the global loss per step, and which parameters received gradients) and
``logits.safetensors`` (the trained model's logits on a probe batch, computed by all ranks).

    torchrun --standalone --nproc_per_node=2 dist_worker.py {ddp|fsdp|accelerate|ddp-schedule} OUT

``ddp-schedule`` trains IncreLoRA (ranks grown as it trains) and builds the DDP wrapper again
whenever ``Scheduler.step()`` reports that the trainable parameters changed;
``fsdp-regularised`` trains a sparse adapter with SaRA's nuclear-norm regulariser on FSDP2
shards (the regulariser reads a layer's values outside the forward: gathered, differentiably);
``fsdp-prefix`` trains prefix tuning on per-layer FSDP2 units (the prefixes are read before the
layers run: gathered, their gradients averaged over the ranks as FSDP averages its own).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import deltatune as dt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import zoo

CONFIG = dt.LoraConfig(rank=4, alpha=8, targets="all-linear")
#: ``ddp-schedule``: ranks grown during training (parameters change shape at steps 2 and 4)
GROWING = dt.IncreLoraConfig(rank=1, alpha=4, target_rank=2, warmup=1, interval=2, top_h=4,
                             targets="all-linear")
#: ``fsdp-regularised``: a loss term read from the sharded parameters outside the forward
REGULARISED = dt.SparseConfig(density=0.05, scorer="magnitude", nuclear_weight=0.5,
                              targets="all-linear")
#: ``fsdp-prefix``: every layer's prefix read (from its shards) before the layers run
PREFIX = dt.PrefixConfig(num_tokens=3)
STEPS, LR, ROWS = 4, 1e-2, 8
SCHEDULED = {"ddp-schedule": GROWING, "fsdp-regularised": REGULARISED}


def config_for(mode: str) -> dt.DeltaConfig:
    return {**SCHEDULED, "fsdp-prefix": PREFIX}.get(mode, CONFIG)


def build(config: dt.DeltaConfig = CONFIG) -> torch.nn.Module:
    """The tiny Llama with a delta, identical in every process (seeded)."""
    model = zoo.CASES_BY_NAME["llama"].build(seed=0)
    torch.manual_seed(1)
    dt.inject(model, config, name="task")
    for delta_param in (p for p in model.parameters() if p.requires_grad):
        with torch.no_grad():  # B = 0 at init: make the first step's gradients reach A too
            delta_param.add_(0.05 * torch.randn_like(delta_param))
    return model.train()


def batch() -> torch.Tensor:
    return torch.randint(1, 96, (ROWS, 9), generator=torch.Generator().manual_seed(3))


def probe() -> torch.Tensor:
    return torch.randint(1, 96, (2, 7), generator=torch.Generator().manual_seed(4))


def main(mode: str, out: Path) -> None:
    accelerator = None
    if mode == "accelerate":
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build(config_for(mode))
    base_names = [n for n, p in model.named_parameters() if not p.requires_grad]
    delta_names = [n for n, p in model.named_parameters() if p.requires_grad]
    if mode in ("ddp", "ddp-schedule"):
        runner = torch.nn.parallel.DistributedDataParallel(model)
    elif mode.startswith("fsdp"):
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        runner = model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    if accelerator is not None:
        runner, optimizer = accelerator.prepare(model, optimizer)
    scheduler = dt.Scheduler(model, optimizer) if mode in SCHEDULED else None
    ids = batch().chunk(world)[rank]
    losses, with_grad, rebuilt = [], set(), 0
    for _ in range(STEPS):
        loss = runner(input_ids=ids, labels=ids).loss
        if scheduler is not None:
            loss = loss + scheduler.loss()
        (accelerator.backward(loss) if accelerator else loss.backward())
        with_grad |= {n for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        if scheduler is not None and scheduler.step() and mode == "ddp-schedule":
            # the trainable parameters changed: a new DDP wrapper
            runner = torch.nn.parallel.DistributedDataParallel(model)
            rebuilt += 1
        optimizer.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / world)
    dt.save(runner, out / "adapter", name="task")  # every rank; rank 0 writes
    with torch.no_grad():
        logits = runner(input_ids=probe()).logits
    if rank == 0:
        from safetensors.torch import save_file

        save_file({"logits": logits.contiguous()}, str(out / "logits.safetensors"))
        (out / "result.json").write_text(json.dumps({
            "world": world, "losses": losses,
            "base_with_grad": sorted(with_grad & set(base_names)),
            "deltas_without_grad": sorted(set(delta_names) - with_grad),
            "num_deltas": len(delta_names), "rebuilt": rebuilt}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
