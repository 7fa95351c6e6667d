"""Smoke test of ``benchmarks/memory.py``: a tiny ``--quick`` run, then the JSON's shape.

The benchmark runs in a subprocess (as a user runs it): it forks its memory-measuring children,
which is only safe from a process that has not run torch kernels yet.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from helpers import run_quick_benchmark

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "memory.py"
TRAIN = ["floor", "full_ft", "lora", "lst", "qst", "qst_pool", "sparse", "lisa"]
NF4 = ["qlora", "qst_nf4"]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench")
    return run_quick_benchmark(SCRIPT, out, "memory_cpu.json"), out


def test_every_case_is_timed_and_measured(report: tuple[dict, Path]) -> None:
    data, _ = report
    cases = data["cases"]
    nf4 = [] if set(NF4) <= set(data["skipped"]) else NF4
    assert sorted(cases) == sorted([*TRAIN, *nf4, "infer_base"])
    for name in set(NF4) - set(nf4):
        assert "quant" in data["skipped"][name]
    for name, case in cases.items():
        assert len(case["time"]["samples_s"]) == data["settings"]["steps"], name
        assert all(x > 0 for x in case["time"]["samples_s"]), name
        mem = case["memory"]
        assert "error" not in mem, (name, mem)
        assert isinstance(mem["peak_bytes"], int), name


def test_ratios_to_full_fine_tuning_and_the_base_forward(report: tuple[dict, Path]) -> None:
    cases = report[0]["cases"]

    def median(name: str) -> float:
        return cases[name]["time"]["median_s"]

    def peak(name: str) -> int:
        return cases[name]["memory"]["peak_bytes"]

    for name, case in cases.items():
        r = case["ratios"]
        assert math.isclose(r["time_vs_full_ft"], median(name) / median("full_ft"), rel_tol=1e-9)
        assert math.isclose(r["time_vs_base_forward"], median(name) / median("infer_base"),
                            rel_tol=1e-9)
        if peak("full_ft") > 0:
            assert math.isclose(r["memory_vs_full_ft"], peak(name) / peak("full_ft"),
                                rel_tol=1e-9)
        if peak("infer_base") > 0:
            assert math.isclose(r["memory_vs_base_forward"], peak(name) / peak("infer_base"),
                                rel_tol=1e-9)
    assert cases["full_ft"]["ratios"]["time_vs_full_ft"] == 1.0


def test_every_method_starts_as_its_base(report: tuple[dict, Path]) -> None:
    data, _ = report
    sanity, cases = data["sanity"], data["cases"]
    assert sanity["first_loss_max_abs_diff"] < 1e-4
    if "qst_nf4" in cases:
        assert sanity["first_loss_max_abs_diff_nf4"] < 1e-4
    trainable = {n: c["trainable_params"] for n, c in cases.items() if c["kind"] == "train"}
    assert trainable["floor"] == 0
    assert 0 < trainable["qst_pool"] < trainable["qst"] < trainable["lora"] < trainable["full_ft"]
    assert 0 < trainable["lst"] < trainable["full_ft"]


def test_markdown_table(report: tuple[dict, Path]) -> None:
    data, out = report
    table = (out / "memory_cpu.md").read_text()
    for case in data["cases"].values():
        assert f"| {case['label']} |" in table
    assert "mem × full FT" in table and "mem × base fwd" in table
