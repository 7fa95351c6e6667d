"""The bitsandbytes backend (optional, skipped where bitsandbytes is not installed): NF4 with
nested statistics and LLM.int8() storage, deltas training on them, and both merge paths."""

from __future__ import annotations

import copy

import pytest
import torch
from quant_helpers import config, ids, llama, logits, same_storage, storage, train

import deltatune as dt
from deltatune import quant
from deltatune.core.errors import ConfigError, MergeError
from helpers import no_deltatune_modules, rel_err

pytest.importorskip("bitsandbytes")
pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings(  # LLM.int8() casts bf16 inputs to fp16, and says so
    "ignore:MatMul8bitLt:UserWarning")

BNB = "bitsandbytes"
OUTPUT_ERROR = {"nf4": 0.25, "int8": 0.03}  # as for torchao (see test_quant.py)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_quantized_model_is_close_to_the_dense_one(scheme):
    dense = llama(torch.bfloat16)
    model = quant.quantize(copy.deepcopy(dense), scheme, backend=BNB)
    layers = quant.quantized_layers(model)
    assert len(layers) == 14
    assert {type(layer.weight).__name__ for layer in layers.values()} == \
        {"nf4": {"Params4bit"}, "int8": {"Int8Params"}}[scheme]
    tokens = ids()
    err = rel_err(logits(model, tokens), logits(dense, tokens))
    assert 1e-4 < err < OUTPUT_ERROR[scheme], err
    twin = copy.deepcopy(model)
    assert same_storage(storage(twin), storage(model))
    assert torch.equal(logits(twin, tokens), logits(model, tokens))


def test_nf4_statistics_are_double_quantized():
    model = quant.quantize(llama(), "nf4", backend=BNB)
    state = model.model.layers[0].mlp.up_proj.weight.quant_state
    assert state.nested and state.absmax.dtype == torch.uint8  # 8-bit block scales
    assert state.state2.blocksize == 256


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_deltas_train_and_merge(scheme, method):
    model = quant.quantize(llama(torch.float32), scheme, backend=BNB)
    tokens = ids()
    kwargs = {} if method == "ia3" else {"rank": 4, "alpha": 8}
    dt.inject(model, config(method, **kwargs), name="a")
    before = storage(model)
    losses = train(model, tokens, steps=6, lr=1e-1 if method == "ia3" else 2e-2)
    assert losses[-1] < losses[0] - 0.05, losses
    assert same_storage(storage(model), before)
    model.eval()
    unmerged = logits(model, tokens)
    with pytest.raises(MergeError, match="allow_lossy"):
        dt.merge(model)
    exact = dt.unload(copy.deepcopy(model), merge=True, dequantize=True)
    assert no_deltatune_modules(exact) and not quant.quantized_layers(exact)
    assert rel_err(logits(exact, tokens), unmerged) < 1e-5
    dt.merge(model, allow_lossy=True)
    assert 1e-5 < rel_err(logits(model, tokens), unmerged) < OUTPUT_ERROR[scheme]


def test_bitsandbytes_fixes_its_second_level_group():
    with pytest.raises(ConfigError, match="256"):
        quant.quantize(llama(), "nf4", backend=BNB, scaler_block_size=128)
    with pytest.raises(ConfigError, match="block_size"):
        quant.quantize(llama(), "nf4", backend=BNB, block_size=48)
