"""``benchmarks/_harness.py``'s weight sharing (``--share-weights``): shared cases hold the base's
very tensors, owning cases their own copy, and a case that would change a shared tensor is
refused before anything is timed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))  # as the benchmark scripts import it
import _harness as h  # noqa: E402

import deltatune as dt  # noqa: E402


@pytest.fixture
def tiny():
    s = h.Settings(device="cpu", dtype="float32", preset="quick", warmup=0, steps=1, seed=0,
                   threads=1, memory=False, malloc="default", cases=(), **h.PRESETS["quick"])
    return h.build_base(s), h.make_ids(s)


def lora(base, ids):
    return h.train_runner(dt.inject(base, dt.LoraConfig(rank=2), name="a"), ids)


def merged(base, ids):
    model = dt.inject(base, dt.LoraConfig(rank=2), name="a")
    h.perturb(model, 1)
    dt.merge(model)
    return h.Runner(model.eval(), ids, "infer")


def test_shared_and_owned_copies(tiny):
    base, ids = tiny
    weight = base.model.layers[0].self_attn.q_proj.weight
    runners = {}
    for case in (h.Case("floor", "", "train", h.floor_runner),
                 h.Case("lora", "", "train", lora),
                 h.Case("full_ft", "", "train", h.full_runner, own_weights=True),
                 h.Case("merged", "", "infer", merged, own_weights=True)):
        runners[case.name] = h.build_runner(case, h.copy_for(base, case, share=True), ids)

    def q_weight(name):  # the first query projection's own weight (wrapped or not)
        return next(p for n, p in runners[name].model.named_parameters()
                    if n.startswith("model.layers.0.self_attn.q_proj.")
                    and n.endswith(".weight") and ".deltas." not in n)
    assert q_weight("floor") is weight and q_weight("lora") is weight
    assert q_weight("full_ft") is not weight and q_weight("full_ft").requires_grad
    assert q_weight("merged").data_ptr() != weight.data_ptr()
    assert not weight.requires_grad
    for runner in runners.values():
        runner.step()  # all of them run on the shared tensors
    assert not weight.requires_grad
    unshared = h.copy_for(base, h.Case("lora", "", "train", lora), share=False)
    assert unshared.model.layers[0].self_attn.q_proj.weight is not weight


@pytest.mark.parametrize("build,what", [(h.full_runner, "trains"), (merged, "rewrites")])
def test_a_case_changing_shared_weights_is_refused(tiny, build, what):
    base, ids = tiny
    case = h.Case("bad", "", "train", build)
    with pytest.raises(RuntimeError, match=f"case 'bad' {what} a base tensor it shares"):
        h.build_runner(case, h.copy_for(base, case, share=True), ids)
