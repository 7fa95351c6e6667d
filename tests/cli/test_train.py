"""``deltatune train`` end to end on a tiny Llama and tiny data: training, evaluation,
checkpoints, an exact resume, the saved files, config files, causal LM and peft export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune.cli import main
from deltatune.train import data
from deltatune.train.loop import evaluate
from deltatune.train.models import load_tokenizer, load_trained

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"


def _train(model: Path, data_path: Path, out: Path, *extra: str) -> int:
    return main(["train", "--model", str(model), "--data", str(data_path), "--output", str(out),
                 "--no-progress", *extra])


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_train_evaluates_checkpoints_and_saves(tiny_model: Path, cls_data: Path,
                                              tmp_path: Path) -> None:
    out = tmp_path / "run"
    code = _train(tiny_model, cls_data, out, "--method", "lora", "--set", "rank=4",
                  "--steps", "24", "--lr", "1e-2", "--save-every", "8", "--eval-every", "8")
    assert code == 0
    record = json.loads((out / "run.json").read_text())
    assert record["task"] == "classification" and record["label_names"] == ["0", "1"]
    assert record["head"] == ["score.weight"] and record["head_trained"]
    metrics = json.loads((out / "metrics.json").read_text())
    evals = [h for h in metrics["history"] if h["kind"] == "eval"]
    assert [h["step"] for h in evals] == [0, 8, 16, 24]
    assert metrics["final"] == {k: v for k, v in evals[-1].items() if k not in ("kind", "step")}
    assert metrics["final"]["loss"] < evals[0]["loss"]
    assert metrics["final"]["accuracy"] >= 0.65
    assert set(metrics["final"]) == {"accuracy", "f1", "mcc", "loss"}
    assert 0 < metrics["trainable_share"] < 0.5
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000008",
                                                                       "step-0000016"]
    assert (out / "checkpoints" / "step-0000016" / "adapter" / "deltatune_config.json").is_file()
    # what was saved reloads into a fresh base and scores what metrics.json says
    model, tok, _ = load_trained(out)
    assert dt.adapters(model) == {"lora": dt.LoraConfig(rank=4)}
    dev = data.read_table(cls_data / "dev.tsv")
    dataset = data.encode(dev, data.resolve_columns(dev), tok, max_length=256,
                          label_names=["0", "1"])
    dataset.left_pad = True
    again = evaluate(model, dataset, tok.pad_token_id, 64, torch.device("cpu"))
    assert again["accuracy"] == metrics["final"]["accuracy"]
    assert again["loss"] == pytest.approx(metrics["final"]["loss"], rel=1e-5)


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_resume_continues_to_the_same_result(tiny_model: Path, cls_data: Path, tmp_path: Path,
                                             method: str) -> None:
    """N steps in one go == K steps, a stop (as if killed) and --resume: adapters, head,
    metrics and history bit for bit (dropout on, so random states matter; AdaLoRA's
    schedule prunes ranks on the way, so the schedule state and changed shapes matter)."""
    sets = ["--set", "dropout=0.1"] + (["--set", "rank=4", "--set", "target_rank=2"]
                                       if method == "adalora" else ["--set", "rank=4"])
    common = ["--method", method, *sets, "--steps", "16", "--lr", "1e-2", "--save-every", "5",
              "--eval-every", "5", "--max-train", "96", "--max-eval", "24"]
    assert _train(tiny_model, cls_data, tmp_path / "once", *common) == 0
    assert _train(tiny_model, cls_data, tmp_path / "twice", *common, "--stop-after", "10") == 0
    assert not (tmp_path / "twice" / "adapter").exists()
    assert _train(tiny_model, cls_data, tmp_path / "twice", *common, "--resume") == 0
    a = _tensors(tmp_path / "once" / "adapter" / "deltatune_model.safetensors")
    b = _tensors(tmp_path / "twice" / "adapter" / "deltatune_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha, hb = _tensors(tmp_path / "once" / "head.safetensors"), \
        _tensors(tmp_path / "twice" / "head.safetensors")
    assert torch.equal(ha["score.weight"], hb["score.weight"])
    ma = json.loads((tmp_path / "once" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "twice" / "metrics.json").read_text())
    assert ma["final"] == mb["final"] and ma["history"] == mb["history"]
    assert mb["resumed_from"].endswith("step-0000010")
    if method == "adalora":
        saved = json.loads((tmp_path / "once" / "adapter" / "deltatune_config.json")
                           .read_text())
        assert saved["config"]["overrides"], "AdaLoRA should have pruned ranks"


def test_resume_refuses_other_settings(tiny_model: Path, cls_data: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    common = ["--method", "lora", "--steps", "6", "--save-every", "3", "--max-train", "32",
              "--max-eval", "8"]
    assert _train(tiny_model, cls_data, out, *common, "--stop-after", "3") == 0
    assert _train(tiny_model, cls_data, out, *common) == 2
    assert "pass --resume to continue it" in capsys.readouterr().err
    assert _train(tiny_model, cls_data, out, *common, "--lr", "0.5", "--resume") == 2
    assert "other settings" in capsys.readouterr().err


def test_config_file_with_flags_over_it(tiny_model: Path, cls_data: Path, tmp_path: Path) -> None:
    config = tmp_path / "train.yaml"
    config.write_text(f"model: {tiny_model}\ndata: {cls_data}\nsteps: 50\nmax-train: 32\n"
                      "max_eval: 16\ndelta:\n  method: ia3\nlr: 0.02\nplot: false\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--steps", "4", "-o", str(out),
                 "--no-progress"]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["delta"]["method"] == "ia3"
    assert record["settings"]["steps"] == 4 and record["settings"]["lr"] == 0.02
    assert not (out / "curves.png").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("modle: x\n")
    assert main(["train", "--config", str(bad)]) == 2


def test_causal_lm_prompt_completion_with_peft_export(tiny_model: Path, lm_data: Path,
                                                      tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    assert _train(tiny_model, lm_data, out, "--method", "lora", "--set", "rank=4",
                  "--set", "targets=[q_proj, v_proj]", "--steps", "12", "--lr", "1e-2",
                  "--export-peft", "--save-every", "0") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "causal-lm" and metrics["metric"] == "perplexity"
    first = next(h for h in metrics["history"] if h["kind"] == "eval")
    assert metrics["final"]["perplexity"] < first["perplexity"]
    assert not (out / "checkpoints").exists()
    ours, tok, _ = load_trained(out)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    theirs = peft.PeftModel.from_pretrained(base, str(out / "peft")).eval()
    ids = tok(["the movie was good is it good answer :"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits)


def test_dataset_folder_from_datasets(tiny_model: Path, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = {"text": ["good plot", "bad plot", "nice cast", "dull story"] * 4,
            "label": [1, 0, 1, 0] * 4}
    folder = tmp_path / "ds"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                          "validation": datasets.Dataset.from_dict(rows)}).save_to_disk(folder)
    out = tmp_path / "run"
    assert _train(tiny_model, folder, out, "--method", "bitfit", "--set", "add_missing=true",
                  "--steps", "2", "--no-plot") == 0
    record = json.loads((out / "run.json").read_text())
    assert record["train_examples"] == record["eval_examples"] == 16


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(tiny_model: Path, cls_data: Path,
                                               tmp_path: Path) -> None:
    """A real SIGKILL of `python -m deltatune.cli train` mid-run, then --resume."""
    args = ["train", "--model", str(tiny_model), "--data", str(cls_data), "--method", "lora",
            "--set", "dropout=0.1", "--steps", "400", "--save-every", "20", "--eval-every",
            "100", "--keep-checkpoints", "0", "--no-progress", "--lr", "1e-2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "deltatune.cli", *args, "-o", str(killed)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        done = list((killed / "checkpoints").glob("step-*")) \
            if (killed / "checkpoints").is_dir() else []
        if len(done) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "adapter").exists()
    assert main([*args, "-o", str(killed), "--resume"]) == 0
    assert main([*args, "-o", str(tmp_path / "whole")]) == 0
    a = _tensors(killed / "adapter" / "deltatune_model.safetensors")
    b = _tensors(tmp_path / "whole" / "adapter" / "deltatune_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma = json.loads((killed / "metrics.json").read_text())
    mb = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert ma["final"] == mb["final"] and ma["history"] == mb["history"]


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "models" / "deltatune-tiny-llama").is_dir()
                    or not (SHARED / "data" / "sst2_sentence").is_dir(),
                    reason="needs shared/models/deltatune-tiny-llama and shared/data")
def test_sst2_on_the_shared_tiny_llama(tmp_path: Path) -> None:
    """The issue's acceptance run, shortened: trains, evaluates, checkpoints, resumes, saves."""
    model, data_dir = SHARED / "models" / "deltatune-tiny-llama", SHARED / "data" / "sst2_sentence"
    common = ["--method", "lora", "--set", "rank=8", "--steps", "60", "--batch-size", "16",
              "--lr", "2e-3", "--save-every", "20", "--eval-every", "30", "--max-eval", "400"]
    out = tmp_path / "sst2"
    assert _train(model, data_dir, out, *common, "--stop-after", "40") == 0
    assert _train(model, data_dir, out, *common, "--resume", "--export-peft") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "classification" and metrics["steps"] == 60
    assert metrics["final"]["accuracy"] > 0.5
    assert (out / "adapter" / "deltatune_model.safetensors").is_file()
    assert (out / "peft" / "adapter_model.safetensors").is_file()
    tok = load_tokenizer(str(model))
    assert tok.pad_token_id == 1


@pytest.mark.parametrize("task", ["classification", "causal-lm"])
def test_evaluate_scores_the_logits_not_the_models_own_loss(tiny_model: Path, cls_data: Path,
                                                            task: str) -> None:
    """The loss (and perplexity) is the cross-entropy of the logits: equal to the model's own
    loss when that is plain cross-entropy, unchanged when a model adds a term to it (as HF
    peft's AdaLoRA adds its orthogonality regulariser, in eval mode too)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    tok = load_tokenizer(tiny_model)
    table = data.read_table(cls_data / "dev.tsv")
    if task == "classification":
        model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
        model.config.pad_token_id = tok.pad_token_id
        dataset = data.encode(table, data.resolve_columns(table), tok, max_length=64,
                              label_names=["0", "1"])
        dataset.left_pad = True
    else:
        model = AutoModelForCausalLM.from_pretrained(tiny_model)
        columns = data.Columns("causal-lm", text=("sentence",))
        dataset = data.encode(table, columns, tok, max_length=16)
    model.eval()
    with torch.no_grad():
        plain = evaluate(model, dataset, tok.pad_token_id, 8, torch.device("cpu"))
        # the model's own mean loss over the same examples, one example at a time
        own = []
        for example in dataset.examples:
            batch = data.collate([example], tok.pad_token_id, left=dataset.left_pad)
            own.append((model(**batch).loss.item(), int((batch["labels"][:, 1:] != -100).sum())
                        if task == "causal-lm" else 1))
    mean = sum(loss * n for loss, n in own) / sum(n for _, n in own)
    assert plain["loss"] == pytest.approx(mean, rel=1e-4)
    forward = model.forward

    def with_extra_term(*args, **kwargs):
        out = forward(*args, **kwargs)
        if out.loss is not None:
            out.loss = out.loss + 5.0
        return out

    model.forward = with_extra_term
    with torch.no_grad():
        again = evaluate(model, dataset, tok.pad_token_id, 8, torch.device("cpu"))
    assert again == plain
