"""``deltatune.quant``: converting Linear layers to NF4 / int8 (torchao), what they store and
compute, moving and copying them, loading a model quantized, and bad input."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from quant_helpers import ids, llama, logits, mlp, quantized, same_storage, storage
from torch import nn

import deltatune as dt
from deltatune import quant
from deltatune.core.errors import ConfigError, StateError, TargetError
from deltatune.quant import QuantizedLinear
from helpers import assert_differs, no_deltatune_modules, rel_err

pytest.importorskip("torchao")
pytest.importorskip("transformers")

PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
#: Relative error ‖Ŵ − W‖ / ‖W‖ of one Gaussian weight matrix, expected ~0.09 for NF4 in blocks of
#: 64 (16 levels fitted to a normal distribution) and ~0.006 for per-row int8 (absmax / 127
#: steps); the bounds leave a factor of ~1.5–3 either way, and a no-op quantizer fails them.
WEIGHT_ERROR = {"nf4": (0.05, 0.15), "int8": (5e-4, 0.02)}
#: The same through the whole model (the logits): errors of every layer compound a little.
OUTPUT_ERROR = {"nf4": 0.25, "int8": 0.03}


def test_every_linear_layer_but_the_head_is_quantized_and_frozen():
    model = quantized()
    layers = quant.quantized_layers(model)
    assert {name.rsplit(".", 1)[1] for name in layers} == PROJECTIONS
    assert len(layers) == 2 * len(PROJECTIONS)
    assert type(model.lm_head) is nn.Linear
    assert type(model.model.embed_tokens) is nn.Embedding
    for layer in layers.values():
        assert isinstance(layer, QuantizedLinear) and isinstance(layer, nn.Linear)
        assert not layer.weight.requires_grad
        assert layer.weight_dtype == torch.bfloat16


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_quantization_error_per_scheme(scheme):
    dense = llama(torch.float32)
    model = quant.quantize(copy.deepcopy(dense), scheme)
    original = dict(dense.named_modules())
    low, high = WEIGHT_ERROR[scheme]
    for name, layer in quant.quantized_layers(model).items():
        err = rel_err(layer.dequantized_weight(), original[name].weight)
        assert low < err < high, f"{scheme} {name}: weight error {err:.4f}"
    tokens = ids()
    err = rel_err(logits(model, tokens), logits(dense, tokens))
    assert 1e-4 < err < OUTPUT_ERROR[scheme], f"{scheme}: output error {err:.4f}"


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_layer_computes_with_the_weight_it_stores(scheme, dtype):
    linear = mlp(dtype)[0]
    layer = QuantizedLinear.from_linear(linear, quant.make_scheme(scheme))
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.no_grad():
        y = layer(x)
        reference = F.linear(x, layer.dequantized_weight(), layer.bias)
        assert_differs(y, linear(x), "quantized vs dense layer")
    assert y.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel_err(y, reference) <= tol


def test_nf4_scales_are_double_quantized():
    layer = QuantizedLinear.from_linear(nn.Linear(256, 256).to(torch.bfloat16),
                                        quant.make_scheme("nf4"))
    w = layer.weight
    blocks = 256 * 256 // 64
    assert w.quantized_data.dtype == torch.uint8 and w.quantized_data.numel() == 256 * 256 // 2
    assert w.quantized_scalers.dtype == torch.int8  # first-level scales, one per block, int8
    assert w.quantized_scalers.numel() == blocks
    assert w.scaler_block_size == 256  # one second-level scale per 256 block scales
    assert w.quantization_factor.numel() == blocks // 256
    # codes + int8 block scales + bf16 second-level scales + their mean + the 16-entry table
    expected = 256 * 256 // 2 + blocks + 2 * (blocks // 256) + 2 + 16 * 2
    assert layer.quant.storage_bytes(w) == expected
    bits = 8 * expected / w.numel()
    assert bits < 4 + 16 / 64  # below NF4 with plain bf16 block scales (4.25 bits / weight)


def test_the_second_level_group_falls_back_to_a_divisor_of_the_block_count():
    linear = nn.Linear(64, 172)  # 172 blocks of 64: 256 does not divide them
    assert QuantizedLinear.from_linear(linear, quant.make_scheme("nf4")).weight \
        .scaler_block_size == 172
    small = quant.make_scheme("nf4", scaler_block_size=64)
    assert QuantizedLinear.from_linear(linear, small).weight.scaler_block_size == 43


def test_int8_stores_about_a_byte_per_weight():
    layer = QuantizedLinear.from_linear(nn.Linear(256, 128), quant.make_scheme("int8"))
    assert layer.weight.qdata.dtype == torch.int8
    assert 256 * 128 <= layer.quant.storage_bytes(layer.weight) <= 1.1 * 256 * 128


def test_targets_and_exclude_choose_the_layers():
    model = quant.quantize(llama(), "int8", targets=["q_proj", "v_proj"])
    assert {n.rsplit(".", 1)[1] for n in quant.quantized_layers(model)} == {"q_proj", "v_proj"}
    model = quant.quantize(llama(), "nf4", exclude=["down_proj"], targets=r".*\.mlp\..*")
    assert {n.rsplit(".", 1)[1] for n in quant.quantized_layers(model)} == {"gate_proj",
                                                                           "up_proj"}


def test_to_dtype_keeps_the_storage_and_changes_the_compute_dtype():
    model = quantized(torch.bfloat16)
    before, tokens = storage(model), ids()
    y_bf16 = logits(model, tokens)
    model.float()
    assert same_storage(storage(model), before)
    assert all(layer.weight_dtype == torch.float32
               for layer in quant.quantized_layers(model).values())
    assert model(input_ids=tokens).logits.dtype == torch.float32
    assert rel_err(logits(model, tokens), y_bf16) < 2e-2
    dt.inject(model, dt.LoraConfig(rank=2), name="a")  # deltas follow the compute dtype
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    model.to("cpu")
    assert same_storage(storage(model), before)


def test_compute_dtype_runs_the_matmul_in_it():
    model = quant.quantize(mlp(torch.float32), "nf4", compute_dtype="bfloat16")
    layer = model[0]
    assert layer.weight_dtype == torch.bfloat16 and layer.compute_dtype == torch.bfloat16
    x = torch.randn(4, 64)
    with torch.no_grad():
        y = layer(x)
        expected = F.linear(x.bfloat16(), layer.dequantized_weight(), layer.bias.bfloat16())
    assert y.dtype == torch.float32
    assert torch.equal(y, y.bfloat16().float())  # bf16 numbers: computed in bf16, cast back
    assert rel_err(y, expected) < 1e-2


def test_deepcopy_copies_the_storage_exactly():
    model = quantized()
    twin = copy.deepcopy(model)
    assert same_storage(storage(twin), storage(model))
    assert torch.equal(logits(twin, ids()), logits(model, ids()))
    layer = twin.model.layers[0].self_attn.q_proj
    assert layer.weight is not model.model.layers[0].self_attn.q_proj.weight


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_dequantize_gives_a_plain_model_computing_the_same(scheme):
    model = quantized(torch.float32, scheme)
    tokens = ids()
    expected = logits(model, tokens)
    quant.dequantize(model)
    assert not quant.quantized_layers(model)
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    assert rel_err(logits(model, tokens), expected) < 1e-5


def test_load_quantized_from_a_local_directory(tmp_path):
    source = llama(torch.float32)
    source.save_pretrained(tmp_path)
    model = quant.load_quantized(tmp_path, "nf4", dtype="bfloat16", exclude=["o_proj"])
    layers = quant.quantized_layers(model)
    assert len(layers) == 2 * (len(PROJECTIONS) - 1)
    assert {layer.weight_dtype for layer in layers.values()} == {torch.bfloat16}
    expected = quant.quantize(source.to(torch.bfloat16), "nf4", exclude=["o_proj"])
    assert same_storage(storage(model), storage(expected))  # the same weights, quantized alike
    assert rel_err(logits(model, ids()), logits(expected, ids())) < 1e-2  # (attention kernels)


def test_load_quantized_checks_its_options_before_loading(tmp_path):
    with pytest.raises(ConfigError, match="scheme"):
        quant.load_quantized(tmp_path / "missing", "nf3")
    with pytest.raises(ConfigError, match="block_size"):
        quant.load_quantized(tmp_path / "missing", "nf4", block_size=0)


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"scheme": "fp4"}, "unknown quantization scheme"),
    ({"backend": "gptq"}, "unknown quantization backend"),
    ({"block_size": 0}, "positive integer"),
    ({"block_size": 63}, "even"),
    ({"block_size": True}, "positive integer"),
    ({"scaler_block_size": -1}, "positive integer"),
    ({"compute_dtype": "int8"}, "dtype must be one of"),
])
def test_bad_options_are_refused(kwargs, match):
    model = mlp()
    with pytest.raises(ConfigError, match=match):
        quant.quantize(model, **kwargs)
    assert not quant.quantized_layers(model)


def test_a_weight_that_does_not_split_into_blocks_is_refused_before_anything_changes():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 30), nn.ReLU(),
                          nn.Linear(30, 5))  # 150 weights: no block size divides them
    with pytest.raises(ConfigError, match=r"^4: .*block_size=64.*exclude"):
        quant.quantize(model, "nf4")
    assert not quant.quantized_layers(model)  # the first two layers were not converted either
    quant.quantize(model, "nf4", exclude=["4"])
    assert set(quant.quantized_layers(model)) == {"0", "2"}


def test_quantizing_twice_is_refused():
    model = quantized()
    with pytest.raises(StateError, match="already quantized"):
        quant.quantize(model, "nf4")
    with pytest.raises(StateError, match="already quantized"):
        quant.quantize(model, "int8", targets=["q_proj"])


def test_quantizing_under_deltas_is_refused():
    model = llama()
    dt.inject(model, dt.LoraConfig(rank=2), name="a")
    with pytest.raises(StateError, match="quantize the base model first"):
        quant.quantize(model, "nf4")
    assert not quant.quantized_layers(model)


def test_targets_that_are_not_linear_layers_are_refused():
    with pytest.raises(TargetError, match="not nn.Linear"):
        quant.quantize(llama(), "nf4", targets=["mlp"])
    with pytest.raises(TargetError, match="matches no module"):
        quant.quantize(llama(), "nf4", targets=["qproj"])


def test_a_shared_weight_is_refused():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    model[1].weight = model[0].weight
    with pytest.raises(TargetError, match="shared"):
        quant.quantize(model, "nf4")
    assert not quant.quantized_layers(model)


def test_a_missing_backend_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails
    with pytest.raises(ConfigError, match="pip install bitsandbytes"):
        quant.quantize(mlp(), "nf4", backend="bitsandbytes")


def test_nothing_left_to_quantize_is_an_error():
    with pytest.raises(TargetError, match="no nn.Linear"):
        quant.quantize(mlp(), "nf4", exclude=["0", "2"])
    assert no_deltatune_modules(mlp())
