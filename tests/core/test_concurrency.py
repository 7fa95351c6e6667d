"""One model called from several threads at once, as a server answering requests does
(``core.concurrency``): per-sample calls with different ``adapter_names``, plain calls,
tokens-form deltas (prompt, prefix) and side networks — every call gets what it gets alone."""

from __future__ import annotations

import threading

import pytest
import torch

import deltatune as dt
from helpers import perturb
from zoo import CASES_BY_NAME

LLAMA = CASES_BY_NAME["llama"]
THREADS, ROUNDS = 4, 25


def run_threads(work) -> list[str]:
    """``work(k, i)`` for ``ROUNDS`` rounds in each of ``THREADS`` threads started together;
    the failures (wrong results, errors) as text."""
    failures: list[str] = []
    start = threading.Barrier(THREADS)

    def loop(k: int) -> None:
        start.wait()
        for i in range(ROUNDS):
            try:
                problem = work(k, i)
            except Exception as exc:  # reported: the test fails on it
                problem = f"{type(exc).__name__}: {exc}"
            if problem:
                failures.append(f"thread {k} round {i}: {problem}")

    threads = [threading.Thread(target=loop, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failures


def three_loras():
    model = LLAMA.build()
    for seed, name in enumerate("abc"):
        dt.inject(model, dt.LoraConfig(rank=4), name=name)
        perturb(model, name, scale=0.1, seed=seed)
    return model


def test_concurrent_per_sample_and_plain_calls():
    model = three_loras()
    x = LLAMA.inputs()["input_ids"]
    choices = [["a", "b"], ["b", "c"], ["c", "__base__"], None]  # None: a plain call
    with torch.no_grad():
        expected = [model(x, adapter_names=c).logits for c in choices]

    def work(k: int, i: int) -> str | None:
        j = (k + i) % len(choices)
        with torch.no_grad():
            y = model(x, adapter_names=choices[j]).logits
        return None if torch.allclose(y, expected[j], atol=1e-5) else f"choice {choices[j]}"

    assert run_threads(work) == []
    state = model.__dict__["_deltatune_per_sample"]
    assert state.call is None and state.access._writer is None and not state.access._readers


def test_a_per_sample_context_holds_the_model_while_it_is_open():
    """``per_sample`` around several calls (as ``generate`` makes): another thread's plain call
    waits for it to close, then sees the model's own activation."""
    model = three_loras()
    dt.activate(model, "a")
    x = LLAMA.inputs()["input_ids"]
    with torch.no_grad():
        plain = model(x).logits
        mixed = model(x, adapter_names=["b", "c"]).logits
    inside, outside = threading.Event(), []

    def other() -> None:
        inside.wait()
        with torch.no_grad():
            outside.append(model(x).logits)

    thread = threading.Thread(target=other)
    thread.start()
    with dt.per_sample(model, ["b", "c"]), torch.no_grad():
        inside.set()
        for _ in range(3):
            assert torch.allclose(model(x).logits, mixed, atol=1e-6)
        thread.join(timeout=0.2)
        assert thread.is_alive() and not outside  # waiting for the context to close
    thread.join()
    assert torch.allclose(outside[0], plain, atol=1e-6)


@pytest.mark.parametrize("config", [dt.PromptConfig(num_tokens=3), dt.PrefixConfig(num_tokens=3),
                                    dt.LSTConfig()], ids=lambda c: c.method)
def test_concurrent_plain_calls_with_per_call_state(config):
    """Tokens-form deltas pair hooks per call (thread-local); a side network carries state from
    block to block within a call (such models run one call at a time)."""
    model = LLAMA.build()
    dt.inject(model, config, name="a")
    perturb(model, "a", scale=0.1, seed=1)
    x = LLAMA.inputs()["input_ids"]
    rows = [x[:1], x[1:], x.flip(1)]
    with torch.no_grad():
        expected = [model(r).logits for r in rows]

    def work(k: int, i: int) -> str | None:
        j = (k + i) % len(rows)
        with torch.no_grad():
            y = model(rows[j]).logits
        return None if torch.allclose(y, expected[j], atol=1e-5) else f"input {j}"

    assert run_threads(work) == []


def test_nested_per_sample_in_one_thread_is_refused():
    model = three_loras()
    x = LLAMA.inputs()["input_ids"]
    with dt.per_sample(model, ["a", "b"]), pytest.raises(
            dt.StateError, match="already open on this model in this thread"):
        model(x, adapter_names=["a", "b"])
    block = model.model.layers[1]
    handle = block.register_forward_pre_hook(
        lambda module, args: model(x, adapter_names=["a", "b"]))
    try:  # a forward calling the model again with adapter_names would wait for itself
        with pytest.raises(dt.StateError, match="inside a call of the same model"):
            model(x)
    finally:
        handle.remove()
    with torch.no_grad():  # nothing left held: another thread's call goes through
        done = []
        thread = threading.Thread(target=lambda: done.append(model(x, adapter_names=["a", "c"])))
        thread.start()
        thread.join(timeout=30)
        assert done
