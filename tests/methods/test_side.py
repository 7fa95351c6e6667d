"""Side networks (LST, QST) against a naive reference of the ladder equations, and the property
they exist for: training never back-propagates through the backbone."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import deltatune as dt
from deltatune.core.errors import ConfigError, StateError, TargetError
from deltatune.core.lifecycle import delta_layers
from deltatune.methods.side import LSTConfig, QSTConfig
from helpers import assert_differs, assert_rel_close, greedy_by_hand, perturb
from zoo import CASES_BY_NAME, run

LLAMA, GPT2, BERT = CASES_BY_NAME["llama"], CASES_BY_NAME["gpt2"], CASES_BY_NAME["bert"]
ACT = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "tanh": torch.tanh}
CONFIGS = {
    "lst": LSTConfig(),
    "lst-subset": LSTConfig(reduction=4, ffn_ratio=2.0, activation="relu", ladder_layers=[-1],
                            gate_init=0.3, temperature=0.5),
    "qst": QSTConfig(),
    "qst-lowrank": QSTConfig(downsample="lowrank", downsample_rank=3, reduction=8),
    "qst-avgpool": QSTConfig(downsample="avgpool", reduction=8),
    "qst-maxpool": QSTConfig(downsample="maxpool", reduction=4, activation="silu"),
}


# ----------------------------------------------------------------------------- reference
def layer_norm(x, w, b, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def naive_side(delta, hs, y):
    """The papers' equations, by hand: ``hs`` the tapped blocks' inputs, ``y`` the output
    module's base output."""
    p = {k: v.detach() for k, v in delta.named_parameters()}
    cfg, act = delta.config, ACT[delta.config.activation]
    kind = getattr(cfg, "downsample", "linear")
    ds = y.shape[-1] // cfg.reduction

    def down(k, h):
        if kind == "linear":
            return h @ p[f"down.{k}.proj.weight"].T + p[f"down.{k}.proj.bias"]
        if kind in ("avgpool", "maxpool"):
            groups = h.reshape(*h.shape[:-1], ds, cfg.reduction)
            return groups.mean(-1) if kind == "avgpool" else groups.max(-1).values
        z = h @ p[f"down.{k}.a.weight"].T
        z = (act(z) if kind == "adapter" else z) @ p[f"down.{k}.b.weight"].T
        return layer_norm(z, p[f"down.{k}.norm.weight"], p[f"down.{k}.norm.bias"])

    rungs = [*hs, y]
    s = down(0, rungs[0])
    for k in range(1, len(rungs)):
        mu = torch.sigmoid(p["gates"][k - 1] / cfg.temperature)
        z = mu * s + (1 - mu) * down(k, rungs[k])
        b = f"blocks.{k - 1}"
        hidden = act(layer_norm(z, p[f"{b}.norm.weight"], p[f"{b}.norm.bias"])
                     @ p[f"{b}.fc1.weight"].T + p[f"{b}.fc1.bias"])
        s = z + hidden @ p[f"{b}.fc2.weight"].T + p[f"{b}.fc2.bias"]
    u = layer_norm(s, p["norm.weight"], p["norm.bias"]) @ p["up.weight"].T + p["up.bias"]
    if "mix" in p:
        return p["mix"] * y + (1 - p["mix"]) * u
    return y + u


def capture(model, inputs, taps, out_path):
    """The base model's tapped inputs and the output module's output (adapters disabled)."""
    modules = dict(model.named_modules())
    seen, handles = {}, []

    def keep(key, value):
        seen.setdefault(key, value)

    for path in taps:
        handles.append(modules[path].register_forward_pre_hook(
            lambda m, a, kw, path=path: keep(path, a[0] if a else kw["hidden_states"]),
            with_kwargs=True))
    layer = delta_layers(model)[out_path]
    handles.append(layer.register_forward_hook(lambda m, a, o: keep("out", o)))
    with torch.no_grad():
        run(model, inputs)
    for handle in handles:
        handle.remove()
    return [seen[p] for p in taps], seen["out"]


def the_delta(model, name="a"):
    (path, layer), = delta_layers(model).items()
    return path, layer.deltas[name]


@pytest.mark.parametrize("variant", list(CONFIGS))
@pytest.mark.parametrize("case", [LLAMA, GPT2, BERT], ids=str)
def test_output_matches_the_naive_ladder(variant, case):
    model, inputs = case.build(), case.inputs()
    with torch.no_grad():
        y0 = run(model, inputs)
    dt.inject(model, CONFIGS[variant], name="a")
    with torch.no_grad():
        assert torch.equal(run(model, inputs), y0), "identity at init"
    perturb(model, scale=0.5)
    path, delta = the_delta(model)
    with dt.disabled(model):
        hs, y = capture(model, inputs, delta.taps, path)
    hs_on, out = capture(model, inputs, delta.taps, path)
    assert all(torch.equal(a, b) for a, b in zip(hs, hs_on, strict=True)), "backbone unchanged"
    assert_differs(out, y, f"{variant} on {case}")
    assert_rel_close(out, naive_side(delta, hs, y), 1e-5, f"{variant} ladder on {case}")


def test_placement_on_each_family():
    expect = {"llama": ("model.norm", "model.layers"),
              "gpt2": ("transformer.ln_f", "transformer.h"),
              "bert": ("bert.encoder.layer.1.output.LayerNorm", "bert.encoder.layer"),
              "t5": ("decoder.final_layer_norm", "decoder.block"), "vit": ("vit.layernorm", None)}
    for family, (out, blocks) in expect.items():
        model = CASES_BY_NAME[family].build()
        dt.inject(model, LSTConfig(), name="a")
        path, delta = the_delta(model)
        assert path == out
        assert len(delta.taps) == 2 and (blocks is None or delta.taps[0] == f"{blocks}.0")
    model = LLAMA.build()
    dt.inject(model, LSTConfig(targets=["norm"], ladder_layers=[-1, 0, 1]), name="a")
    assert the_delta(model)[1].taps == ("model.layers.0", "model.layers.1")


# ------------------------------------------------------------------- no backprop through it
def llama(layers=4, hidden=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=128, tie_word_embeddings=False)).train()


def saved_activation_bytes(model, ids):
    """Bytes autograd keeps for backward in one training forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    total = 0

    def pack(t):
        nonlocal total
        if t.untyped_storage().data_ptr() not in params:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return total


@pytest.mark.parametrize("variant", ["lst", "qst", "qst-avgpool"])
def test_the_backbone_records_no_graph_and_only_side_parameters_get_gradients(variant):
    model = llama()
    dt.inject(model, CONFIGS[variant], name="a")
    perturb(model, scale=0.3)
    outputs = []
    hooks = [block.register_forward_hook(lambda m, a, o: outputs.append(
        o[0] if isinstance(o, tuple) else o)) for block in model.model.layers]
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    for h in hooks:
        h.remove()
    assert len(outputs) == 4 and not any(o.requires_grad for o in outputs), \
        "a backbone block recorded an autograd graph"
    _, delta = the_delta(model)
    side = {id(p) for p in delta.parameters()}
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (id(p) in side), name
    assert all(p.grad.abs().sum() > 0 for p in delta.parameters())


def test_training_keeps_far_less_for_backward_than_lora():
    ids = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(0))
    saved = {}
    for name, config in [("lora", dt.LoraConfig(rank=8)), ("lst", LSTConfig()),
                         ("qst", QSTConfig(downsample="avgpool")), ("full", None)]:
        model = llama()
        if config is None:
            model.requires_grad_(True)
        else:
            dt.inject(model, config, name="a")
        saved[name] = saved_activation_bytes(model, ids)
    assert saved["lst"] < 0.5 * saved["lora"], saved
    assert saved["qst"] < saved["lst"], saved  # gradient-free downsamplers keep no h_k
    assert saved["lora"] <= saved["full"], saved


def test_training_reduces_the_loss_and_drops_the_graph():
    model = llama(layers=2, hidden=32)
    dt.inject(model, LSTConfig(reduction=4), name="a")
    _, delta = the_delta(model)
    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(3))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        assert delta._state is None, "a training forward must not keep the side graph"
    assert losses[-1] < losses[0] - 0.05, losses
    with torch.no_grad():
        model(input_ids=ids)
    assert delta._state is not None and not delta._state.requires_grad


# ----------------------------------------------------------------------------- life cycle
@pytest.mark.parametrize("variant", ["lst", "qst-maxpool"])
def test_save_load_round_trip_gives_identical_outputs(variant, tmp_path):
    model, inputs = LLAMA.build(), LLAMA.inputs()
    dt.inject(model, CONFIGS[variant], name="a")
    perturb(model, scale=0.5)
    with torch.no_grad():
        y1 = run(model, inputs)
    dt.save(model, tmp_path / "a")
    fresh = LLAMA.build()
    dt.load(fresh, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(run(fresh, inputs), y1)
    assert dt.adapters(fresh)["a"].taps == dt.adapters(model)["a"].taps


def test_sequence_classification_head():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)).eval()
    ids = torch.randint(1, 96, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y0 = model(input_ids=ids).logits
    dt.inject(model, QSTConfig(), name="a")
    assert not any(p.requires_grad for n, p in model.named_parameters() if "deltas" not in n)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, y0)
    perturb(model, scale=0.5)
    with torch.no_grad():
        assert_differs(model(input_ids=ids).logits, y0, "classifier logits")
    labels = torch.tensor([0, 2, 1])
    model.train()
    model(input_ids=ids, labels=labels).loss.backward()
    assert all(p.grad is not None for p in the_delta(model)[1].parameters())


def test_generate_with_a_kv_cache_equals_decoding_without_one():
    torch.manual_seed(0)
    model = LLAMA.build()
    dt.inject(model, LSTConfig(), name="a")
    perturb(model, scale=1.0)
    ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                         pad_token_id=0)
    assert torch.equal(out, greedy_by_hand(model, ids, mask, 5))
    with dt.disabled(model):
        plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5,
                               do_sample=False, pad_token_id=0)
    assert not torch.equal(out, plain), "the side network changes what is generated"


def pre_hooks(model):
    """Forward pre-hooks on the model's blocks (where the ladder taps)."""
    blocks = getattr(getattr(model, "transformer", None), "h", None) or model.model.layers
    return sum(len(block._forward_pre_hooks) for block in blocks)


def test_delete_and_unload_remove_the_tap_hooks():
    model = GPT2.build()
    before = pre_hooks(model)
    dt.inject(model, LSTConfig(), name="a")
    dt.inject(model, QSTConfig(), name="b")
    assert pre_hooks(model) == before + 2  # one per tapped block, shared by both
    dt.delete(model, "a")
    assert pre_hooks(model) == before + 2
    dt.delete(model, "b")
    assert pre_hooks(model) == before
    dt.inject(model, LSTConfig(), name="c")
    plain = dt.unload(model)
    assert pre_hooks(plain) == before


def test_trainable_count_formula_by_hand():
    model = LLAMA.build()  # d = 32, two blocks: three rungs
    for config, ds, extra in [(LSTConfig(), 4, 0), (LSTConfig(reduction=2, ffn_ratio=1.5), 16, 0),
                              (QSTConfig(downsample="linear"), 2, 32)]:
        d, m, rungs = 32, round(config.ffn_ratio * ds), 3
        down = d * ds + ds
        block = (2 * ds) + (ds * m + m) + (m * ds + ds)
        expected = rungs * down + (rungs - 1) * (1 + block) + 2 * ds + (ds * d + d) + extra
        assert dt.cost(model, config).params == expected
    model = LLAMA.build()
    dt.inject(model, QSTConfig(downsample="adapter", downsample_rank=5), name="a")
    ds = 2
    down = 32 * 5 + 5 * ds + 2 * ds
    expected = 3 * down + 2 * (1 + 2 * ds + 2 * ds * 8 + 8 + ds) + 2 * ds + ds * 32 + 32 + 32
    assert dt.summary(model).trainable_params == expected


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, match", [
    ({"reduction": 0}, "reduction"), ({"temperature": 0.0}, "temperature"),
    ({"ffn_ratio": -1.0}, "ffn_ratio"), ({"activation": "swish"}, "activation"),
    ({"gate_init": math.inf}, "gate_init"), ({"ladder_layers": []}, "ladder_layers"),
    ({"taps": [""]}, "taps"), ({"layers": [0]}, "ladder_layers"),
])
def test_bad_configs_are_clear_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LSTConfig(**kwargs)


def test_bad_qst_configs_are_clear_errors():
    with pytest.raises(ConfigError, match="downsample must be"):
        QSTConfig(downsample="conv")
    with pytest.raises(ConfigError, match="downsample_rank"):
        QSTConfig(downsample_rank=0)
    with pytest.raises(ConfigError, match="cannot be gated"):
        dt.inject(LLAMA.build(), LSTConfig(gate=True), name="a")


@pytest.mark.parametrize("config, match", [
    (LSTConfig(targets=["input_layernorm"]), "selects 2 such layers"),
    (LSTConfig(targets=["q_proj"]), "selects 0 such layers"),
    (LSTConfig(targets=["nothing_here"]), "matches no module"),
    (LSTConfig(ladder_layers=[5]), "out of range"),
    (LSTConfig(taps=["model.layers.7"]), "name no module"),
    (QSTConfig(downsample="avgpool", reduction=5), "not a multiple"),
    (LSTConfig(reduction=64), "below reduction"),
])
def test_bad_placements_are_clear_errors_and_leave_the_model_unchanged(config, match):
    model = LLAMA.build()
    with pytest.raises((TargetError, ConfigError), match=match):
        dt.inject(model, config, name="a")
    assert not delta_layers(model) and pre_hooks(model) == pre_hooks(LLAMA.build())


def test_an_output_inside_an_earlier_block_is_refused():
    with pytest.raises(TargetError, match="back-propagate"):
        dt.inject(BERT.build(), LSTConfig(targets=["bert.encoder.layer.0.output.LayerNorm"]),
                  name="a")
    with pytest.raises(TargetError, match="has none"):
        dt.inject(CASES_BY_NAME["norms"].build(), LSTConfig(), name="a")


def test_running_the_output_layer_alone_or_blocks_out_of_order_is_an_error():
    model, inputs = LLAMA.build(), LLAMA.inputs()
    dt.inject(model, LSTConfig(), name="a")
    path, delta = the_delta(model)
    layer = delta_layers(model)[path]
    with pytest.raises(StateError, match="has not seen this call's blocks"):
        layer(torch.randn(2, 9, 32))
    with pytest.raises(StateError, match="in order"):
        delta.on_tap("model.layers.1", torch.randn(2, 9, 32))
    with torch.no_grad():
        run(model, inputs)
    with pytest.raises(StateError, match="has not seen this call's blocks"):
        layer(torch.randn(3, 9, 32))  # another batch than the blocks saw
    with pytest.raises(StateError, match="width"):
        delta.on_tap("model.layers.0", torch.randn(2, 9, 16))


def test_loading_into_a_shallower_model_is_a_clear_error(tmp_path):
    model = llama(layers=4, hidden=64)
    dt.inject(model, LSTConfig(), name="a")
    dt.save(model, tmp_path / "a")
    shallow = llama(layers=2, hidden=64)
    with pytest.raises(TargetError, match="model.layers.2"):
        dt.load(shallow, tmp_path / "a")
    assert not delta_layers(shallow)


def test_composition_of_two_side_networks_is_their_sum():
    model, inputs = GPT2.build(), GPT2.inputs()
    dt.inject(model, LSTConfig(), name="a")
    dt.inject(model, QSTConfig(), name="b")
    perturb(model, scale=0.5)
    outs = {}
    for names in ([], ["a"], ["b"], ["a", "b"]):
        dt.activate(model, names)
        with torch.no_grad():
            outs[tuple(names)] = run(model, inputs)
    base = outs[()]
    # the heads are linear: logits add like the hidden states
    assert_rel_close(outs[("a", "b")] - base, (outs[("a",)] - base) + (outs[("b",)] - base),
                     1e-5, "a + b")
