"""Prefix tuning: attention over ``[P_k ; K]``, ``[P_v ; V]`` against a naive reference written
with plain tensors, the MLP re-parameterisation and its folding on save, ``generate()``,
lifecycle and bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import deltatune as dt
import zoo
from deltatune.core.lifecycle import delta_layers
from deltatune.methods.prefix import PrefixConfig
from helpers import assert_differs, assert_rel_close, greedy_by_hand

TOL = 1e-5


def model_of(family: str) -> nn.Module:
    torch.manual_seed(0)
    return zoo.FAMILIES[family]().eval()


def deltas_of(model, name="p"):
    return [layer.deltas[name] for layer in delta_layers(model).values() if name in layer.deltas]


def ids_and_mask():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 96, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    return ids, mask


def naive_gpt2(model, ids, mask, prefixes):
    """GPT-2 written out: each attention reads ``[P_k ; K]`` / ``[P_v ; V]``; the real tokens
    take positions n… (after the prefix, as in the original implementation and HF peft)."""
    t = model.transformer
    n = prefixes[0].shape[1]
    pos = torch.arange(n, n + ids.shape[1])
    h = t.wte(ids) + t.wpe(pos)
    heads = model.config.n_head
    causal = torch.ones(ids.shape[1], ids.shape[1]).tril().bool()
    allowed = torch.cat([torch.ones(ids.shape[1], n, dtype=torch.bool), causal], 1)
    allowed = allowed[None] & torch.cat([torch.ones(2, n, dtype=torch.bool), mask.bool()], 1)[
        :, None]  # (B, T, n + T)
    for block, prefix in zip(t.h, prefixes, strict=True):
        x = block.ln_1(h)
        q, k, v = block.attn.c_attn(x).split(x.shape[-1], -1)
        k = torch.cat([prefix[0].expand(2, -1, -1), k], 1)
        v = torch.cat([prefix[1].expand(2, -1, -1), v], 1)

        def split(z):
            return z.view(2, z.shape[1], heads, -1).transpose(1, 2)

        q, k, v = split(q), split(k), split(v)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, ids.shape[1], -1)
        h = h + block.attn.c_proj(out)
        h = h + block.mlp(block.ln_2(h))
    return model.lm_head(t.ln_f(h))


@pytest.mark.parametrize("projection", [None, 8], ids=["plain", "projection"])
def test_gpt2_matches_the_naive_attention_over_prefixed_keys(projection):
    model = model_of("gpt2")
    ids, mask = ids_and_mask()
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
    dt.inject(model, PrefixConfig(num_tokens=3, projection=projection), name="p")
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        with dt.disabled(model):
            ref = naive_gpt2(model, ids, mask, [d.prefixes() for d in deltas_of(model)])
    assert_differs(ours, base, "the prefix changes the output")
    real = mask.bool()  # padded queries attend to nothing real; compare real positions
    assert_rel_close(ours[real], ref[real], TOL, "prefix vs naive attention")


def test_geometry_is_read_from_the_model_and_saved():
    model = model_of("llama")  # 4 query heads, 2 key/value heads of 8
    dt.inject(model, PrefixConfig(num_tokens=5), name="p")
    config = deltas_of(model)[0].config
    assert (config.kv_heads, config.head_dim, config.num_layers) == (2, 8, 2)
    assert deltas_of(model)[0].prefix.shape == (2, 5, 16)
    assert dt.cost(model_of("llama"), PrefixConfig(num_tokens=5)).params == 2 * 2 * 5 * 16


def test_projection_is_saved_folded(tmp_path):
    model = model_of("llama")
    ids, mask = ids_and_mask()
    dt.inject(model, PrefixConfig(num_tokens=4, projection=8), name="p")
    shared = deltas_of(model)[0].shared
    assert all(d.shared is shared for d in deltas_of(model)), "one MLP front for all layers"
    with torch.no_grad():
        y = model(input_ids=ids, attention_mask=mask).logits
    dt.save(model, tmp_path / "p")
    fresh = model_of("llama")
    dt.load(fresh, tmp_path / "p")
    loaded = deltas_of(fresh)
    assert loaded[0].config.projection is None and not hasattr(loaded[0], "up")
    assert dt.summary(fresh).rows[0].params == 2 * 2 * 4 * 16  # plain prefixes only
    with torch.no_grad():
        assert_rel_close(fresh(input_ids=ids, attention_mask=mask).logits, y, TOL, "folded")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_with_a_kv_cache_equals_decoding_without_one(family):
    model = model_of(family)
    ids, mask = ids_and_mask()
    dt.inject(model, PrefixConfig(num_tokens=4), name="p")
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5,
                         do_sample=False, pad_token_id=0)
    assert torch.equal(out, greedy_by_hand(model, ids, mask, 5))


def test_given_positions_match_the_positions_the_model_derives():
    model = model_of("llama")
    ids, _ = ids_and_mask()
    dt.inject(model, PrefixConfig(num_tokens=4), name="p")
    with torch.no_grad():
        derived = model(input_ids=ids).logits
        given = model(input_ids=ids, position_ids=torch.arange(6).expand(2, -1)).logits
    assert_rel_close(given, derived, TOL, "position ids shifted past the prefix")


def test_two_prefixes_concatenate_and_training_reaches_only_them():
    model = model_of("bert")
    ids, mask = ids_and_mask()
    dt.inject(model, PrefixConfig(num_tokens=2), name="a")
    dt.inject(model, PrefixConfig(num_tokens=3, projection=4), name="b")
    with torch.no_grad():
        both = model(input_ids=ids, attention_mask=mask).logits
        dt.activate(model, ["a"])
        only_a = model(input_ids=ids, attention_mask=mask).logits
    assert_differs(both, only_a, "b's prefix adds keys")
    dt.activate(model, ["a", "b"])
    model.train()
    loss = nn.functional.cross_entropy(model(input_ids=ids, attention_mask=mask).logits,
                                       torch.tensor([0, 1]))
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".deltas." in n for n in with_grad)
    assert all(d.prefix.grad is not None for d in deltas_of(model, "a"))


def test_bad_inputs_are_clear_errors():
    with pytest.raises(dt.ConfigError, match="num_tokens"):
        PrefixConfig(num_tokens=0)
    with pytest.raises(dt.ConfigError, match="projection"):
        PrefixConfig(projection=-1)
    with pytest.raises(dt.TargetError, match="encoder-decoder"):
        dt.inject(model_of("t5"), PrefixConfig())
    with pytest.raises(dt.TargetError, match="past_key_values"):
        dt.inject(zoo.MLP(), PrefixConfig())
    with pytest.raises(dt.TargetError, match="whole attention layer"):
        dt.inject(model_of("llama"), PrefixConfig(targets=["q_proj"]))
    model = model_of("llama")
    dt.inject(model, PrefixConfig(layers=[0]), name="p")
    ids, mask = ids_and_mask()
    with pytest.raises(dt.TargetError, match="every attention layer"):
        model(input_ids=ids, attention_mask=mask)
