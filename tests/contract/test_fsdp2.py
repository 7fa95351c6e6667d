"""Every registered method on FSDP2 shards (a one-process gloo group: parameters become
``DTensor``s; two processes: ``test_distributed.py``).

Each method's delta is injected into the tiny Llama, the model sharded per decoder layer and at
its root — or at its root only for adapters with a module shared by every layer
(``Delta.build_shared``), which FSDP2 cannot give to one layer's unit — and trained for a few
steps with its schedule; an unsharded copy trains beside it. The sharded run has the copy's
losses, saves the copy's adapter (gathered from the shards), and its whole-model checkpoint
(``torch.distributed.checkpoint``, full state dict) loads into another sharded model; a schedule
that reallocates parameters is refused up front.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_contract import PAIRS, delta_class, inject, make_config

import deltatune as dt
from deltatune.core.lifecycle import delta_layers
from deltatune.core.state import adapter_tensors
from helpers import assert_rel_close, perturb, train_steps

pytest.importorskip("transformers")
fsdp = pytest.importorskip("torch.distributed.fsdp")

CASES = [m for m, c in PAIRS if c.name == "llama" and m.label == str(m)]
LLAMA = next(c for m, c in PAIRS if c.name == "llama")
STEPS = 3


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory):
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path_factory.mktemp("fsdp") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def build(method):
    model = LLAMA.build()
    x = LLAMA.inputs()
    fields = delta_class(method).config_class.__dataclass_fields__
    extra = {"total_steps": STEPS} if "total_steps" in fields else {}
    inject(model, make_config(method, model, **extra), "t", x)
    perturb(model, scale=0.05)
    return model.train(), x


def shares_a_module(model) -> bool:
    return any(getattr(d, "shared", None) is not None
               for layer in delta_layers(model).values() for d in layer.deltas.values())


def shard(model) -> None:
    """Per decoder layer and at the root; at the root only for an adapter-wide shared module."""
    if not shares_a_module(model):
        for layer in model.model.layers:
            fsdp.fully_shard(layer)
    fsdp.fully_shard(model)


def train(model, x, scheduled: bool) -> list[float]:
    """``STEPS`` steps of AdamW on the delta (and the method's schedule)."""
    return train_steps(model, lambda m: m(**x, labels=x["input_ids"]).loss, STEPS, 1e-2,
                       scheduled)[0]


@pytest.mark.parametrize("method", CASES, ids=str)
def test_trains_and_saves_on_fsdp2_shards(method, group, tmp_path: Path):
    model, x = build(method)
    reference = copy.deepcopy(model)
    shard(model)
    scheduled = delta_class(method).schedule_class is not None
    if scheduled and dt.Scheduler(reference).schedules["t"].remaps:
        with pytest.raises(dt.StateError, match="FSDP2-sharded parameters cannot follow"):
            dt.Scheduler(model)  # refused before anything changed
        return
    expected = train(reference, x, scheduled)
    assert max(expected) - min(expected) > 1e-4  # it trained: the comparison is not vacuous
    torch.testing.assert_close(torch.tensor(train(model, x, scheduled)),
                               torch.tensor(expected), rtol=1e-5, atol=1e-5)
    dt.save(model, tmp_path / "a", name="t")
    saved = load_file(str(tmp_path / "a" / "deltatune_model.safetensors"))
    want = adapter_tensors(reference, "t")
    assert saved.keys() == want.keys()
    for key, value in want.items():
        assert_rel_close(saved[key].float(), value.float(), 1e-5, key)

    # a whole-model checkpoint through torch.distributed.checkpoint (as accelerate writes one):
    # gathered, then loaded into another sharded model of the same structure. Not for an
    # adapter-wide shared module: registered under every delta, it has one key per delta, and
    # torch's loader distributes a parameter under one name only (use dt.save / dt.load).
    if shares_a_module(model):
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )
    whole = StateDictOptions(full_state_dict=True)
    state = get_model_state_dict(model, options=whole)
    other, _ = build(method)
    shard(other)
    set_model_state_dict(other, state, options=whole)
    model.eval()
    other.eval()
    with torch.no_grad():
        assert_rel_close(other(**x).logits, model(**x).logits, 1e-6, "reloaded checkpoint")
