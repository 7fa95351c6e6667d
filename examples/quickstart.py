"""deltatune end to end: inject LoRA, train a few steps, save, reload into a fresh base, merge.

The base is a tiny Llama built from a config (random weights, no download). The task is to
continue counting (each token is the previous one plus one, modulo the vocabulary), which the
random base cannot do; LoRA learns it while the base stays frozen. (The frozen output head's
small random weights cap how peaked the predictions can get, so the loss stays well above zero
even once every next token is predicted right.)
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune as dt

VOCAB, SEQ, BATCH, STEPS = 64, 32, 16, 80


def base_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=SEQ)
    return LlamaForCausalLM(config).eval()


def batch(gen: torch.Generator) -> torch.Tensor:
    """Counting sequences from random starting tokens."""
    start = torch.randint(0, VOCAB, (BATCH, 1), generator=gen)
    return (start + torch.arange(SEQ)) % VOCAB


def evaluate(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, float]:
    """Test loss and next-token accuracy."""
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    accuracy = (out.logits[:, :-1].argmax(-1) == ids[:, 1:]).float().mean().item()
    return out.loss.item(), accuracy


def show(label: str, result: tuple[float, float]) -> None:
    print(f"{label:<18} loss {result[0]:.3f}, next-token accuracy {100 * result[1]:5.1f}%")


def main() -> None:
    model = base_model()
    test_ids = batch(torch.Generator().manual_seed(123))
    base = evaluate(model, test_ids)

    config = dt.LoraConfig(rank=8, alpha=16, targets="all-linear")
    print(f"LoRA would add {dt.cost(model, config).params:,} parameters; injecting it.")
    dt.inject(model, config, name="counting")
    print(dt.summary(model), "\n")

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for step in range(1, STEPS + 1):
        ids = batch(gen)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 20 == 0:
            print(f"step {step:3d}  training loss {loss.item():.3f}")
    model.eval()
    tuned = evaluate(model, test_ids)
    print()
    show("frozen base:", base)
    show("with LoRA:", tuned)

    with tempfile.TemporaryDirectory() as tmp:
        path = dt.save(model, Path(tmp) / "counting")
        files = sorted(p.name for p in path.iterdir())
        size = sum(p.stat().st_size for p in path.iterdir())
        print(f"saved {files} ({size / 1024:.0f} KiB) to {path}")
        fresh = dt.load(base_model(), path)
    show("reloaded:", evaluate(fresh, test_ids))
    with dt.disabled(fresh):
        show("delta disabled:", evaluate(fresh, test_ids))
    dt.merge(fresh)
    show("merged:", evaluate(fresh, test_ids))
    plain = dt.unload(fresh, merge=True)
    final = evaluate(plain, test_ids)
    show(f"plain {type(plain).__name__}:", final)
    if abs(final[0] - tuned[0]) > 1e-3 or final[1] != tuned[1] or not tuned[0] < base[0]:
        raise SystemExit("the merged plain model should behave like the adapted one")


if __name__ == "__main__":
    main()
