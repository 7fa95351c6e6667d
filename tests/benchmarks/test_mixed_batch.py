"""Smoke test of ``benchmarks/mixed_batch.py``: a tiny ``--quick`` run, then the JSON's shape.

The benchmark runs in a subprocess (as a user runs it): it forks its memory-measuring children,
which is only safe from a process that has not run torch kernels yet.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from helpers import run_quick_benchmark

pytest.importorskip("transformers")
pytest.importorskip("peft")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "mixed_batch.py"
CASES = ["infer_base", "infer_dt_single", "infer_dt_mixed", "infer_peft_single",
         "infer_peft_mixed"]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench")
    return run_quick_benchmark(SCRIPT, out, "mixed_batch_cpu.json", "--batch", "4"), out


def test_every_case_is_timed_and_measured(report: tuple[dict, Path]) -> None:
    data, _ = report
    cases = data["cases"]
    assert sorted(cases) == sorted(CASES)
    assert data["benchmark"] == "mixed_batch"
    assert data["settings"]["steps"] >= 2 and data["settings"]["batch"] == 4
    for name, case in cases.items():
        assert case["kind"] == "infer", name
        t = case["time"]
        assert len(t["samples_s"]) == data["settings"]["steps"], name
        assert all(x > 0 for x in t["samples_s"]), name
        assert 0 < t["min_s"] <= t["median_s"] <= t["max_s"], name
        mem = case["memory"]
        assert "error" not in mem, (name, mem)
        assert isinstance(mem["peak_bytes"], int), name
    env = data["environment"]
    for key in ("torch", "transformers", "peft", "device_name", "threads", "dtype"):
        assert env[key] is not None, key


def test_ratios_match_the_times(report: tuple[dict, Path]) -> None:
    data, _ = report
    cases = data["cases"]

    def median(name: str) -> float:
        return cases[name]["time"]["median_s"]

    for name, case in cases.items():
        ratios = case["ratios"]
        assert ratios["reference"] == "infer_base"
        assert math.isclose(ratios["time_vs_reference"], median(name) / median("infer_base"),
                            rel_tol=1e-9)
    assert cases["infer_dt_mixed"]["peer"] == "infer_peft_mixed"
    assert cases["infer_dt_single"]["peer"] == "infer_peft_single"
    assert math.isclose(cases["infer_dt_mixed"]["ratios"]["time_vs_peer"],
                        median("infer_dt_mixed") / median("infer_peft_mixed"), rel_tol=1e-9)
    kept = data["throughput_mixed_vs_single"]
    assert math.isclose(kept["deltatune"], median("infer_dt_single") / median("infer_dt_mixed"),
                        rel_tol=1e-9)
    assert math.isclose(kept["peft"], median("infer_peft_single") / median("infer_peft_mixed"),
                        rel_tol=1e-9)
    assert kept["row_names"] == ["a0", "a1", "a2", "a3"]


def test_cases_compute_the_same_thing(report: tuple[dict, Path]) -> None:
    diffs = report[0]["sanity"]["logits_rel_diff"]
    assert diffs["dt_mixed_vs_base"] > 1e-3  # the adapters are not a no-op
    assert diffs["dt_single_vs_base"] > 1e-3
    assert diffs["dt_mixed_vs_rows_alone"] < 1e-5
    assert diffs["dt_mixed_vs_peft_mixed"] < 1e-5
    assert diffs["dt_single_vs_peft_single"] < 1e-5


def test_markdown_table(report: tuple[dict, Path]) -> None:
    data, out = report
    table = (out / "mixed_batch_cpu.md").read_text()
    for case in data["cases"].values():
        assert f"| {case['label']} |" in table
    assert "Throughput kept" in table
