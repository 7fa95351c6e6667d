"""Targeting: suffix lists, full-match regexes, "all-linear", layers=, exclude=, structure maps,
per-module overrides, and the errors for targets that match nothing usable."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core.lifecycle import delta_layers
from deltatune.core.structures import StructureMap
from deltatune.core.targeting import Matcher, find_block_lists
from zoo import FAMILIES, MLP, ConvNet


def adapted(model, **config):
    dt.inject(model, dt.LoraConfig(rank=2, **config), name="a")
    return list(delta_layers(model))


def test_list_entries_match_whole_dotted_suffixes():
    model = FAMILIES["llama"]()
    assert adapted(model, targets=["self_attn.q_proj"]) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    with pytest.raises(dt.TargetError, match="'proj' matches no module.*Close names"):
        dt.inject(FAMILIES["llama"](), dt.LoraConfig(targets=["proj"]), name="b")
    full = adapted(FAMILIES["llama"](), targets=["model.layers.1.mlp.down_proj"])
    assert full == ["model.layers.1.mlp.down_proj"]


def test_a_string_is_a_full_match_regex():
    with pytest.raises(dt.TargetError, match="must match the whole name"):
        dt.inject(FAMILIES["llama"](), dt.LoraConfig(targets="q_proj"), name="a")
    names = adapted(FAMILIES["llama"](), targets=r".*\.(q|v)_proj")
    assert [n.rsplit(".", 1)[1] for n in names] == ["q_proj", "v_proj"] * 2
    with pytest.raises(dt.TargetError, match="not a valid regular expression"):
        dt.inject(FAMILIES["llama"](), dt.LoraConfig(targets="(["), name="a")


@pytest.mark.parametrize("family, head, expected", [
    ("llama", "lm_head", 14), ("gpt2", "lm_head", 8), ("bert", "classifier", 13),
    ("t5", "lm_head", 32), ("vit", "classifier", 12), ("roberta", "classifier", 12),
])
def test_all_linear_is_every_linear_and_conv1d_but_the_head(family, head, expected):
    model = FAMILIES[family]()
    names = adapted(model, targets="all-linear")
    assert len(names) == expected
    assert not any(n == head or n.startswith(head + ".") for n in names)
    if family == "gpt2":  # HF Conv1D layers count as linear
        assert all(type(layer.base_layer).__name__ == "Conv1D"
                   for layer in delta_layers(model).values())


def test_all_linear_is_the_default_for_lora():
    assert len(adapted(FAMILIES["llama"]())) == 14


def test_plain_model_heads_are_excluded_by_name():
    assert adapted(MLP()) == ["blocks.0.0", "blocks.0.2", "blocks.1.0", "blocks.1.2"]


# Expected module suffixes per canonical name, two blocks each.
CANONICAL = {
    "llama": {"attn.q": "self_attn.q_proj", "attn.o": "self_attn.o_proj",
              "ffn.gate": "mlp.gate_proj", "ffn.up": "mlp.up_proj", "ffn.down": "mlp.down_proj"},
    "mistral": {"attn.k": "self_attn.k_proj", "ffn.gate": "mlp.gate_proj"},
    "qwen2": {"attn.v": "self_attn.v_proj", "ffn.down": "mlp.down_proj"},
    "gpt2": {"attn.qkv": "attn.c_attn", "attn.o": "attn.c_proj", "ffn.up": "mlp.c_fc",
             "ffn.down": "mlp.c_proj"},
    "gpt_neox": {"attn.qkv": "attention.query_key_value", "attn.o": "attention.dense",
                 "ffn.up": "mlp.dense_h_to_4h", "ffn.down": "mlp.dense_4h_to_h"},
    "bert": {"attn.q": "attention.self.query", "attn.o": "attention.output.dense",
             "ffn.up": "intermediate.dense", "ffn.down": "layer.N.output.dense"},
    "roberta": {"attn.k": "attention.self.key", "ffn.down": "layer.N.output.dense"},
    "vit": {"attn.q": "attention.q_proj", "attn.o": "attention.o_proj", "ffn.up": "mlp.fc1",
            "ffn.down": "mlp.fc2"},
}


@pytest.mark.parametrize("family, canonical", [(f, c) for f, m in CANONICAL.items() for c in m])
def test_canonical_names(family, canonical):
    names = adapted(FAMILIES[family](), targets=[canonical])
    suffix = CANONICAL[family][canonical]
    pattern = re.compile(r".*\." + re.escape(suffix).replace("N", r"\d+") + "$")
    assert len(names) == 2 and all(pattern.match(n) for n in names), names


def test_attn_qkv_on_separate_projections_is_all_three():
    names = adapted(FAMILIES["llama"](), targets=["attn.qkv"])
    assert [n.rsplit(".", 1)[1] for n in names] == ["q_proj", "k_proj", "v_proj"] * 2


def test_t5_encoder_decoder_and_cross_attention():
    names = adapted(FAMILIES["t5"](), targets=["attn.q"])
    assert len(names) == 4 and all(n.endswith("layer.0.SelfAttention.q") for n in names)
    assert {n.split(".")[0] for n in names} == {"encoder", "decoder"}
    cross = adapted(FAMILIES["t5"](), targets=["xattn.v"])
    assert cross == ["decoder.block.0.layer.1.EncDecAttention.v",
                     "decoder.block.1.layer.1.EncDecAttention.v"]
    ffn = adapted(FAMILIES["t5"](), targets=["ffn.up", "ffn.down"])
    assert len(ffn) == 8 and all(n.endswith((".wi", ".wo")) for n in ffn)
    gated = adapted(FAMILIES["t5_gated"](), targets=["ffn.gate", "ffn.up"])
    assert sorted({n.rsplit(".", 1)[1] for n in gated}) == ["wi_0", "wi_1"] and len(gated) == 8
    with pytest.raises(dt.TargetError, match="T5 model has no 'ffn.gate'.*present: \\['attn.q'"):
        dt.inject(FAMILIES["t5"](), dt.LoraConfig(targets=["ffn.gate"]), name="a")


def test_fused_qkv_is_an_error_that_names_the_fused_layer():
    with pytest.raises(dt.TargetError, match="fuses q, k and v.*target 'attn.qkv'"):
        dt.inject(FAMILIES["gpt2"](), dt.LoraConfig(targets=["attn.q"]), name="a")
    with pytest.raises(dt.TargetError, match="GPT-2 has no 'ffn.gate'; its canonical names"):
        dt.inject(FAMILIES["gpt2"](), dt.LoraConfig(targets=["ffn.gate"]), name="a")


def test_canonical_names_need_a_structure_map():
    with pytest.raises(dt.TargetError, match="no known structure map.*register_structure"):
        dt.inject(MLP(), dt.LoraConfig(targets=["attn.q"]), name="a")


def test_register_structure_for_a_custom_model():
    class Config:
        model_type = "tiny-mlp-family"

    model = MLP()
    model.config = Config()
    dt.register_structure(StructureMap("TinyMLP", ("tiny-mlp-family",),
                                       {"ffn.up": ("0",), "ffn.down": ("2",)}))
    assert adapted(model, targets=["ffn.down"]) == ["blocks.0.2", "blocks.1.2"]


def test_block_lists():
    assert find_block_lists(FAMILIES["llama"]()) == ["model.layers"]
    assert find_block_lists(FAMILIES["t5"]()) == ["encoder.block", "decoder.block"]
    assert find_block_lists(MLP()) == ["blocks"]
    assert find_block_lists(ConvNet()) == []


def test_layers_selects_blocks_with_negative_indices():
    names = adapted(FAMILIES["llama"](), targets=["attn.q", "attn.v"], layers=[-1])
    assert names == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    t5 = adapted(FAMILIES["t5"](), targets=["attn.q"], layers=[0])
    assert t5 == ["encoder.block.0.layer.0.SelfAttention.q",
                  "decoder.block.0.layer.0.SelfAttention.q"]
    with pytest.raises(dt.TargetError, match="layers \\[2\\] out of range.*2 blocks"):
        dt.inject(FAMILIES["llama"](), dt.LoraConfig(layers=[2]), name="a")
    with pytest.raises(dt.TargetError, match="needs a repeated block list"):
        dt.inject(ConvNet(), dt.LoraConfig(layers=[0]), name="a")
    with pytest.raises(dt.TargetError, match="none of the targeted modules lies in blocks"):
        dt.inject(MLP(), dt.LoraConfig(targets=["head"], layers=[0]), name="a")


def test_exclude():
    names = adapted(FAMILIES["llama"](), targets=["attn.q", "attn.v"],
                    exclude=["layers.0.self_attn.v_proj"])
    assert "model.layers.0.self_attn.v_proj" not in names and len(names) == 3
    assert adapted(FAMILIES["llama"](), exclude=r".*mlp.*") == [
        f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"]
    with pytest.raises(dt.TargetError, match="exclude entry 'nope' matches no module"):
        dt.inject(FAMILIES["llama"](), dt.LoraConfig(exclude=["nope"]), name="a")
    with pytest.raises(dt.TargetError, match="no module is left"):
        dt.inject(FAMILIES["llama"](), dt.LoraConfig(targets=["q_proj"], exclude=["attn.q"]),
                  name="a")


def test_close_names_and_canonical_names_in_the_error():
    with pytest.raises(dt.TargetError) as info:
        dt.inject(FAMILIES["llama"](), dt.LoraConfig(targets=["q_prj"]), name="a")
    message = str(info.value)
    assert "q_proj" in message and "Canonical names for Llama" in message and "attn.q" in message


def test_unsupported_layers_are_explained():
    with pytest.raises(dt.TargetError, match="matches only modules 'lora' cannot adapt "
                                             "\\(LlamaRMSNorm"):
        dt.inject(FAMILIES["llama"](), dt.LoraConfig(targets=["input_layernorm"]), name="a")
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(dt.TargetError, match="groups=2 is not supported"):
        dt.inject(grouped, dt.LoraConfig(targets=["0"]), name="a")
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 1)
    with pytest.raises(dt.TargetError, match="reads out_proj.weight directly"):
        dt.inject(encoder, dt.LoraConfig(targets=["out_proj"]), name="a")
    with pytest.raises(dt.TargetError, match="fused inference path"):
        dt.inject(encoder, dt.LoraConfig(targets=["linear1"]), name="a")


def test_overrides_set_per_module_values_first_match_wins():
    model = FAMILIES["llama"]()
    dt.inject(model, dt.LoraConfig(rank=2, targets=["attn.q", "attn.v"], overrides={
        "layers.0.self_attn.v_proj": {"rank": 6}, "attn.v": {"rank": 4, "alpha": 8}}), name="a")
    layers = delta_layers(model)
    ranks = {p: layer.deltas["a"].A.shape[0] for p, layer in layers.items()}
    assert ranks == {"model.layers.0.self_attn.q_proj": 2, "model.layers.0.self_attn.v_proj": 6,
                     "model.layers.1.self_attn.q_proj": 2, "model.layers.1.self_attn.v_proj": 4}
    assert layers["model.layers.1.self_attn.v_proj"].deltas["a"].scale == 2.0
    assert layers["model.layers.0.self_attn.v_proj"].deltas["a"].scale == 1.0
    with pytest.raises(dt.TargetError, match="overrides key 'k_proj' matches none"):
        dt.inject(FAMILIES["llama"](), dt.LoraConfig(targets=["q_proj"],
                                                     overrides={"k_proj": {"rank": 4}}), name="a")


def test_a_module_shared_under_two_paths_gets_one_delta_at_both():
    shared = nn.Linear(4, 4)
    model = nn.Module()
    model.first, model.again = shared, nn.Sequential(shared)
    assert adapted(model, targets=["again.0"]) == ["first"]
    assert model.first is model.again[0]
    dt.unload(model)
    assert model.first is shared and model.again[0] is shared


def test_targeting_sees_logical_names_after_injection():
    model = FAMILIES["llama"]()
    dt.inject(model, dt.LoraConfig(targets=["attn.q"]), name="a")
    dt.inject(model, dt.LoraConfig(targets=["q_proj", "k_proj"]), name="b")
    layers = delta_layers(model)
    assert not any("base_layer" in p for p in layers)
    assert sorted(layers["model.layers.0.self_attn.q_proj"].deltas) == ["a", "b"]
    assert "model.layers.0.self_attn.q_proj" in Matcher(model).names


def test_matcher_reports_canonical_alias_and_info():
    model = FAMILIES["gpt2"]()
    matcher = Matcher(model)
    info = matcher.info("transformer.h.0.attn.c_attn")
    assert info.kind == "linear" and info.transposed and (info.in_dim, info.out_dim) == (32, 96)
    norm = matcher.info("transformer.h.0.ln_1")
    assert norm.kind == "norm" and norm.weight_shape == (32,)
    assert matcher.info("transformer.h.0.attn.attn_dropout") is None
    assert matcher.output_heads() == {"lm_head"}
    assert torch.equal(info.weight_matrix(matcher.modules["transformer.h.0.attn.c_attn"].weight),
                       matcher.modules["transformer.h.0.attn.c_attn"].weight.t())
