"""Tiny real architectures built from configs (no downloads), plus plain torch models.

Each ``Case`` builds a deterministic model (same seed → same weights) and deterministic inputs,
and knows how to get the output tensor. Dropout is off so that outputs are deterministic in
train mode too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], nn.Module]
    make_inputs: Callable[[], dict[str, Any]]
    kinds: frozenset[str] = field(default=frozenset({"linear"}))
    hf: bool = False

    def build(self, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
        torch.manual_seed(seed)
        return self.make().to(dtype).eval()

    def inputs(self, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        return _materialise(self.make_inputs(), torch.Generator().manual_seed(1234), dtype)

    def __str__(self) -> str:
        return self.name


def _materialise(spec: dict[str, Any], gen: torch.Generator, dtype: torch.dtype) -> dict:
    out = {}
    for key, value in spec.items():
        value = value(gen) if callable(value) else value
        if isinstance(value, Tensor) and value.is_floating_point():
            value = value.to(dtype)
        out[key] = value
    return out


def output(result: Any) -> Tensor:
    """The main output tensor of a model call (HF ``logits`` or a plain tensor)."""
    if isinstance(result, Tensor):
        return result
    for key in ("logits", "last_hidden_state"):
        value = getattr(result, key, None)
        if value is not None:
            return value
    raise TypeError(f"no output tensor in {type(result).__name__}")


def run(model: nn.Module, inputs: dict[str, Any]) -> Tensor:
    if set(inputs) == {"x"}:
        return output(model(inputs["x"]))
    return output(model(**inputs))


# ----------------------------------------------------------------------------- plain torch
class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 12)) for _ in range(2))
        self.head = nn.Linear(12, 3)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


class ConvNet(nn.Module):
    """Conv1d, Conv2d (strided, dilated, reflect-padded) and Conv3d layers."""

    def __init__(self) -> None:
        super().__init__()
        self.c2a = nn.Conv2d(3, 8, 3, padding=1)
        self.c2b = nn.Conv2d(8, 8, 3, stride=2, dilation=1, padding=1, padding_mode="reflect")
        self.c2c = nn.Conv2d(8, 6, (1, 3), dilation=(1, 2), bias=False)
        self.c1 = nn.Conv1d(6, 6, 3, padding="same")
        self.c3 = nn.Conv3d(1, 2, 2)
        self.fc = nn.Linear(6 + 2, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.c2a(x))
        h = torch.relu(self.c2b(h))
        h = self.c2c(h)  # (N, 6, H, W')
        h = self.c1(h.flatten(2))  # (N, 6, L)
        v = self.c3(x[:, :1].unsqueeze(1).expand(-1, -1, 2, -1, -1).contiguous())
        return self.fc(torch.cat([h.mean(-1), v.flatten(2).mean(-1)], dim=-1))


class EmbeddingModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 16, padding_idx=0)
        self.proj = nn.Linear(16, 16)
        self.out = nn.Linear(16, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.proj(self.embed(x))).mean(1))


class NormNet(nn.Module):
    """Every norm kind: BatchNorm (batch statistics, no running buffers to change in training),
    GroupNorm, LayerNorm without bias, torch RMSNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8, track_running_stats=False)
        self.gn = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, 12)
        self.ln = nn.LayerNorm(12, bias=False)
        self.rms = nn.RMSNorm(12)
        self.out = nn.Linear(12, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.gn(torch.relu(self.bn(self.conv(x)))).mean((-2, -1))
        return self.out(self.rms(self.ln(self.fc(h))))


# ----------------------------------------------------------------------------- Hugging Face
def llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False))


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(
        vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2))


def bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=64, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(
        vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
        dropout_rate=0.0, decoder_start_token_id=0))


def vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=48, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def _ids(shape: tuple[int, ...], high: int = 96) -> Callable[[torch.Generator], Tensor]:
    return lambda g: torch.randint(1, high, shape, generator=g)


def _randn(*shape: int) -> Callable[[torch.Generator], Tensor]:
    return lambda g: torch.randn(*shape, generator=g)


CASES = [
    Case("mlp", MLP, lambda: {"x": _randn(4, 12)}),
    Case("conv", ConvNet, lambda: {"x": _randn(2, 3, 12, 12)},
         kinds=frozenset({"linear", "conv"})),
    Case("norms", NormNet, lambda: {"x": _randn(3, 3, 6, 6)},
         kinds=frozenset({"linear", "conv", "norm"})),
    Case("embedding", EmbeddingModel, lambda: {"x": _ids((3, 7), 40)},
         kinds=frozenset({"linear", "embedding"})),
    Case("llama", llama, lambda: {"input_ids": _ids((2, 9))},
         kinds=frozenset({"linear", "embedding", "norm"}), hf=True),
    Case("gpt2", gpt2, lambda: {"input_ids": _ids((2, 9))},
         kinds=frozenset({"linear", "embedding", "norm"}), hf=True),
    Case("bert", bert, lambda: {"input_ids": _ids((2, 9))},
         kinds=frozenset({"linear", "embedding", "norm"}), hf=True),
    Case("t5", t5, lambda: {"input_ids": _ids((2, 9)), "decoder_input_ids": _ids((2, 5))},
         kinds=frozenset({"linear", "embedding", "norm"}), hf=True),
    Case("vit", vit, lambda: {"pixel_values": _randn(2, 3, 16, 16)},
         kinds=frozenset({"linear", "conv", "norm"}), hf=True),
]
CASES_BY_NAME = {c.name: c for c in CASES}


# --------------------------------------------------------- more families, for structure maps
def mistral() -> nn.Module:
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def qwen2() -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def gpt_neox() -> nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64))


def roberta() -> nn.Module:
    from transformers import RobertaConfig, RobertaForSequenceClassification

    return RobertaForSequenceClassification(RobertaConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=64, num_labels=2))


def t5_gated() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(
        vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", decoder_start_token_id=0))


FAMILIES = {"llama": llama, "mistral": mistral, "qwen2": qwen2, "gpt2": gpt2,
            "gpt_neox": gpt_neox, "bert": bert, "roberta": roberta, "t5": t5,
            "t5_gated": t5_gated, "vit": vit}
