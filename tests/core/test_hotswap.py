"""Hot swaps (``core.hotswap``): a loaded delta's tensors replaced in place by another saved
delta's — equal to a fresh load of that delta, no tensor re-allocated, and a compiled model not
recompiled (LoRA with other rank / alpha / rsLoRA after ``prepare_hotswap``, DoRA, IA3, every
registered method with an equal config); the recompile detection proven by a swap that does
recompile; every refusal leaves the model as it was."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch._dynamo

import deltatune as dt
from contract.test_contract import inject as contract_inject
from contract.test_contract import make_config
from deltatune.core.hotswap import hotswap, hotswap_tensors, prepare_hotswap, swap_impl
from deltatune.core.lifecycle import delta_layers
from deltatune.core.state import adapter_tensors
from deltatune.methods.dora import DoraDelta
from deltatune.methods.lora import LoraDelta
from helpers import assert_differs, assert_rel_close, perturb
from zoo import CASES, CASES_BY_NAME, run

MLP = CASES_BY_NAME["mlp"]
LLAMA = CASES_BY_NAME["llama"]
TOL = 1e-6
TARGETS = ["blocks.0.0", "blocks.0.2", "blocks.1.0"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def saved(tmp_path, tag, config, *, seed, case=MLP):
    """Save a delta made with ``config`` (perturbed with ``seed``) to ``tmp_path/tag``."""
    model = case.build()
    dt.inject(model, config, name=tag)
    perturb(model, seed=seed)
    return dt.save(model, tmp_path / tag)


def loaded(path, case=MLP, name="a"):
    return dt.load(case.build(), path, name=name)


def out(model, case=MLP):
    with torch.no_grad():
        return run(model, case.inputs())


def pointers(model):
    """Every delta tensor (parameters and buffers) by name: identity and data pointer."""
    return {f"{p}.{k}": (id(t), t.data_ptr()) for p, layer in delta_layers(model).items()
            for k, t in [*layer.deltas.named_parameters(), *layer.deltas.named_buffers()]}


def snapshot(model):
    """Everything a refused swap or preparation must leave as it was."""
    deltas = {(p, n): (d.config, d.adapter_config, getattr(d, "scale", None),
                       getattr(d, "scaling", None) is not None)
              for p, layer in delta_layers(model).items() for n, d in layer.deltas.items()}
    values = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return deltas, values, pointers(model)


def assert_untouched(model, before):
    deltas, values, ptrs = snapshot(model)
    assert deltas == before[0] and ptrs == before[2]
    assert values.keys() == before[1].keys()
    assert all(torch.equal(values[k], before[1][k]) for k in values)


# ------------------------------------------------------------------------------- eager
LORA_PAIRS = {  # (loaded, swapped in, max_rank for prepare_hotswap)
    "rank-alpha-rslora": (dt.LoraConfig(rank=4, alpha=8, targets=TARGETS),
                          dt.LoraConfig(rank=6, alpha=3, rslora=True, dropout=0.1,
                                        init="gaussian", targets=TARGETS), 8),
    "lower-rank-unprepared": (dt.LoraConfig(rank=6, alpha=2, targets=TARGETS),
                              dt.LoraConfig(rank=3, alpha=7, targets=TARGETS), None),
    "overrides": (dt.LoraConfig(rank=2, targets=TARGETS, overrides={"blocks.0.2": {"rank": 5}}),
                  dt.LoraConfig(rank=4, alpha=3, targets=TARGETS, overrides={
                      "blocks.1.0": {"rank": 1, "alpha": 9, "rslora": True}}), 6),
    "bias-gate": (dt.LoraConfig(rank=3, bias=True, gate=True, targets=TARGETS),
                  dt.LoraConfig(rank=2, alpha=5, bias=True, gate=True, targets=TARGETS), 3),
    "dora": (dt.DoraConfig(rank=4, alpha=8, targets=TARGETS),
             dt.DoraConfig(rank=2, alpha=16, rslora=True, targets=TARGETS), 4),
}


@pytest.mark.parametrize("pair", LORA_PAIRS, ids=list(LORA_PAIRS))
def test_swap_equals_a_fresh_load_in_place(tmp_path, pair):
    first, second, max_rank = LORA_PAIRS[pair]
    path_a = saved(tmp_path, "one", first, seed=1)
    path_b = saved(tmp_path, "two", second, seed=2)
    y_a, y_b = out(loaded(path_a)), out(loaded(path_b))
    assert_differs(y_b, y_a, "the two deltas")
    model = loaded(path_a)
    if max_rank is not None:
        prepare_hotswap(model, max_rank=max_rank)
        assert_rel_close(out(model), y_a, TOL, "prepare_hotswap keeps the outputs")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad] or
                                [torch.zeros(1, requires_grad=True)], lr=0.1)
    held = [id(p) for group in optimizer.param_groups for p in group["params"]]
    before = pointers(model)
    hotswap(model, path_b, name="a")
    assert pointers(model) == before, "a hot swap re-allocated a tensor"
    assert [id(p) for group in optimizer.param_groups for p in group["params"]] == held
    assert_rel_close(out(model), y_b, TOL, "swapped in")
    assert dt.active_adapters(model) == ["a"] and list(dt.adapters(model)) == ["a"]
    # saved after the swap: the second delta (padded, same outputs), loadable anywhere
    assert_rel_close(out(loaded(dt.save(model, tmp_path / "again"))), y_b, TOL, "re-saved")
    hotswap(model, path_a, name="a")  # and back
    assert pointers(model) == before
    assert_rel_close(out(model), y_a, TOL, "swapped back")


def test_swap_updates_the_scale_and_keeps_requires_grad(tmp_path):
    path = saved(tmp_path, "two", dt.LoraConfig(rank=3, alpha=5, targets=TARGETS), seed=2)
    model = MLP.build()
    dt.inject(model, dt.LoraConfig(rank=4, alpha=1, targets=TARGETS), name="a")
    prepare_hotswap(model, max_rank=4)
    dt.load(model, path, name="a", swap=True)  # the load path's spelling
    for layer in delta_layers(model).values():
        delta = layer.deltas["a"]
        assert delta.scale == pytest.approx(5 / 3) and delta.config.rank == 4
        assert delta.scaling.item() == pytest.approx(5 / 3) and delta.A.requires_grad
        assert torch.all(delta.A[3:] == 0) and torch.all(delta.B[:, 3:] == 0)
    assert_rel_close(out(model), out(loaded(path)), TOL, "swapped into an injected delta")


def test_every_method_swaps_an_equal_config(tmp_path):
    """The generic path: any registered method, same config, other weights — exact."""
    for method in dt.methods():
        cls = dt.get_method(method).delta_class
        for case in CASES:
            if not cls.layer_kinds & case.kinds:
                continue
            model = case.build()
            try:
                config = make_config(method, model)
            except pytest.skip.Exception:
                continue
            contract_inject(model, config, "x", case.inputs())
            perturb(model, scale=0.05, seed=1)
            first = dt.save(model, tmp_path / method / "one")
            perturb(model, scale=0.05, seed=2)
            second = dt.save(model, tmp_path / method / "two")
            y = out(model, case)
            live = loaded(first, case)
            y_first = out(live, case)
            assert_differs(y, y_first, method)
            before = pointers(live)
            hotswap(live, second, name="a")
            assert pointers(live) == before, method
            assert_rel_close(out(live, case), y, TOL, method)
            break
        else:
            pytest.fail(f"{method} adapts no model of the zoo")


def test_per_sample_batches_see_the_swap(tmp_path):
    one = saved(tmp_path, "one", dt.LoraConfig(rank=2, targets=TARGETS), seed=1)
    two = saved(tmp_path, "two", dt.LoraConfig(rank=2, alpha=5, targets=TARGETS), seed=2)
    other = saved(tmp_path, "other", dt.DoraConfig(rank=3, targets=TARGETS), seed=3)
    rows = ["a", "c", "__base__", "a"]

    def mixed(model):
        with torch.no_grad(), dt.per_sample(model, rows):
            return run(model, MLP.inputs())

    model = dt.load(loaded(one), other, name="c")
    prepare_hotswap(model)
    mixed(model)  # builds and caches the stacked weights
    hotswap(model, two, name="a")
    expected = mixed(dt.load(loaded(two), other, name="c"))
    assert_rel_close(mixed(model), expected, TOL, "per-sample rows after the swap")


# ---------------------------------------------------------------------------- compiled
def compiled(model):
    return torch.compile(model, backend="eager")


def no_recompile():
    return torch._dynamo.config.patch(error_on_recompile=True)


COMPILED = {
    "lora": (dt.LoraConfig(rank=4, alpha=8, targets=TARGETS),
             dt.LoraConfig(rank=6, alpha=3, rslora=True, dropout=0.2, targets=TARGETS), 8),
    "lora-same-config-unprepared": (dt.LoraConfig(rank=4, alpha=8, targets=TARGETS),
                                    dt.LoraConfig(rank=4, alpha=8, targets=TARGETS), None),
    "dora": (dt.DoraConfig(rank=4, alpha=8, targets=TARGETS),
             dt.DoraConfig(rank=2, alpha=3, targets=TARGETS), 4),
    "ia3": (dt.IA3Config(targets=TARGETS, feedforward=["blocks.0.2"]),
            dt.IA3Config(targets=TARGETS, feedforward=["blocks.0.2"]), None),
}


@pytest.mark.parametrize("kind", COMPILED, ids=list(COMPILED))
def test_compiled_model_does_not_recompile(tmp_path, kind):
    first, second, max_rank = COMPILED[kind]
    path_a, path_b = (saved(tmp_path, "one", first, seed=1),
                      saved(tmp_path, "two", second, seed=2))
    y_a, y_b = out(loaded(path_a)), out(loaded(path_b))
    assert_differs(y_b, y_a, kind)
    model = loaded(path_a)
    if max_rank is not None:
        prepare_hotswap(model, max_rank=max_rank)
    fast = compiled(model)
    assert_rel_close(out(fast), y_a, TOL, "compiled")
    with no_recompile():
        hotswap(fast, path_b, name="a")
        assert_rel_close(out(fast), y_b, TOL, "compiled, swapped")
        hotswap(fast, path_a, name="a")
        assert_rel_close(out(fast), y_a, TOL, "compiled, swapped back")


def test_the_recompile_detection_works(tmp_path):
    """Without prepare_hotswap, LoRA's scale is a Python float the graph guards on: a swap to
    another alpha is exact but recompiles — which the no-recompile check catches."""
    path_a = saved(tmp_path, "one", dt.LoraConfig(rank=4, alpha=8, targets=TARGETS), seed=1)
    path_b = saved(tmp_path, "two", dt.LoraConfig(rank=4, alpha=2, targets=TARGETS), seed=2)
    fast = compiled(loaded(path_a))
    out(fast)
    hotswap(fast, path_b, name="a")
    with no_recompile(), pytest.raises(torch._dynamo.exc.RecompileError):
        out(fast)
    assert_rel_close(out(fast), out(loaded(path_b)), TOL, "recompiled, still exact")


def test_compiled_llama_with_per_module_ranks(tmp_path):
    targets = ["attn.q", "attn.v", "ffn.down"]
    first = dt.LoraConfig(rank=4, alpha=8, targets=targets, overrides={"attn.v": {"rank": 2}})
    second = dt.LoraConfig(rank=6, alpha=3, targets=targets,
                           overrides={"ffn.down": {"rank": 8, "alpha": 4, "rslora": True}})
    path_a = saved(tmp_path, "one", first, seed=1, case=LLAMA)
    path_b = saved(tmp_path, "two", second, seed=2, case=LLAMA)
    y_b = out(loaded(path_b, LLAMA), LLAMA)
    model = loaded(path_a, LLAMA)
    prepare_hotswap(model, max_rank=8)
    fast = torch.compile(model, backend="aot_eager")
    assert_differs(out(fast, LLAMA), y_b, "before the swap")
    with no_recompile():
        hotswap(fast, path_b, name="a")
        assert_rel_close(out(fast, LLAMA), y_b, TOL, "compiled Llama, swapped")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cc") is None,
                    reason="inductor needs a C++ compiler (g++) on CPU")
def test_inductor_swap_without_recompile(tmp_path):
    path_a = saved(tmp_path, "one", dt.LoraConfig(rank=4, alpha=8, targets=TARGETS), seed=1)
    path_b = saved(tmp_path, "two", dt.DoraConfig(rank=2, targets=TARGETS), seed=2)
    path_c = saved(tmp_path, "three", dt.LoraConfig(rank=8, alpha=1, rslora=True,
                                                     targets=TARGETS), seed=3)
    model = loaded(path_a)
    prepare_hotswap(model, max_rank=8)
    fast = torch.compile(model)
    assert_rel_close(out(fast), out(loaded(path_a)), 1e-5, "inductor")
    with no_recompile():
        hotswap(fast, path_c, name="a")
        assert_rel_close(out(fast), out(loaded(path_c)), 1e-5, "inductor, swapped")
    with pytest.raises(dt.DeltaError, match="method"):
        hotswap(fast, path_b, name="a")


# ----------------------------------------------------------------------------- refusals
def lora(**kwargs):
    return dt.LoraConfig(**{"rank": 4, "targets": TARGETS, **kwargs})


REFUSALS = {  # swapped-in config, error, message
    "other targets": (lora(targets=["blocks.0.0"]), dt.ShapeMismatchError, "other modules"),
    "other method": (dt.IA3Config(targets=TARGETS), dt.ConfigError, "keeps the method"),
    "rank above the loaded one": (lora(rank=6), dt.ShapeMismatchError, "max_rank=6"),
    "bias differs": (lora(bias=True), dt.ConfigError, "bias=True"),
    "freeze_a differs": (lora(freeze_a=True), dt.ConfigError, "freeze_a"),
    "gate differs": (lora(gate=True), dt.ConfigError, "gate"),
}


@pytest.mark.parametrize("case", REFUSALS, ids=list(REFUSALS))
def test_refused_swaps_leave_the_model_untouched(tmp_path, case):
    config, error, message = REFUSALS[case]
    path = saved(tmp_path, "new", config, seed=2)
    model = loaded(saved(tmp_path, "old", lora(alpha=3), seed=1))
    if case != "rank above the loaded one":
        prepare_hotswap(model, max_rank=5)
    before = snapshot(model)
    with pytest.raises(error, match=message):
        hotswap(model, path, name="a")
    assert_untouched(model, before)


def test_other_refusals(tmp_path):
    path = saved(tmp_path, "new", lora(rank=2), seed=2)
    model = loaded(saved(tmp_path, "old", lora(overrides={"blocks.0.2": {"rank": 3}}), seed=1))
    before = snapshot(model)
    with pytest.raises(dt.ShapeMismatchError, match="one rank"):
        hotswap(model, path, name="a")  # ranks 4 and 3: not prepared
    with pytest.raises(dt.AdapterNameError, match="no adapter named 'b'"):
        hotswap(model, path, name="b")
    dt.load(model, path, name="b")
    before_two = snapshot(model)
    with pytest.raises(dt.AdapterNameError, match="name="):
        hotswap(model, path)
    assert_untouched(model, before_two)
    dt.delete(model, "b")
    assert_untouched(model, before)
    dt.merge(model, "a")
    with pytest.raises(dt.StateError, match="unmerge"):
        hotswap(model, path, name="a")
    dt.unmerge(model, "a")
    weights = path / "deltatune_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-9])
    with pytest.raises(dt.AdapterFileError, match="truncated"):
        hotswap(model, path, name="a")
    assert_rel_close(out(model), out(loaded(tmp_path / "old")), TOL, "after the refusals")


def test_prepare_refusals_change_nothing(tmp_path):
    model = MLP.build()
    dt.inject(model, lora(rank=4), name="a")
    dt.inject(model, lora(rank=2, init="pissa"), name="p")
    perturb(model)
    before = snapshot(model)
    with pytest.raises(dt.ConfigError, match="frozen copy"):
        prepare_hotswap(model, max_rank=6)  # "a" could be padded; "p" cannot: neither is
    with pytest.raises(dt.ConfigError, match="above max_rank=3"):
        prepare_hotswap(model, max_rank=3, names="a")
    with pytest.raises(dt.AdapterNameError):
        prepare_hotswap(model, names=["a", "nope"])
    with pytest.raises(dt.StateError, match="before torch.compile"):
        prepare_hotswap(compiled(model))
    assert_untouched(model, before)
    frozen = MLP.build()
    dt.inject(frozen, lora(freeze_a=True), name="a")
    with pytest.raises(dt.ConfigError, match="freeze_a"):
        prepare_hotswap(frozen, max_rank=6)
    prepare_hotswap(frozen)  # at its own rank: only the scale moves into a tensor
    assert all(layer.deltas["a"].scaling is not None for layer in delta_layers(frozen).values())


def test_subclasses_that_change_what_the_support_reads_get_the_default():
    assert swap_impl(LoraDelta) is LoraDelta and swap_impl(DoraDelta) is DoraDelta
    assert swap_impl(dt.get_method("ia3").delta_class).swappable == frozenset()

    class Changed(LoraDelta):
        def forward(self, x, y):
            return y

    assert swap_impl(Changed).swappable == frozenset()


def test_swap_from_memory(tmp_path):
    """``hotswap_tensors``: adapters kept in host memory, swapped without touching a file."""
    source = MLP.build()
    dt.inject(source, dt.LoraConfig(rank=2, alpha=6, targets=TARGETS), name="x")
    perturb(source, seed=3)
    tensors = {k: v.to(torch.float64) for k, v in adapter_tensors(source, "x").items()}
    model = loaded(saved(tmp_path, "one", lora(), seed=1))
    prepare_hotswap(model)
    hotswap_tensors(model, dt.adapters(source)["x"], tensors, source="the cache")
    assert_rel_close(out(model), out(source), TOL, "swapped from memory")
    del tensors["blocks.1.0.B"]
    before = snapshot(model)
    with pytest.raises(dt.AdapterFileError, match="the cache lacks tensor 'blocks.1.0.B'"):
        hotswap_tensors(model, dt.adapters(source)["x"], tensors, source="the cache")
    assert_untouched(model, before)
