"""Smoke test of ``benchmarks/qlora_memory.py``: a tiny ``--quick`` run, then the JSON's shape
and the figures derived from it.

The benchmark runs in a subprocess (as a user runs it): it forks its memory-measuring children,
which is only safe from a process that has not run torch kernels yet.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from helpers import run_quick_benchmark

pytest.importorskip("transformers")
pytest.importorskip("torchao")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "qlora_memory.py"
CASES = ["floor", "full_ft", "lora_bf16", "qlora_nf4", "qlora_int8"]
LORA = ["lora_bf16", "qlora_nf4", "qlora_int8"]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench")
    return run_quick_benchmark(SCRIPT, out, "qlora_memory_cpu.json"), out


def test_every_case_is_measured(report: tuple[dict, Path]) -> None:
    data, _ = report
    assert data["benchmark"] == "qlora_memory"
    assert data["settings"]["dtype"] == "bfloat16"
    assert list(data["cases"]) == CASES
    for name, case in data["cases"].items():
        mem = case["memory"]
        assert "error" not in mem, (name, mem)
        assert isinstance(mem["peak_bytes"], int) and mem["peak_bytes"] > 0, name
        assert mem["peak_bytes"] >= mem["resident_before_step_bytes"] - 4 * 2**20, name
        assert len(case["time"]["samples_s"]) == data["settings"]["steps"], name
        assert case["weight_bytes"] > 0, name


def test_ratios_and_headline_follow_the_peaks(report: tuple[dict, Path]) -> None:
    data, _ = report
    cases = data["cases"]

    def peak(name: str) -> int:
        return cases[name]["memory"]["peak_bytes"]

    for name, case in cases.items():
        for ref in ("full_ft", "lora_bf16"):
            assert math.isclose(case["ratios"][f"memory_vs_{ref}"], peak(name) / peak(ref),
                                rel_tol=1e-9), (name, ref)
    head = data["headline"]
    assert math.isclose(head["qlora_nf4_vs_lora_bf16"], peak("qlora_nf4") / peak("lora_bf16"))
    assert math.isclose(head["qlora_nf4_vs_full_ft"], peak("qlora_nf4") / peak("full_ft"))
    assert math.isclose(head["lora_bf16_vs_full_ft"], peak("lora_bf16") / peak("full_ft"))


def test_the_cases_train_the_same_adapter_on_smaller_bases(report: tuple[dict, Path]) -> None:
    data, _ = report
    cases, sanity = data["cases"], data["sanity"]
    trainable = {n: cases[n]["trainable_params"] for n in LORA}
    assert len(set(trainable.values())) == 1 and trainable["lora_bf16"] > 0
    assert cases["floor"]["trainable_params"] == 0
    assert cases["full_ft"]["trainable_params"] > trainable["lora_bf16"]
    weights = {n: cases[n]["weight_bytes"] for n in CASES}
    assert weights["qlora_nf4"] < weights["qlora_int8"] < weights["lora_bf16"]
    diffs = sanity["first_loss_diff_vs_lora_bf16"]  # the quantized bases' rounding, small
    assert set(diffs) == {"qlora_nf4", "qlora_int8"}
    assert all(abs(v) < 0.1 for v in diffs.values()), diffs


def test_markdown_report(report: tuple[dict, Path]) -> None:
    data, out = report
    table = (out / "qlora_memory_cpu.md").read_text()
    assert table.startswith("# QLoRA memory — cpu")
    for case in data["cases"].values():
        assert f"| {case['label']} |" in table
    assert "Peak training memory: QLoRA (NF4) is" in table
