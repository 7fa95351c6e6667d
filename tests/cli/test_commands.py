"""``deltatune compare / merge / export / inspect / demo`` end to end on tiny models and data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import deltatune as dt
from deltatune.cli import main
from deltatune.train.compare import fit_budget
from deltatune.train.models import load_model, load_trained
from deltatune.train.synthetic import Task, TaskFamily

QUIET = ["--no-progress"]


def _train(model: Path, data_path: Path, out: Path, *extra: str) -> Path:
    code = main(["train", "--model", str(model), "--data", str(data_path), "-o", str(out),
                 "--no-progress", "--no-plot", "--save-every", "0", *extra])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def lm_runs(tiny_model: Path, lm_data: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> list[Path]:
    """Two LoRA runs (causal LM) of different ranks and seeds on the same base."""
    root = tmp_path_factory.mktemp("lm-runs")
    return [_train(tiny_model, lm_data, root / f"r{rank}", "--method", "lora", "--set",
                   f"rank={rank}", "--steps", "6", "--lr", "2e-2", "--seed", str(rank),
                   "--max-eval", "20")
            for rank in (2, 4)]


@pytest.fixture(scope="module")
def cls_run(tiny_model: Path, cls_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tiny_model, cls_data, tmp_path_factory.mktemp("cls") / "run", "--method",
                  "lora", "--set", "rank=2", "--steps", "6", "--lr", "2e-2", "--max-eval", "20")


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[5, 9, 12, 7, 3, 20]])


# -------------------------------------------------------------------------------- compare
def test_fit_budget_picks_the_closest_size(tiny_model: Path) -> None:
    model = load_model(str(tiny_model), "causal-lm").model
    config, note = fit_budget(model, dt.LoraConfig(rank=8), 1000)
    sizes = {r: dt.cost(model, dt.LoraConfig(rank=r)).params for r in range(1, 8)}
    assert note == f"rank={config.rank}"
    assert abs(sizes[config.rank] - 1000) == min(abs(v - 1000) for v in sizes.values())
    adapter, note = fit_budget(model, dt.AdapterConfig(), 500)
    assert note.startswith("bottleneck=") and adapter.reduction_factor is None
    assert fit_budget(model, dt.IA3Config(), 500) == (dt.IA3Config(), "fixed size")


def test_compare_at_an_equal_budget(tiny_model: Path, cls_data: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp"
    code = main(["compare", "--model", str(tiny_model), "--data", str(cls_data), "--methods",
                 "lora,ia3,prefix", "--equal-budget", "800", "--steps", "4", "--max-train",
                 "48", "--max-eval", "16", "-o", str(out), *QUIET])
    assert code == 0
    record = json.loads((out / "compare.json").read_text())
    rows = {r["label"]: r for r in record["rows"]}
    assert list(rows) == ["lora", "ia3", "prefix"]
    assert rows["ia3"]["sized"] == "fixed size"
    assert rows["lora"]["sized"].startswith("rank=")
    assert rows["prefix"]["sized"].startswith("num_tokens=")
    for label in ("lora", "prefix"):
        assert abs(rows[label]["delta_params"] - 800) < 400
    for r in rows.values():
        assert 0 <= r["accuracy"] <= 1 and r["seconds_per_step"] > 0
        assert r["trainable"] == r["delta_params"] + 2 * 32  # + the new 2-class head
        assert r["peak_memory_bytes"] is None or r["peak_memory_bytes"] >= 0
    text = capsys.readouterr().out
    assert "trainable" in text and "peak memory" in text and "time/step" in text
    assert (out / "compare.md").read_text().count("\n") > 5
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "lora" / "adapter" / "deltatune_config.json").is_file()


def test_compare_entries_from_files_and_scoped_sets(tiny_model: Path, cls_data: Path,
                                                   tmp_path: Path) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.json"
    a.write_text("method: lora\nlabel: small\nrank: 8\n")
    b.write_text(json.dumps({"method": "lora", "label": "fast", "lr": 0.05}))
    out = tmp_path / "cmp"
    assert main(["compare", "--model", str(tiny_model), "--data", str(cls_data), "--delta",
                 str(a), "--delta", str(b), "--set", "small.rank=2", "--set", "alpha=4",
                 "--steps", "2", "--max-train", "32", "--max-eval", "8", "--no-plot", "-o",
                 str(out), *QUIET]) == 0
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [(r["label"], r["config"]["rank"], r["config"]["alpha"]) for r in rows] == \
        [("small", 2, 4), ("fast", 8, 4)]
    assert main(["compare", "--model", str(tiny_model), "--data", str(cls_data), "--methods",
                 "ia3", "--set", "rank=2", "-o", str(out)]) == 2


def test_compare_checks_every_entry_before_training_any(tiny_model: Path, cls_data: Path,
                                                         tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    """An entry that cannot adapt the model (BitFit on bias-free layers) stops the comparison
    before the first entry trains, naming the entry and how to set its fields; set, it runs."""
    out = tmp_path / "cmp"
    args = ["compare", "--model", str(tiny_model), "--data", str(cls_data), "--methods",
            "lora,bitfit", "--steps", "2", "--max-train", "32", "--max-eval", "8", "--no-plot",
            "-o", str(out), *QUIET]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "bitfit: targets entry" in err and "add_missing=True" in err
    assert "nothing was trained" in err and "--set bitfit.FIELD=VALUE" in err
    assert not out.exists()
    assert main([*args, "--set", "bitfit.add_missing=true"]) == 0
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["lora", "bitfit"]


# ---------------------------------------------------------------------------------- merge
def test_linear_merge_of_loras_is_exact(tiny_model: Path, lm_runs: list[Path],
                                        tmp_path: Path) -> None:
    out = tmp_path / "merged"
    assert main(["merge", *map(str, lm_runs), "--weights", "0.5,0.5", "-o", str(out)]) == 0
    merged, _, record = load_trained(out)
    assert record["algorithm"] == "linear" and record["delta"]["method"] == "lora"
    both = load_model(str(tiny_model), "causal-lm").model
    for i, run in enumerate(lm_runs):
        dt.load(both, run / "adapter", name=f"d{i}")
    dt.activate(both, ["d0", "d1"], weights=[0.5, 0.5])
    torch.testing.assert_close(_logits(merged, IDS), _logits(both, IDS))
    assert not torch.allclose(_logits(merged, IDS), _logits(load_model(
        str(tiny_model), "causal-lm").model, IDS))


def test_ties_merge_into_lora_and_into_a_model(tiny_model: Path, lm_runs: list[Path],
                                               tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    assert main(["merge", *map(str, lm_runs), "--algorithm", "ties", "--set", "density=0.5",
                 "--set", "rank=3", "-o", str(tmp_path / "ties")]) == 0
    merged, _, _ = load_trained(tmp_path / "ties")
    assert {d.factors()[0].shape[0] for layer in dt.core.lifecycle.delta_layers(merged).values()
            for d in layer.deltas.values()} == {3}
    assert main(["merge", *map(str, lm_runs), "--algorithm", "dare_linear", "--set",
                 "density=0.5", "--into", "model", "-o", str(tmp_path / "full")]) == 0
    full = AutoModelForCausalLM.from_pretrained(str(tmp_path / "full"))
    base = load_model(str(tiny_model), "causal-lm").model
    assert not torch.allclose(_logits(full, IDS), _logits(base, IDS))


def test_merge_errors_say_what_to_do(tiny_model: Path, cls_run: Path, lm_runs: list[Path],
                                     tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["merge", str(cls_run), str(cls_run), "-o", str(tmp_path / "m")]) == 2
    assert "--head-from" in capsys.readouterr().err
    assert main(["merge", *map(str, lm_runs), "--set", "denisty=0.5", "-o",
                 str(tmp_path / "m")]) == 2
    assert "known: ['density'" in capsys.readouterr().err
    assert main(["merge", str(cls_run), str(lm_runs[0]), "-o", str(tmp_path / "m")]) == 2
    assert "different tasks" in capsys.readouterr().err


# --------------------------------------------------------------------------------- export
def test_export_folds_the_delta_and_the_head_into_a_plain_model(cls_run: Path,
                                                                tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "hf"
    assert main(["export", str(cls_run), "-o", str(out)]) == 0
    plain = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    assert not any("lora" in n for n, _ in plain.named_parameters())
    ours, _, _ = load_trained(cls_run)
    torch.testing.assert_close(_logits(plain, IDS), _logits(ours, IDS))
    assert (out / "tokenizer.json").is_file()


def test_export_peft_carries_the_classification_head(tiny_model: Path, cls_run: Path,
                                                     tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "peft"
    assert main(["export", str(cls_run), "--format", "peft", "-o", str(out)]) == 0
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["modules_to_save"] == ["score"] and meta["task_type"] == "SEQ_CLS"
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_model), num_labels=2)
    base.config.pad_token_id = 0
    theirs = peft.PeftModel.from_pretrained(base, str(out)).eval()
    ours, _, _ = load_trained(cls_run)
    torch.testing.assert_close(_logits(theirs, IDS), _logits(ours, IDS))


def test_export_peft_and_a_non_mergeable_delta(tiny_model: Path, lm_data: Path,
                                               lm_runs: list[Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(lm_runs[0]), "--format", "peft", "-o", str(tmp_path / "p")]) == 0
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["r"] == 2
    prompt = _train(tiny_model, lm_data, tmp_path / "prompt", "--method", "prompt", "--set",
                    "num_tokens=2", "--steps", "2", "--max-eval", "4")
    assert main(["export", str(prompt), "-o", str(tmp_path / "hf")]) == 2
    assert "--format peft" in capsys.readouterr().err


# -------------------------------------------------------------------------------- inspect
def test_inspect_a_run_and_a_preview(tiny_model: Path, cls_run: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(cls_run)]) == 0
    text = capsys.readouterr().out
    assert "q_proj (Linear)" in text and "◆ lora (lora)" in text
    assert "score (Linear)" in text and "◇ new head" in text
    assert "… as above" in text  # block 1 is modified like block 0
    assert "model.layers.1" in text and "modified modules" in text
    assert main(["inspect", "--model", str(tiny_model), "--method", "ia3", "--depth",
                 "2"]) == 0
    text = capsys.readouterr().out
    assert "+ ia3 injected" in text and "layers (ModuleList)" in text
    assert "q_proj" not in text  # below --depth 2
    assert main(["inspect", "--model", str(tiny_model)]) == 0  # alone: all of it trains
    assert "trainable (100.0000%)" in capsys.readouterr().out
    assert main(["inspect"]) == 2


# ----------------------------------------------------------------------------------- demo
def test_synthetic_task_family() -> None:
    family = TaskFamily(symbols=10, length=4, shifts=3, held_out=Task("reverse", 1))
    assert family.held_out not in family.pretraining_tasks
    assert len(family.pretraining_tasks) == 5 and family.vocab_size == 10 + 6 + 1
    ids, labels = family.sample(Task("reverse", 1), 3, torch.Generator().manual_seed(0))
    x, y = ids[:, 1:5], ids[:, 6:]
    assert torch.equal(y, (x.flip(1) + 1) % 10)
    assert (labels[:, :6] == -100).all() and torch.equal(labels[:, 6:], y)
    assert (ids[:, 0] == family.task_token(Task("reverse", 1))).all()
    assert (ids[:, 5] == family.sep).all()
    a = family.dataset(family.pretraining_tasks, 20, seed=3)
    assert a.examples == family.dataset(family.pretraining_tasks, 20, seed=3).examples


def test_demo_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--quick", "-o", str(tmp_path), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "frozen pretrained base" in text and "same model from scratch" in text
    assert "LoRA" in text and f"plot: {tmp_path / 'demo.png'}" in text
    record = json.loads((tmp_path / "demo.json").read_text())
    assert [r["kind"] for r in record["rows"]] == ["base", "delta", "delta", "delta", "scratch"]
    assert record["rows"][0]["trainable"] == 0
    assert record["rows"][-1]["trainable"] == record["total_params"]
    assert all(0 <= r["accuracy"] <= 1 for r in record["rows"])
    assert (tmp_path / "demo.png").read_bytes()[:4] == b"\x89PNG"
