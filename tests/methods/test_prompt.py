"""Prompt tuning: ``h₀ = [P ; E(x)]`` against a naive reference, mask / label / position
handling, ``generate()`` with a KV cache (decoder-only and encoder-decoder), initialisations,
lifecycle and bad inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
import zoo
from deltatune.core.lifecycle import delta_layers
from deltatune.methods.prompt import PromptConfig
from helpers import assert_differs, assert_rel_close, greedy_by_hand

TOL = 1e-5


def model_of(family: str) -> nn.Module:
    torch.manual_seed(0)
    return zoo.FAMILIES[family]().eval()


def prompt_of(model: nn.Module, name: str = "p") -> torch.Tensor:
    return next(layer.deltas[name] for layer in delta_layers(model).values()
                if name in layer.deltas).prompt


def padded_batch(vocab: int = 96, length: int = 6):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (2, length), generator=g)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[0, :2] = 0
    return ids, mask


def naive(model, ids, mask, prompt, **kwargs):
    """The paper's equation by hand: the base model on [P ; E(x)] with the mask extended."""
    with dt.disabled(model):
        embeds = model.get_input_embeddings()(ids)
        p = prompt.detach().unsqueeze(0).expand(ids.shape[0], -1, -1)
        n = prompt.shape[0]
        full_mask = torch.cat([torch.ones(ids.shape[0], n, dtype=mask.dtype), mask], 1)
        return model(inputs_embeds=torch.cat([p, embeds], 1), attention_mask=full_mask, **kwargs)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_output_matches_the_naive_reference(family):
    model = model_of(family)
    ids, mask = padded_batch()
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
    dt.inject(model, PromptConfig(num_tokens=4, init="random"), name="p")
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        ref = naive(model, ids, mask, prompt_of(model)).logits
    assert_rel_close(ours, ref, TOL, "prompt vs [P ; E(x)]")
    tail = ours[:, -ids.shape[1]:] if ours.dim() == 3 else ours
    assert_differs(tail, base, "the prompt changes the output")
    if family != "bert":
        assert ours.shape[1] == ids.shape[1] + 4  # soft positions come first


def test_labels_get_no_loss_on_soft_tokens():
    model = model_of("llama")
    ids, mask = padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    dt.inject(model, PromptConfig(num_tokens=3, init="random"), name="p")
    with torch.no_grad():
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        full = torch.cat([torch.full((2, 3), -100), labels], 1)
        ref = naive(model, ids, mask, prompt_of(model), labels=full).loss
    assert_rel_close(loss, ref, TOL, "loss over real tokens only")


def test_token_type_ids_and_positional_arguments_are_extended():
    model = model_of("bert")
    ids, mask = padded_batch()
    types = torch.zeros_like(ids)
    types[:, 3:] = 1
    dt.inject(model, PromptConfig(num_tokens=2, init="random"), name="p")
    with torch.no_grad():
        by_name = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        positional = model(ids, mask, types).logits
        with dt.disabled(model):
            embeds = model.get_input_embeddings()(ids)
            p = prompt_of(model).unsqueeze(0).expand(2, -1, -1)
            ref = model(inputs_embeds=torch.cat([p, embeds], 1),
                        attention_mask=torch.cat([torch.ones(2, 2, dtype=torch.long), mask], 1),
                        token_type_ids=torch.cat([torch.zeros(2, 2, dtype=torch.long), types], 1)
                        ).logits
    assert_rel_close(by_name, ref, TOL, "token types extended with zeros")
    assert torch.equal(by_name, positional)


def test_inputs_embeds_from_the_caller_get_the_prompt_too():
    model = model_of("llama")
    ids, mask = padded_batch()
    dt.inject(model, PromptConfig(num_tokens=3, init="random"), name="p")
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).logits
        b = model(inputs_embeds=model.get_input_embeddings()(ids), attention_mask=mask).logits
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_with_a_kv_cache_equals_decoding_without_one(family):
    model = model_of(family)
    ids, mask = padded_batch()
    dt.inject(model, PromptConfig(num_tokens=4, init="random"), name="p")
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0,
              "return_dict_in_generate": True, "output_scores": True}
    out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert torch.equal(out.sequences, greedy_by_hand(model, ids, mask, 6))
    with dt.disabled(model):
        plain = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert_differs(torch.stack(out.scores), torch.stack(plain.scores), "generation scores")


def test_encoder_decoder_generate_sees_the_prompt_once():
    model = model_of("t5")
    ids, mask = padded_batch()
    dt.inject(model, PromptConfig(num_tokens=3, init="random"), name="p")
    assert list(delta_layers(model)) == ["encoder.embed_tokens"]
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    dec = out[:, :1]
    for _ in range(out.shape[1] - 1):  # greedy by hand through the full model
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        dec = torch.cat([dec, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, dec)
    with torch.no_grad():  # the encoder output holds the soft tokens
        enc = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    assert enc.shape[1] == ids.shape[1] + 3


def test_several_prompts_concatenate_in_activation_order():
    model = model_of("llama")
    ids, mask = padded_batch()
    dt.inject(model, PromptConfig(num_tokens=2, init="random"), name="a")
    dt.inject(model, PromptConfig(num_tokens=3, init="random"), name="b")
    dt.activate(model, ["b", "a"])
    with torch.no_grad():
        both = model(input_ids=ids, attention_mask=mask).logits
        joined = torch.cat([prompt_of(model, "b"), prompt_of(model, "a")])
        ref = naive(model, ids, mask, joined).logits
    assert_rel_close(both, ref, TOL, "b's tokens then a's")


def test_initialisations():
    model = model_of("llama")
    table = model.get_input_embeddings().weight
    dt.inject(model, PromptConfig(num_tokens=5), name="vocab")
    rows = prompt_of(model, "vocab")
    assert all((table == row).all(-1).any() for row in rows), "vocab init copies table rows"
    dt.inject(model, PromptConfig(num_tokens=5, init="text", init_ids=(7, 9)), name="text")
    assert torch.equal(prompt_of(model, "text"), table[[7, 9, 7, 9, 7]].detach())
    dt.inject(model, PromptConfig(num_tokens=400, init="random"), name="random")
    std = prompt_of(model, "random").std().item()
    assert abs(std - table.std().item()) < 0.1 * table.std().item()


def test_from_text_uses_the_tokenizer_without_special_tokens():
    class Tokenizer:
        def convert_tokens_to_ids(self, tokens):  # marks a Hugging Face tokenizer
            return tokens

        def __call__(self, text, add_special_tokens=True):
            ids = [len(w) for w in text.split()]
            return {"input_ids": ([1] if add_special_tokens else []) + ids}

    config = PromptConfig.from_text("classify this review", Tokenizer(), num_tokens=4)
    assert config.init == "text" and config.init_ids == (8, 4, 6)
    assert dt.config_from_dict(config.to_dict()) == config


def test_training_moves_only_the_prompt_and_lowers_the_loss():
    model = model_of("llama")
    ids, mask = padded_batch()
    labels = torch.full_like(ids, 5).masked_fill(mask == 0, -100)  # learnable: always say 5
    dt.inject(model, PromptConfig(num_tokens=4), name="p")
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable == [prompt_of(model)]
    opt = torch.optim.Adam(trainable, lr=0.1)
    losses = []
    for _ in range(30):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.95


def test_save_load_delete_and_unload(tmp_path):
    model = model_of("gpt2")
    ids, mask = padded_batch()
    dt.inject(model, PromptConfig(num_tokens=3, init="random"), name="p")
    with torch.no_grad():
        y = model(input_ids=ids, attention_mask=mask).logits
        base = dt.unload(model_of("gpt2"))(input_ids=ids, attention_mask=mask).logits
    dt.save(model, tmp_path / "p")
    fresh = model_of("gpt2")
    dt.load(fresh, tmp_path / "p")
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids, attention_mask=mask).logits, y)
    dt.delete(fresh, "p")
    with torch.no_grad():  # no hook left behind: the mask is the caller's again
        assert torch.equal(fresh(input_ids=ids, attention_mask=mask).logits, base)
    with pytest.raises(dt.MergeError, match="cannot be merged"):
        dt.merge(model)
    plain = dt.unload(model)
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids, attention_mask=mask).logits, base)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(dt.ConfigError, match="num_tokens"):
        PromptConfig(num_tokens=0)
    with pytest.raises(dt.ConfigError, match="init_ids"):
        PromptConfig(init="text")
    with pytest.raises(dt.ConfigError, match="only used with init='text'"):
        PromptConfig(init_ids=(1, 2))
    model = model_of("llama")
    with pytest.raises(dt.TargetError, match="init_ids reach 500"):
        dt.inject(model, PromptConfig(init="text", init_ids=(1, 500)))
    with pytest.raises(dt.TargetError, match="one embedding that reads input_ids"):
        dt.inject(model_of("gpt2"), PromptConfig(targets=["wpe"]))
    with pytest.raises(dt.TargetError, match="inputs_embeds"):
        dt.inject(zoo.EmbeddingModel(), PromptConfig())
    dt.inject(model, PromptConfig(num_tokens=2), name="p")
    ids, mask = padded_batch()
    with pytest.raises(dt.TargetError, match="2-D attention_mask"):
        model(input_ids=ids, attention_mask=mask[:, None, None, :])
