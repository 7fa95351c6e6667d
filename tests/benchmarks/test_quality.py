"""End to end test of ``benchmarks/quality.py`` on a tiny slice: a tiny Llama built from a
``LlamaConfig`` (with a word-level tokenizer made here), a few dozen rows in the layout of
``shared/data``, two methods plus a peft twin, one seed. Checks the report's structure, that
every figure comes from the run (the metric on the test rows, the learning rate chosen on the
validation split), that a method that cannot run becomes a row saying why, and that running
again resumes instead of recomputing."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import random
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "quality.py"
WORDS = ["good", "great", "fine", "bad", "awful", "poor", "the", "a", "movie", "film", "plot",
         "story", "is", "was", "very", "not", "king", "lord", "thou", "art", "sir", "news",
         "market", "game", "team", "city"]


@pytest.fixture(scope="module")
def quality() -> ModuleType:
    spec = importlib.util.spec_from_file_location("quality_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _write_data(root: Path) -> None:
    rng = random.Random(0)
    (root / "sst2_sentence").mkdir(parents=True)
    for split, n in (("train", 48), ("test", 20)):
        rows = []
        for _ in range(n):
            label = rng.randint(0, 1)
            word = "good" if label else "bad"
            rows.append(f"{label}\t{word} {_sentence(rng, rng.randint(2, 8))}")
        (root / "sst2_sentence" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    (root / "tinyshakespeare").mkdir()
    lines = [_sentence(rng, rng.randint(3, 9)) for _ in range(400)]
    (root / "tinyshakespeare" / "input.txt").write_text("\n".join(lines) + "\n")


def _write_model(root: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<pad>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>", bos_token="<eos>")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, pad_token_id=1, eos_token_id=0,
                         bos_token_id=0, tie_word_embeddings=True)
    import torch

    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root)
    tok.save_pretrained(root)


@pytest.fixture()
def setup(tmp_path: Path, quality: ModuleType, monkeypatch: pytest.MonkeyPatch):
    _write_data(tmp_path / "data")
    _write_model(tmp_path / "model")
    tiny = [dataclasses.replace(t, steps=6, val_size=8 if t.kind == "classification" else 4,
                                max_length=16 if t.kind == "causal-lm" else t.max_length,
                                rows="all", lr_scale=1.0)
            for t in quality.TASKS if t.name in ("sst2", "shakespeare")]
    # a screen task that takes its rates from sst2 (the layout of rte / cola)
    tiny.append(dataclasses.replace(tiny[-1] if tiny[-1].name == "sst2" else tiny[0],
                                    name="sst2b", steps=4, rows="screen", lr_from="sst2"))
    monkeypatch.setattr(quality, "TASKS", tiny)
    methods = quality.methods_mod
    broken = methods.MethodSpec("broken", "delta", "lora", {"targets": ["no_such_module"]})
    monkeypatch.setattr(methods, "NAMED", [*methods.NAMED, broken])
    args = ["--model", str(tmp_path / "model"), "--data-dir", str(tmp_path / "data"),
            "--out", str(tmp_path / "out"), "--tasks", "sst2,shakespeare,sst2b",
            "--methods", "base,head,lora-qv,peft:lora-qv,broken", "--seeds", "1",
            "--workers", "0", "--no-progress", "--peft-tasks", "sst2"]
    return tmp_path / "out", args


def test_pipeline_end_to_end_and_resume(setup, quality, monkeypatch):
    out, args = setup
    monkeypatch.setattr(quality.cells_mod, "_fresh_process", True)  # as in a new worker
    record = quality.main(args)
    rows = {(s["task"], s["label"]): s for s in record["summaries"]}
    assert set(rows) == {("sst2", "head"), ("sst2", "lora-qv"), ("sst2", "peft:lora-qv"),
                         ("sst2", "broken"), ("shakespeare", "head"),
                         ("shakespeare", "lora-qv"), ("shakespeare", "broken"),
                         ("shakespeare", "base"),  # the untrained base: causal-LM only
                         ("sst2b", "head")}  # a screen task: the screen rows only
    # a method that cannot run is a row that says why
    for task in ("sst2", "shakespeare"):
        assert rows[(task, "broken")]["status"] == "failed"
        assert "no_such_module" in rows[(task, "broken")]["error"]
    # the untrained base: one evaluation on the test blocks, nothing trained; training moves
    # the perplexity away from it
    base = rows[("shakespeare", "base")]
    base_cell = json.loads((out / "cells" / "shakespeare__base.json").read_text())
    (base_run,) = base_cell["runs"]
    assert base["status"] == "ok" and base_cell["sweep"] == [] and base_run["steps"] == 0
    assert base_run["trainable"] == 0 and base_run["split"] == "test"
    assert math.isclose(base["mean"], math.exp(base_run["metrics"]["loss"]), rel_tol=1e-9)
    assert base["mean"] != rows[("shakespeare", "lora-qv")]["mean"]
    # the screen task takes sst2's rate (its sweep, scored on sst2's validation split) and
    # makes its own seeds
    b_cell = json.loads((out / "cells" / "sst2b__head.json").read_text())
    a_cell = json.loads((out / "cells" / "sst2__head.json").read_text())
    assert b_cell["lr_task"] == "sst2" and b_cell["sweep"] == a_cell["sweep"]
    assert b_cell["best_lr"] == a_cell["best_lr"] and b_cell["runs"][0]["steps"] == 4
    assert not list((out / "runs" / "sst2b" / "head").glob("val-*"))
    # memory: the first cell of the process probes cleanly, the others say why they do not
    probes = [json.loads(p.read_text()).get("memory") for p in (out / "cells").glob("*.json")]
    probes = [m for m in probes if m is not None]
    clean = [m for m in probes if m["peak_memory_bytes"] is not None]
    assert len(probes) == 8 and len(clean) == 1
    assert all(m["peak_memory_bytes"] > 0 and m["steps"] == 3 for m in clean)
    assert all("first training" in m["why"] or "no_such_module" in m["why"]
               for m in probes if m["peak_memory_bytes"] is None)
    for (task, label), s in rows.items():
        if label in ("broken", "base") or task == "sst2b":
            continue
        assert s["status"] == "ok", s
        cell = json.loads((out / "cells" / f"{task}__{label.replace(':', '_')}.json").read_text())
        # the learning rate is the best one on the validation split; the grid grew past an
        # end only while that end won, by one grid step at a time, at most twice
        scored = [x for x in cell["sweep"] if x["val"] is not None]
        assert 3 <= len(cell["sweep"]) <= 5 and scored
        pick = max if s["metric"] == "accuracy" else min
        assert cell["best_lr"] == pick(scored, key=lambda x: x["val"])["lr"]
        lrs = [x["lr"] for x in cell["sweep"]]
        ratio = lrs[1] / lrs[0]
        for k in range(3, len(lrs)):
            before = [x for x in cell["sweep"][:k] if x["val"] is not None]
            won = pick(before, key=lambda x: x["val"])["lr"]
            assert won in (max(lrs[:k]), min(lrs[:k]))
            assert math.isclose(lrs[k], won * ratio, rel_tol=1e-2) or math.isclose(
                lrs[k], won / ratio, rel_tol=1e-2)
        if len(lrs) < 5:  # the grid stopped growing: the winner is inside it
            assert min(lrs) < cell["best_lr"] < max(lrs), lrs
        if s["kind"] == "peft":  # the same runs as its twin: the twin's learning rate
            twin = json.loads((out / "cells" / f"{task}__{s['twin']}.json").read_text())
            assert cell["lr_from"] == s["twin"] and cell["best_lr"] == twin["best_lr"]
            assert cell["sweep"] == twin["sweep"]
        (run,) = cell["runs"]
        assert run["split"] == "test" and run["lr"] == cell["best_lr"] and run["steps"] == 6
        metrics = run["metrics"]
        assert s["mean"] == metrics[s["metric"]] and s["std"] == 0.0
        if task == "sst2":  # an accuracy over the 20 test rows
            assert abs(20 * metrics["accuracy"] - round(20 * metrics["accuracy"])) < 1e-9
        else:
            assert math.isclose(metrics["perplexity"], math.exp(metrics["loss"]), rel_tol=1e-9)
        assert run["seconds_per_step"] > 0 and s["trainable"] > 0
    # parameter counts: the classification head is counted apart, the same for every row
    assert rows[("sst2", "lora-qv")]["head_params"] == 2 * 32
    assert rows[("sst2", "lora-qv")]["delta_params"] == rows[("sst2", "peft:lora-qv")][
        "delta_params"] > 0
    assert rows[("sst2", "head")]["trainable"] == 2 * 32
    text = (out / "quality.md").read_text()
    assert "| lora-qv |" in text and "deltatune against HF peft" in text
    assert (out / "quality.png").stat().st_size > 0
    # running again resumes: nothing is recomputed, the figures are unchanged
    again = quality.main(args)
    assert json.loads((out / "invocations.jsonl").read_text().splitlines()[-1])[
        "cells_run"] == 0
    assert [s.get("mean") for s in again["summaries"]] == [
        s.get("mean") for s in record["summaries"]]
    # a row whose settings change is run again (and its peft twin's cell, whose rate follows
    # it), never read back from the old runs; the other rows are left as they were
    methods = quality.methods_mod
    monkeypatch.setattr(methods, "NAMED", [
        dataclasses.replace(m, options={**m.options, "rank": 4}) if m.label == "lora-qv" else m
        for m in methods.NAMED])
    third = quality.main(args)
    history = [json.loads(line) for line in (out / "invocations.jsonl").read_text().splitlines()]
    assert history[-1]["cells_run"] == 3  # lora-qv on both tasks, peft:lora-qv on sst2
    after = {(s["task"], s["label"]): s for s in third["summaries"]}
    assert after[("sst2", "lora-qv")]["delta_params"] * 2 == rows[("sst2", "lora-qv")][
        "delta_params"]
    assert after[("sst2", "head")] == rows[("sst2", "head")]


def test_unknown_method_or_task_is_a_clear_error(quality):
    with pytest.raises(SystemExit, match="unknown method"):
        quality.select_methods("lora-qv,nope")
    with pytest.raises(SystemExit, match="unknown tasks"):
        quality.main(["--tasks", "nope", "--estimate"])


@pytest.mark.parametrize(("peak", "expected"), [
    (4e-3, [1e-3, 4e-3, 1.6e-2]),  # inside the grid: no extension
    (0.3, [1e-3, 4e-3, 1.6e-2, 6.4e-2, 0.256]),  # past the top: grows twice, then stops
    (6.4e-2, [1e-3, 4e-3, 1.6e-2, 6.4e-2, 0.256]),  # one step up wins, the next one loses
    (1e-4, [1e-3, 4e-3, 1.6e-2, 2.5e-4, 6.25e-5]),  # below the bottom: grows downwards
    (None, [1e-3, 4e-3, 1.6e-2, 6.4e-2]),  # the next rate up diverges: stop there
])
def test_sweep_grows_past_a_winning_end(quality, monkeypatch, peak, expected):
    """The grid extends by its own ratio past an end that wins, at most twice, and stops
    as soon as the winner is inside (or the next rate fails)."""
    cells = quality.cells_mod
    seen = []

    def fake_run(spec, method, p, *, lr, seed, steps, split):
        seen.append(lr)
        assert split == "val" and seed == 0
        if peak is None:  # higher is better up to 1.6e-2; above it the loss diverges
            if lr > 2e-2:
                return {"status": "failed", "error": "loss is nan"}
            return {"status": "ok", "metrics": {"accuracy": lr}}
        return {"status": "ok", "metrics": {"accuracy": -abs(math.log(lr / peak))}}

    monkeypatch.setattr(cells, "cached_run", fake_run)
    spec = next(t for t in quality.TASKS if t.name == "sst2")
    method = next(m for m in quality.methods_mod.all_methods() if m.label == "lora-qv")
    protocol = cells.Protocol(model="m", data_dir="d", out="o")
    entries = cells.sweep(spec, method, protocol)
    assert [e["lr"] for e in entries] == pytest.approx(expected) == seen
    best = cells.best_of(entries, "accuracy")["lr"]
    if peak is None:
        assert best == 1.6e-2 and entries[-1]["status"] == "failed"
    elif peak in (4e-3, 6.4e-2):
        assert best == pytest.approx(peak)


def test_every_cell_runs_in_a_new_process_and_measures_memory(setup, quality):
    """Through the worker pool each cell starts in a new process (forked from a server that
    imported the libraries once), so every cell's memory probe is its process's first
    training, unlike ``--workers 0`` above where only the first cell's is."""
    out, args = setup
    args = [a for a in args if a not in ("--workers", "0")]
    args[args.index("--tasks") + 1] = "shakespeare"
    args[args.index("--methods") + 1] = "head,lora-qv"
    record = quality.main([*args, "--workers", "1"])
    assert {s["label"] for s in record["summaries"]} == {"head", "lora-qv"}
    for s in record["summaries"]:
        assert s["status"] == "ok" and s["peak_memory_bytes"] > 0
        cell = json.loads((out / "cells" / f"shakespeare__{s['label']}.json").read_text())
        assert cell["memory"]["steps"] == quality.cells_mod.PROBE_STEPS
    assert "peak memory" in (out / "quality.md").read_text()


def test_screen_tasks_run_the_screen_rows_unless_all_rows(quality):
    """SST-2, RTE and CoLA run the baselines and LoRA by default; ``--all-rows`` runs every
    row there too (and changes nothing else)."""
    rows = {m.label: m for m in quality.methods_mod.all_methods()}
    default = {t.name: t for t in quality.select_tasks(quality.parse_args([]))}
    every = {t.name: t for t in quality.select_tasks(quality.parse_args(["--all-rows"]))}
    peft, extra = set(quality.PEFT_TASKS), set(quality.EXTRA_TASKS)
    for name in ("sst2", "rte", "cola"):
        chosen = {m for m in rows if quality.on_task(default[name], rows[m], peft, extra)}
        assert chosen == set(quality.SCREEN_ROWS)
        assert quality.on_task(every[name], rows["dora"], peft, extra)
        assert every[name] == dataclasses.replace(default[name], rows="all")
    assert default["rte"].lr_from == default["cola"].lr_from == "sst2"
    assert every["agnews"] == default["agnews"]
