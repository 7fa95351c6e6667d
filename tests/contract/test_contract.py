"""The contract every registered method keeps, on every architecture it can adapt.

Parametrized over ``deltatune.methods()`` × the tiny architecture zoo: registering a method is
enough for it to be tested here. Which checks apply is read from the method's declared
capabilities (``mergeable``, ``identity_at_init``, ``composition``, ``layer_kinds``,
``tolerance``), never from its name. Gradient checks: ``test_gradients.py``.
"""

from __future__ import annotations

import json

import pytest
import torch

import deltatune as dt
from deltatune.core.delta import Delta
from deltatune.core.lifecycle import delta_layers
from deltatune.core.targeting import Matcher, module_config, resolve_targets
from helpers import (
    adaptable,
    assert_differs,
    assert_rel_close,
    base_tensors,
    delta_params,
    no_deltatune_modules,
    perturb,
    rel_err,
)
from zoo import CASES, output, run


class Variant(str):
    """A method name plus one of its declared example configs (``Delta.examples``)."""

    def __new__(cls, method: str, index: int):
        self = super().__new__(cls, method)
        self.kwargs = dict(dt.get_method(method).delta_class.examples[index])
        self.label = method if index == 0 else f"{method}{index}"
        return self


#: Noise added to every delta parameter so that deltas are not at their (often identity) init:
#: large enough to change outputs clearly, small enough to keep ΔW on the scale of W.
PERTURB = 0.05

#: Where a method's further examples run: one model per layer kind (Linear, conv, norm,
#: embedding, HF Conv1D); its default config runs on every model of the zoo.
EXAMPLE_CASES = frozenset({"mlp", "conv", "norms", "embedding", "gpt2"})

PAIRS = [(Variant(m, i), c) for m in dt.methods()
         for i in range(len(dt.get_method(m).delta_class.examples)) for c in CASES
         if dt.get_method(m).delta_class.layer_kinds & c.kinds
         and (i == 0 or c.name in EXAMPLE_CASES)]


@pytest.fixture(params=PAIRS, ids=[f"{m.label}-{c.name}" for m, c in PAIRS])
def pair(request):
    return request.param


def delta_class(method: str) -> type[Delta]:
    return dt.get_method(method).delta_class


def mergeable(method: str) -> bool:
    """The declared capability, for this example's config (a gated delta never merges)."""
    cls = delta_class(method)
    return cls.can_merge(cls.config_class(**getattr(method, "kwargs", {})))


def tolerance(method: str, dtype: torch.dtype = torch.float32) -> float:
    cls = delta_class(method)
    return cls.tolerance_for(cls.config_class(**getattr(method, "kwargs", {})))[dtype]


def make_config(method: str, model, **kwargs):
    """The method's example config on every module of ``model`` it can adapt (or on its
    default targets, for methods placed at one position: a prompt, a prefix per attention)."""
    cls = delta_class(method)
    variant = getattr(method, "kwargs", {})

    def build(targets):  # model-level fields (prefix tuning's attention geometry) filled in
        return cls.complete(model, cls.config_class(targets=targets, **variant, **kwargs))

    try:
        build(None)
    except dt.TargetError as exc:
        pytest.skip(f"{method} does not apply to this model: {exc}")
    probe = cls.config_class(targets=["_"], **variant, **kwargs)  # for the per-module check
    targets = adaptable(model, cls.layer_kinds, lambda m, info: cls.accepts(m, info, probe))
    if targets:
        try:  # methods placed at one model-level position refuse a broad selection
            return build(targets)
        except dt.TargetError:
            pass
    try:
        config = build(cls.default_targets)
        resolve_targets(model, config, cls.layer_kinds, cls.default_targets, method,
                        cls.accepts)
        return config
    except dt.TargetError:
        pytest.skip(f"{method.label if hasattr(method, 'label') else method} adapts no module "
                    "of this model")


def inject(model, config, name, inputs):
    """``dt.inject``; a method that initialises from data (``Delta.calibration``) calibrates on
    the test inputs, with the mean square of the model output as the loss."""
    if not delta_class(config.method).calibration:
        return dt.inject(model, config, name=name)
    batch = inputs["x"] if set(inputs) == {"x"} else inputs
    return dt.inject(model, config, name=name, data=[batch],
                     loss_fn=lambda out, _: output(out).float().pow(2).mean())


def adapted(method, case, dtype=torch.float32, name="a", seed=0):
    """(model with one perturbed delta, inputs, base output, adapted output)."""
    model = case.build(seed=seed, dtype=dtype)
    inputs = case.inputs(dtype)
    with torch.no_grad():
        y0 = run(model, inputs)
    inject(model, make_config(method, model), name, inputs)
    perturb(model, scale=PERTURB)
    with torch.no_grad():
        y1 = run(model, inputs)
    assert_differs(comparable(y1, y0), y0, f"{method} on {case}")
    return model, inputs, y0, y1


def comparable(y, y0):
    """``y`` cut to ``y0``'s positions: soft input tokens (prompt tuning) come first."""
    if y.dim() >= 2 and y0.dim() >= 2 and y.shape[1] > y0.shape[1]:
        return y[:, y.shape[1] - y0.shape[1]:]
    return y


def weights(model) -> dict[str, torch.Tensor]:
    """Every own parameter of the adapted base layers (weights and biases, created ones too)."""
    return {f"{path}.{key}": p.detach().clone() for path, layer in delta_layers(model).items()
            for key, p in layer.base_layer.named_parameters(recurse=False)}


# ------------------------------------------------------------------------------------ tests
def test_identity_at_init(pair):
    method, case = pair
    if not delta_class(method).identity_at_init:
        pytest.skip(f"{method} declares identity_at_init=False")
    model = case.build()
    inputs = case.inputs()
    with torch.no_grad():
        y0 = run(model, inputs)
    inject(model, make_config(method, model), "a", inputs)
    with torch.no_grad():
        y1 = run(model, inputs)
    assert_rel_close(y1, y0, tolerance(method, torch.float32), "identity at init")


def test_training_changes_only_delta_params(pair):
    method, case = pair
    model = case.build()
    model.train()
    inputs = case.inputs()
    inject(model, make_config(method, model), "a", inputs)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == set(delta_params(model)), "exactly the delta parameters must train"
    before_base = base_tensors(model)
    before_delta = {k: p.detach().clone() for k, p in delta_params(model).items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = run(model, inputs).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    after_base = base_tensors(model)
    assert before_base.keys() == after_base.keys()
    for key, value in before_base.items():
        assert torch.equal(value, after_base[key]), f"base tensor {key} changed"
    for key, p in delta_params(model).items():
        assert not torch.equal(before_delta[key], p), "a delta parameter did not train"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_merged_equals_unmerged(pair, dtype):
    method, case = pair
    if not mergeable(method):
        pytest.skip(f"{method} declares mergeable=False (or is gated)")
    model, inputs, _, y_unmerged = adapted(method, case, dtype)
    w_before = weights(model)
    dt.merge(model)
    assert dt.merged_adapters(model) == ["a"]
    changed = [p for p, w in weights(model).items()
               if p not in w_before or not torch.equal(w, w_before[p])]
    assert changed, "merge wrote nothing"
    with torch.no_grad():
        y_merged = run(model, inputs)
    assert_rel_close(y_merged, y_unmerged, tolerance(method, dtype), f"merged vs unmerged {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_unmerge_restores_base_weights(pair, dtype):
    method, case = pair
    if not mergeable(method):
        pytest.skip(f"{method} declares mergeable=False (or is gated)")
    model, inputs, _, y1 = adapted(method, case, dtype)
    before = base_tensors(model)
    dt.merge(model)
    merged = base_tensors(model)
    dt.unmerge(model)
    assert dt.merged_adapters(model) == []
    after = base_tensors(model)
    assert before.keys() == after.keys(), "unmerge must remove parameters the merge created"
    for key, value in before.items():
        # Rounding happens on W + ΔW, so the error is bounded relative to the merged weight.
        err = (after[key].double() - value.double()).norm() \
            / merged[key].double().norm().clamp_min(1e-12)
        assert err <= tolerance(method, dtype), f"restored {key}: relative error {err:.2e}"
    with torch.no_grad():
        assert_rel_close(run(model, inputs), y1, tolerance(method, dtype), "output after unmerge")


def test_merge_twice_is_merge_once(pair):
    method, case = pair
    if not mergeable(method):
        pytest.skip(f"{method} declares mergeable=False (or is gated)")
    model, _, _, _ = adapted(method, case)
    dt.merge(model)
    once = base_tensors(model)
    dt.merge(model)
    dt.merge(model, "a")
    twice = base_tensors(model)
    assert all(torch.equal(once[k], twice[k]) for k in once)
    assert dt.merged_adapters(model) == ["a"]


def test_unload_merge_gives_plain_model(pair):
    method, case = pair
    if not mergeable(method):
        pytest.skip(f"{method} declares mergeable=False (or is gated)")
    model, inputs, _, y1 = adapted(method, case)
    targets = list(delta_layers(model))
    plain = dt.unload(model, merge=True)
    assert no_deltatune_modules(plain)
    extra = set(plain.state_dict()) - set(case.build().state_dict())
    assert extra <= {f"{t}.bias" for t in targets}, "only a merged bias delta may add keys"
    assert set(case.build().state_dict()) <= set(plain.state_dict()), "not the base's layout"
    with torch.no_grad():
        assert_rel_close(run(plain, inputs), y1, tolerance(method, torch.float32), "unloaded")


def test_unload_without_merge_gives_base_model(pair):
    method, case = pair
    model, inputs, y0, _ = adapted(method, case)
    if mergeable(method):
        dt.merge(model)
    plain = dt.unload(model)
    assert no_deltatune_modules(plain)
    fresh = case.build()
    assert set(plain.state_dict()) == set(fresh.state_dict())
    with torch.no_grad():
        assert_rel_close(run(plain, inputs), y0, tolerance(method, torch.float32),
                         "unload(merge=False) output")


def test_save_load_into_fresh_base(pair, tmp_path):
    method, case = pair
    model, inputs, _, y1 = adapted(method, case)
    dt.save(model, tmp_path / "a")
    fresh = case.build(seed=0)
    dt.load(fresh, tmp_path / "a")
    assert dt.adapters(fresh).keys() == {"a"} and dt.active_adapters(fresh) == ["a"]
    assert not any(p.requires_grad for p in fresh.parameters()), "loaded deltas default frozen"
    with torch.no_grad():
        assert_rel_close(run(fresh, inputs), y1, tolerance(method, torch.float32),
                         "reloaded")


def test_disabled_gives_base_output(pair):
    method, case = pair
    model, inputs, y0, y1 = adapted(method, case)
    with dt.disabled(model), torch.no_grad():
        assert torch.equal(run(model, inputs), y0)
    with torch.no_grad():
        assert torch.equal(run(model, inputs), y1), "disabled() must restore the deltas on exit"


def test_two_deltas_compose_as_declared(pair):
    method, case = pair
    cls = delta_class(method)
    model = case.build()
    inputs = case.inputs()
    config = make_config(method, model)
    inject(model, config, "a", inputs)
    inject(model, config, "b", inputs)
    perturb(model, "a", seed=1, scale=PERTURB)
    perturb(model, "b", seed=2, scale=PERTURB)
    if cls.composition == "concat":  # tokens: a's then b's, one longer sequence
        outs = {}
        for names in ([], ["a"], ["b"], ["a", "b"]):
            dt.activate(model, names)
            with torch.no_grad():
                outs[tuple(names)] = run(model, inputs)
        ab = outs[("a", "b")]
        for other in (("a",), ("b",)):
            assert_differs(comparable(ab, outs[other]), comparable(outs[other], ab),
                           f"{other} vs a+b")
        n = {name: next(d.num_tokens for layer in delta_layers(model).values()
                        for k, d in layer.deltas.items() if k == name) for name in "ab"}
        base, a_only = outs[()], outs[("a",)]
        if a_only.shape != base.shape:  # the output keeps every soft position (decoder-only)
            assert ab.shape[1] == a_only.shape[1] + n["b"] == base.shape[1] + n["a"] + n["b"]
        return
    path, layer = next(iter(delta_layers(model).items()))
    seen = {}
    hook = layer.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        run(model, inputs)
    hook.remove()
    x = seen["x"]

    def layer_out(names):
        dt.activate(model, names)
        with torch.no_grad():
            return layer(x)

    y0, ya, yb, yab = layer_out([]), layer_out(["a"]), layer_out(["b"]), layer_out(["a", "b"])
    assert_differs(ya, y0, "delta a")
    assert_differs(yb, y0, "delta b")
    tol = tolerance(method, torch.float32)
    if cls.composition == "add":
        assert_rel_close(yab - y0, (ya - y0) + (yb - y0), tol, f"additive composition ({path})")
    elif cls.composition == "scale":
        assert_rel_close(yab * y0, ya * yb, tol, f"multiplicative composition ({path})")
    elif cls.composition == "affine":  # b's map applied to a's output: γb ⊙ (γa ⊙ y + βa) + βb
        assert_rel_close(yab, layer.deltas["b"].forward(x, ya), tol,
                         f"affine composition ({path})")
    else:
        pytest.fail(f"unknown composition {cls.composition!r}")
    if mergeable(method) and cls.merges_first:  # each folds the whole weight: not both
        with pytest.raises(dt.MergeError, match="must merge first"):
            dt.merge(model)
    elif mergeable(method):
        dt.merge(model)
        with torch.no_grad():
            assert_rel_close(layer(x), yab, tol, "both deltas merged")


def test_trainable_count_matches_formula(pair):
    method, case = pair
    cls = delta_class(method)
    model = case.build()
    config = make_config(method, model)
    predicted = dt.cost(model, config)
    matcher = Matcher(model)
    targets = resolve_targets(model, config, cls.layer_kinds, cls.default_targets, method,
                              cls.accepts)
    formula = sum(cls.trainable_count(info, module_config(matcher, config, p))
                  for p, info in targets.items())
    formula += cls.num_shared(config, targets)
    inject(model, config, "a", case.inputs())
    counted = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counted == formula == predicted.params == dt.summary(model).trainable_params
    assert predicted.modules == len(targets) == len(delta_layers(model))


def test_config_json_round_trip(pair):
    method, case = pair
    config = make_config(method, case.build())
    text = json.dumps(config.to_dict())
    again = dt.config_from_dict(json.loads(text))
    assert again == config and type(again) is type(config)
    assert json.loads(text)["method"] == method


def test_every_method_declares_examples_that_build():
    for method in dt.methods():
        cls = delta_class(method)
        assert cls.examples and cls.examples[0] == {}, f"{method}: examples[0] is the default"
        for kwargs in cls.examples:
            cls.config_class(**kwargs)


def test_errors_leave_model_unchanged_on_bad_target(pair):
    method, case = pair
    model, inputs, _, y1 = adapted(method, case)
    cls = delta_class(method).config_class
    with pytest.raises(dt.TargetError):
        dt.inject(model, cls(targets=["no_such_module_xyz"]), name="b")
    assert list(dt.adapters(model)) == ["a"]
    with torch.no_grad():
        assert torch.equal(run(model, inputs), y1)


def test_relative_error_helper_is_not_vacuous():
    a = torch.ones(4)
    assert rel_err(a, a) == 0 and rel_err(a * 2, a) == pytest.approx(1.0)
