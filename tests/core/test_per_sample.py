"""Per-sample deltas: every row of a batch with its own adapters (``dt.per_sample``,
``adapter_names=``, ``dt.generate``) equals running that row alone with its adapters active —
for LoRA (ranks, rsLoRA, bias, PiSSA), DoRA, IA3 (output and input scaling), generic-path methods
(SSF, sequential / parallel / gated adapters), several adapters per row and base rows, on tiny
Llama, GPT-2 (HF Conv1D) and an MLP; generate (greedy, beam search, num_return_sequences);
gradients; refusals that leave the model as it was; parity with peft's mixed batches."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core.delta import Delta
from deltatune.core.lifecycle import delta_layers
from deltatune.core.per_sample import BASE
from deltatune.core.selection import batched_impl
from helpers import assert_differs, assert_rel_close, perturb
from zoo import CASES_BY_NAME, output

TOL = 1e-5
MODELS = ("llama", "gpt2", "mlp")
#: Per model: a few layers, the FFN down projections, IA3's placement.
TARGETS = {
    "llama": {"sub": ["attn.q", "attn.v"], "down": ["ffn.down"],
              "ia3": ["attn.k", "attn.v", "ffn.down"]},
    "gpt2": {"sub": ["attn.qkv"], "down": ["ffn.down"], "ia3": ["attn.qkv", "ffn.down"]},
    "t5": {"sub": ["attn.q", "attn.v"], "down": ["ffn.down"], "ia3": ["attn.k", "ffn.down"]},
    "mlp": {"sub": ["blocks.0.0"], "down": ["blocks.0.2", "blocks.1.2"],
            "ia3": ["blocks.0.0", "blocks.0.2", "blocks.1.2"]},
}


def configs(model: str, kind: str) -> dict[str, dt.DeltaConfig]:
    t = TARGETS[model]
    hf = model != "mlp"
    if kind == "lora":
        return {"a": dt.LoraConfig(rank=2),
                "b": dt.LoraConfig(rank=4, alpha=3, rslora=True, bias=True),
                "c": dt.LoraConfig(rank=3, targets=t["sub"], init="pissa")}  # rank 2r
    if kind == "dora":
        return {"a": dt.DoraConfig(rank=2), "b": dt.DoraConfig(rank=3, alpha=5, rslora=True)}
    if kind == "ia3":
        return {"a": dt.IA3Config(targets=t["ia3"], feedforward=t["down"]),
                "b": dt.IA3Config(targets="all-linear")}
    if kind == "generic":
        sequential = dt.houlsby(bottleneck=3) if hf else \
            dt.AdapterConfig(targets=t["down"], bottleneck=3)
        parallel = dt.parallel_adapter(bottleneck=3) if hf else \
            dt.AdapterConfig(position="parallel", targets=t["down"], bottleneck=3)
        return {"a": dt.SSFConfig(), "b": sequential, "c": parallel,
                "d": dt.LoraConfig(rank=2, gate=True, targets=t["sub"])}
    if kind == "mixed":
        return {"a": dt.LoraConfig(rank=2), "b": dt.IA3Config(targets=t["ia3"],
                                                             feedforward=t["down"]),
                "c": dt.DoraConfig(rank=3, targets=t["sub"])}
    raise KeyError(kind)


ROWS = {
    "lora": ["a", BASE, "b", ["a", "c"], "c"],
    "dora": ["a", "b", BASE, ["a", "b"]],
    "ia3": ["a", "b", ["a", "b"], BASE],
    "generic": ["a", "b", ["b", "c"], "c", BASE, ["a", "d"], "d"],
    "mixed": ["a", "b", "c", ["a", "b", "c"], BASE],
}


def build(model: str, kind: str) -> nn.Module:
    m = CASES_BY_NAME[model].build()
    for name, config in configs(model, kind).items():
        dt.inject(m, config, name=name)
    perturb(m)
    return m


def inputs(model: str, rows: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(rows)
    if model == "mlp":
        return torch.randn(rows, 12, generator=g)
    return torch.randint(3, 96, (rows, 7), generator=g)


def call(m: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        if hasattr(m, "config"):  # Hugging Face
            return output(m(input_ids=x, **kwargs))
        return output(m(x, **kwargs))


def group(entry) -> list[str]:
    return [] if entry == BASE else [entry] if isinstance(entry, str) else list(entry)


def each_row(m: nn.Module, names, run, **activate) -> list:
    """``run(i)`` with row ``i``'s adapters activated, for every row; then every layer's
    activation as before (``dt.activate`` would not restore its per-layer order)."""
    before = {layer: layer.plan_state() for layer in delta_layers(m).values()}
    try:
        outs = []
        for i, entry in enumerate(names):
            dt.activate(m, group(entry), **activate)
            outs.append(run(i))
        return outs
    finally:
        for layer, state in before.items():
            layer.set_plan_state(state)


def row_by_row(m: nn.Module, x: torch.Tensor, names, **activate) -> torch.Tensor:
    """Each row alone, with its adapters activated (the definition of the per-sample result)."""
    return torch.cat(each_row(m, names, lambda i: call(m, x[i:i + 1]), **activate))


def snapshot(m: nn.Module, x: torch.Tensor) -> tuple:
    layers = {p: (layer.active, layer.combine) for p, layer in delta_layers(m).items()}
    return layers, call(m, x)


def assert_unchanged(m: nn.Module, x: torch.Tensor, before: tuple) -> None:
    layers, out = before
    assert {p: (layer.active, layer.combine) for p, layer in delta_layers(m).items()} == layers
    assert all(layer._mix is None for layer in delta_layers(m).values())
    state = m.__dict__["_deltatune_per_sample"]
    assert state.call is None and not state._tokens.items
    assert state.access._writer is None and not state.access._readers  # nothing held
    assert torch.equal(call(m, x), out)


# ------------------------------------------------------------------------------ equivalence
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("kind", list(ROWS))
def test_each_row_equals_running_it_alone_with_its_adapters(model, kind):
    m = build(model, kind)
    names = ROWS[kind]
    x = inputs(model, len(names))
    before = snapshot(m, x)
    with dt.per_sample(m, names):
        ours = call(m, x)
        assert any(layer._mix is not None for layer in delta_layers(m).values())
    expected = row_by_row(m, x, names)
    with dt.disabled(m):
        base = call(m, x)
    for i, entry in enumerate(names):  # not vacuous: every adapted row differs from the base
        if entry != BASE:
            assert_differs(expected[i], base[i], f"{kind}: row {i} ({entry})")
    assert_rel_close(ours, expected, TOL, f"{model}/{kind}: per-sample vs row by row")
    assert torch.equal(call(m, x, adapter_names=names), ours)  # the forward keyword
    assert_unchanged(m, x, before)


@pytest.mark.parametrize("model", ["conv", "embedding"])
def test_lora_on_conv_and_embedding_layers_takes_the_generic_path(model):
    case = CASES_BY_NAME[model]
    m = case.build()
    dt.inject(m, dt.LoraConfig(rank=2, targets=".*"), name="a")
    dt.inject(m, dt.LoraConfig(rank=3, targets=".*", bias=True), name="b")
    perturb(m)
    x = case.inputs()["x"]
    x = torch.cat([x, x[:1]])
    names = ["a", "b", BASE, ["a", "b"]][:x.shape[0]]
    assert_rel_close(call(m, x, adapter_names=names), row_by_row(m, x, names), TOL, model)


def test_bf16_rows_match_within_the_bf16_tolerance():
    m = build("llama", "mixed").to(torch.bfloat16)
    names = ROWS["mixed"]
    x = inputs("llama", len(names))
    ours = call(m, x, adapter_names=names)
    assert ours.dtype == torch.bfloat16
    assert_rel_close(ours, row_by_row(m, x, names), 2e-2, "bf16")


def test_one_adapter_for_every_row_is_the_usual_forward():
    m = build("llama", "lora")
    x = inputs("llama", 3)
    dt.activate(m, "a")
    alone = call(m, x)
    dt.activate(m, ["b"])
    with dt.per_sample(m, ["a", "a", "a"]):
        assert all(layer._mix is None for layer in delta_layers(m).values())
        assert dt.active_adapters(m) == ["a"]
        assert torch.equal(call(m, x), alone)
    assert dt.active_adapters(m) == ["b"]


def test_layers_where_every_row_agrees_take_the_fast_path():
    m = CASES_BY_NAME["llama"].build()
    dt.inject(m, dt.LoraConfig(rank=2), name="a")
    dt.inject(m, dt.LoraConfig(rank=2, targets=["attn.v"]), name="b")
    perturb(m)
    names = ["a", ["a", "b"]]
    x = inputs("llama", 2)
    with dt.per_sample(m, names):
        mixed = {p for p, layer in delta_layers(m).items() if layer._mix is not None}
        ours = call(m, x)
    assert mixed == {p for p, layer in delta_layers(m).items() if "b" in layer.deltas}
    assert_rel_close(ours, row_by_row(m, x, names), TOL, "partly mixed")


def test_a_delta_every_row_shares_runs_without_gathers():
    m = build("llama", "mixed")
    names = [["b", "a"], ["b", "c"], ["b"]]  # IA3 "b" on every row, LoRA / DoRA per row
    x = inputs("llama", 3)
    with dt.per_sample(m, names):
        impls = {impl.__name__ for layer in delta_layers(m).values() if layer._mix is not None
                 for step in layer._mix.steps for impl, *_ in step}
        ours = call(m, x)
    assert "_Same" in impls and "LoraDelta" in impls
    assert_rel_close(ours, row_by_row(m, x, names), TOL, "shared + per-row")


def test_batches_of_k_times_the_rows_map_back_to_each_row():
    m = build("llama", "lora")
    names = ["a", BASE, "b"]
    x = inputs("llama", 3)
    with dt.per_sample(m, names):
        ours = call(m, x.repeat_interleave(2, 0))
    assert_rel_close(ours, row_by_row(m, x, names).repeat_interleave(2, 0), TOL, "k·B rows")


def test_disabled_inside_gives_the_base_and_outputs_follow_parameter_changes():
    m = build("llama", "lora")
    names = ["a", "b", BASE]
    x = inputs("llama", 3)
    with dt.disabled(m):
        base = call(m, x)
    with dt.per_sample(m, names):
        first = call(m, x)
        with dt.disabled(m):
            assert torch.equal(call(m, x), base)
    with torch.no_grad():  # an in-place update: the cached stacks must be rebuilt
        for layer in delta_layers(m).values():
            layer.deltas["a"].B.mul_(3)
    after = call(m, x, adapter_names=names)
    assert_differs(after[0], first[0], "updated adapter")
    assert torch.equal(after[1], first[1])
    assert_rel_close(after, row_by_row(m, x, names), TOL, "after an in-place update")


def test_several_names_in_stack_mode_apply_in_the_given_order():
    m = build("mlp", "dora")  # two DoRAs on one layer: "sum" and "stack" differ
    dt.activate(m, ["a", "b"], combine="stack")
    names = [["a", "b"], ["b", "a"], "b", BASE]
    x = inputs("mlp", 4)
    with dt.per_sample(m, names):
        ours = call(m, x)
    expected = row_by_row(m, x, names, combine="stack")
    assert_differs(expected[0], row_by_row(m, x[:1], [["a", "b"]]), "stack differs from sum")
    assert_differs(expected[0], row_by_row(m, x[:1], [["b", "a"]], combine="stack"), "order")
    assert_rel_close(ours, expected, TOL, "stacked")


def test_equal_weight_form_and_tokens_form_deltas_may_join_differing_ones():
    m = build("mlp", "lora")
    dt.inject(m, dt.BitFitConfig(), name="bias")
    perturb(m, "bias")
    names = [["bias", "a"], ["bias", "b"], ["bias"]]
    x = inputs("mlp", 3)
    assert_rel_close(call(m, x, adapter_names=names), row_by_row(m, x, names), TOL, "bitfit")
    llama = build("llama", "lora")
    dt.inject(llama, dt.PromptConfig(num_tokens=3, init="random"), name="p")
    names = [["p", "a"], ["p", "b"], ["p"]]
    ids = inputs("llama", 3)
    ours = call(llama, ids, adapter_names=names)
    assert ours.shape[1] == ids.shape[1] + 3
    assert_rel_close(ours, row_by_row(llama, ids, names), TOL, "prompt")


def test_methods_that_change_what_lora_computes_take_the_generic_path():
    registered = {name: dt.get_method(name).delta_class for name in dt.methods()}
    assert batched_impl(registered["lora"]) is registered["lora"]
    assert batched_impl(registered["dora"]) is registered["dora"]
    assert batched_impl(registered["ia3"]) is registered["ia3"]
    assert batched_impl(registered["lora_ga"]) is registered["lora"]  # only its init differs
    for name in ("adalora", "dylora", "increlora", "dynamic_rank", "ssf", "adapter"):
        assert batched_impl(registered[name]) is Delta, name


def test_gradients_equal_the_sum_of_the_rows_gradients():
    m = build("llama", "mixed")
    names = ["a", "b", ["a", "c"], BASE]
    x = inputs("llama", 4)
    params = [p for p in m.parameters() if p.requires_grad]
    out = output(m(input_ids=x, adapter_names=names))
    ours = torch.autograd.grad(out.square().mean(1).sum(), params)
    expected = [torch.zeros_like(p) for p in params]
    for i, entry in enumerate(names):
        if entry == BASE:
            continue  # nothing trainable takes part
        dt.activate(m, group(entry))
        row = output(m(input_ids=x[i:i + 1])).square().mean(1).sum()
        for acc, g in zip(expected, torch.autograd.grad(row, params, allow_unused=True),
                          strict=True):
            if g is not None:
                acc += g
    assert any(g.abs().sum() > 0 for g in ours)
    for g, e in zip(ours, expected, strict=True):
        assert_rel_close(g, e, 1e-4, "gradient")


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_nothing_cached_in_inference_mode_leaks_into_autograd(kind):
    m = build("llama", kind)
    x = inputs("llama", 2)
    with torch.inference_mode():
        m(input_ids=x, adapter_names=["a", "b"])
    with torch.no_grad():
        m(input_ids=x, adapter_names=["a", "b"])
    output(m(input_ids=x, adapter_names=["a", "b"])).sum().backward()


def test_training_with_dropout_runs_each_adapter_on_its_rows():
    m = CASES_BY_NAME["llama"].build().train()
    for name in ("a", "b"):
        dt.inject(m, dt.LoraConfig(rank=2, dropout=0.5), name=name)
    perturb(m)
    x = inputs("llama", 3)
    torch.manual_seed(0)
    out = output(m(input_ids=x, adapter_names=["a", "b", BASE]))
    out.square().mean().backward()
    grads = {n: [p.grad for p in m.parameters() if p.requires_grad and f".{n}." in n]
             for n in ("a", "b")}
    assert all(g is not None and g.abs().sum() > 0 for n in grads for g in grads[n])
    with dt.disabled(m):  # the same batch: multi-threaded BLAS is not batch-size invariant
        assert torch.equal(out[2], output(m(input_ids=x)).detach()[2])


# ------------------------------------------------------------------------------- generate
def generate_rows(m, ids, names, **kwargs):
    return each_row(m, names, lambda i: m.generate(
        ids[i:i + 1], attention_mask=torch.ones_like(ids[i:i + 1]), **kwargs))


@pytest.mark.parametrize("model", ["llama", "gpt2", "t5"])
@pytest.mark.parametrize("search", [
    {"do_sample": False},
    {"do_sample": False, "num_beams": 2},
    {"do_sample": False, "num_beams": 2, "num_return_sequences": 2},
])
def test_generate_with_mixed_adapters_equals_per_row_generation(model, search):
    m = build(model, "lora")
    names = ["a", BASE, ["a", "c"], "b"]
    ids = inputs(model, len(names))
    kwargs = {"max_new_tokens": 4, "min_new_tokens": 4, "pad_token_id": 0, **search}
    with torch.no_grad():
        ours = dt.generate(m, ids, attention_mask=torch.ones_like(ids), adapter_names=names,
                           **kwargs)
        with dt.per_sample(m, names):
            assert torch.equal(m.generate(ids, attention_mask=torch.ones_like(ids), **kwargs),
                               ours)
        rows = generate_rows(m, ids, names, **kwargs)
        base = generate_rows(m, ids, [BASE] * len(names), **kwargs)
    assert torch.equal(ours, torch.cat(rows))
    assert torch.equal(rows[1], base[1])
    assert any(not torch.equal(r, b) for r, b in zip(rows, base, strict=True))  # not vacuous


# ------------------------------------------------------------------------------- refusals
def refused(m, x, names, error, match):
    before = snapshot(m, x)
    with pytest.raises(error, match=match), dt.per_sample(m, names):
        call(m, x)
    assert_unchanged(m, x, before)
    with pytest.raises(error, match=match):
        call(m, x, adapter_names=names)
    assert_unchanged(m, x, before)


def test_unknown_or_malformed_names_are_refused():
    m = build("mlp", "lora")
    x = inputs("mlp", 2)
    refused(m, x, ["a", "nope"], dt.AdapterNameError, "no adapter named 'nope'")
    refused(m, x, ["a", [BASE, "b"]], dt.AdapterNameError, "cannot be combined")
    refused(m, x, ["a", ["b", "b"]], dt.AdapterNameError, "duplicate")
    refused(m, x, ["a", 3], dt.AdapterNameError, "entry must be")
    for bad in ("a", []):
        with pytest.raises(dt.AdapterNameError, match="non-empty list"):
            call(m, x, adapter_names=bad)


def test_a_wrong_number_of_names_is_refused():
    m = build("mlp", "lora")
    x = inputs("mlp", 4)
    before = snapshot(m, x)
    with pytest.raises(dt.AdapterNameError, match="3 entries for a batch of 4"):
        call(m, x, adapter_names=["a", "b", BASE])
    with pytest.raises(dt.AdapterNameError, match="4 rows for 3 per-sample"), \
            dt.per_sample(m, ["a", "b", BASE]):
        call(m, x)
    assert_unchanged(m, x, before)


def test_merged_weighted_and_nested_are_refused():
    m = build("mlp", "lora")
    x = inputs("mlp", 2)
    dt.merge(m, "a")
    refused(m, x, ["a", "b"], dt.StateError, "unmerge them first")
    dt.unmerge(m)
    dt.activate(m, ["a", "b"], weights=[0.5, 0.5])
    refused(m, x, ["a", "b"], dt.StateError, "combined with weights")
    dt.activate(m, ["a"])
    before = snapshot(m, x)
    with dt.per_sample(m, ["a", "b"]):
        with pytest.raises(dt.StateError, match="already open"):
            call(m, x, adapter_names=["b", "a"])
        with pytest.raises(dt.StateError, match="already open"), dt.per_sample(m, ["b", "a"]):
            pass
    assert_unchanged(m, x, before)


def test_weight_and_tokens_form_deltas_that_differ_between_rows_are_refused():
    m = build("mlp", "lora")
    dt.inject(m, dt.BitFitConfig(), name="bias")
    perturb(m, "bias")
    refused(m, inputs("mlp", 2), ["bias", "a"], dt.StateError,
            r"weight-form deltas \(\['bitfit'\]\)")
    llama = build("llama", "lora")
    dt.inject(llama, dt.PromptConfig(num_tokens=3, init="random"), name="p")
    refused(llama, inputs("llama", 2), [["p", "a"], "a"], dt.StateError,
            r"tokens-form deltas \(\['prompt'\]\)")


# ------------------------------------------------------------------------------- lifecycle
def test_hooks_follow_the_model_through_deepcopy_and_unload():
    m = build("mlp", "lora")
    names = ["a", "b"]
    x = inputs("mlp", 2)
    expected = call(m, x, adapter_names=names)
    twin = copy.deepcopy(m)
    with torch.no_grad():
        for layer in delta_layers(twin).values():
            layer.deltas["a"].A.mul_(2)
    assert torch.equal(call(m, x, adapter_names=names), expected)
    assert_rel_close(call(twin, x, adapter_names=names), row_by_row(twin, x, names), TOL, "copy")
    dt.unload(twin)
    assert not twin._forward_pre_hooks and not twin._forward_hooks
    assert "_deltatune_per_sample" not in twin.__dict__
    assert torch.equal(call(m, x, adapter_names=names), expected)
    dt.delete(m, "a")
    dt.delete(m, "b")
    dt.delete(m, "c")
    assert not m._forward_pre_hooks and not m._forward_hooks


# ------------------------------------------------------------------------------- HF peft
def test_parity_with_peft_mixed_batches():
    peft = pytest.importorskip("peft")
    case = CASES_BY_NAME["llama"]
    ours = case.build()
    dt.inject(ours, dt.LoraConfig(rank=2, alpha=4), name="a")
    dt.inject(ours, dt.LoraConfig(rank=4, alpha=2), name="b")
    perturb(ours)
    theirs = peft.get_peft_model(case.build(), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules="all-linear"), adapter_name="a")
    theirs.add_adapter("b", peft.LoraConfig(r=4, lora_alpha=2, target_modules="all-linear"))
    params = dict(ours.named_parameters())
    copied = 0
    with torch.no_grad():
        for path, module in theirs.named_modules():
            if hasattr(module, "lora_A") and "a" in getattr(module, "lora_A", {}):
                own = path.removeprefix("base_model.model.")
                for name in ("a", "b"):
                    module.lora_A[name].weight.copy_(params[f"{own}.deltas.{name}.A"])
                    module.lora_B[name].weight.copy_(params[f"{own}.deltas.{name}.B"])
                copied += 1
    assert copied == 14
    theirs.eval()
    names = ["a", "__base__", "b", "a"]
    x = inputs("llama", 4)
    expected = call(theirs, x, adapter_names=names)
    with dt.disabled(ours):
        assert_differs(expected, call(ours, x), "peft's adapters")
    assert_rel_close(call(ours, x, adapter_names=names), expected, TOL, "ours vs peft")


def test_mixed_batch_gradients_do_not_depend_on_input_recipes(monkeypatch):
    """Rows choosing different deltas run inside ``core.recompute``'s context too: the same
    gradients, bit for bit, as with every layer's input kept."""
    from deltatune.core import recompute
    from deltatune.core.recompute import saving_inputs

    used = [0]
    get = recompute._Recipe.get
    monkeypatch.setattr(recompute._Recipe, "get",
                        lambda self: used.__setitem__(0, used[0] + 1) or get(self))
    m = build("llama", "mixed")
    names = ["a", "b", ["a", "c"], BASE]
    x = inputs("llama", 4)
    params = [p for p in m.parameters() if p.requires_grad]
    runs = []
    for saving in (False, True):
        with saving_inputs() if saving else contextlib.nullcontext():
            out = output(m(input_ids=x, adapter_names=names))
            runs.append(torch.autograd.grad(out.square().mean(1).sum(), params))
    assert used[0] > 0, "no input was recomputed: the test would compare nothing"
    assert any(g.abs().sum() > 0 for g in runs[0])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
