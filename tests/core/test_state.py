"""Saving and loading: the file format, atomic writes, several adapters, and every way a saved
adapter can be wrong (each a clear error that leaves the model as it was)."""

from __future__ import annotations

import json
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltatune as dt
from deltatune.core import state
from deltatune.core.lifecycle import delta_layers
from helpers import assert_rel_close, base_tensors, no_deltatune_modules, perturb
from zoo import CASES_BY_NAME, FAMILIES, MLP, run

LLAMA = CASES_BY_NAME["llama"]


def adapted_llama(name="sst2", **config):
    model = LLAMA.build()
    dt.inject(model, dt.LoraConfig(rank=4, targets=["attn.q", "attn.v"], **config), name=name)
    perturb(model)
    return model


def out(model):
    with torch.no_grad():
        return run(model, LLAMA.inputs())


def test_file_format(tmp_path):
    model = adapted_llama()
    path = dt.save(model, tmp_path / "sst2", hash_base=True)
    assert sorted(os.listdir(path)) == [state.CONFIG_FILE, state.WEIGHTS_FILE]
    meta = json.loads((path / state.CONFIG_FILE).read_text())
    assert meta["format"] == "deltatune" and meta["format_version"] == state.FORMAT_VERSION
    assert meta["deltatune_version"] == dt.__version__ and meta["name"] == "sst2"
    assert meta["config"]["method"] == "lora" and meta["config"]["rank"] == 4
    assert meta["base"]["architecture"] == "LlamaForCausalLM"
    assert meta["base"]["model_type"] == "llama" and len(meta["base"]["sha256"]) == 64
    assert meta["base"]["modules"]["model.layers.0.self_attn.q_proj"] == {
        "type": "Linear", "shape": [32, 32]}
    tensors = load_file(path / state.WEIGHTS_FILE)
    assert sorted(tensors) == sorted(f"model.layers.{i}.self_attn.{p}_proj.{t}"
                                     for i in range(2) for p in "qv" for t in "AB")
    assert tensors["model.layers.0.self_attn.v_proj.A"].shape == (4, 32)


def test_round_trip_and_rename(tmp_path):
    model = adapted_llama()
    y = out(model)
    dt.save(model, tmp_path / "a")
    fresh = dt.load(LLAMA.build(), tmp_path / "a", name="renamed", trainable=True)
    assert list(dt.adapters(fresh)) == ["renamed"]
    assert all(p.requires_grad for p in delta_layers(fresh)[
        "model.layers.0.self_attn.q_proj"].deltas["renamed"].parameters())
    assert torch.equal(out(fresh), y)


def test_several_adapters_save_to_subdirectories_and_load_together(tmp_path):
    model = adapted_llama("sst2")
    dt.inject(model, dt.LoraConfig(rank=2, targets=["mlp.down_proj"]), name="rte")
    perturb(model, "rte", seed=3)
    y = out(model)
    dt.save(model, tmp_path / "all")
    assert sorted(os.listdir(tmp_path / "all")) == ["rte", "sst2"]
    fresh = dt.load(LLAMA.build(), tmp_path / "all")
    assert sorted(dt.adapters(fresh)) == ["rte", "sst2"]
    assert torch.equal(out(fresh), y)
    with pytest.raises(dt.AdapterNameError, match="holds several deltas"):
        dt.load(LLAMA.build(), tmp_path / "all", name="x")
    one = dt.load(LLAMA.build(), tmp_path / "all" / "rte")
    assert list(dt.adapters(one)) == ["rte"]


def test_save_errors(tmp_path):
    with pytest.raises(dt.AdapterNameError, match="no deltas to save"):
        dt.save(LLAMA.build(), tmp_path / "x")
    model = adapted_llama()
    with pytest.raises(dt.AdapterNameError, match="no adapter named 'nope'"):
        dt.save(model, tmp_path / "x", name="nope")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(dt.AdapterFileError, match="not empty.*refusing to replace"):
        dt.save(model, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"
    dt.save(model, tmp_path / "ok")
    (tmp_path / "ok" / "extra.bin").write_bytes(b"x")
    with pytest.raises(dt.AdapterFileError, match="plus other files"):
        dt.save(model, tmp_path / "ok")
    (tmp_path / "file").write_text("x")
    with pytest.raises(dt.AdapterFileError, match="not a directory"):
        dt.save(model, tmp_path / "file")
    dt.merge(model)
    with pytest.raises(dt.DeltaError, match="cannot hash the base weights while"):
        dt.save(model, tmp_path / "merged", hash_base=True)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_overwrite_replaces_a_saved_adapter(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(state, "_exchange", lambda a, b: False)
    model = adapted_llama()
    dt.save(model, tmp_path / "a")
    perturb(model, seed=11)
    y = out(model)
    dt.save(model, tmp_path / "a")
    assert torch.equal(out(dt.load(LLAMA.build(), tmp_path / "a")), y)
    assert os.listdir(tmp_path) == ["a"], "no temporary or backup directory may remain"


def test_a_crash_mid_save_leaves_the_previous_adapter_intact(tmp_path, monkeypatch):
    model = adapted_llama()
    dt.save(model, tmp_path / "a")
    y = out(model)
    perturb(model, seed=11)

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        dt.save(model, tmp_path / "a")
    assert os.listdir(tmp_path) == ["a"]
    assert torch.equal(out(dt.load(LLAMA.build(), tmp_path / "a")), y)


def saved(tmp_path, name="a"):
    model = adapted_llama(name)
    return dt.save(model, tmp_path / name)


def assert_untouched(model, before):
    assert no_deltatune_modules(model) and dt.adapters(model) == {}
    after = base_tensors(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def rewrite_meta(path, change):
    meta = json.loads((path / state.CONFIG_FILE).read_text())
    change(meta)
    (path / state.CONFIG_FILE).write_text(json.dumps(meta))


def rewrite_tensors(path, change):
    tensors = load_file(path / state.WEIGHTS_FILE)
    change(tensors)
    save_file(tensors, path / state.WEIGHTS_FILE)
    rewrite_meta(path, lambda m: m.update(
        weights_sha256=state._file_sha256(path / state.WEIGHTS_FILE)))


BAD_FILES = {
    "missing directory": (lambda p: p.rename(p.with_name("gone")), "no saved delta at"),
    "truncated weights": (lambda p: (p / state.WEIGHTS_FILE).write_bytes(
        (p / state.WEIGHTS_FILE).read_bytes()[:100]), "does not match its config"),
    "corrupt weights": (lambda p: (p / state.WEIGHTS_FILE).write_bytes(
        b"\x00" * len((p / state.WEIGHTS_FILE).read_bytes())), "does not match its config"),
    "missing weights": (lambda p: (p / state.WEIGHTS_FILE).unlink(), "is missing"),
    "unparseable weights with matching hash": (lambda p: (
        (p / state.WEIGHTS_FILE).write_bytes(b"garbage"),
        rewrite_meta(p, lambda m: m.update(weights_sha256=state._file_sha256(
            p / state.WEIGHTS_FILE)))), "cannot be read"),
    "corrupt json": (lambda p: (p / state.CONFIG_FILE).write_text("{not json"), "not valid JSON"),
    "not deltatune": (lambda p: rewrite_meta(p, lambda m: m.update(format="other")),
                      "not a deltatune adapter config"),
    "newer format": (lambda p: rewrite_meta(p, lambda m: m.update(format_version=99)),
                     "format version 99.*Upgrade"),
    "missing entry": (lambda p: rewrite_meta(p, lambda m: m.pop("config")), "no 'config' entry"),
    "unknown method": (lambda p: rewrite_meta(p, lambda m: m["config"].update(method="nope")),
                       "unknown method 'nope'"),
    "unknown config key": (lambda p: rewrite_meta(p, lambda m: m["config"].update(colour=1)),
                           "unknown keys \\['colour'\\]"),
    "bad adapter name": (lambda p: rewrite_meta(p, lambda m: m.update(name="../evil")),
                         "invalid adapter name"),
    "missing tensor": (lambda p: rewrite_tensors(p, lambda t: t.pop(
        "model.layers.1.self_attn.v_proj.B")), "lacks tensor 'model.layers.1.self_attn.v_proj.B'"),
    "extra tensor": (lambda p: rewrite_tensors(p, lambda t: t.update(stray=torch.zeros(2))),
                     "tensors the config does not explain"),
    "tensor of wrong shape": (lambda p: rewrite_tensors(p, lambda t: t.update({
        "model.layers.0.self_attn.q_proj.A": torch.zeros(5, 32)})),
        "'model.layers.0.self_attn.q_proj.A' has shape \\(5, 32\\)"),
    "no modules": (lambda p: rewrite_meta(p, lambda m: m["base"].update(modules={})),
                   "lists no adapted modules"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_are_clear_errors_and_change_nothing(tmp_path, case):
    damage, message = BAD_FILES[case]
    path = saved(tmp_path)
    damage(path)
    model = LLAMA.build()
    before = base_tensors(model)
    with pytest.raises(dt.DeltaError, match=message):
        dt.load(model, path)
    assert_untouched(model, before)


def test_a_bad_file_among_several_rolls_back_all(tmp_path):
    model = adapted_llama("a")
    dt.inject(model, dt.LoraConfig(targets=["o_proj"]), name="b")
    dt.save(model, tmp_path / "both")
    (tmp_path / "both" / "b" / state.WEIGHTS_FILE).write_bytes(b"x")
    fresh = LLAMA.build()
    before = base_tensors(fresh)
    with pytest.raises(dt.AdapterFileError):
        dt.load(fresh, tmp_path / "both")
    assert_untouched(fresh, before)


def test_peft_directory_gets_a_hint(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(dt.AdapterFileError, match="Hugging Face peft adapter"):
        dt.load(LLAMA.build(), tmp_path)


def test_shape_mismatch_names_the_first_module(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = saved(tmp_path)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=48,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2))
    before = base_tensors(other)
    with pytest.raises(dt.ShapeMismatchError,
                       match="'model.layers.0.self_attn.q_proj' has weight shape \\[48, 48\\] "
                             "here but \\[32, 32\\]"):
        dt.load(other, path)
    assert_untouched(other, before)
    with pytest.raises(dt.ShapeMismatchError, match="which this MLP does not have"):
        dt.load(MLP(), path)


def test_name_taken(tmp_path):
    path = saved(tmp_path)
    model = adapted_llama("a")
    with pytest.raises(dt.AdapterNameError, match="already exists"):
        dt.load(model, path)
    assert list(dt.adapters(model)) == ["a"]


def test_fingerprint_mismatch_with_equal_shapes_is_a_warning(tmp_path):
    model = MLP()
    dt.inject(model, dt.LoraConfig(targets=["blocks.0.0"]), name="a")
    dt.save(model, tmp_path / "a", hash_base=True)

    class MLPv2(MLP):
        pass

    same = dt.unload(model)
    renamed = MLPv2()
    renamed.load_state_dict(same.state_dict())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dt.load(renamed, tmp_path / "a")
    assert [str(w.message) for w in caught] == [
        f"delta in {tmp_path / 'a'} was saved from a MLP, loading into a MLPv2 (shapes match)"]
    torch.manual_seed(123)
    with pytest.warns(UserWarning, match="trained on other base weights"):
        dt.load(MLP(), tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dt.load(same, tmp_path / "a")


def test_loading_never_unpickles(tmp_path, monkeypatch):
    path = saved(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("pickle must not be used")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    model = dt.load(LLAMA.build(), path)
    assert list(dt.adapters(model)) == ["a"]


def test_bf16_adapter_loads_into_fp32_base(tmp_path):
    model = adapted_llama("a")
    model.to(torch.bfloat16)
    y = out(model.float())
    model.to(torch.bfloat16)
    dt.save(model, tmp_path / "a")
    assert load_file(tmp_path / "a" / state.WEIGHTS_FILE)[
        "model.layers.0.self_attn.q_proj.A"].dtype == torch.bfloat16
    fresh = dt.load(LLAMA.build(), tmp_path / "a")
    layer = delta_layers(fresh)["model.layers.0.self_attn.q_proj"]
    assert layer.deltas["a"].A.dtype == torch.float32
    assert_rel_close(out(fresh), y, 2e-2, "bf16 adapter in fp32 base")


def test_load_into_a_model_with_other_deltas(tmp_path):
    path = saved(tmp_path, "a")
    model = LLAMA.build()
    dt.inject(model, dt.LoraConfig(targets=["attn.q"]), name="b")
    dt.load(model, path)
    assert dt.active_adapters(model) == ["b", "a"]
    assert sorted(delta_layers(model)["model.layers.0.self_attn.q_proj"].deltas) == ["a", "b"]


def test_families_round_trip(tmp_path):
    for family in ("gpt2", "t5", "bert"):
        model = FAMILIES[family]()
        dt.inject(model, dt.LoraConfig(rank=2), name="x")
        dt.save(model, tmp_path / family)
        dt.load(FAMILIES[family](), tmp_path / family)


def test_model_state_dicts_of_adapted_models():
    """``model.state_dict()`` names the base tensors as the unadapted model does: a checkpoint
    of the adapted model (``save_pretrained``, as the HF Trainer writes it) loads with
    ``from_pretrained`` as the base model, or as the adapted one once merged; state dicts in the
    wrapped spelling (``…q_proj.base_layer.weight``, from before) still load."""
    import tempfile

    from transformers import LlamaForCausalLM

    case = LLAMA
    model = case.build()
    x = case.inputs()["input_ids"]
    with torch.no_grad():
        base = model(x).logits
    dt.inject(model, dt.LoraConfig(rank=4), name="a")
    perturb(model, scale=0.1)
    with torch.no_grad():
        adapted = model(x).logits
    wrapped = {}
    for key, value in model.state_dict().items():
        if ".deltas." not in key and key.endswith(("proj.weight",)):
            key = key.replace(".weight", ".base_layer.weight")
        wrapped[key] = value
    fresh = case.build(seed=4)
    dt.inject(fresh, dt.LoraConfig(rank=4), name="a")
    fresh.load_state_dict(wrapped)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, adapted)
    for merge, want in ((False, base), (True, adapted)):
        if merge:
            dt.merge(model)
        with tempfile.TemporaryDirectory() as out:
            model.save_pretrained(out)
            reloaded = LlamaForCausalLM.from_pretrained(out)  # warns: the deltas' keys
        with torch.no_grad():
            torch.testing.assert_close(reloaded(x).logits, want, rtol=1e-4, atol=1e-4)
