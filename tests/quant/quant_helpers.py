"""Shared pieces of the quantization tests: tiny models, their outputs, storage snapshots."""

from __future__ import annotations

import torch
from torch import Tensor, nn

import deltatune as dt
from deltatune import quant

VOCAB = 128


def llama(dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> nn.Module:
    """A tiny seeded Llama whose weights split into NF4 blocks of 64."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False))
    return model.to(dtype).eval()


def mlp(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """A plain MLP with biases (so BitFit and bias merges have something to do)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).to(dtype).eval()


def ids(batch: int = 2, length: int = 12) -> Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model: nn.Module, tokens: Tensor) -> Tensor:
    return model(input_ids=tokens).logits.float()


def quantized(dtype: torch.dtype = torch.bfloat16, scheme: str = "nf4", **kwargs) -> nn.Module:
    return quant.quantize(llama(dtype), scheme, **kwargs)


def storage(model: nn.Module) -> dict[str, list[Tensor]]:
    """Clones of every quantized layer's stored tensors (codes and scales), by layer."""
    out = {}
    for name, layer in quant.quantized_layers(model).items():
        weight = layer.weight
        if hasattr(weight, "__tensor_flatten__"):  # torchao
            names, _ = weight.__tensor_flatten__()
            out[name] = [getattr(weight, n).detach().clone() for n in names]
        else:  # bitsandbytes: the codes plus the scales kept beside them
            extra = [weight.SCB] if getattr(weight, "SCB", None) is not None else \
                [weight.quant_state.absmax]
            out[name] = [weight.data.clone(), *[t.clone() for t in extra]]
    return out


def same_storage(a: dict[str, list[Tensor]], b: dict[str, list[Tensor]]) -> bool:
    return a.keys() == b.keys() and all(
        len(a[k]) == len(b[k]) and all(torch.equal(x, y) for x, y in zip(a[k], b[k], strict=True))
        for k in a)


def train(model: nn.Module, tokens: Tensor, steps: int = 8, lr: float = 1e-2) -> list[float]:
    """A few AdamW steps on the language-modelling loss; the losses."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def config(method: str, **kwargs) -> dt.DeltaConfig:
    return {"lora": dt.LoraConfig, "dora": dt.DoraConfig, "ia3": dt.IA3Config}[method](**kwargs)


def adapted(scheme: str, method: str, dtype: torch.dtype = torch.bfloat16,
            tokens: Tensor | None = None, steps: int = 6) -> nn.Module:
    """A quantized tiny Llama with a delta trained a few steps (realistic, small deltas)."""
    model = quantized(dtype, scheme)
    kwargs = {} if method == "ia3" else {"rank": 4, "alpha": 8}
    dt.inject(model, config(method, **kwargs), name="a")
    train(model, ids() if tokens is None else tokens, steps=steps)
    return model.eval()


__all__ = ["adapted", "config", "ids", "llama", "logits", "mlp", "quantized", "same_storage",
           "storage", "train"]
