"""Configs: frozen keyword-only dataclasses, JSON round trip, strict validation; the registry."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

import deltatune as dt
from deltatune.core.config import FrozenDict
from deltatune.core.delta import Delta
from deltatune.core.registry import register


def test_configs_are_frozen_and_keyword_only():
    config = dt.LoraConfig(rank=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.rank = 8
    with pytest.raises(TypeError):
        dt.LoraConfig(4)


def test_mutable_inputs_are_frozen_and_hashable():
    config = dt.LoraConfig(targets=["q_proj", "v_proj"], layers=[0, 1],
                           overrides={"v_proj": {"rank": 16}})
    assert config.targets == ("q_proj", "v_proj") and config.layers == (0, 1)
    assert isinstance(config.overrides, FrozenDict)
    assert isinstance(config.overrides["v_proj"], FrozenDict)
    assert hash(config) == hash(dt.LoraConfig(targets=("q_proj", "v_proj"), layers=(0, 1),
                                              overrides={"v_proj": {"rank": 16}}))
    with pytest.raises(TypeError):
        config.overrides["v_proj"] = {}


def test_json_round_trip_with_method_tag():
    config = dt.LoraConfig(rank=4, alpha=8.0, targets="all-linear", exclude=["lm_head"],
                           layers=[-1], overrides={"attn.v": {"rank": 2, "alpha": 4}},
                           dropout=0.1, rslora=True, init="gaussian", bias=True, dtype="float32")
    data = config.to_dict()
    assert data["method"] == "lora"
    text = json.dumps(data)
    for again in (dt.config_from_dict(json.loads(text)), dt.config_from_dict(text),
                  dt.LoraConfig.from_dict(data)):
        assert again == config and type(again) is dt.LoraConfig


def test_unknown_keys_are_rejected_with_the_valid_ones():
    with pytest.raises(dt.ConfigError, match="unknown keys \\['r'\\].*valid keys.*'rank'"):
        dt.config_from_dict({"method": "lora", "r": 8})


def test_unknown_method_suggests_close_names():
    with pytest.raises(dt.ConfigError, match="unknown method 'lorra'.*lora"):
        dt.config_from_dict({"method": "lorra"})
    with pytest.raises(dt.ConfigError, match="needs a 'method' key"):
        dt.config_from_dict({"rank": 8})
    with pytest.raises(dt.ConfigError, match="not valid JSON"):
        dt.config_from_dict("{rank: 8")
    with pytest.raises(dt.ConfigError, match="tagged method='other'"):
        dt.LoraConfig.from_dict({"method": "other"})


@pytest.mark.parametrize("kwargs, message", [
    ({"rank": 0}, "rank must be a positive integer"),
    ({"rank": "8"}, "rank must be a positive integer"),
    ({"rank": True}, "rank must be a positive integer"),
    ({"alpha": math.nan}, "alpha must be a finite number"),
    ({"dropout": 1.0}, "dropout must be in"),
    ({"init": "olora"}, "init must be one of"),
    ({"pissa_iters": 4}, "pissa_iters"),
    ({"freeze_a": True, "init": "pissa"}, "freeze_a=True needs a random A"),
    ({"dtype": "int8"}, "dtype must be one of"),
    ({"targets": ["q_proj", ""]}, "targets must be"),
    ({"exclude": [3]}, "exclude must be"),
    ({"layers": ["0"]}, "layers must be a list of block indices"),
    ({"overrides": {"q_proj": {"rnk": 4}}}, "unknown or placement fields \\['rnk'\\]"),
    ({"overrides": {"q_proj": {"targets": ["x"]}}}, "placement fields \\['targets'\\]"),
    ({"overrides": {"q_proj": 4}}, "must map field names to values"),
])
def test_invalid_values_are_clear_errors(kwargs, message):
    with pytest.raises(dt.ConfigError, match=message):
        dt.LoraConfig(**kwargs)


def test_replace_validates_and_rejects_unknown_fields():
    config = dt.LoraConfig(rank=4)
    assert config.replace(rank=8).rank == 8
    with pytest.raises(dt.ConfigError, match="has no fields \\['rnk'\\]"):
        config.replace(rnk=8)
    with pytest.raises(dt.ConfigError, match="rank must be"):
        config.replace(rank=-1)


def test_lora_scale():
    assert dt.LoraConfig(rank=8).scale == 1.0  # alpha defaults to the rank
    assert dt.LoraConfig(rank=8, alpha=16).scale == 2.0
    assert dt.LoraConfig(rank=16, alpha=8, rslora=True).scale == pytest.approx(2.0)


@pytest.mark.parametrize("rslora", [False, True])
def test_pissa_is_saved_as_plain_lora_of_twice_the_rank_with_the_same_scale(rslora):
    config = dt.LoraConfig(rank=4, alpha=6, rslora=rslora, init="pissa", pissa_iters=2,
                           overrides={"v_proj": {"rank": 2}, "q_proj": {"dropout": 0.1}})
    saved = config.for_saving()
    assert saved.init == "default" and saved.pissa_iters is None and saved.rank == 8
    assert saved.scale == pytest.approx(config.scale)
    v_before = config.replace(overrides=None, **config.overrides["v_proj"])
    v_after = saved.replace(overrides=None, **saved.overrides["v_proj"])
    assert v_after.rank == 4 and v_after.scale == pytest.approx(v_before.scale)
    assert dict(saved.overrides["q_proj"]) == {"dropout": 0.1}
    assert dt.LoraConfig(rank=4).for_saving() == dt.LoraConfig(rank=4)


def test_registry():
    assert dt.methods() == sorted(dt.methods()) and "lora" in dt.methods()
    spec = dt.get_method("lora")
    assert spec.config_class is dt.LoraConfig and spec.delta_class.method == "lora"
    with pytest.raises(dt.ConfigError, match="lowercase"):
        register("LoRA", config=dt.LoraConfig)

    class Impostor(Delta):
        pass

    with pytest.raises(dt.ConfigError, match="already registered"):
        register("lora", config=dt.LoraConfig)(Impostor)
    assert dt.get_method("lora").delta_class is spec.delta_class


def test_unregistered_config_cannot_be_injected():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Orphan(dt.DeltaConfig):
        pass

    import torch

    with pytest.raises(dt.ConfigError, match="not a registered method's config"):
        dt.inject(torch.nn.Sequential(torch.nn.Linear(2, 2)), Orphan())
